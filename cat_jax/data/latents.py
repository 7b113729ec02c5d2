"""Latent files (``python -m cat_jax.encode`` output) for the DiT: writing, reading, statistics, a grain pipeline.

``LatentWriter`` writes them (the encode command and ``encode_source``, which ``train_dit`` uses); ``read_index`` is the
one reader of ``index.jsonl``.

``LatentDataset(dir)`` reads ``index.jsonl`` (one row per image: id, level, label, record file) and the records
(array_record or npz). ``LatentStatistics`` are the per-level, per-channel mean and standard deviation of the
training latents (the DiT trains on ``(z - mean) / std``, samples go back as ``z * std + mean``) and the class x level
counts (what ``--level auto`` samples from), stored as JSON with the model.

``make_latent_train_iterator`` is the image pipeline's order (``cat_jax.data.pipeline``) over latents: one global
order of single-level batches for any process count (the same seeded level schedule), each process taking its
positions of every global batch (``grain.experimental.ElasticIterator``), checkpointable and restorable onto another
process count.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from cat_jax import levels as L
from cat_jax import storage
from cat_jax.data.pipeline import LevelSchedule, int_proportions, process_index_and_count

STATISTICS_FILE = "latent_stats.json"
TOKENIZER_FILE = "tokenizer.json"  # in an encode folder: which tokenizer made the latents (decode reads it)
# np.load parses the npz header with ast.literal_eval, which CPython 3.11 does not make safe across threads (grain's
# read threads): it failed the demo with "SystemError: AST constructor recursion depth mismatch". Reads are tiny.
_NPZ_LOCK = threading.Lock()


# -- writing (python -m cat_jax.encode, train_dit) --------------------------------------------------------------------------------------------------------
def _npz_bytes(latent: np.ndarray, level: int, image_size, label: int | None = None) -> bytes:
  """``image_size``: the side of a square image (the training pipeline's) or an (H, W) pair."""
  buf = io.BytesIO()
  extra = {} if label is None else {"label": np.int32(label)}
  np.savez(buf, latent=latent.astype(np.float32), level=np.int32(level), factor=np.int32(L.FACTORS[level]),
           image_size=np.asarray(image_size, np.int32), **extra)
  return buf.getvalue()


def read_index(out) -> dict[str, dict]:
  """The current row of every id in ``out/index.jsonl`` (the last one written)."""
  rows = {}
  for line in storage.read_lines(storage.as_path(out) / "index.jsonl"):
    if line.strip():
      row = json.loads(line)
      rows[row["id"]] = row
  return rows


def _record_file(out) -> str:
  """latents.array_record, or latents-<n>.array_record when earlier runs wrote the first ones."""
  name, n = "latents.array_record", 0
  while (out / name).exists():
    n += 1
    name = f"latents-{n}.array_record"
  return name


class LatentWriter:
  """Writes encoded images into ``out``: each latent (``latents/<id>.npz``, or a record of ``latents.array_record``
  with ``file_format='array_record'``), its reconstruction PNG if given, and its ``index.jsonl`` row.

  ``image_size``: the side every image was resized and cropped to (the training pipeline's), or None when each image
  has its own size (``encoded``'s ``encoded_size``)."""

  def __init__(self, out, image_size: int | None, *, file_format: str = "npz", reconstructions: bool = True):
    self.out, self.image_size = out, image_size
    self.reconstructions = reconstructions
    self.records = None
    if file_format == "array_record":
      if not storage.is_local(out):
        raise ValueError("--format array_record writes a local file: use a local --out, or --format npz")
      from array_record.python.array_record_module import ArrayRecordWriter
      self.record_file = _record_file(out)
      self.records = ArrayRecordWriter(os.fspath(out / self.record_file), "group_size:1")
      self.count = 0
    self.index = storage.AppendFile(out / "index.jsonl")

  def encoded(self, image_id: str, latent: np.ndarray, level: int, recon: np.ndarray | None,
              label: int | None = None, code_only: bool = False, *, original_size: Sequence[int] | None = None,
              encoded_size: Sequence[int] | None = None, resized: str | None = None,
              missed_target: bool = False) -> None:
    """``code_only``: the latent is the DCT patch code, decoded as that code alone (``Latents.code_only``).
    ``missed_target``: no level brought the image to the quality target asked for (``Latents.missed_target``).
    ``original_size`` / ``encoded_size``: the file's (height, width) and the encoded image's (the tokenizer pads it to
    a multiple of 32 and crops it back); ``resized``: how the one became the other when they differ ('image_size':
    shorter side and centre crop, 'max_side': aspect kept), for ``python -m cat_jax.decode`` to restore it."""
    from cat_jax.data.preprocess import from_model_range

    sizes = {}
    if encoded_size is not None:
      sizes = {"encoded_size": [int(v) for v in encoded_size],
               "original_size": [int(v) for v in (original_size if original_size is not None else encoded_size)],
               **({"resized": resized} if resized else {})}
    row = {"id": image_id, "level": level, "factor": L.FACTORS[level],
           "tokens": int(latent.shape[0] * latent.shape[1]), "latent_shape": list(latent.shape),
           **({"image_size": self.image_size} if self.image_size is not None else {}), **sizes,
           **({} if label is None else {"label": int(label)}), **({"code_only": True} if code_only else {}),
           **({"missed_target": True} if missed_target else {})}
    data = _npz_bytes(latent, level, self.image_size if encoded_size is None else encoded_size, label)
    if self.records is not None:
      self.records.write(data)
      row.update(record_file=self.record_file, record=self.count)
      self.count += 1
    else:
      row["latent_file"] = f"latents/{image_id}.npz"
      storage.write_bytes(self.out / row["latent_file"], data)
    if recon is not None:
      row["reconstruction"] = f"reconstructions/{os.path.splitext(image_id)[0]}.png"
      storage.write_png(self.out / row["reconstruction"], from_model_range(recon))
    self.index.write(json.dumps(row) + "\n")

  def failed(self, image_id: str, reason: str) -> None:
    self.index.write(json.dumps({"id": image_id, "error": reason}) + "\n")

  def flush(self) -> None:
    self.index.flush()

  def close(self) -> None:
    self.index.close()
    if self.records is not None:
      self.records.close()



def encode_source(tok, source, out, *, levels, labels, image_size: int, chunk: int = 256) -> int:
  """Encodes every image of a ``cat_jax.data`` source into ``out/latents.array_record`` + ``index.jsonl``, each
  with its level (``levels[i]``) and class (``labels[i]``); the training set of ``python -m cat_jax.train_dit``.
  Returns the number encoded. Unreadable images raise (a source, unlike a folder, is expected to be clean)."""
  from cat_jax.data.preprocess import PreprocessConfig, preprocess

  out = storage.as_path(out)
  out.mkdir(parents=True, exist_ok=True)
  writer = LatentWriter(out, image_size, file_format="array_record", reconstructions=False)
  config = PreprocessConfig(image_size=image_size, on_bad_image="raise")
  try:
    for start in range(0, len(source), chunk):
      indices = range(start, min(start + chunk, len(source)))
      records = [source[i] for i in indices]
      images = [preprocess(r["image"], config, path=str(r["id"]), rng=None) for r in records]
      # The encoder's own latents (no per-image patch-code bit): what a generative model trained on them
      # produces is decoded by the network.
      latents = tok.encode(images, [int(levels[i]) for i in indices], keep_code=False)
      for i, r, latent, level in zip(indices, records, latents.values, latents.levels):
        writer.encoded(str(r["id"]), latent, int(level), None, int(labels[i]))
      writer.flush()
  finally:
    writer.close()
  return len(source)



# -- reading ----------------------------------------------------------------------------------------------------------
class LatentDataset:
  """Random access to encoded latents: ``[i]`` -> {"latent" (h, w, C) float32, "level", "label", "id"}.

  ``labelled=False`` reads latents without class labels too (``python -m cat_jax.decode``); ``"label"`` is then
  absent."""

  def __init__(self, path: str | os.PathLike, *, labelled: bool = True):
    self.path = storage.as_path(os.fspath(path))
    if not (self.path / "index.jsonl").exists():
      raise FileNotFoundError(f"{self.path} has no index.jsonl: encode latents first with python -m cat_jax.encode "
                              "--format array_record --labels subfolder (or let train_dit encode them)")
    rows = [r for r in read_index(self.path).values() if "error" not in r]
    if not rows:
      raise ValueError(f"{self.path}/index.jsonl lists no encoded image")
    unlabelled = [r["id"] for r in rows if "label" not in r]
    if unlabelled and labelled:
      raise ValueError(f"{len(unlabelled)} latents in {self.path} have no class label (e.g. {unlabelled[:3]}); "
                       "encode with python -m cat_jax.encode --labels subfolder")
    self.rows = rows
    self.levels = np.array([int(r["level"]) for r in rows], np.int32)
    self.labels = np.array([int(r.get("label", -1)) for r in rows], np.int32)
    self._readers: dict[str, Any] = {}

  def __len__(self) -> int:
    return len(self.rows)

  def _bytes(self, row: dict) -> bytes:
    if "record_file" in row:
      name = row["record_file"]
      if name not in self._readers:
        self._readers[name] = grain.sources.ArrayRecordDataSource([os.fspath(self.path / name)])
      return self._readers[name][int(row["record"])]
    return (self.path / row["latent_file"]).read_bytes()

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self.rows[int(index)]
    data = self._bytes(row)
    with _NPZ_LOCK, np.load(io.BytesIO(data)) as npz:
      latent = np.asarray(npz["latent"], np.float32)
    item = {"latent": latent, "level": np.int32(row["level"]), "id": row["id"],
            "code_only": bool(row.get("code_only", False))}
    if "label" in row:
      item["label"] = np.int32(row["label"])
    return item

  def __getstate__(self):  # grain may pickle the dataset: readers are reopened lazily
    return dict(self.__dict__, _readers={})

  def __setstate__(self, state):
    self.__dict__.update(state)


@dataclasses.dataclass
class LatentStatistics:
  """Per-level channel means / stds of the training latents and the per-class level counts."""

  mean: dict[int, list[float]]        # level -> (C,)
  std: dict[int, list[float]]         # level -> (C,)
  count: dict[int, int]               # level -> latents
  class_level_counts: list[list[int]]  # [class][level]

  @classmethod
  def measure(cls, dataset: LatentDataset, num_classes: int) -> "LatentStatistics":
    if dataset.labels.max() >= num_classes or dataset.labels.min() < 0:
      raise ValueError(f"latent labels span [{dataset.labels.min()}, {dataset.labels.max()}] but the model has "
                       f"num_classes={num_classes}")
    sums: dict[int, list] = {}
    for i in range(len(dataset)):
      item = dataset[i]
      z = item["latent"].reshape(-1, item["latent"].shape[-1]).astype(np.float64)
      s = sums.setdefault(int(item["level"]), [0, 0.0, 0.0])
      s[0] += z.shape[0]
      s[1] = s[1] + z.sum(0)
      s[2] = s[2] + np.square(z).sum(0)
    mean, std, count = {}, {}, {}
    for level, (n, total, squares) in sorted(sums.items()):
      m = total / n
      mean[level] = m.tolist()
      std[level] = np.sqrt(np.maximum(squares / n - m * m, 1e-12)).tolist()
      count[level] = int(np.sum(dataset.levels == level))
    counts = np.zeros((num_classes, L.NUM_LEVELS), np.int64)
    np.add.at(counts, (dataset.labels, dataset.levels), 1)
    return cls(mean, std, count, counts.tolist())

  def save(self, directory) -> None:
    storage.write_text(storage.as_path(os.fspath(directory)) / STATISTICS_FILE,
                       json.dumps(dataclasses.asdict(self), indent=1) + "\n")

  @classmethod
  def load(cls, directory) -> "LatentStatistics":
    path = storage.as_path(os.fspath(directory)) / STATISTICS_FILE
    if not path.exists():
      raise FileNotFoundError(f"no {STATISTICS_FILE} in {directory}: is it a python -m cat_jax.train_dit workdir?")
    raw = json.loads(path.read_text())
    as_levels = lambda d: {int(k): v for k, v in d.items()}
    return cls(as_levels(raw["mean"]), as_levels(raw["std"]), as_levels(raw["count"]), raw["class_level_counts"])

  def _check(self, level: int) -> None:
    if level not in self.mean:
      raise ValueError(f"no training latents at level {L.level_name(level)}: the model was trained on levels "
                       f"{[L.level_name(l) for l in sorted(self.mean)]}")

  def normalize(self, latents: np.ndarray, level: int) -> np.ndarray:
    self._check(level)
    return ((latents - np.asarray(self.mean[level], np.float32)) / np.asarray(self.std[level], np.float32)
            ).astype(np.float32)

  def denormalize(self, latents: np.ndarray, level: int) -> np.ndarray:
    self._check(level)
    return (np.asarray(latents, np.float32) * np.asarray(self.std[level], np.float32)
            + np.asarray(self.mean[level], np.float32))

  def level_distribution(self, label: int) -> np.ndarray:
    """P(level | class) in the training set; raises for a class the training set never had."""
    if not 0 <= label < len(self.class_level_counts):
      raise ValueError(f"class {label} is out of range [0, {len(self.class_level_counts)})")
    counts = np.asarray(self.class_level_counts[label], np.float64)
    if counts.sum() == 0:
      raise ValueError(f"class {label} has no training latents, so --level auto has no distribution for it; "
                       "pass a level")
    return counts / counts.sum()


class _LatentElement:
  """map fn: global element e -> the latent at position e mod B of global batch e // B (as the image pipeline)."""

  def __init__(self, dataset: LatentDataset, streams, levels, schedule: LevelSchedule, global_batch: int):
    self._dataset, self._streams, self._levels = dataset, streams, levels
    self._schedule, self._global_batch = schedule, global_batch

  def __call__(self, element: int) -> dict[str, Any]:
    k, i = divmod(int(element), self._global_batch)
    d, j = self._schedule[k]
    return self._dataset[int(self._streams[d][j * self._global_batch + i])]


def _collate(batch: dict[str, Any]) -> dict[str, Any]:
  levels = np.asarray(batch["level"])
  if levels.min() != levels.max():
    raise RuntimeError(f"a latent batch mixes levels {sorted(set(levels.tolist()))}")
  return {"latent": batch["latent"], "label": batch["label"], "level": np.int32(levels[0]),
          "id": np.asarray(batch["id"])}


def make_latent_train_iterator(dataset: LatentDataset, *, batch_size: int, seed: int = 0,
                               process_index: int | None = None, process_count: int | None = None,
                               read_threads: int = 2) -> grain.DatasetIterator:
  """Endless, level-bucketed, checkpointable batches {"latent" (B, h, w, C), "label" (B,), "level", "id"};
  ``batch_size`` per process; levels drawn in proportion to their latent counts."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  pi, pc = process_index_and_count(process_index, process_count)
  counts = np.bincount(dataset.levels, minlength=L.NUM_LEVELS)
  active = [l for l in range(L.NUM_LEVELS) if counts[l]]
  streams = [grain.MapDataset.source([int(i) for i in np.flatnonzero(dataset.levels == l)])
             .shuffle(seed=seed * 7919 + l).repeat() for l in active]
  schedule = LevelSchedule(int_proportions([float(counts[l]) for l in active]), seed)
  global_batch = batch_size * pc
  elements = grain.MapDataset.range(sys.maxsize).map(
      _LatentElement(dataset, streams, active, schedule, global_batch))
  elastic = grain.experimental.ElasticIterator(
      elements, global_batch, grain.sharding.ShardOptions(shard_index=pi, shard_count=pc),
      read_options=grain.ReadOptions(num_threads=max(1, read_threads), prefetch_buffer_size=2))
  return iter(elastic.map(_collate))
