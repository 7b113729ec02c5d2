r"""Decodes ``python -m cat_jax.encode``'s output back to images: one PNG per encoded image.

  python -m cat_jax.decode --latents latents/ --out decoded/                    # with the tokenizer encode used
  python -m cat_jax.decode --latents latents/ --out decoded/ --checkpoint demo  # or any tokenizer name

Reads ``index.jsonl`` and the latents it lists (npz files or array_record), decodes them at their levels and writes
``<out>/<id>.png`` (the id's extension replaced) at the image's original size: the tokenizer's padding is cropped off
(``encoded_size``), and an image ``encode`` resized on request is resized back (bicubic) to its ``original_size``
(``--max-side``) or, for ``--image-size`` (a centre crop), to the square the crop covered in the original (its shorter
side). ``--no-restore-size`` writes the encoded size instead. Images ``encode`` skipped are listed in its index and
skipped here.
A ``Latents.save`` file (``.npz``) decodes too: ``--latents file.npz`` writes ``<out>/<index>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from cat_jax import cli
from cat_jax import storage
from cat_jax.data.latents import TOKENIZER_FILE

MAX_CHUNK_PIXELS = 1 << 26  # decoded pixels held at a time (as encode's chunks): a chunk ends early at this many


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cat_jax.decode", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--latents", required=True, help="an encode --out folder (index.jsonl) or a Latents.save .npz file")
  p.add_argument("--out", required=True, help="folder for the PNGs (local or gs://...)")
  p.add_argument("--checkpoint", help="the tokenizer: a training workdir, a tokenizer folder or a shipped name (default: "
                 f"the one encode recorded in <latents>/{TOKENIZER_FILE})")
  p.add_argument("--no-ema", action="store_true", help="raw parameters instead of the EMA (a training workdir)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--chunk", type=int, default=256, help="latents decoded at a time (fewer when their images hold "
                 f"more than {MAX_CHUNK_PIXELS / 1e6:.0f} megapixels)")
  p.add_argument("--no-restore-size", action="store_true",
                 help="write each image at the size it was encoded at, not its original size")
  return p


def restored_size(row: dict) -> tuple[int, int] | None:
  """The (height, width) ``decode`` writes an index row's image at: its original size, or for an ``--image-size``
  centre crop the square that crop covered in the original; None when the row does not say (older encodes)."""
  if "original_size" not in row:
    return None
  h, w = row["original_size"]
  if row.get("resized") == "image_size":
    return min(h, w), min(h, w)
  return h, w


def _tokenizer_spec(args) -> tuple[str, bool]:
  if args.checkpoint:
    return args.checkpoint, not args.no_ema
  recorded = storage.as_path(args.latents) / TOKENIZER_FILE
  if not recorded.exists():
    raise FileNotFoundError(f"{args.latents} does not say which tokenizer encoded it (no {TOKENIZER_FILE}); pass "
                            "--checkpoint")
  info = json.loads(recorded.read_text())
  return info["checkpoint"], bool(info.get("use_ema", True))


def _batches(path, chunk: int):
  """(ids, Latents, sizes to write: (H, W) or None each) a chunk at a time, from an encode folder or a
  ``Latents.save`` file."""
  import numpy as np

  from cat_jax.data.latents import LatentDataset
  from cat_jax.tokenizer import Latents

  if os.fspath(path).endswith(".npz"):
    latents = Latents.load(path)
    yield [str(i) for i in range(len(latents))], latents, [None] * len(latents)
    return
  dataset = LatentDataset(path, labelled=False)
  for span in _spans(dataset.rows, chunk):
    items, rows = [dataset[i] for i in span], [dataset.rows[i] for i in span]
    yield ([item["id"] for item in items],
           Latents([item["latent"] for item in items], np.array([item["level"] for item in items]),
                   image_sizes=[_encoded_size(row) for row in rows], code_only=np.array([item["code_only"] for item in items])),
           [restored_size(row) for row in rows])


def _encoded_size(row: dict) -> tuple[int, int]:
  """The (height, width) an index row's image was encoded at (older rows: its latent grid times its factor)."""
  if "encoded_size" in row:
    return tuple(row["encoded_size"])
  return tuple(d * int(row["factor"]) for d in row["latent_shape"][:2])


def _spans(rows: list[dict], chunk: int, max_pixels: int | None = None):
  """Index ranges of at most ``chunk`` rows whose images (``encoded_size``, else the latent grid times the factor)
  hold at most ``max_pixels`` (default ``MAX_CHUNK_PIXELS``; at least one row each)."""
  max_pixels = MAX_CHUNK_PIXELS if max_pixels is None else max_pixels
  start, pixels = 0, 0
  for i, row in enumerate(rows):
    h, w = _encoded_size(row)
    if i > start and (i - start >= chunk or pixels + h * w > max_pixels):
      yield range(start, i)
      start, pixels = i, 0
    pixels += h * w
  if start < len(rows):
    yield range(start, len(rows))


def _count(path) -> int:
  """How many latents ``_batches`` yields."""
  from cat_jax.data.latents import read_index

  if os.fspath(path).endswith(".npz"):
    from cat_jax.tokenizer import Latents
    return len(Latents.load(path))
  if not (storage.as_path(path) / "index.jsonl").exists():
    return 0  # LatentDataset says what is missing
  return sum("error" not in row for row in read_index(path).values())


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    import numpy as np
    import tqdm
    from PIL import Image

    from cat_jax.data.preprocess import from_model_range
    from cat_jax.tokenizer import load_tokenizer

    if not storage.as_path(args.latents).exists():
      raise FileNotFoundError(f"--latents {args.latents} does not exist")
    spec, use_ema = _tokenizer_spec(args)
    tok = load_tokenizer(spec, use_ema=use_ema, batch_size=args.batch_size)
    out = storage.as_path(os.path.expanduser(args.out) if storage.is_local(args.out) else args.out)
    n = resized = 0
    batches = _batches(args.latents, max(1, args.chunk))
    total = _count(args.latents)
    print(f"decode: {total} latents in {args.latents} with {spec} into {out}, "
          + ("at their encoded sizes" if args.no_restore_size else "at their original sizes"), file=sys.stderr,
          flush=True)
    bar = tqdm.tqdm(total=total, unit="img", desc="decode", dynamic_ncols=True, file=sys.stderr,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    with bar:
      for ids, latents, sizes in batches:
        images = tok.decode(latents)
        for image_id, image, size in zip(ids, images, sizes):
          pixels = from_model_range(image)
          if size is not None and not args.no_restore_size and tuple(size) != pixels.shape[:2]:
            pixels = np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BICUBIC))
            resized += 1
          storage.write_png(out / f"{os.path.splitext(image_id)[0]}.png", pixels)
        n += len(ids)
        bar.update(len(ids))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"decoded {n} images with {spec} into {out}" + (f" ({resized} resized back to their original size)"
                                                       if resized else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
