"""Memory of one Tokenizer.reconstruct call at batch 1, by image size: what XLA plans (arguments, outputs and
temporaries of the compiled program, ``compiled.memory_analysis()``), nothing run. Prints one JSON line per size and
the largest square image whose plan fits ``--budget_gib`` (extrapolated linearly in pixels from the largest two
sizes measured: activations grow with the pixel count). Large images go through the tokenizer one at a time
(``max_batch_pixels``), so this is the tokenizer's peak for one image.

  python benchmarks/tokenizer_memory.py                       # the shipped demo tokenizer, 24 GiB (this machine)
  python benchmarks/tokenizer_memory.py --tokenizer /runs/cat --sizes 512,1024,2048 --level 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cat_jax import levels as L  # noqa: E402
from cat_jax.tokenizer import load_tokenizer  # noqa: E402


def planned_bytes(tok, side: int, level: int) -> int:
  x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  compiled = tok._reconstruct_fn.lower(tok.params, x, level=level).compile()  # noqa: SLF001
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokenizer", default="demo")
  p.add_argument("--sizes", default="256,512,1024", help="square image sides, multiples of 32")
  p.add_argument("--level", default="8x", help="the costliest is 8x (the longest decoder path)")
  p.add_argument("--budget_gib", type=float, default=24.0)
  args = p.parse_args()
  tok = load_tokenizer(args.tokenizer, batch_size=1)
  level = L.parse_level(args.level)
  sides = [int(s) for s in args.sizes.split(",")]
  measured = []
  for side in sides:
    b = planned_bytes(tok, side, level)
    measured.append((side * side, b))
    print(json.dumps({"side": side, "megapixels": round(side * side / 1e6, 3), "planned_gib": round(b / 2**30, 3),
                      "bytes_per_pixel": round(b / (side * side), 1)}), flush=True)
  (p0, b0), (p1, b1) = measured[-2:]
  per_pixel = (b1 - b0) / (p1 - p0)
  fit_pixels = (args.budget_gib * 2**30 - (b1 - per_pixel * p1)) / per_pixel
  print(json.dumps({"tokenizer": args.tokenizer, "level": L.level_name(level), "budget_gib": args.budget_gib,
                    "bytes_per_pixel_marginal": round(per_pixel, 1),
                    "largest_square_side": int(fit_pixels ** 0.5) // L.MAX_FACTOR * L.MAX_FACTOR,
                    "largest_megapixels": round(fit_pixels / 1e6, 1)}))


if __name__ == "__main__":
  main()
