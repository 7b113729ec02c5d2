r"""Text legibility (TokBench-style) of reconstructions at 8x / 16x / 32x, per size group of the text set.

  python scripts/legibility_report.py                                  # 120 images at 256², every row
  python scripts/legibility_report.py --image-size 512 --num-images 80
  python scripts/legibility_report.py --rows original --recogniser tesseract   # the recogniser comparison

Rows: ``original`` (the set's own images), ``dct`` (the fixed DCT patch code with the tokenizer's numbers per latent
position, cat_jax.metrics.baselines.dct_code), ``tokenizer`` (``--tokenizer``'s reconstruction, posterior mean) and
``area_bicubic`` (average-pool to the latent grid, bicubic back). Prints a table of word accuracy and 1 - NED per row,
level and size group (cat_jax.metrics.legibility), the recogniser's time per word crop, and one JSON line.

``--recogniser tesseract`` reads the crops with Debian's tesseract instead (``apt-get install -y tesseract-ocr``,
``pip install pytesseract``; not a dependency of the project: it is here only to compare, see docs/guide.md): each
crop grey, dark text on light (inverted where its median is dark), resized to 48 px high (bicubic), a 10 px white
border, ``--psm 7`` (one line of text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from cat_jax.data import text_set  # noqa: E402
from cat_jax.metrics import legibility  # noqa: E402

ROWS = ("original", "dct", "tokenizer", "area_bicubic")
TESSERACT_HEIGHT = 48


def tesseract_recogniser(crops):
  import pytesseract
  from PIL import Image

  readings = []
  for crop in crops:
    grey = Image.fromarray(crop).convert("L")
    if np.median(np.asarray(grey)) < 128:
      grey = Image.fromarray(255 - np.asarray(grey))
    grey = grey.resize((max(1, round(grey.width * TESSERACT_HEIGHT / grey.height)), TESSERACT_HEIGHT), Image.BICUBIC)
    page = Image.new("L", (grey.width + 20, grey.height + 20), 255)
    page.paste(grey, (10, 10))
    readings.append(pytesseract.image_to_string(page, config="--psm 7").strip())
  return readings


def timed(recognise):
  """``recognise`` that adds its seconds and crops to ``timed.seconds`` / ``timed.crops``."""
  def call(crops):
    start = time.perf_counter()
    out = recognise(crops)
    call.seconds += time.perf_counter() - start
    call.crops += len(crops)
    return out
  call.seconds, call.crops = 0.0, 0
  return call


def reconstructions(rows, tokenizer_spec):
  """``{row: fn(images, level)}`` for the rows other than the original (``evaluate.reconstruction_sources``)."""
  from cat_jax.evaluate import reconstruction_sources
  from cat_jax.tokenizer import load_tokenizer

  names = {"tokenizer": "model", "dct": "dct_code", "area_bicubic": "area_bicubic"}
  wanted = [r for r in rows if r in names]
  if not wanted:
    return {}
  fns = reconstruction_sources(load_tokenizer(tokenizer_spec, batch_size=8), [names[r] for r in wanted])
  return {r: fns[names[r]] for r in wanted}


def print_table(results):
  groups = list(text_set.GROUP_NAMES) + ["all"]
  print(f"{'row':<14}{'level':<10}" + "".join(f"{g:>16}" for g in groups))
  print(f"{'':<24}" + "".join(f"{'words  1-NED':>16}" for _ in groups))
  for row, levels in results.items():
    for level, by_group in levels.items():
      cells = "".join(f"{100 * by_group[g]['word_accuracy']:>9.1f}%{by_group[g]['one_minus_ned']:>6.3f}"
                      if g in by_group else f"{'':>16}" for g in groups)
      print(f"{row:<14}{level:<10}{cells}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num-images", "--num_images", type=int, default=120, help="images of the set (cycling groups)")
  p.add_argument("--image-size", "--image_size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", default="demo", help="'demo', a save_pretrained folder or a training workdir")
  p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
  p.add_argument("--recogniser", choices=("rapidocr", "tesseract"), default="rapidocr")
  args = p.parse_args(argv)
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown or not rows:
    p.error(f"--rows: unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}")
  if args.num_images <= 0 or args.image_size % 32:
    p.error("--num-images must be positive and --image-size a multiple of 32 (the 32x level's patch)")
  try:
    recognise = timed(legibility.rapidocr_recogniser() if args.recogniser == "rapidocr" else tesseract_recogniser)
  except ImportError as e:
    p.error(str(e))
  recognise([text_set.render(0).image])  # loads the model before the clock counts
  recognise.seconds, recognise.crops = 0.0, 0

  texts = text_set.text_set(args.num_images, seed=args.seed, image_size=args.image_size)
  images = text_set.model_images(texts)
  results = {}
  if "original" in rows:
    results["original"] = {"-": legibility.by_group(legibility.legibility(images, texts, recognise=recognise))}
  for row, fn in reconstructions(rows, args.tokenizer).items():
    results[row] = legibility.legibility_rows(fn, images, texts, original=False, recognise=recognise)
    print(f"{row} done", file=sys.stderr, flush=True)
  print(f"{args.num_images} images at {args.image_size}², seed {args.seed}, recogniser {args.recogniser}: "
        f"{1000 * recognise.seconds / recognise.crops:.1f} ms per word crop ({recognise.crops} crops)")
  print_table(results)
  print(json.dumps({"num_images": args.num_images, "image_size": args.image_size, "seed": args.seed,
                    "recogniser": args.recogniser, "ms_per_crop": 1000 * recognise.seconds / recognise.crops,
                    "tokenizer": args.tokenizer, "rows": results}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
