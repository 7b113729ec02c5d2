"""Memory of one Tokenizer.reconstruct call at batch 1, by image size: what XLA plans (arguments, outputs and
temporaries of the compiled program, ``compiled.memory_analysis()``), nothing run. Prints one JSON line per size and
the largest square image whose plan fits ``--budget_gib``, from a fit of bytes = a + b * pixels + c * pixels^2 to the
last three sizes (convolution activations grow with the pixel count, the latent heads' attention with its square).
Large images go through the tokenizer one at a time (``max_batch_pixels``), so this is the tokenizer's peak for one
image.

  python benchmarks/tokenizer_memory.py                       # the shipped demo tokenizer, 24 GiB (this machine)
  python benchmarks/tokenizer_memory.py --tokenizer /runs/cat --sizes 512,1024,2048 --level 0
  python benchmarks/tokenizer_memory.py --config cat --sizes 256,512,1024   # a config's model (shapes only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cat_jax import configs  # noqa: E402
from cat_jax import levels as L  # noqa: E402
from cat_jax import tokenizer as tokenizer_lib  # noqa: E402
from cat_jax.models.nested_vae import NestedVAE, abstract_params, build_model  # noqa: E402


def planned_bytes(model, params, side: int, level: int) -> int:
  x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  fn = jax.jit(lambda params, x, level: model.apply({"params": params}, x, level, method=NestedVAE.reconstruct),
               static_argnames=("level",))  # what the tokenizer runs
  m = fn.lower(params, x, level=level).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokenizer", default="demo")
  p.add_argument("--config", help="measure this config's model instead (e.g. cat: the paper size), from shapes")
  p.add_argument("--sizes", default="512,1024,2048", help="square image sides, multiples of 32 (three or more)")
  p.add_argument("--level", default="8x", help="the costliest is 8x (the longest decoder path)")
  p.add_argument("--budget_gib", type=float, default=24.0)
  args = p.parse_args()
  if args.config:
    model = build_model(configs.load(args.config).model)
    params = abstract_params(model)
  else:
    tok = tokenizer_lib.load_tokenizer(args.tokenizer, batch_size=1)
    model, params = tok.model, tok.params
  level = L.parse_level(args.level)
  sides = [int(s) for s in args.sizes.split(",")]
  measured = []
  for side in sides:
    b = planned_bytes(model, params, side, level)
    measured.append((side * side, b))
    print(json.dumps({"side": side, "megapixels": round(side * side / 1e6, 3), "planned_gib": round(b / 2**30, 3),
                      "bytes_per_pixel": round(b / (side * side), 1)}), flush=True)
  if len(measured) < 3:
    raise SystemExit("give at least three --sizes for the fit")
  pixels, planned = (np.array(v, np.float64) for v in zip(*measured[-3:]))
  c, b, a = np.polyfit(pixels, planned, 2)
  budget = args.budget_gib * 2**30
  roots = [r.real for r in np.roots([c, b, a - budget]) if abs(r.imag) < 1e-9 and r.real > 0]
  fit_pixels = min(roots)
  print(json.dumps({"tokenizer": args.config or args.tokenizer, "level": L.level_name(level),
                    "budget_gib": args.budget_gib, "bytes_per_pixel_linear": round(b, 1),
                    "bytes_per_pixel_squared": float(f"{c:.3g}"),
                    "largest_square_side": int(fit_pixels ** 0.5) // L.MAX_FACTOR * L.MAX_FACTOR,
                    "largest_megapixels": round(fit_pixels / 1e6, 1)}))


if __name__ == "__main__":
  main()
