"""What each quality measure of the registry costs per image, as a ratio to PSNR measured in the same run.

  python benchmarks/measure_cost.py [--batch 16] [--size 256] [--repeats 5] [--steps 4] [--measures psnr,gmsd]

Each measure is ``image_quality.quality(name, originals, reconstructions)`` jitted (the 8-bit rounding included, as
every caller pays it) on a batch of embedded validation images against a blurred copy; compile time is excluded
(one warmup call). The measures take turns (``--repeats`` rounds of ``--steps`` calls, the order rotating), so a
machine whose speed drifts slows all alike. One JSON line per measure: ms per image (median over rounds, spread)
and ``over_psnr``, its time per image / PSNR's in the same round (median, min, max); then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from benchmarks.common import interleaved, rate_summary, ratio_summary  # noqa: E402
from cat_jax.data.embedded import generate  # noqa: E402
from cat_jax.metrics import image_quality  # noqa: E402

REFERENCE = "psnr"


def _images(batch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Embedded validation images (every kind) in [-1, 1] and a blurred copy (sigma 1 px)."""
  x = np.stack([generate(i, split="validation", image_size=size)[0] for i in range(batch)]) / 127.5 - 1.0
  return x.astype(np.float32), gaussian_filter(x, sigma=(0, 1, 1, 0)).astype(np.float32)


def measure(names: list[str], batch: int, size: int, repeats: int, steps: int) -> list[dict]:
  x, y = (jax.device_put(a) for a in _images(batch, size))
  runs, values = {}, {}
  for name in names:
    fn = jax.jit(lambda a, b, name=name: image_quality.quality(name, a, b))
    values[name] = float(np.mean(np.asarray(fn(x, y))))  # compiles (excluded from the timing)

    def run(n, fn=fn):
      out = None
      for _ in range(n):
        out = fn(x, y)
      jax.block_until_ready(out)

    runs[name] = run
  seconds = interleaved(runs, repeats, steps)
  results = []
  for name in names:
    rate = rate_summary(seconds[name], batch)
    results.append({"measure": name, "batch": batch, "image_size": size, "rounds": repeats, "steps": steps,
                    "ms_per_image": 1e3 / rate["images_per_s"], "ms_per_image_min": 1e3 / rate["images_per_s_max"],
                    "ms_per_image_max": 1e3 / rate["images_per_s_min"],
                    "over_psnr": ratio_summary(seconds[name], seconds[REFERENCE]),
                    "mean_value_vs_blur": values[name]})
  return results


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--measures", default=",".join(image_quality.MEASURES),
                      help=f"comma-separated, from {', '.join(image_quality.MEASURES)} (psnr, the reference, is "
                           "always timed)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=256, help="image side in pixels")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=4, help="calls per round")
  args = parser.parse_args(argv)
  names = [n for n in args.measures.split(",") if n]
  unknown = sorted(set(names) - set(image_quality.MEASURES))
  if unknown:
    parser.error(f"unknown measures {unknown}; choose from {', '.join(image_quality.MEASURES)}")
  names = [REFERENCE] + [n for n in names if n != REFERENCE]
  min_side = max(image_quality.MEASURES[n].min_side for n in names)
  if args.size < min_side or min(args.batch, args.repeats, args.steps) < 1:
    parser.error(f"--size must be at least {min_side} for these measures, --batch, --repeats and --steps at least 1")
  results = measure(names, args.batch, args.size, args.repeats, args.steps)
  for r in results:
    print(json.dumps(r), flush=True)
  print(f"\njax on {jax.default_backend()} ({jax.devices()[0].device_kind}); batch {args.batch} at {args.size}², "
        f"jitted, {args.repeats} interleaved rounds of {args.steps} calls")
  print("| measure | ms / image | over PSNR (min-max) |")
  print("| --- | --- | --- |")
  for r in results:
    q = r["over_psnr"]
    print(f"| {r['measure']} | {r['ms_per_image']:.3f} | {q['median']:.1f}x ({q['min']:.1f}-{q['max']:.1f}) |")
  return results


if __name__ == "__main__":
  main()
