"""Weights in and out of cat_jax.

  python -m cat_jax.convert lpips|inception --out PATH [--torch-weights FILE]   public torch weights -> Flax
  python -m cat_jax.convert sd_vae --src PATH --out DIR [--preset sd|sdxl|sd3|flux]   (docs/sd_vae.md)
  python -m cat_jax.convert to_torch --src TOKENIZER --out DIR   a standalone PyTorch tokenizer (docs/pytorch.md)
  python -m cat_jax.convert release --src WORKDIR --out DIR      EMA + raw generator + discriminator, for
                                                                  --config.init_from=DIR fine-tuning

TOKENIZER: a shipped name (demo), a tokenizer folder (config.json + model.safetensors) or a training workdir.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cat_jax import cli

# name -> module with `convert_cli(src: str | None, out: str, **options) -> None`
CONVERTERS = {
    "lpips": "cat_jax.convert.lpips",
    "inception": "cat_jax.convert.inception",
    "sd_vae": "cat_jax.convert.sd_vae",
    "to_torch": "cat_jax.convert.to_torch",
    "release": "cat_jax.convert.release",
}


def build_parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(prog="python -m cat_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("which", choices=sorted(CONVERTERS))
  parser.add_argument("--out", required=True,
                      help="lpips/inception: the Flax msgpack file to write; sd_vae/release: a tokenizer folder; "
                           "to_torch: the PyTorch folder")
  parser.add_argument("--torch-weights", "--src", dest="src", default=None,
                      help="lpips/inception: the public torch checkpoint (default: torch hub cache); sd_vae: a "
                           "diffusers AutoencoderKL folder or an original .safetensors/.ckpt file; to_torch: a "
                           "tokenizer (demo, a folder, a workdir); release: a training workdir")
  parser.add_argument("--step", type=int, default=None,
                      help="to_torch/release from a workdir: which checkpoint step (default: the latest)")
  sd = parser.add_argument_group("sd_vae only")
  sd.add_argument("--preset", default=None, help="latent scaling of a known VAE: sd, sdxl, sd3 or flux")
  sd.add_argument("--scaling-factor", type=float, default=None,
                  help="latent scale (overrides preset and config)")
  sd.add_argument("--shift-factor", type=float, default=None,
                  help="latent shift (overrides preset and config)")
  sd.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised 16x/32x stages")
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  options = {}
  if args.which == "sd_vae":
    options = dict(preset=args.preset, scaling_factor=args.scaling_factor, shift_factor=args.shift_factor,
                   seed=args.seed)
  elif args.which in ("to_torch", "release"):
    options = dict(step=args.step)
  elif args.step is not None:
    parser.error(f"--step applies to to_torch and release, not {args.which}")
  module = importlib.import_module(CONVERTERS[args.which])
  try:
    module.convert_cli(args.src, args.out, **options)
  except (OSError, ImportError, ValueError) as e:  # OSError: a missing file, an unwritable --out, ...
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  if args.which not in ("to_torch", "release"):
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
