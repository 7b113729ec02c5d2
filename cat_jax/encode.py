r"""Encodes images with a CAT checkpoint: latents (npz or array_record) and reconstructions.

  python -m cat_jax.encode --checkpoint /tmp/cat_demo --input photos/ --out latents/ --level 16
  python -m cat_jax.encode --checkpoint DIR --input photos/ --out latents/ --level auto --manifest scores.jsonl
  python -m cat_jax.encode --checkpoint DIR --input photo.png --out latents/ --level auto --scorer jpeg

Images are decoded, resized (shorter side to ``--image_size``, default the checkpoint's training size) and
centre-cropped, as in evaluation. ``--level``: 8, 16 or 32 (the downsampling factor) or ``auto``; auto takes each
image's level from ``--manifest`` (ids are paths relative to the input folder, as ``python -m cat_jax.score --path``
writes them) or from ``--scorer jpeg|mse`` with ``--thresholds LOW,HIGH`` (default: the inputs' score terciles).
The mse scorer uses this checkpoint's own 32x reconstruction error.

Outputs in ``--out``:
  ``latents/<id>.npz``         (npz format) ``latent`` (H/f, W/f, C) float32, ``level``, ``factor``, ``image_size``;
  ``latents.array_record``     (array_record format) one record per image: the same npz, bytes;
  ``reconstructions/<id>.png`` unless ``--no_reconstructions``;
  ``index.jsonl``              one line per image: id, level, factor, tokens, latent shape, files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
from typing import Sequence

import numpy as np

from cat_jax import levels as L


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m cat_jax.encode", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="training workdir (or <workdir>/checkpoints/<step>)")
  p.add_argument("--input", required=True, help="an image file or a folder of images (searched recursively)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--level", default="16", help="8, 16, 32 (downsampling factor) or auto (default 16)")
  p.add_argument("--manifest", help="score manifest for --level auto")
  p.add_argument("--scorer", choices=("jpeg", "mse"), help="complexity scorer for --level auto")
  p.add_argument("--thresholds", help="LOW,HIGH score thresholds for --scorer (default: terciles of the inputs)")
  p.add_argument("--format", choices=("npz", "array_record"), default="npz")
  p.add_argument("--image_size", type=int, help="default: the checkpoint's data.image_size")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--no_reconstructions", action="store_true")
  p.add_argument("--no_ema", action="store_true", help="raw parameters instead of the EMA")
  return p


def _load_inputs(path: str, image_size: int) -> tuple[list[str], np.ndarray]:
  from cat_jax.data.preprocess import PreprocessConfig, preprocess
  from cat_jax.data.sources import FolderSource

  p = pathlib.Path(path).expanduser()
  if p.is_file():
    files = [(p.name, p)]
  elif p.is_dir():
    source = FolderSource(str(p), "all")
    files = [(i, p / i) for i in source.ids()]
  else:
    raise FileNotFoundError(f"--input {path} is neither an image file nor a folder")
  config = PreprocessConfig(image_size=image_size, on_bad_image="raise")
  images = [preprocess(f.read_bytes(), config, path=str(f), rng=None) for _, f in files]
  return [i for i, _ in files], np.stack(images)


def _levels(args, tok, ids: list[str], images: np.ndarray) -> np.ndarray:
  from cat_jax.complexity import levels as complexity_levels
  from cat_jax.complexity import scorers

  if args.level != "auto":
    if args.manifest or args.scorer:
      raise ValueError("--manifest and --scorer only apply with --level auto")
    try:
      return tok.assign_levels(images, L.level_for_factor(int(args.level)))
    except ValueError:
      raise ValueError(f"--level must be 8, 16, 32 or auto, got {args.level!r}") from None
  if bool(args.manifest) == bool(args.scorer):
    raise ValueError("--level auto needs exactly one of --manifest PATH or --scorer jpeg|mse")
  if args.manifest:
    from cat_jax.data import load_levels
    return tok.assign_levels(images, "auto", ids=ids, manifest=load_levels(args.manifest))
  if args.scorer == "jpeg":
    scorer = scorers.JpegScorer(image_size=None)
  else:
    scorer = scorers.MseScorer(image_size=None,
                               reconstruct_fn=lambda x: tok.reconstruct(x, L.NUM_LEVELS - 1, clip=True))
  from cat_jax.data.preprocess import from_model_range
  scores = [float(scorer.score({"id": i, "image": from_model_range(x)})["score"]) for i, x in zip(ids, images)]
  thresholds = (complexity_levels.parse_thresholds(args.thresholds) if args.thresholds
                else complexity_levels.quantile_thresholds(scores))
  return complexity_levels.levels_for_scores(scores, thresholds)


def _npz_bytes(latent: np.ndarray, level: int, image_size: int) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, latent=latent.astype(np.float32), level=np.int32(level), factor=np.int32(L.FACTORS[level]),
           image_size=np.int32(image_size))
  return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    from PIL import Image

    from cat_jax.data.preprocess import from_model_range
    from cat_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(args.checkpoint, use_ema=not args.no_ema, batch_size=args.batch_size)
    image_size = args.image_size or tok.image_size
    if not image_size:
      raise ValueError("the checkpoint's config has no data.image_size; pass --image_size")
    ids, images = _load_inputs(args.input, image_size)
    level_arr = _levels(args, tok, ids, images)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  latents = tok.encode(images, level_arr)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  recons = None if args.no_reconstructions else tok.decode(latents)
  writer = None
  if args.format == "array_record":
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(out / "latents.array_record"), "group_size:1")
  with open(out / "index.jsonl", "w", encoding="utf-8") as index:
    for k, (image_id, latent, level) in enumerate(zip(ids, latents.values, latents.levels)):
      level = int(level)
      record = {"id": image_id, "level": level, "factor": L.FACTORS[level], "tokens": int(latent.shape[0] *
                latent.shape[1]), "latent_shape": list(latent.shape), "image_size": image_size}
      data = _npz_bytes(latent, level, image_size)
      if writer is not None:
        writer.write(data)
        record["record"] = k
      else:
        path = out / "latents" / (image_id + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record["latent_file"] = str(path.relative_to(out))
      if recons is not None:
        path = out / "reconstructions" / (os.path.splitext(image_id)[0] + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(from_model_range(recons[k])).save(path)
        record["reconstruction"] = str(path.relative_to(out))
      index.write(json.dumps(record) + "\n")
  if writer is not None:
    writer.close()
  counts = np.bincount(latents.levels, minlength=L.NUM_LEVELS)
  print(f"encoded {len(ids)} images (8x/16x/32x: {counts[0]}/{counts[1]}/{counts[2]}, mean tokens "
        f"{latents.num_tokens.mean():.1f}) from step {tok.step} into {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
