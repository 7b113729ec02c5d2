"""Shared benchmark helpers (run the benchmarks as `python benchmarks/<name>.py` from the repository root)."""

from __future__ import annotations

import time
from typing import Callable


def images_per_second(step: Callable[[], object], batch: int, warmup: int, iters: int) -> float:
  """Calls ``step`` ``warmup`` times untimed, then ``iters`` times timed; ``step`` must block until done."""
  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(iters):
    step()
  return batch * iters / (time.perf_counter() - start)


def torch_fid_inception():
  """pytorch-fid's FID InceptionV3 structure (FID-specific A/C/E blocks) with random weights, no download."""
  from pytorch_fid import inception as pt_inception

  net = pt_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = pt_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pt_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pt_inception.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pt_inception.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pt_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pt_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pt_inception.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pt_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = pt_inception.FIDInceptionE_2(2048)
  return net.eval()


def interleaved(runs: dict[str, Callable[[int], object]], repeats: int, steps: int) -> dict[str, list[float]]:
  """Seconds per step of each ``runs[name](steps)`` (which must block until done) in each of ``repeats`` rounds.

  The runs take turns within a round, and the order rotates every round, so a machine whose speed drifts (other
  jobs, clocks) slows every run alike and the per-round ratios stay comparable.
  """
  names = list(runs)
  out: dict[str, list[float]] = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      runs[name](steps)
      out[name].append((time.perf_counter() - start) / steps)
  return out


def rate_summary(seconds: list[float], batch: int) -> dict[str, float]:
  """Images/s from per-step seconds: the median and the spread (slowest and fastest round)."""
  s = sorted(seconds)
  median = s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])
  return {"images_per_s": batch / median, "images_per_s_min": batch / s[-1], "images_per_s_max": batch / s[0],
          "step_ms": 1e3 * median, "rounds": len(s)}


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict[str, float]:
  """Per-round ratios ``numerator[i] / denominator[i]``: the median and the spread (min, max)."""
  r = sorted(a / b for a, b in zip(numerator, denominator))
  median = r[len(r) // 2] if len(r) % 2 else 0.5 * (r[len(r) // 2 - 1] + r[len(r) // 2])
  return {"median": median, "min": r[0], "max": r[-1]}
