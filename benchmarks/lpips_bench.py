"""Images/s of the Flax LPIPS-VGG (jitted) vs the torch `lpips` package, same device, same weights.

  python benchmarks/lpips_bench.py [--batch 8] [--size 128] [--iters 5] [--grad]

Uses a random VGG trunk (pnet_rand) with the real v0.1 heads, so no download is needed; speed
does not depend on the weight values. GPU for both when JAX sees one and torch has CUDA.
``--grad`` times the training use: distance plus gradient w.r.t. the first image.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lpips  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import images_per_second  # noqa: E402
from cat_jax.convert.lpips import convert_torch_lpips  # noqa: E402
from cat_jax.models.lpips import LPIPSDistance  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=128, help="image side in pixels")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--grad", action="store_true", help="time distance + input gradient")
  args = parser.parse_args()

  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  torch_device = torch.device("cuda" if on_gpu else "cpu")
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
    torch_model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(torch_device)
  state = torch_model.state_dict()
  lpips_fn = LPIPSDistance(convert_torch_lpips(state, state))

  rng = np.random.default_rng(0)
  shape = (args.batch, args.size, args.size, 3)
  x_np = rng.uniform(-1, 1, shape).astype(np.float32)
  y_np = rng.uniform(-1, 1, shape).astype(np.float32)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous().to(torch_device)
  yt = torch.from_numpy(y_np).permute(0, 3, 1, 2).contiguous().to(torch_device)

  if args.grad:
    jax_grad = jax.jit(jax.grad(lambda a, b: lpips_fn(a, b).sum()))
    jax_step = lambda: jax_grad(x, y).block_until_ready()

    def torch_step():
      a = xt.detach().requires_grad_(True)
      torch_model(a, yt).sum().backward()
      if on_gpu:
        torch.cuda.synchronize()
  else:
    jax_step = lambda: lpips_fn(x, y).block_until_ready()

    def torch_step():
      with torch.no_grad():
        torch_model(xt, yt)
      if on_gpu:
        torch.cuda.synchronize()

  with torch.no_grad():
    ref = torch_model(xt, yt).reshape(-1).cpu().numpy()
  max_diff = float(np.abs(np.asarray(lpips_fn(x, y)) - ref).max())

  jax_rate = images_per_second(jax_step, args.batch, args.warmup, args.iters)
  torch_rate = images_per_second(torch_step, args.batch, args.warmup, args.iters)
  mode = "distance+grad" if args.grad else "distance"
  print(f"LPIPS-VGG {mode}, batch {args.batch} at {args.size}x{args.size}, "
        f"jax on {jax.devices()[0].device_kind} ({jax.default_backend()}), torch on {torch_device} "
        f"({torch.get_num_threads()} threads), {args.iters} iters after {args.warmup} warmup")
  print(f"max |flax - torch| distance: {max_diff:.2e}")
  print(f"flax  : {jax_rate:8.2f} images/s")
  print(f"torch : {torch_rate:8.2f} images/s")
  print(f"ratio flax/torch: {jax_rate / torch_rate:.2f}x")


if __name__ == "__main__":
  main()
