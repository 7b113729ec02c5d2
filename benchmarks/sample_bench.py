"""Sampling throughput (images/s) of one DiT: adaptive levels vs all-8x vs all-16x, measured in the same run.

The adaptive mix is the embedded dataset's (3 of its 8 kinds at 8x, 2 at 16x, 3 at 32x) unless ``--mix`` gives
another (fractions of 8x,16x,32x, e.g. ImageNet's under a score manifest). Each level's batch is timed separately
(the ODE sampler of ``cat_jax.generation.sampling``, compiled once per level, ``--num_steps`` Heun steps with
classifier-free guidance); the mix's time per image is the mix-weighted mean of the levels' times. The DiT weights
are random: throughput does not depend on them. Decoding through the tokenizer is not included (``--decode`` adds an
untrained tokenizer of the same config to each level's time).

  python benchmarks/sample_bench.py                                     # DiT-mini, 64x64 images, 16 channels
  python benchmarks/sample_bench.py --size XL --image_size 256 --patch_size 2 --batch 32   # the paper's setting
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import images_per_second  # noqa: E402
from cat_jax import levels as L  # noqa: E402
from cat_jax.data.embedded import KINDS  # noqa: E402
from cat_jax.data.latents import LatentStatistics  # noqa: E402
from cat_jax.generation.dit import build_dit, init_dit  # noqa: E402
from cat_jax.generation.sampling import Generator  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="mini")
  p.add_argument("--patch_size", type=int, default=1)
  p.add_argument("--channels", type=int, default=16)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--num_steps", type=int, default=16)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--mix", help="fractions of 8x,16x,32x (default: the embedded dataset's kinds)")
  args = p.parse_args(argv)

  if args.mix:
    mix = np.array([float(x) for x in args.mix.split(",")])
    if mix.shape != (L.NUM_LEVELS,) or (mix < 0).any() or mix.sum() <= 0:
      raise SystemExit(f"--mix needs {L.NUM_LEVELS} non-negative fractions, got {args.mix!r}")
  else:
    mix = np.bincount([k.level for k in KINDS], minlength=L.NUM_LEVELS).astype(float)
  mix = mix / mix.sum()

  model = build_dit(dict(size=args.size, patch_size=args.patch_size, in_channels=args.channels, num_classes=8))
  params = init_dit(model, jax.random.key(0))
  stats = LatentStatistics({l: [0.0] * args.channels for l in range(3)}, {l: [1.0] * args.channels for l in range(3)},
                           {l: 1 for l in range(3)}, [[1, 1, 1]] * 8)
  gen = Generator(model, params, stats, image_size=args.image_size, num_steps=args.num_steps, solver="heun",
                  cfg_scale=1.5, batch_size=args.batch)
  labels = np.arange(args.batch) % 8
  per_level = {}
  for level in range(L.NUM_LEVELS):
    side = gen.grid(level)[0]
    per_level[level] = images_per_second(lambda: gen.sample_latents(labels, level), args.batch, warmup=1,
                                         iters=args.iters)
    print(f"level {L.level_name(level):>3}: {side}x{side} latents, {(side // args.patch_size) ** 2:4d} tokens, "
          f"{per_level[level]:8.1f} images/s")
  adaptive = 1.0 / sum(mix[l] / per_level[l] for l in range(L.NUM_LEVELS))
  print(f"DiT-{args.size}/{args.patch_size}, {args.image_size}px, batch {args.batch}, {args.num_steps} Heun steps "
        f"with CFG, {jax.devices()[0].platform}")
  print(f"adaptive mix {'/'.join(f'{m:.3f}' for m in mix)} (8x/16x/32x): {adaptive:.1f} images/s")
  print(f"adaptive / all-8x:  {adaptive / per_level[0]:.2f}x")
  print(f"adaptive / all-16x: {adaptive / per_level[1]:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
