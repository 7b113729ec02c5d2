"""One layer at a time, JAX (jit) vs torch (torch.compile) on the same device: where the train step's gap is.

  python benchmarks/ops_bench.py [--batch 16] [--size 64] [--channels 16] [--repeats 7] [--steps 5] [--torch-mode eager]

Each op is timed forward + backward (gradients w.r.t. every input, as in training) except ``conv3x3_fwd``: the
RMSNorm and SiLU of the model's blocks, a 3x3 convolution, and the model's ResnetBlock (norm, SiLU, conv, norm,
SiLU, conv, residual). JAX runs the model's own code (``Normalize``, ``conv_general_dilated``); torch the same math
in NCHW, as benchmarks/torch_reference.py. Defaults: the demo config's full-resolution stage (batch 16, 64², 16
channels). The two take turns (``--repeats`` rounds of ``--steps`` steps); one JSON line per op with
``jax_over_torch`` (torch's step time / JAX's: above 1 is JAX faster), median and spread over rounds, and the
largest difference between the two sides' outputs and gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import interleaved, rate_summary, ratio_summary  # noqa: E402
from cat_jax.models import nested_vae as nv  # noqa: E402

OPS = ("rmsnorm", "silu", "conv3x3_fwd", "conv3x3", "resblock")
EPS = 1e-6  # nested_vae.Normalize's


def _jax_ops():
  norm = lambda x, s: nv.Normalize("rms").apply({"params": {"RMSNorm_0": {"scale": s}}}, x)
  conv = lambda x, w: nv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def resblock(x, s1, w1, s2, w2):
    h = conv(jax.nn.swish(norm(x, s1)), w1)
    return x + conv(jax.nn.swish(norm(h, s2)), w2)

  return {"rmsnorm": norm, "silu": jax.nn.swish, "conv3x3_fwd": conv, "conv3x3": conv, "resblock": resblock}


def _torch_ops():
  def norm(x, s):
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + EPS) * s[None, :, None, None]

  conv = lambda x, w: F.conv2d(x, w, padding=1)

  def resblock(x, s1, w1, s2, w2):
    h = conv(F.silu(norm(x, s1)), w1)
    return x + conv(F.silu(norm(h, s2)), w2)

  return {"rmsnorm": norm, "silu": F.silu, "conv3x3_fwd": conv, "conv3x3": conv, "resblock": resblock}


def _inputs(op: str, batch: int, size: int, channels: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
  """(array, layout) pairs: NHWC activations ("act"), HWIO kernels ("kernel"), per-channel scales ("vec")."""
  rng = np.random.RandomState(seed)
  x = (rng.randn(batch, size, size, channels).astype(np.float32), "act")
  scale = lambda: ((1 + 0.1 * rng.randn(channels)).astype(np.float32), "vec")
  kernel = lambda: ((rng.randn(3, 3, channels, channels) / np.sqrt(9 * channels)).astype(np.float32), "kernel")
  return {"rmsnorm": lambda: [x, scale()], "silu": lambda: [x], "conv3x3_fwd": lambda: [x, kernel()],
          "conv3x3": lambda: [x, kernel()], "resblock": lambda: [x, scale(), kernel(), scale(), kernel()]}[op]()


_TO_TORCH = {"act": (0, 3, 1, 2), "kernel": (3, 2, 0, 1)}  # NHWC -> NCHW, HWIO -> OIHW
_FROM_TORCH = {"act": (0, 2, 3, 1), "kernel": (2, 3, 1, 0)}


def _to_torch(a: np.ndarray, layout: str) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(a.transpose(_TO_TORCH[layout]) if layout in _TO_TORCH else a))


def _from_torch(t: torch.Tensor, layout: str) -> np.ndarray:
  a = t.detach().numpy()
  return a.transpose(_FROM_TORCH[layout]) if layout in _FROM_TORCH else a


def measure(op: str, batch: int = 16, size: int = 64, channels: int = 16, repeats: int = 7, steps: int = 5,
            torch_mode: str = "compile") -> dict:
  backward = op != "conv3x3_fwd"
  inputs = _inputs(op, batch, size, channels)
  args, layouts = [a for a, _ in inputs], [layout for _, layout in inputs]
  cotangent = np.random.RandomState(1).randn(batch, size, size, channels).astype(np.float32)

  jax_fn = _jax_ops()[op]
  if backward:
    loss = lambda *a: jnp.sum(jax_fn(*a) * cotangent)
    jax_step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  else:
    jax_step = jax.jit(jax_fn)
  j_args = [jnp.asarray(a) for a in args]
  j_out = jax.block_until_ready(jax_step(*j_args))

  torch_fn = _torch_ops()[op]
  if torch_mode == "compile":
    torch_fn = torch.compile(torch_fn)
  t_args = [_to_torch(a, layout).requires_grad_(backward) for a, layout in inputs]
  t_cot = _to_torch(cotangent, "act")

  def torch_step():
    for a in t_args:
      a.grad = None
    if not backward:
      with torch.no_grad():
        return torch_fn(*t_args)
    value = (torch_fn(*t_args) * t_cot).sum()
    value.backward()
    return value, [a.grad for a in t_args]

  t_out = torch_step()
  if backward:  # the loss, then each input's gradient
    pairs = [(j_out[0], t_out[0], "scalar")] + list(zip(j_out[1], t_out[1], layouts))
  else:
    pairs = [(j_out, t_out, "act")]
  max_diff = max(float(np.max(np.abs(np.asarray(j) - _from_torch(t, layout)))) for j, t, layout in pairs)

  def run_jax(n):
    for _ in range(n):
      jax.block_until_ready(jax_step(*j_args))

  def run_torch(n):
    for _ in range(n):
      torch_step()

  run_jax(1), run_torch(1)  # warm-up
  seconds = interleaved({"jax": run_jax, "torch": run_torch}, repeats, steps)
  return {"op": op, "shape": [batch, size, size, channels], "backward": backward, "torch_mode": torch_mode,
          "max_abs_diff": max_diff, "jax": rate_summary(seconds["jax"], batch),
          "torch": rate_summary(seconds["torch"], batch),
          "jax_over_torch": ratio_summary(seconds["torch"], seconds["jax"])}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {OPS}")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--channels", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=5, help="steps per round")
  parser.add_argument("--torch-mode", choices=("compile", "eager"), default="compile")
  args = parser.parse_args(argv)
  ops = args.ops.split(",")
  unknown = set(ops) - set(OPS)
  if unknown:
    parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
  results = []
  for op in ops:
    r = measure(op, args.batch, args.size, args.channels, args.repeats, args.steps, args.torch_mode)
    print(json.dumps(r), flush=True)
    results.append(r)
  print(f"\njax on {jax.default_backend()}, torch {args.torch_mode} ({torch.get_num_threads()} threads); "
        f"batch {args.batch} at {args.size}², {args.channels} channels; {args.repeats} rounds of {args.steps} steps")
  for r in results:
    q = r["jax_over_torch"]
    print(f"{r['op']:12s} jax {r['jax']['step_ms']:8.2f} ms  torch {r['torch']['step_ms']:8.2f} ms  "
          f"jax_over_torch {q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f})")
  return results


if __name__ == "__main__":
  main()
