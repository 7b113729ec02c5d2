"""Images/s of FID feature extraction: our jitted Flax InceptionV3 vs pytorch-fid, same device.

  python benchmarks/fid_bench.py [--batch 16] [--size 256] [--repeats 5] [--steps 2] [--precision highest]

Both networks have the same random weights (the real ones cannot be downloaded here; speed does not
depend on their values) and include the resize to 299 and the normalisation. GPU for both when JAX
sees one and torch has CUDA. ``--precision highest`` (our default) runs float32 convs on both sides;
``default`` lets both use TF32 on GPUs (torch's cuDNN default), at a cost in parity. JAX and torch
take turns (``--repeats`` rounds of ``--steps`` batches); figures are medians over rounds.
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
from pytorch_fid import inception as pt_inception  # noqa: E402

from benchmarks.common import interleaved, rate_summary, ratio_summary, torch_fid_inception  # noqa: E402
from cat_jax.convert.inception import convert_state_dict  # noqa: E402
from cat_jax.models.inception import InceptionV3  # noqa: E402


def measure(batch: int = 16, size: int = 256, warmup: int = 2, repeats: int = 5, steps: int = 2,
            precision: str = "highest") -> dict:
  """Ours vs pytorch-fid images/s (median and spread over interleaved rounds) and the max feature difference."""
  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  device = "cuda" if on_gpu else "cpu"
  torch.backends.cudnn.allow_tf32 = precision == "default"
  torch.backends.cuda.matmul.allow_tf32 = precision == "default"
  jax_precision = jax.lax.Precision.HIGHEST if precision == "highest" else None

  torch.manual_seed(0)
  net = torch_fid_inception()
  original = pt_inception.fid_inception_v3
  pt_inception.fid_inception_v3 = lambda: net
  try:
    wrapper = pt_inception.InceptionV3([3]).eval().to(device)
  finally:
    pt_inception.fid_inception_v3 = original
  variables = jax.tree.map(jnp.asarray, convert_state_dict(net.state_dict()))
  model = InceptionV3(precision=jax_precision)
  features = jax.jit(lambda images: model.apply(variables, images))

  rng = np.random.default_rng(0)
  images01 = rng.random((batch, size, size, 3), dtype=np.float32)
  ours_in = jax.device_put(images01 * 2.0 - 1.0)
  ref_in = torch.from_numpy(images01).permute(0, 3, 1, 2).contiguous().to(device)

  def run_ours(n):
    out = None
    for _ in range(n):
      out = features(ours_in)
    jax.block_until_ready(out)

  def run_ref(n):
    with torch.no_grad():
      for _ in range(n):
        wrapper(ref_in)[0].cpu()  # .cpu() waits for the GPU, as pytorch-fid does per batch

  with torch.no_grad():
    ref_feats = wrapper(ref_in)[0][:, :, 0, 0].cpu().numpy()
  diff = float(np.abs(np.asarray(features(ours_in)) - ref_feats).max())
  run_ours(warmup)
  run_ref(warmup)
  seconds = interleaved({"ours": run_ours, "pytorch_fid": run_ref}, repeats, steps)
  return {"batch": batch, "image_size": size, "precision": precision, "torch_device": device, "steps": steps,
          "max_abs_feature_diff": diff, "ours": rate_summary(seconds["ours"], batch),
          "pytorch_fid": rate_summary(seconds["pytorch_fid"], batch),
          "ours_over_ref": ratio_summary(seconds["pytorch_fid"], seconds["ours"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=256, help="input side, resized to 299 inside")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=2, help="batches per round")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--precision", choices=["highest", "default"], default="highest")
  args = parser.parse_args()
  r = measure(args.batch, args.size, args.warmup, args.repeats, args.steps, args.precision)
  print(f"device: {jax.devices()[0].device_kind} (torch: {r['torch_device']}); batch {args.batch} at "
        f"{args.size}x{args.size}; precision {args.precision}; {args.repeats} interleaved rounds of {args.steps}")
  print(f"ours (Flax, jit): {r['ours']['images_per_s']:9.1f} images/s")
  print(f"pytorch-fid:      {r['pytorch_fid']['images_per_s']:9.1f} images/s")
  q = r["ours_over_ref"]
  print(f"ratio ours/ref:   {q['median']:9.2f}   ({q['min']:.2f} .. {q['max']:.2f}; "
        f"max |feature diff| {r['max_abs_feature_diff']:.2e})")


if __name__ == "__main__":
  main()
