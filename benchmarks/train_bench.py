"""Images/s and MFU of the jitted train step vs a torch.compile PyTorch reference of the same network and batch.

  python benchmarks/train_bench.py [--config demo] [--size 64] [--batch 8] [--steps 5] [--warmup 2] [--level 0]
                                   [--dtype float32|bfloat16] [--no-torch-compile] [--peak_tflops T] [--no-lpips]

JAX runs the real ``cat_jax.train.train_step`` (generator + EMA + discriminator update, hinge GAN with taming's
adaptive weight); PyTorch runs ``benchmarks/torch_reference.TorchTrainStep``, the same step on a port of the same
networks (tests/test_torch_reference.py checks the outputs and the step's losses and gradient norms agree), starting
from the same weights. The GAN is on from step 0 in both (``disc_start=0``). LPIPS follows the config
(``loss.lpips_weight``; ``--no-lpips`` turns it off) and uses a random VGG trunk with the real v0.1 heads in both, so
nothing is downloaded: speed does not depend on weight values.

The level is passed to ``train_step`` as a static int, so the compiled program holds that level's branch only (the
branch ``nn.switch`` runs in training) and XLA's FLOP count (``cost_analysis()['flops']``, the whole step: forward,
backward, adaptive-weight gradients, optimisers) is that level's. The same FLOP count is used for the torch MFU:
same network, same batch. ``--dtype bfloat16`` sets the VAE's and discriminator's compute dtype in JAX (parameters
stay float32) and runs torch under bf16 autocast. MFU uses dense peak FLOP/s per device kind (float32 counts
against the TF32 tensor-core peak on NVIDIA: both XLA and cuDNN use TF32 for float32 by default; torch's matmul TF32
switch is turned on to match); on a CPU it is n/a unless ``--peak_tflops`` is given.

On a CPU, the first run with a cold inductor cache spends minutes compiling C++ kernels and its torch timings come
out several times too slow (the compile workers still hold the cores); the kernels are cached
(/tmp/torchinductor_$USER), so run it twice and report the second run. The script warns when this happens.

Prints one table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import torch_reference as tr  # noqa: E402
from cat_jax import configs  # noqa: E402
from cat_jax import levels as L  # noqa: E402
from cat_jax import train  # noqa: E402

# Dense peak FLOP/s per device (bfloat16, float32); float32 on NVIDIA is the TF32 tensor-core rate, on TPUs the
# bf16 rate (XLA's default float32 matmul precision uses bf16 passes there). Matched in order, by substring of
# device_kind (jax) or the CUDA device name (torch), case-insensitive.
PEAK_FLOPS = (
    ("h100 pcie", 756e12, 378e12),
    ("h100", 989.4e12, 494.7e12),  # SXM
    ("h200", 989.4e12, 494.7e12),
    ("a100", 312e12, 156e12),
    ("tpu v4", 275e12, 275e12),
    ("tpu v5 lite", 197e12, 197e12),  # v5e
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("tpu v6 lite", 918e12, 918e12),  # v6e
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one device for ``dtype`` ('bfloat16' | 'float32'), or None if unknown (CPUs)."""
  kind = device_kind.lower()
  for name, bf16, fp32 in PEAK_FLOPS:
    if name in kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None


def load_config(variant: str):
  return configs.load(f"cat:{variant}")


def _cost_flops(lowered) -> float | None:
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def xla_flops(lowered, lower_for_cpu=None) -> float | None:
  """FLOPs of a lowered XLA program from its cost analysis, counted before the backend's passes.

  The compiled program's own count misses work the backend hands to libraries: on an H200 (jax 0.11.2) the
  paper step's compiled count was 0.21 TFLOP against 25.3 TFLOP lowered (on CPU), the convolutions being cuDNN
  calls; and there a lowered program had no cost analysis at all. ``lower_for_cpu`` (a thunk returning the same
  program lowered for the CPU, e.g. ``jitted.trace(*args).lower(lowering_platforms=("cpu",))``) is counted then.
  """
  flops = _cost_flops(lowered)
  if flops is None and lower_for_cpu is not None:
    try:
      flops = _cost_flops(lower_for_cpu())
    except Exception:  # noqa: BLE001 - no count rather than no benchmark
      flops = None
  return flops


def _timed(step, sync, warmup: int, steps: int) -> tuple[float, float]:
  """(seconds of the first call, compile included; seconds per step after ``warmup`` more steps)."""
  start = time.perf_counter()
  step()
  sync()
  first = time.perf_counter() - start
  for _ in range(warmup):
    step()
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return first, (time.perf_counter() - start) / steps


def _make_lpips(device):
  import lpips
  from cat_jax.convert.lpips import convert_torch_lpips
  from cat_jax.models.lpips import LPIPS

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips
    torch_lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(device)
  state = torch_lpips.state_dict()
  return torch_lpips, LPIPS(), convert_torch_lpips(state, state)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help="configs/cat.py variant: imagenet | demo | runlocal")
  parser.add_argument("--size", type=int, default=None, help="image side (default: the config's data.image_size)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
  parser.add_argument("--level", type=int, default=0, help="0 = 8x, 1 = 16x, 2 = 32x")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  parser.add_argument("--no-torch-compile", action="store_true", help="run the PyTorch reference eagerly")
  parser.add_argument("--no-lpips", action="store_true", help="LPIPS off even if the config has it on")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="peak TFLOP/s of one device for MFU (default: from the device kind; CPUs: none)")
  args = parser.parse_args()
  L.check_level(args.level)

  config = load_config(args.config)
  size = args.size or config.data.image_size
  config.batch_size = args.batch
  config.loss.disc_start = 0  # time the full step: GAN, adaptive weight and discriminator update on
  use_lpips = config.loss.lpips_weight > 0 and not args.no_lpips
  if not use_lpips:
    config.loss.lpips_weight = 0.0
  config.model.dtype = args.dtype  # as --config.model.dtype; the discriminator computes in config.disc.dtype

  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_float32_matmul_precision("high")  # TF32 on NVIDIA, as XLA's default float32 precision
  torch_lpips, lpips_module, lpips_params = _make_lpips(torch_device) if use_lpips else (None, None, None)

  rng = np.random.default_rng(0)
  images_np = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)

  # -- JAX: the real train_step ------------------------------------------------------------------------------------
  parts = train.make_train_step(config, lpips_module=lpips_module, image_size=size)
  step_fn = parts.step
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = jax.jit(parts.init)(init_rng)
  g_params_np = jax.device_get(state.params)  # the torch reference starts from the same weights
  d_params_np = jax.device_get(state.d_params)
  images = jnp.asarray(images_np)
  start = time.perf_counter()
  jitted = jax.jit(step_fn, static_argnums=2, donate_argnums=0)
  lowered = jitted.lower(state, images, args.level, lpips_params, step_rng)
  compiled = lowered.compile()
  jax_compile_s = time.perf_counter() - start
  flops = xla_flops(lowered, lambda: jitted.trace(state, images, args.level, lpips_params, step_rng).lower(
      lowering_platforms=("cpu",)))
  box = {"state": state}

  def jax_step():
    box["state"], box["metrics"] = compiled(box["state"], images, lpips_params, step_rng)

  jax_first_s, jax_step_s = _timed(jax_step, lambda: jax.block_until_ready(box["state"]), args.warmup, args.steps)
  jax_first_s += jax_compile_s
  jax_finite = bool(box["state"].all_finite)
  del box

  # -- PyTorch reference -------------------------------------------------------------------------------------------
  torch.manual_seed(0)
  vae = tr.load_flax_params(tr.NestedVAE(**config.model), g_params_np).to(torch_device)
  torch_disc = tr.load_flax_discriminator(tr.PatchDiscriminator(**config.disc), d_params_np).to(torch_device)
  images_t = torch.from_numpy(images_np.transpose(0, 3, 1, 2).copy()).to(torch_device)
  o, lc = config.optimizer, config.loss

  def make_torch_step(compile_: bool) -> tr.TorchTrainStep:
    return tr.TorchTrainStep(
        vae, torch_disc, lr=o.lr, d_lr=o.d_lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
        grad_clip=o.grad_clip, ema_decay=config.ema_decay, recon=lc.recon, recon_weight=lc.recon_weight,
        log_mse_weight=lc.log_mse_weight, kl_weight=lc.kl_weight, gan_weight=lc.gan_weight, perceptual=torch_lpips,
        perceptual_weight=lc.lpips_weight, compile=compile_,
        autocast_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None,
        disc_float32=config.disc.get("dtype", "float32") == "float32")

  sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)
  torch_mode = "eager" if args.no_torch_compile else "compile"
  torch_step = make_torch_step(torch_mode == "compile")
  box = {}

  def run_torch():
    box["metrics"] = torch_step(images_t, args.level)

  try:
    torch_first_s, torch_step_s = _timed(run_torch, sync, args.warmup, args.steps)
  except Exception as e:  # noqa: BLE001 - inductor needs a working C++/Triton toolchain
    if torch_mode != "compile":
      raise
    print(f"note: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
          "timing the PyTorch reference eagerly instead", file=sys.stderr)
    torch_mode = "eager (compile failed)"
    torch_step = make_torch_step(False)
    torch_first_s, torch_step_s = _timed(run_torch, sync, args.warmup, args.steps)
  torch_finite = bool(torch.isfinite(box["metrics"]["g_loss"]).item())

  # -- summary -----------------------------------------------------------------------------------------------------
  jax_kind = jax.devices()[0].device_kind
  torch_kind = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
  jax_peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(jax_kind, args.dtype)
  torch_peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(torch_kind, args.dtype)
  rows = []
  for name, device, step_s, first_s, peak in (
      (f"jax ({jax.default_backend()})", jax_kind, jax_step_s, jax_first_s, jax_peak),
      (f"torch ({torch_device.type}, {torch_mode})", torch_kind, torch_step_s, torch_first_s, torch_peak)):
    tflops = flops / step_s / 1e12 if flops else None
    mfu = flops / step_s / peak if flops and peak else None
    rows.append(dict(name=name, device=device, images_per_s=args.batch / step_s, step_ms=1e3 * step_s,
                     tflops_per_s=tflops, mfu=mfu, first_step_s=first_s))
  ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]

  fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
  print(f"train step (G + EMA + D, GAN + adaptive weight on, LPIPS {'on' if use_lpips else 'off'}): config "
        f"{args.config}, {size}x{size}, batch {args.batch}, level {args.level} ({L.factor_for_level(args.level)}x), "
        f"{args.dtype}; {args.steps} timed steps after {args.warmup} warmup; "
        f"torch threads {torch.get_num_threads()}")
  print(f"XLA FLOPs per step: {fmt(flops and flops / 1e9, '.3f')} GFLOP")
  print(f"{'':28s} {'device':>24s} {'images/s':>10s} {'step ms':>10s} {'TFLOP/s':>9s} {'MFU':>7s} "
        f"{'1st step s':>10s}")
  for r in rows:
    print(f"{r['name']:28s} {r['device'][:24]:>24s} {r['images_per_s']:10.2f} {r['step_ms']:10.1f} "
          f"{fmt(r['tflops_per_s'], '9.4f')} {fmt(r['mfu'] and 100 * r['mfu'], '6.2f') + '%' if r['mfu'] else 'n/a':>7s} "
          f"{r['first_step_s']:10.1f}")
  print(f"ratio jax/torch images/s: {ratio:.2f}x")
  if torch_mode == "compile" and torch_first_s > 60:
    print(f"warning: torch compiled cold ({torch_first_s:.0f} s); inductor's compile workers may have slowed the timed "
          "steps. Re-run for representative figures (compiled kernels are cached).", file=sys.stderr)
  if not (jax_finite and torch_finite):
    print(f"warning: non-finite losses (jax finite={jax_finite}, torch finite={torch_finite})", file=sys.stderr)
  print(json.dumps({
      "benchmark": "train_step", "config": args.config, "image_size": size, "batch": args.batch,
      "level": args.level, "dtype": args.dtype, "lpips": use_lpips, "steps": args.steps, "warmup": args.warmup,
      "flops_per_step": flops, "torch_mode": torch_mode, "ratio_jax_over_torch": ratio,
      "jax": rows[0], "torch": rows[1]}))


if __name__ == "__main__":
  main()
