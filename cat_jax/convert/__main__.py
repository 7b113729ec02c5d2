"""`python -m cat_jax.convert {lpips,inception} --out PATH [--torch-weights FILE]`."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module with `convert_cli(torch_weights: str | None, out: str) -> None`
CONVERTERS = {
    "lpips": "cat_jax.convert.lpips",
    "inception": "cat_jax.convert.inception",
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cat_jax.convert", description=__doc__)
  parser.add_argument("which", choices=sorted(CONVERTERS))
  parser.add_argument("--out", required=True, help="where to write the Flax msgpack file")
  parser.add_argument("--torch-weights", default=None,
                      help="path of the public torch checkpoint (default: torch hub cache)")
  args = parser.parse_args(argv)
  module = importlib.import_module(CONVERTERS[args.which])
  try:
    module.convert_cli(args.torch_weights, args.out)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
