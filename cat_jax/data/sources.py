"""Random-access image sources.

A source has ``__len__``, ``__getitem__(i) -> dict`` and ``ids() -> list[str]``. Each
record holds:

  ``'id'``       str, stable and unique within the source (the key of score manifests);
  ``'image'``    the image as **encoded bytes** (JPEG / PNG / WebP / BMP ... as stored).
                 Decoding happens in the grain map (``cat_jax.data.preprocess``), so it runs
                 in the worker processes; use ``preprocess.decode_image`` for an array;
  ``'caption'``  str, when the source has one (optional key).

``ids()`` lists every id without reading any image (level bucketing needs them all).
Sources: ``get_source('embedded' | 'folder' | 'chartqa' | 'tfds:<name>', split, **kwargs)``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from cat_jax.data.embedded import EmbeddedSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@runtime_checkable
class Source(Protocol):
  """What the pipelines need from a source."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


def source_ids(source: Source) -> list[str]:
  """All ids of ``source`` in index order (``source.ids()`` when it has it, else by reading)."""
  if hasattr(source, "ids"):
    ids = list(source.ids())
  else:
    ids = [str(source[i]["id"]) for i in range(len(source))]
  if len(ids) != len(source):
    raise ValueError(f"{source!r}: ids() returned {len(ids)} ids for {len(source)} records")
  if len(set(ids)) != len(ids):
    raise ValueError(f"{source!r}: ids are not unique")
  return ids


def source_labels(source: Source, n: int) -> np.ndarray:
  """Class of the first ``n`` images: the record's 'label' (TFDS label_key) or the embedded dataset's kind index."""
  from cat_jax.data.embedded import KIND_NAMES

  if hasattr(source, "kind"):
    return np.array([KIND_NAMES.index(source.kind(i).name) for i in range(n)], np.int32)
  first = source[0]
  if "label" not in first:
    raise ValueError(f"{source!r} gives no 'label': pass data.source_kwargs.label_key (TFDS), or encode a class "
                     "folder with python -m cat_jax.encode --labels subfolder and set data.latents")
  return np.array([int(source[i]["label"]) for i in range(n)], np.int32)


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _load_captions(captions_file: str, root: str) -> dict[str, str]:
  """Captions keyed by path relative to ``root`` (with '/' separators).

  Formats: ``.jsonl`` (one object a line with 'caption' and one of 'path' / 'file' /
  'file_name' / 'image'), ``.json`` (an object {relative path: caption}), or any other
  extension as text lines ``relative/path<TAB>caption``.
  """
  if not os.path.isfile(captions_file):
    raise FileNotFoundError(f"captions file {captions_file} does not exist")
  captions: dict[str, str] = {}
  if captions_file.endswith(".json"):
    with open(captions_file, encoding="utf-8") as f:
      data = json.load(f)
    if not isinstance(data, dict):
      raise ValueError(f"{captions_file}: a .json captions file must hold an object "
                       "{relative path: caption}")
    items = data.items()
  else:
    items = []
    with open(captions_file, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line.strip():
          continue
        if captions_file.endswith(".jsonl"):
          rec = json.loads(line)
          key = next((rec[k] for k in ("path", "file", "file_name", "image") if k in rec), None)
          if key is None or "caption" not in rec:
            raise ValueError(f"{captions_file}:{n}: needs 'caption' and 'path' (or 'file', "
                             f"'file_name', 'image'), got keys {sorted(rec)}")
          items.append((key, rec["caption"]))
        else:
          if "\t" not in line:
            raise ValueError(f"{captions_file}:{n}: expected 'relative/path<TAB>caption'")
          items.append(tuple(line.split("\t", 1)))
  for key, caption in items:
    key = str(key).replace(os.sep, "/")
    if os.path.isabs(key):
      key = os.path.relpath(key, root).replace(os.sep, "/")
    captions[key] = str(caption)
  return captions


class FolderSource:
  """Every image under a folder, recursively (jpg, jpeg, png, webp, bmp; any case).

  Ids are paths relative to the folder, '/'-separated, sorted. If ``path/<split>`` is a
  folder it is used; otherwise ``split`` must be 'train' or 'all' and the whole folder is
  the split.

  Args:
    path: the folder.
    split: subfolder to use when it exists.
    captions_file: optional captions (see ``_load_captions`` for formats); relative
      paths resolve against the folder.
  """

  def __init__(self, path: str, split: str = "train", *, captions_file: str | None = None):
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"image folder {path!r} does not exist. Point data.path at a folder of "
          f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images (searched recursively).")
    if split and os.path.isdir(os.path.join(path, split)):
      path = os.path.join(path, split)
    elif split not in (None, "", "train", "all"):
      raise FileNotFoundError(
          f"image folder {path!r} has no {split!r} subfolder; create {path}/{split} or use "
          "split='train' / 'all' for the whole folder.")
    self.root = path
    files = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
      dirnames.sort()
      for name in filenames:
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
          files.append(os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/"))
    files.sort()
    if not files:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {path!r}")
    self._files = files
    self._captions: dict[str, str] = {}
    if captions_file:
      cf = captions_file if os.path.isabs(captions_file) else os.path.join(path, captions_file)
      if not os.path.isfile(cf) and os.path.isfile(captions_file):
        cf = captions_file
      self._captions = _load_captions(cf, path)

  def __len__(self) -> int:
    return len(self._files)

  def ids(self) -> list[str]:
    return list(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    rel = self._files[index]
    record = {"id": rel, "image": _read_bytes(os.path.join(self.root, rel)),
              "path": os.path.join(self.root, rel)}
    if rel in self._captions:
      record["caption"] = self._captions[rel]
    return record

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, {len(self)} images)"


_CHARTQA_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
_CHART_TYPES = {"v_bar": "vertical bar chart", "h_bar": "horizontal bar chart",
                "line": "line chart", "pie": "pie chart"}


class ChartQASource:
  """ChartQA from a local copy of its release (github.com/vis-nlp/ChartQA, or the full
  version with annotations at huggingface.co/datasets/ahmed-masry/ChartQA).

  ``path`` is the ``ChartQA Dataset`` folder (or its parent) holding ``train/``, ``val/``,
  ``test/``, each with ``png/`` and optionally ``annotations/``. Ids are
  ``chartqa/<split>/<file name>``; captions are written from the annotations (chart type
  and title) when they exist.
  """

  def __init__(self, path: str, split: str = "train"):
    if split not in _CHARTQA_SPLITS:
      raise ValueError(f"ChartQA split must be one of {sorted(_CHARTQA_SPLITS)}, got {split!r}")
    sub = _CHARTQA_SPLITS[split]
    path = os.path.expanduser(str(path))
    candidates = [path, os.path.join(path, "ChartQA Dataset"), os.path.join(path, "ChartQA_Dataset")]
    root = next((c for c in candidates if os.path.isdir(os.path.join(c, sub, "png"))), None)
    if root is None:
      raise FileNotFoundError(
          f"ChartQA not found under {path!r} (looked for {sub}/png/ in {candidates}). Download "
          "the release from https://huggingface.co/datasets/ahmed-masry/ChartQA (or the "
          "'ChartQA Dataset' folder of https://github.com/vis-nlp/ChartQA) and pass the folder "
          "that holds train/ val/ test/.")
    self.split = sub
    self._png_dir = os.path.join(root, sub, "png")
    self._ann_dir = os.path.join(root, sub, "annotations")
    self._files = sorted(f for f in os.listdir(self._png_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not self._files:
      raise FileNotFoundError(f"no chart images in {self._png_dir}")

  def __len__(self) -> int:
    return len(self._files)

  def ids(self) -> list[str]:
    return [f"chartqa/{self.split}/{f}" for f in self._files]

  def _caption(self, name: str) -> str | None:
    ann_path = os.path.join(self._ann_dir, os.path.splitext(name)[0] + ".json")
    if not os.path.isfile(ann_path):
      return None
    try:
      with open(ann_path, encoding="utf-8") as f:
        ann = json.load(f)
      kind = _CHART_TYPES.get(ann.get("type", ""), "chart")
      title = ((ann.get("general_figure_info") or {}).get("title") or {}).get("text")
      return f"A {kind} titled '{title.strip()}'." if title else f"A {kind}."
    except (OSError, ValueError, AttributeError):
      return None  # Annotations are noisy; a missing caption is fine.

  def __getitem__(self, index: int) -> dict[str, Any]:
    name = self._files[index]
    record = {"id": f"chartqa/{self.split}/{name}",
              "image": _read_bytes(os.path.join(self._png_dir, name)),
              "path": os.path.join(self._png_dir, name)}
    caption = self._caption(name)
    if caption:
      record["caption"] = caption
    return record

  def __repr__(self) -> str:
    return f"ChartQASource({self._png_dir!r}, {len(self)} images)"


def _tfds_prepare_instructions(name: str, builder: Any, data_dir: str | None) -> str:
  dd = f" --data_dir={data_dir}" if data_dir else ""
  lines = [f"TFDS dataset {name!r} is not prepared in "
           f"{data_dir or '~/tensorflow_datasets (default data_dir)'}. No network is used here, "
           "so prepare it once (on a machine with network access if needed):"]
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    lines.append("  1. This dataset needs a manual download into the manual_dir "
                 f"(default <data_dir>/downloads/manual):\n     " + manual.strip().replace("\n", "\n     "))
    lines.append(f"  2. tfds build {name}{dd} --manual_dir=<that folder> --file_format=array_record")
  else:
    lines.append(f"  tfds build {name}{dd} --file_format=array_record")
  lines.append("Random access (tfds.data_source) needs the array_record file format.")
  return "\n".join(lines)


class TfdsSource:
  """A TFDS dataset read through ``tfds.data_source`` (random access, array_record).

  Images stay encoded (``tfds.decode.SkipDecoding``). Ids are ``<name>/<split>/<index>``
  (stable for a given prepared dataset version), plus the dataset's own file name
  feature as ``'file_name'`` when it has one. ``image_key`` picks the image feature; ``label_key`` (e.g. 'label')
  adds the class index as ``'label'``.
  """

  def __init__(self, name: str, split: str = "train", *, data_dir: str | None = None,
               image_key: str = "image", caption_key: str | None = None, label_key: str | None = None):
    import tensorflow_datasets as tfds  # Imported lazily: slow, and only needed here.

    self.name = name
    self.split = split
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # Unknown names, bad configs.
      raise ValueError(f"unknown TFDS dataset {name!r}: {e}") from e
    if not builder.is_prepared():
      raise FileNotFoundError(_tfds_prepare_instructions(name, builder, data_dir))
    features = builder.info.features
    if image_key not in features:
      raise ValueError(f"TFDS dataset {name!r} has no {image_key!r} feature; features: "
                       f"{sorted(features.keys())}. Pass image_key=...")
    self._image_key = image_key
    self._caption_key = caption_key
    if label_key is not None and label_key not in features:
      raise ValueError(f"TFDS dataset {name!r} has no {label_key!r} feature; features: {sorted(features.keys())}")
    self._label_key = label_key
    self._file_key = next((k for k in ("file_name", "image/filename") if k in features), None)
    try:
      self._ds = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False,
          decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:
      raise FileNotFoundError(
          f"could not open TFDS {name!r} split {split!r} for random access ({e}). "
          + _tfds_prepare_instructions(name, builder, data_dir)) from e

  def __len__(self) -> int:
    return len(self._ds)

  def ids(self) -> list[str]:
    return [f"{self.name}/{self.split}/{i}" for i in range(len(self._ds))]

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._ds[index]
    record = {"id": f"{self.name}/{self.split}/{index}", "image": bytes(ex[self._image_key])}
    if self._file_key is not None:
      fn = ex[self._file_key]
      record["file_name"] = fn.decode() if isinstance(fn, bytes) else str(fn)
    if self._caption_key is not None:
      cap = ex[self._caption_key]
      record["caption"] = cap.decode() if isinstance(cap, bytes) else str(cap)
    if self._label_key is not None:
      record["label"] = int(ex[self._label_key])
    return record

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} images)"


class Subset:
  """Some records of a source, in their order (keeps ids, built-in levels and kinds)."""

  def __init__(self, source, indices: Sequence[int]):
    self._source, self._indices = source, list(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    if not 0 <= int(index) < len(self._indices):
      raise IndexError(index)
    return self._source[self._indices[int(index)]]

  def ids(self) -> list[str]:
    every = source_ids(self._source)
    return [every[i] for i in self._indices]

  def __getattr__(self, name):  # builtin_levels, kind: forwarded when the source has them
    attr = getattr(self._source, name)
    if name == "builtin_levels":
      return lambda: {i: attr()[i] for i in self.ids()}
    if name == "kind":
      return lambda k: attr(self._indices[k])
    return attr

  def __repr__(self) -> str:
    return f"{self._source!r}[{len(self._indices)} records]"


def get_source(name: str, split: str = "train", **kwargs: Any) -> Source:
  """Builds a source by name.

  Args:
    name: 'embedded' (kwargs: num_images, seed, image_size), 'heldout' (photos the embedded dataset never
      uses; kwargs: crops_per_image, image_size), 'folder' (path,
      captions_file), 'chartqa' (path), or 'tfds:<dataset>' such as 'tfds:imagenet2012',
      'tfds:coco/2017', 'tfds:celeb_a' (data_dir, image_key, caption_key).
    split: 'train', 'validation', 'test' (TFDS split strings such as 'train[:1%]' too).
    **kwargs: source-specific options above.

  Returns:
    A random-access source whose records hold encoded image bytes.
  """
  if name == "embedded":
    return EmbeddedSource(split, **kwargs)
  if name == "heldout":
    from cat_jax.data.heldout import HeldoutSource
    return HeldoutSource(split, **kwargs)
  if name == "folder":
    if "path" not in kwargs:
      raise ValueError("the 'folder' source needs path=<folder of images>")
    return FolderSource(kwargs.pop("path"), split, **kwargs)
  if name == "chartqa":
    if "path" not in kwargs:
      raise ValueError("the 'chartqa' source needs path=<ChartQA Dataset folder>")
    return ChartQASource(kwargs.pop("path"), split, **kwargs)
  if name.startswith("tfds:"):
    return TfdsSource(name[len("tfds:"):], split, **kwargs)
  raise ValueError(f"unknown source {name!r}; use 'embedded', 'heldout', 'folder', 'chartqa' or "
                   "'tfds:<name>' (e.g. 'tfds:imagenet2012').")
