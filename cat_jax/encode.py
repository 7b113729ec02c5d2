r"""Encodes images with a CAT checkpoint: latents (npz or array_record) and reconstructions.

  python -m cat_jax.encode --checkpoint /tmp/cat_demo --input photos/ --out latents/ --level 16x
  python -m cat_jax.encode --checkpoint DIR --input photos/ --out latents/ --level auto --manifest scores.jsonl
  python -m cat_jax.encode --checkpoint DIR --input photo.png --out latents/ --level auto --scorer jpeg
  python -m cat_jax.encode --checkpoint demo --input photos/ --out latents/ --level auto --target-psnr 30

Images are encoded at their native size (the tokenizer pads each to a multiple of 32 and crops the result back),
or resized on request: ``--image-size N`` (shorter side to N, centre crop N x N, as in training and the paper's
evaluation) or ``--max-side N`` (longer side at most N, aspect kept). ``index.jsonl`` records each image's
``original_size`` and ``encoded_size`` (height, width); ``python -m cat_jax.decode`` writes the original size back.

``--level``: a level in either spelling (index 0 / 1 / 2 or factor 8 / 16 / 32, ``8x`` / ``16x`` / ``32x``) or
``auto``. Auto alone uses the tokenizer's calibrated default (``auto_levels`` in its config.json, ``Tokenizer.
auto_assigner``: the shipped ``demo``'s quality predictor prices what more tokens buy each image; a threshold rule's
thresholds, which ``--thresholds`` replaces); or each image's level comes from
``--manifest`` (ids are paths relative to the input folder, as ``python -m cat_jax.score --path`` writes them), from
``--scorer jpeg|mse`` with ``--thresholds LOW,HIGH`` (default: the inputs' score terciles, kept in
``thresholds.json`` so a rerun uses the same; mse is this checkpoint's own 32x reconstruction error), or from
``--target-psnr DB`` (the coarsest level whose reconstruction reaches it). An input the manifest lacks (its scoring
failed, or it is new) is skipped and recorded with that reason (``--strict`` refuses the run instead).

Real folders: a file that cannot be read or used (truncated, corrupt, smaller than 32 pixels a side, too large) is
skipped and recorded in ``index.jsonl`` with the reason (checked before the manifest, so a bad file the manifest
lacks is recorded as bad); the exit status is 1 when any was skipped (``--on-bad-image raise``
stops at the first one instead, status 2). Rerunning the same command skips every image already encoded and
retries the skipped ones; in ``index.jsonl`` the last row of an id is the current one. Images are processed a
chunk at a time, with a progress bar (rate, ETA). ``--out`` may be any etils.epath location (gs://...) with
``--format npz``.

Outputs in ``--out``:
  ``latents/<id>.npz``         (npz format) ``latent`` (H/f, W/f, C) float32, ``level``, ``factor``, ``image_size``
                               (the encoded (H, W));
  ``latents.array_record``     (array_record format) one record per image: the same npz, bytes (a resumed run
                               writes ``latents-<n>.array_record``; each row names its ``record_file``);
  ``reconstructions/<id>.png`` unless ``--no-reconstructions``;
  ``index.jsonl``              one line per image: id, level, factor, tokens, latent shape, original_size,
                               encoded_size, files; or id and error;
  ``tokenizer.json``           which tokenizer encoded them (``python -m cat_jax.decode`` reads it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import warnings
from typing import Sequence

import numpy as np

from cat_jax import cli
from cat_jax import levels as L
from cat_jax import storage

ON_BAD_IMAGE = ("skip", "raise")


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cat_jax.encode", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="the tokenizer: a training workdir (or <workdir>/checkpoints/<step>), a tokenizer folder "
                      "(save_pretrained, convert sd_vae/release) or a shipped name (demo)")
  p.add_argument("--input", required=True, help="an image file or a folder of images (searched recursively)")
  p.add_argument("--out", required=True, help="output folder (local or gs://...)")
  p.add_argument("--level", default="16x", help="0/1/2 or 8x/16x/32x (8/16/32), or auto (default 16x)")
  p.add_argument("--manifest", help="score manifest for --level auto")
  p.add_argument("--scorer", choices=("jpeg", "mse"), help="complexity scorer for --level auto")
  p.add_argument("--thresholds", help="LOW,HIGH score thresholds for --scorer (default: terciles of the inputs), or "
                 "instead of the calibrated ones of the tokenizer's own --level auto")
  p.add_argument("--target-psnr", type=float, help="--level auto: each image at the coarsest level whose "
                 "reconstruction reaches this PSNR (dB), 8x when none does (exact; one or two extra reconstructions)")
  p.add_argument("--format", choices=("npz", "array_record"), default="npz")
  cli.add_sizing_arguments(p)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--chunk", type=int, default=256, help="images decoded and encoded at a time (fewer when they "
                 f"hold more than {MAX_CHUNK_PIXELS / 1e6:.0f} megapixels)")
  p.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default="skip",
                 help="skip (record in index.jsonl, exit status 1) or raise (stop at the first)")
  p.add_argument("--strict", action="store_true", help="with --manifest: refuse the run when the manifest lacks an "
                 "input (default: skip it and record why in index.jsonl, exit status 1)")
  p.add_argument("--no-reconstructions", action="store_true")
  p.add_argument("--no-keep-code", action="store_true",
                 help="every latent is the encoder's own, decoded by the learned path (as a generative model trained "
                      "on them samples); default: an image the learned path reconstructs worse than the model's DCT "
                      "patch code keeps the code (index.jsonl: \"code_only\": true)")
  p.add_argument("--no-ema", action="store_true", help="raw parameters instead of the EMA")
  p.add_argument("--labels", choices=("none", "subfolder"), default="none",
                 help="subfolder: each image's class is its top-level folder (ImageNet layout), stored as 'label' "
                 "(classes in sorted order in classes.json), for python -m cat_jax.train_dit (needs --image-size)")
  return p


# -- inputs ---------------------------------------------------------------------------------------------------------
def list_inputs(path: str) -> list[tuple[str, pathlib.Path]]:
  """(id, file) of every image: a single file, or a folder searched recursively (ids relative to it)."""
  from cat_jax.data.sources import FolderSource

  p = pathlib.Path(path).expanduser()
  if p.is_file():
    return [(p.name, p)]
  if p.is_dir():
    return [(i, p / i) for i in FolderSource(str(p), "all").ids()]
  raise FileNotFoundError(f"--input {path} is neither an image file nor a folder")


def load_image(path: pathlib.Path, sizing) -> tuple[np.ndarray, tuple[int, int]]:
  """The model input of one file at ``sizing`` (``preprocess.Sizing``) and its original (height, width); raises
  BadImageError (unreadable, corrupt, truncated, tiny or huge)."""
  from cat_jax.data.preprocess import BadImageError, load_sized

  try:
    data = path.read_bytes()
  except OSError as e:
    raise BadImageError(str(path), f"cannot read file ({type(e).__name__}: {e.strerror or e})") from e
  return load_sized(data, sizing, path=str(path))


# Images held in memory at a time (decoded, float32): a chunk of --chunk files ends early at this many pixels, so a
# folder of large photos at their native size cannot fill the memory (a larger image goes alone).
MAX_CHUNK_PIXELS = 1 << 26


def _pixels(path: pathlib.Path, sizing) -> int:
  """The pixels ``load_image`` will give for ``path`` (from its header; 0 for a file it cannot read)."""
  from PIL import Image

  try:
    with Image.open(path) as img:
      h, w = sizing.sized_hw((img.height, img.width))
  except Exception:  # noqa: BLE001 (a bad file is recorded with its reason when it is loaded)
    return 0
  return h * w


def _chunks(items: list, size: int, sizing, max_pixels: int | None = None):
  """``items`` (id, path) in chunks of at most ``size`` files and ``max_pixels`` pixels (default
  ``MAX_CHUNK_PIXELS``; at least one file)."""
  max_pixels = MAX_CHUNK_PIXELS if max_pixels is None else max_pixels
  chunk, pixels = [], 0
  for item in items:
    n = _pixels(item[1], sizing)
    if chunk and (len(chunk) >= size or pixels + n > max_pixels):
      yield chunk
      chunk, pixels = [], 0
    chunk.append(item)
    pixels += n
  if chunk:
    yield chunk


# -- levels ---------------------------------------------------------------------------------------------------------
def _scorer(args, tok):
  from cat_jax.complexity import scorers

  if args.scorer == "jpeg":
    return scorers.JpegScorer(image_size=None)
  return scorers.MseScorer.of_tokenizer(tok, image_size=None)


def _thresholds(args, out, scorer, files, sizing) -> tuple[float, float]:
  """--thresholds, else those of an earlier run of this --out, else the terciles of every input's score."""
  from cat_jax.complexity import thresholds as complexity_thresholds
  from cat_jax.complexity.assign import score_images
  from cat_jax.data.preprocess import BadImageError

  if args.thresholds:
    return complexity_thresholds.parse_thresholds(args.thresholds)
  saved = out / "thresholds.json"
  if saved.exists():
    return tuple(json.loads(saved.read_text())["thresholds"])
  scores = []
  for image_id, path in files:
    try:
      scores += score_images(scorer, [image_id], [load_image(path, sizing)[0]])
    except BadImageError:
      continue  # recorded by the encoding pass
  if not scores:
    raise ValueError("no readable image to derive --thresholds from")
  thresholds = tuple(float(t) for t in complexity_thresholds.quantile_thresholds(scores))
  storage.write_text(saved, json.dumps({"method": args.scorer, "thresholds": thresholds}) + "\n")
  return thresholds


def _level_assigner(args, tok, out, files, sizing):
  """``--level`` as a ``LevelAssigner``: one level, a manifest's levels (every input must be listed) or a scorer's."""
  from cat_jax.complexity.assign import LevelAssigner

  if args.level.strip().lower() != "auto":
    if args.manifest or args.scorer or args.target_psnr is not None:
      raise ValueError("--manifest, --scorer and --target-psnr only apply with --level auto")
    try:
      return LevelAssigner(level=args.level)
    except ValueError as e:
      raise ValueError(f"--level must be auto or a level: {e}") from None
  given = sum((bool(args.manifest), bool(args.scorer), args.target_psnr is not None))
  if given > 1:
    raise ValueError("--level auto takes one of --manifest PATH, --scorer jpeg|mse or --target-psnr DB")
  if given == 0:  # the tokenizer's own calibrated default
    if tok.auto_levels is None:
      raise ValueError("--level auto needs --manifest PATH, --scorer jpeg|mse or --target-psnr DB: this tokenizer "
                       "ships no calibrated default (auto_levels in its config.json)")
    from cat_jax.complexity.thresholds import parse_thresholds
    return tok.auto_assigner(thresholds=parse_thresholds(args.thresholds) if args.thresholds else None)
  if args.target_psnr is not None:
    return LevelAssigner(target_psnr=args.target_psnr)
  if args.manifest:
    assign = LevelAssigner(manifest=args.manifest)
    if args.strict:
      assign.require([i for i, _ in files], f"the manifest {args.manifest}")
    return assign
  scorer = _scorer(args, tok)
  return LevelAssigner(scorer=scorer, thresholds=_thresholds(args, out, scorer, files, sizing))


def _describe_levels(args) -> str:
  """What ``--level`` and its companions choose, in words (a command's first lines)."""
  if args.level.strip().lower() != "auto":
    return f"every image at {args.level}"
  if args.manifest:
    return f"auto, from the manifest {args.manifest}"
  if args.scorer:
    return f"auto, from {args.scorer} scores" + (f" at thresholds {args.thresholds}" if args.thresholds else "")
  if args.target_psnr is not None:
    return f"auto, the coarsest level reaching {args.target_psnr:g} dB"
  return "auto, the tokenizer's calibrated default"


@functools.lru_cache(maxsize=4)
def _manifest_failures(path: str) -> dict[str, str]:
  """{id: error} of the items a score manifest records as failed."""
  from cat_jax.complexity.manifest import read_manifest

  return {i: str(r["error"]) for i, r in read_manifest(path).items() if "error" in r and "level" not in r}


def _missing_reason(manifest: str, image_id: str) -> str:
  """Why a readable input has no level in ``manifest``: its recorded scoring failure, or that it is not listed."""
  failure = _manifest_failures(manifest).get(image_id)
  if failure is not None:
    return f"its scoring failed in the manifest {manifest} ({failure}): rescore it (score --retry-failures) or pass a "\
           "fixed --level"
  return f"not in the manifest {manifest} (a file new since it was scored): score it, or pass a fixed --level"


def _labels(args, out, files):
  """id -> class index (None without --labels): the sorted top-level folder names, kept in classes.json."""
  if getattr(args, "labels", "none") == "none":
    return lambda image_id: None
  flat = [i for i, _ in files if "/" not in i]
  if flat:
    raise ValueError(f"--labels subfolder needs every image inside a class folder; {len(flat)} are not, "
                     f"e.g. {flat[:3]}")
  saved = out / "classes.json"
  classes = json.loads(saved.read_text()) if saved.exists() else sorted({i.split("/")[0] for i, _ in files})
  storage.write_text(saved, json.dumps(classes) + "\n")
  index = {name: k for k, name in enumerate(classes)}

  def label_of(image_id):
    name = image_id.split("/")[0]
    if name not in index:
      raise ValueError(f"{image_id}: class folder {name!r} is not in {saved} (classes of the first run)")
    return index[name]

  return label_of


# -- the command ----------------------------------------------------------------------------------------------------
def _record_tokenizer(out, args, tok) -> None:
  """``out/tokenizer.json``: which tokenizer encoded the latents (``python -m cat_jax.decode`` reads it); a rerun
  into the same ``out`` must use the same one."""
  checkpoint = os.path.abspath(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
  info = {"checkpoint": checkpoint, "use_ema": not args.no_ema, "step": tok.step}
  from cat_jax.data.latents import TOKENIZER_FILE

  path = out / TOKENIZER_FILE
  if path.exists():
    before = json.loads(path.read_text())
    if before != info:
      raise ValueError(f"{out} holds latents of another tokenizer ({before}); use another --out, or the same "
                       "--checkpoint (and step) to continue it")
    return
  storage.write_text(path, json.dumps(info) + "\n")


def encode_folder(args, tok, out, files, sizing) -> dict:
  """Encodes every file not yet encoded in ``out``; returns the run's counts."""
  import tqdm

  from cat_jax.data.latents import LatentWriter, read_index
  from cat_jax.data.preprocess import BadImageError

  done = {i for i, row in read_index(out).items() if "error" not in row}
  todo = [(i, p) for i, p in files if i not in done]
  label_of = _labels(args, out, files)
  level_of = _level_assigner(args, tok, out, files, sizing)
  counts = {"encoded": 0, "failed": 0, "already": len(files) - len(todo), "levels": [0] * L.NUM_LEVELS,
            "tokens": 0, "missed_target": 0}
  writer = LatentWriter(out, None, file_format=args.format,
                        reconstructions=not args.no_reconstructions)
  bar = tqdm.tqdm(total=len(todo), unit="img", desc="encode", dynamic_ncols=True, file=sys.stderr,
                  mininterval=1.0 if sys.stderr.isatty() else 30.0)
  try:
    for chunk in _chunks(todo, max(1, args.chunk), sizing):
      ids, images, originals = [], [], []
      for image_id, path in chunk:
        try:
          image, original = load_image(path, sizing)
        except BadImageError as e:
          if args.on_bad_image == "raise":
            raise
          writer.failed(image_id, e.reason)
          counts["failed"] += 1
          continue
        if level_of.manifest is not None and image_id not in level_of.manifest:
          writer.failed(image_id, _missing_reason(args.manifest, image_id))
          counts["failed"] += 1
          continue
        images.append(image)
        originals.append(original)
        ids.append(image_id)
      if ids:
        with warnings.catch_warnings():  # counted and reported once at the end
          warnings.filterwarnings("ignore", ".*reach the quality target")
          latents = tok.encode(images, level_of, ids=ids, keep_code=False if args.no_keep_code else None)
        missed = latents.missed_target if latents.missed_target is not None else np.zeros(len(ids), bool)
        counts["missed_target"] += int(missed.sum())
        recons = tok.decode(latents) if writer.reconstructions else [None] * len(ids)
        for image_id, latent, level, recon, code_only, image, original, miss in zip(
            ids, latents.values, latents.levels, recons, latents.code_only_flags(), images, originals, missed):
          writer.encoded(image_id, latent, int(level), recon, label_of(image_id), code_only=bool(code_only),
                         missed_target=bool(miss),
                         original_size=original, encoded_size=image.shape[:2],
                         resized=None if original == image.shape[:2] else "image_size" if sizing.image_size
                         else "max_side")
          counts["levels"][int(level)] += 1
          counts["tokens"] += int(latent.shape[0] * latent.shape[1])
        counts["encoded"] += len(ids)
      writer.flush()
      bar.update(len(chunk))
      bar.set_postfix(encoded=counts["encoded"], skipped=counts["failed"], refresh=False)
  finally:
    bar.close()
    writer.close()
  return counts


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from cat_jax.data.preprocess import BadImageError, describe_sizes

  try:
    from cat_jax.tokenizer import load_tokenizer

    files = list_inputs(args.input)
    sizing = cli.sizing(args)
    if args.labels == "subfolder" and sizing.image_size is None:
      raise ValueError("--labels subfolder writes a DiT training set, whose latents need one size: pass --image-size "
                       "N (the DiT config's data.image_size, e.g. 256)")
    print(f"encode: {args.input}: {describe_sizes([p for _, p in files])}; {sizing.describe()}; levels: "
          f"{_describe_levels(args)}",
          file=sys.stderr, flush=True)
    tok = load_tokenizer(args.checkpoint, use_ema=not args.no_ema, batch_size=args.batch_size)
    out = storage.as_path(os.path.expanduser(args.out) if storage.is_local(args.out) else args.out)
    out.mkdir(parents=True, exist_ok=True)
    _record_tokenizer(out, args, tok)
    counts = encode_folder(args, tok, out, files, sizing)
  except BadImageError as e:
    print(f"error: {e} (--on-bad-image raise; rerun to continue after fixing or removing it)", file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = counts["encoded"]
  mix = "/".join(str(c) for c in counts["levels"])
  print(f"encoded {n} images ({'/'.join(L.level_name(l) for l in range(L.NUM_LEVELS))}: {mix}, mean tokens "
        f"{counts['tokens'] / max(n, 1):.1f}) from step {tok.step} into {out}"
        + (f"; {counts['already']} already encoded" if counts["already"] else ""))
  if counts["missed_target"]:
    print(f"WARNING: {counts['missed_target']} of {n} images reach --target-psnr {args.target_psnr:g} dB at no level: "
          f"they are at 8x, the closest ('missed_target' in {out}/index.jsonl)", file=sys.stderr)
  if counts["failed"]:
    print(f"skipped {counts['failed']} files that could not be used (bad, unreadable, or without a level in the "
          "manifest); each is "
          f"in {out}/index.jsonl with the reason "
          "(rerun to retry them)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
