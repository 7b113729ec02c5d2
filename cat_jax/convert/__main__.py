"""`python -m cat_jax.convert {lpips,inception} --out PATH [--torch-weights FILE]`,
`python -m cat_jax.convert sd_vae --src PATH --out DIR [--preset sd|sdxl|sd3|flux]` (see docs/sd_vae.md)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module with `convert_cli(torch_weights: str | None, out: str, **options) -> None`
CONVERTERS = {
    "lpips": "cat_jax.convert.lpips",
    "inception": "cat_jax.convert.inception",
    "sd_vae": "cat_jax.convert.sd_vae",
}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cat_jax.convert", description=__doc__)
  parser.add_argument("which", choices=sorted(CONVERTERS))
  parser.add_argument("--out", required=True,
                      help="where to write the Flax msgpack file (sd_vae: a directory for Tokenizer.from_pretrained)")
  parser.add_argument("--torch-weights", "--src", dest="torch_weights", default=None,
                      help="path of the public torch checkpoint (default: torch hub cache); sd_vae: a diffusers "
                           "AutoencoderKL folder or an original .safetensors/.ckpt file")
  sd = parser.add_argument_group("sd_vae only")
  sd.add_argument("--preset", default=None, help="latent scaling of a known VAE: sd, sdxl, sd3 or flux")
  sd.add_argument("--scaling-factor", type=float, default=None, help="latent scale (overrides preset and config)")
  sd.add_argument("--shift-factor", type=float, default=None, help="latent shift (overrides preset and config)")
  sd.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised 16x/32x stages")
  args = parser.parse_args(argv)
  options = {}
  if args.which == "sd_vae":
    options = dict(preset=args.preset, scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
                   seed=args.seed)
  module = importlib.import_module(CONVERTERS[args.which])
  try:
    module.convert_cli(args.torch_weights, args.out, **options)
  except (FileNotFoundError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
