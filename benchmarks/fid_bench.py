"""Images/s of FID feature extraction: our jitted Flax InceptionV3 vs pytorch-fid, same device.

  python benchmarks/fid_bench.py [--batch 16] [--size 256] [--iters 5] [--precision highest]

Both networks have the same random weights (the real ones cannot be downloaded here; speed does not
depend on their values) and include the resize to 299 and the normalisation. GPU for both when JAX
sees one and torch has CUDA. ``--precision highest`` (our default) runs float32 convs on both sides;
``default`` lets both use TF32 on GPUs (torch's cuDNN default), at a cost in parity.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import images_per_second, torch_fid_inception  # noqa: E402
from cat_jax.convert.inception import convert_state_dict  # noqa: E402
from cat_jax.models.inception import InceptionV3  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=256, help="input side, resized to 299 inside")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--precision", choices=["highest", "default"], default="highest")
  args = parser.parse_args()

  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  device = "cuda" if on_gpu else "cpu"
  torch.backends.cudnn.allow_tf32 = args.precision == "default"
  torch.backends.cuda.matmul.allow_tf32 = args.precision == "default"
  precision = jax.lax.Precision.HIGHEST if args.precision == "highest" else None

  torch.manual_seed(0)
  net = torch_fid_inception()
  original = pt_inception.fid_inception_v3
  pt_inception.fid_inception_v3 = lambda: net
  try:
    wrapper = pt_inception.InceptionV3([3]).eval().to(device)
  finally:
    pt_inception.fid_inception_v3 = original
  variables = jax.tree.map(jnp.asarray, convert_state_dict(net.state_dict()))
  model = InceptionV3(precision=precision)
  features = jax.jit(lambda images: model.apply(variables, images))

  rng = np.random.default_rng(0)
  images01 = rng.random((args.batch, args.size, args.size, 3), dtype=np.float32)
  ours_in = jax.device_put(images01 * 2.0 - 1.0)
  ref_in = torch.from_numpy(images01).permute(0, 3, 1, 2).contiguous().to(device)

  def ours_step():
    features(ours_in).block_until_ready()

  def ref_step():
    with torch.no_grad():
      wrapper(ref_in)[0].cpu()  # .cpu() waits for the GPU, as pytorch-fid does per batch

  ours = images_per_second(ours_step, args.batch, args.warmup, args.iters)
  ref = images_per_second(ref_step, args.batch, args.warmup, args.iters)
  with torch.no_grad():
    ref_feats = wrapper(ref_in)[0][:, :, 0, 0].cpu().numpy()
  diff = float(np.abs(np.asarray(features(ours_in)) - ref_feats).max())
  print(f"device: {jax.devices()[0].device_kind} (torch: {device}); batch {args.batch} at "
        f"{args.size}x{args.size}; precision {args.precision}")
  print(f"ours (Flax, jit): {ours:9.1f} images/s")
  print(f"pytorch-fid:      {ref:9.1f} images/s")
  print(f"ratio ours/ref:   {ours / ref:9.2f}   (max |feature diff| {diff:.2e})")


if __name__ == "__main__":
  main()
