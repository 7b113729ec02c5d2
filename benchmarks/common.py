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
