"""Images/s of the Flax LPIPS-VGG (jitted) vs the torch `lpips` package, same device, same weights.

  python benchmarks/lpips_bench.py [--batch 8] [--size 128] [--repeats 5] [--steps 4] [--grad]

Uses a random VGG trunk (pnet_rand) with the real v0.1 heads, so no download is needed; speed
does not depend on the weight values. GPU for both when JAX sees one and torch has CUDA.
``--grad`` times the training use: distance plus gradient w.r.t. the first image. JAX and torch
take turns (``--repeats`` rounds of ``--steps`` steps each); figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import lpips  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import interleaved, rate_summary, ratio_summary  # noqa: E402
from cat_jax.convert.lpips import convert_torch_lpips  # noqa: E402
from cat_jax.models.lpips import LPIPSDistance  # noqa: E402


def measure(batch: int = 8, size: int = 128, warmup: int = 2, repeats: int = 5, steps: int = 4,
            grad: bool = False) -> dict:
  """Flax vs torch LPIPS images/s (median and spread over interleaved rounds) and their max distance difference."""
  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  torch_device = torch.device("cuda" if on_gpu else "cpu")
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
    torch_model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(torch_device)
  state = torch_model.state_dict()
  lpips_fn = LPIPSDistance(convert_torch_lpips(state, state))

  rng = np.random.default_rng(0)
  shape = (batch, size, size, 3)
  x_np = rng.uniform(-1, 1, shape).astype(np.float32)
  y_np = rng.uniform(-1, 1, shape).astype(np.float32)
  x, y = jax.device_put(x_np), jax.device_put(y_np)
  xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(torch_device)
  yt = torch.from_numpy(y_np).permute(0, 3, 1, 2).contiguous().to(torch_device)

  if grad:
    jax_grad = jax.jit(jax.grad(lambda a, b: lpips_fn(a, b).sum()))
    jax_step = lambda: jax_grad(x, y)

    def torch_step():
      a = xt.detach().requires_grad_(True)
      torch_model(a, yt).sum().backward()
      return a.grad
  else:
    jax_step = lambda: lpips_fn(x, y)

    def torch_step():
      with torch.no_grad():
        return torch_model(xt, yt)

  def run_jax(n):
    out = None
    for _ in range(n):
      out = jax_step()
    jax.block_until_ready(out)

  def run_torch(n):
    for _ in range(n):
      torch_step()
    if on_gpu:
      torch.cuda.synchronize()

  with torch.no_grad():
    ref = torch_model(xt, yt).reshape(-1).cpu().numpy()
  max_diff = float(np.abs(np.asarray(lpips_fn(x, y)) - ref).max())
  run_jax(warmup)
  run_torch(warmup)
  seconds = interleaved({"flax": run_jax, "torch": run_torch}, repeats, steps)
  return {"mode": "distance+grad" if grad else "distance", "batch": batch, "image_size": size,
          "torch_device": str(torch_device), "torch_threads": torch.get_num_threads(), "steps": steps,
          "max_abs_diff": max_diff, "flax": rate_summary(seconds["flax"], batch),
          "torch": rate_summary(seconds["torch"], batch),
          "flax_over_torch": ratio_summary(seconds["torch"], seconds["flax"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=128, help="image side in pixels")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=4, help="steps per round")
  parser.add_argument("--grad", action="store_true", help="time distance + input gradient")
  args = parser.parse_args()
  r = measure(args.batch, args.size, args.warmup, args.repeats, args.steps, args.grad)
  print(f"LPIPS-VGG {r['mode']}, batch {args.batch} at {args.size}x{args.size}, "
        f"jax on {jax.devices()[0].device_kind} ({jax.default_backend()}), torch on {r['torch_device']} "
        f"({r['torch_threads']} threads), {args.repeats} interleaved rounds of {args.steps} after {args.warmup} warmup")
  print(f"max |flax - torch| distance: {r['max_abs_diff']:.2e}")
  for name in ("flax", "torch"):
    s = r[name]
    print(f"{name:6s}: {s['images_per_s']:8.2f} images/s (rounds {s['images_per_s_min']:.2f} .. "
          f"{s['images_per_s_max']:.2f})")
  q = r["flax_over_torch"]
  print(f"ratio flax/torch: {q['median']:.2f}x ({q['min']:.2f} .. {q['max']:.2f})")


if __name__ == "__main__":
  main()
