"""One layer at a time, JAX (jit) vs torch (torch.compile) on the same device: where the train step's gap is.

  python benchmarks/ops_bench.py [--batch 16] [--size 64] [--channels 16] [--repeats 7] [--steps 5] [--torch-mode eager]

Each op is timed forward + backward (gradients w.r.t. every input, as in training) except ``conv3x3_fwd``: the
RMSNorm and SiLU of the model's blocks, a 3x3 convolution, and the model's ResnetBlock (norm, SiLU, conv, norm,
SiLU, conv, residual). JAX runs the model's own modules (``Normalize``, ``Conv``, ``ResnetBlock``), torch their
ports in cat_jax/convert/modeling_cat.py (NCHW), with the same random parameters. Defaults: the demo config's
full-resolution stage (batch 16, 64², 16 channels). The two take turns (``--repeats`` rounds of ``--steps``
steps); one JSON line per op with ``jax_over_torch`` (torch's step time / JAX's: above 1 is JAX faster), median and spread over rounds, and the
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

from benchmarks import torch_reference as tr  # noqa: E402
from benchmarks.common import interleaved, rate_summary, ratio_summary  # noqa: E402
from cat_jax.convert import modeling_cat as port  # noqa: E402
from cat_jax.models import nested_vae as nv  # noqa: E402

OPS = ("rmsnorm", "silu", "conv3x3_fwd", "conv3x3", "resblock")


def _layers(op: str, channels: int):
  """The op as (Flax module, its PyTorch port), or (None, None) for SiLU, which has no parameters."""
  c = channels
  return {"rmsnorm": lambda: (nv.Normalize("rms"), port.Normalize(c, "rms")),
          "silu": lambda: (None, None),
          "conv3x3_fwd": lambda: (nv.Conv(c, (3, 3), padding="SAME"), torch.nn.Conv2d(c, c, 3, padding=1)),
          "conv3x3": lambda: (nv.Conv(c, (3, 3), padding="SAME"), torch.nn.Conv2d(c, c, 3, padding=1)),
          "resblock": lambda: (nv.ResnetBlock(out_channels=c, norm="rms", shortcuts=True),
                               port.ResnetBlock(c, c, norm="rms", shortcuts=True))}[op]()


def _nchw(a) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def measure(op: str, batch: int = 16, size: int = 64, channels: int = 16, repeats: int = 7, steps: int = 5,
            torch_mode: str = "compile") -> dict:
  backward = op != "conv3x3_fwd"
  rng = np.random.RandomState(0)
  x = rng.randn(batch, size, size, channels).astype(np.float32)
  cotangent = rng.randn(batch, size, size, channels).astype(np.float32)
  flax_module, torch_module = _layers(op, channels)
  if flax_module is None:
    params, jax_apply, torch_fn = {}, lambda p, x: jax.nn.swish(x), F.silu
  else:
    # Random values everywhere: the residual branch's last conv starts at zero, which would leave it untested.
    params = jax.tree.map(lambda p: p + 0.1 * rng.randn(*p.shape).astype(np.float32),
                          flax_module.init(jax.random.key(0), x)["params"])
    jax_apply = lambda p, x: flax_module.apply({"params": p}, x)
    torch_fn = tr.load_flax_params(torch_module, params)

  if backward:
    jax_step = jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(jax_apply(p, x) * cotangent), argnums=(0, 1)))
  else:
    jax_step = jax.jit(jax_apply)
  j_args = (jnp.asarray(x), params) if backward else (params, jnp.asarray(x))
  j_out = jax.block_until_ready(jax_step(*j_args))

  t_x, t_cot = _nchw(x).requires_grad_(backward), _nchw(cotangent)
  t_params = dict(torch_module.named_parameters()) if torch_module is not None else {}
  step_fn = torch.compile(torch_fn) if torch_mode == "compile" else torch_fn

  def torch_step():
    if not backward:
      with torch.no_grad():
        return step_fn(t_x)
    t_x.grad = None
    for t in t_params.values():
      t.grad = None
    value = (step_fn(t_x) * t_cot).sum()
    value.backward()
    return value

  t_out = torch_step()
  # The largest difference between the two sides: output (forward only) or loss, input and parameter gradients.
  if backward:
    value, (dx, dparams) = j_out
    pairs = [(value, t_out), (_nchw(dx), t_x.grad)]
    pairs += [(a, t_params[name].grad) for name, a in tr.torch_state(dparams).items()]
  else:
    pairs = [(_nchw(j_out), t_out)]
  max_diff = max(float(np.max(np.abs(np.asarray(j) - t.detach().numpy()))) for j, t in pairs)

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
