r"""Decodes ``python -m cat_jax.encode``'s output back to images: one PNG per encoded image.

  python -m cat_jax.decode --latents latents/ --out decoded/                    # with the tokenizer encode used
  python -m cat_jax.decode --latents latents/ --out decoded/ --checkpoint demo  # or any tokenizer name

Reads ``index.jsonl`` and the latents it lists (npz files or array_record), decodes them at their levels and writes
``<out>/<id>.png`` (the id's extension replaced). Images ``encode`` skipped are listed in its index and skipped here.
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

def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cat_jax.decode", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--latents", required=True, help="an encode --out folder (index.jsonl) or a Latents.save .npz file")
  p.add_argument("--out", required=True, help="folder for the PNGs (local or gs://...)")
  p.add_argument("--checkpoint", help="the tokenizer: a training workdir, a tokenizer folder or a shipped name (default: "
                 f"the one encode recorded in <latents>/{TOKENIZER_FILE})")
  p.add_argument("--no-ema", action="store_true", help="raw parameters instead of the EMA (a training workdir)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--chunk", type=int, default=256, help="latents decoded at a time")
  return p


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
  """(ids, Latents) a chunk at a time, from an encode folder or a ``Latents.save`` file."""
  import numpy as np

  from cat_jax.data.latents import LatentDataset
  from cat_jax.tokenizer import Latents

  if os.fspath(path).endswith(".npz"):
    latents = Latents.load(path)
    yield [str(i) for i in range(len(latents))], latents
    return
  dataset = LatentDataset(path, labelled=False)
  for start in range(0, len(dataset), chunk):
    items = [dataset[i] for i in range(start, min(start + chunk, len(dataset)))]
    yield ([item["id"] for item in items],
           Latents([item["latent"] for item in items], np.array([item["level"] for item in items]),
                   code_only=np.array([item["code_only"] for item in items])))


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    from cat_jax.data.preprocess import from_model_range
    from cat_jax.tokenizer import load_tokenizer

    if not storage.as_path(args.latents).exists():
      raise FileNotFoundError(f"--latents {args.latents} does not exist")
    spec, use_ema = _tokenizer_spec(args)
    tok = load_tokenizer(spec, use_ema=use_ema, batch_size=args.batch_size)
    out = storage.as_path(os.path.expanduser(args.out) if storage.is_local(args.out) else args.out)
    n = 0
    for ids, latents in _batches(args.latents, max(1, args.chunk)):
      images = tok.decode(latents)
      for image_id, image in zip(ids, images):
        storage.write_png(out / f"{os.path.splitext(image_id)[0]}.png", from_model_range(image))
      n += len(ids)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"decoded {n} images with {spec} into {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
