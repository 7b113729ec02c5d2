"""The benchmark suite: every part in its own subprocess with its own timeout, one JSON line per part.

  python benchmarks/suite.py --quick                # the paper model (256², bf16, LPIPS + GAN) on the accelerator
  python benchmarks/suite.py --quick --cpu          # the demo config on a CPU (64², float32)
  python benchmarks/suite.py --quick --cpu --markdown   # and a markdown table for docs/performance.md

Parts, in order (``--parts`` picks some):

  env          device, backend and library versions.
  train_jax    the real ``cat_jax.train.train_step`` (G + EMA + D, GAN and adaptive weight on) compiled once per
               static level and once with a traced level (``lax.switch``): lower / compile seconds, whether the
               compile was a persistent-cache hit, XLA FLOPs, then all executables timed in interleaved rounds:
               images/s per level, MFU where the peak is known, ``traced_over_static`` per level.
  train_torch  the static-level JAX step against the PyTorch port (benchmarks/torch_reference.py) under
               torch.compile in a separate process, same weights and batch, rounds interleaved (JAX, torch, ...):
               ``jax_over_torch`` per level (images/s ratio).
  lpips        LPIPS-VGG distance + input gradient: Flax vs the `lpips` package (benchmarks/lpips_bench.py).
  fid          FID-Inception features: Flax vs pytorch-fid (benchmarks/fid_bench.py).
  inference    encode (posterior mode) and decode images/s per level, static level.

``--prewarm`` (for a lent accelerator's short lease) first compiles every train-step executable, the torch.compile
port and the inference executables in parallel processes, one per executable, and reports their cold compile times
(measured side by side, so each may be a little slower than alone); the timed parts then start from JAX's persistent
cache and inductor's cache, and skip an executable whose prewarm failed instead of compiling it again.

Every figure is a median over ``--repeats`` interleaved rounds of ``--steps`` steps, with its spread (slowest and
fastest round; for ratios, the smallest and largest per-round ratio). No weights are downloaded: speed does not
depend on their values. JAX's persistent compilation cache is on (``--cache-dir``; ``--no-cache`` turns it off), so
a second run skips XLA compiles; each compile reports ``cache_hit`` (JAX's '/jax/compilation_cache/cache_hits'
event). A part that fails or runs past its timeout prints a line with ``"status": "error"`` or ``"timeout"`` and
the suite goes on.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

PARTS = ("env", "train_jax", "train_torch", "lpips", "fid", "inference")
DEFAULT_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "cat_jax" / "jax"


# -- settings -------------------------------------------------------------------------------------------------------
def settings(args) -> dict:
  """What each part runs, from ``--cpu`` / ``--quick`` and the explicit overrides."""
  if args.cpu:  # the demo config: the CPU target of issue 15
    s = dict(config="demo", size=64, batch=16, dtype="float32", lpips=False, lpips_batch=4, lpips_size=64,
             fid_batch=4, fid_size=64, infer_batch=16)
  else:  # the paper model as train_bench's GPU runs
    s = dict(config="imagenet", size=256, batch=16, dtype="bfloat16", lpips=True, lpips_batch=16, lpips_size=256,
             fid_batch=64, fid_size=256, infer_batch=32)
  s.update(levels=[0, 1, 2], repeats=5 if args.quick else 10, steps=4 if args.quick else 5, warmup=2,
           torch_mode="compile")
  # torch.compile of the G + D step takes ~3 minutes per level on 2 CPU cores: the CPU form compares level 0 only.
  s["torch_levels"] = [0] if args.cpu else [0, 1, 2]
  for key in ("config", "size", "batch", "dtype", "repeats", "steps", "warmup", "torch_mode"):
    if getattr(args, key, None) is not None:
      s[key] = getattr(args, key)
  if args.levels is not None:
    s["levels"] = [int(v) for v in args.levels.split(",")]
  if args.no_lpips:
    s["lpips"] = False
  if args.small_aux:  # tiny LPIPS / FID / inference batches (the test)
    s.update(lpips_batch=1, lpips_size=32, fid_batch=1, fid_size=32, infer_batch=2)
  s["executables"] = (args.executables.split(",") if args.executables else
                      [f"static_{level}" for level in s["levels"]] + ["traced"])
  s["compile_only"] = args.compile_only
  s["cache_dir"] = None if args.no_cache else str(args.cache_dir)
  s["peak_tflops"] = args.peak_tflops
  return s


def enable_cache(cache_dir: str | None) -> None:
  """JAX's persistent compilation cache in ``cache_dir`` (every compile cached, however quick), or off."""
  import jax
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_CACHE_HITS = [0]


def _count_cache_hits() -> None:
  import jax

  def listener(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
      _CACHE_HITS[0] += 1
  jax.monitoring.register_event_listener(listener)


def compile_timed(jitted, *args) -> tuple[object, dict]:
  """``jitted.lower(*args).compile()`` and its lower / compile seconds, cache hit and XLA FLOPs."""
  from benchmarks.train_bench import xla_flops
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  hits = _CACHE_HITS[0]
  start = time.perf_counter()
  compiled = lowered.compile()
  return compiled, {"lower_s": lower_s, "compile_s": time.perf_counter() - start, "cache_hit": _CACHE_HITS[0] > hits,
                    "flops": xla_flops(lowered, lambda: jitted.trace(*args).lower(lowering_platforms=("cpu",)))}


# -- parts ----------------------------------------------------------------------------------------------------------
def part_env(s) -> dict:
  import flax
  import jax
  import jaxlib
  import optax
  import torch
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count(),
          "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "torch": torch.__version__, "torch_cuda": torch.version.cuda, "machine": platform.machine(),
          "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


class JaxTrain:
  """The real train step of ``s['config']``, its state and a batch (GAN and adaptive weight on from step 0)."""

  def __init__(self, s):
    import jax
    import numpy as np
    from benchmarks.train_bench import load_config
    from cat_jax import train

    config = load_config(s["config"])
    config.batch_size = s["batch"]
    config.loss.disc_start = 0
    if not s["lpips"]:
      config.loss.lpips_weight = 0.0
    config.model.dtype = s["dtype"]  # as --config.model.dtype; the discriminator computes in config.disc.dtype
    self.config, self.batch, self.size = config, s["batch"], s["size"]
    self.lpips_module = self.lpips_params = None
    self.torch_lpips = None
    if config.loss.lpips_weight > 0:
      import torch
      from benchmarks.train_bench import _make_lpips
      self.torch_lpips, self.lpips_module, self.lpips_params = _make_lpips(torch.device("cpu"))
    parts = train.make_train_step(config, lpips_module=self.lpips_module, image_size=s["size"])
    self.model, self.disc, self.step_fn = parts.model, parts.disc, parts.step
    init_rng, self.step_rng = jax.random.split(jax.random.key(config.seed))
    self.state = jax.jit(parts.init)(init_rng)
    images = np.random.default_rng(0).uniform(-1, 1, (s["batch"], s["size"], s["size"], 3)).astype(np.float32)
    self.images_np, self.images = images, jax.device_put(images)

  def compile(self, level, traced: bool):
    """(a ``run(n)`` that does n steps and blocks, compile info)."""
    import jax
    import jax.numpy as jnp
    if traced:
      jitted = jax.jit(self.step_fn, donate_argnums=0)
      level_arg = jnp.int32(level)
      compiled, info = compile_timed(jitted, self.state, self.images, level_arg, self.lpips_params, self.step_rng)
      call = lambda lvl: compiled(self.state, self.images, jnp.int32(lvl), self.lpips_params, self.step_rng)
    else:
      jitted = jax.jit(self.step_fn, static_argnums=2, donate_argnums=0)
      compiled, info = compile_timed(jitted, self.state, self.images, level, self.lpips_params, self.step_rng)
      call = lambda lvl: compiled(self.state, self.images, self.lpips_params, self.step_rng)
    self.last_compiled = compiled
    return call, info

  def runner(self, call, level):
    import jax

    def run(n):
      for _ in range(n):
        self.state, _ = call(level)  # the state is donated: every executable continues from the last one's
      jax.block_until_ready(self.state)
    return run


def _peak(s, dtype: str) -> float | None:
  import jax
  from benchmarks.train_bench import peak_flops
  return s["peak_tflops"] * 1e12 if s["peak_tflops"] else peak_flops(jax.devices()[0].device_kind, dtype)


def part_train_jax(s) -> dict:
  from benchmarks.common import interleaved, rate_summary, ratio_summary
  t = JaxTrain(s)
  compiles, runs = {}, {}
  for name in s["executables"]:
    traced = name == "traced"
    level = s["levels"][0] if traced else int(name.split("_")[1])
    call, compiles[name] = t.compile(level, traced=traced)
    for lvl in (s["levels"] if traced else [level]):
      runs[f"{'traced' if traced else 'static'}_{lvl}"] = t.runner(call, lvl)
  head = {"config": s["config"], "image_size": t.size, "batch": t.batch, "dtype": s["dtype"],
          "lpips": t.config.loss.lpips_weight > 0, "gan": True, "compiles": compiles}
  if s["compile_only"]:
    return head
  for run in runs.values():
    run(s["warmup"])
  seconds = interleaved(runs, s["repeats"], s["steps"])
  peak = _peak(s, s["dtype"])
  levels = {}
  for level in s["levels"]:
    row = {}
    flops = compiles.get(f"static_{level}", {}).get("flops") or compiles.get("traced", {}).get("flops")
    for kind in ("static", "traced"):
      if f"{kind}_{level}" not in seconds:
        continue
      row[kind] = rate_summary(seconds[f"{kind}_{level}"], t.batch)
      step_s = row[kind]["step_ms"] / 1e3
      # The traced step's XLA FLOPs count all three branches: the static level's FLOPs are what one step does.
      row[kind]["tflops_per_s"] = flops / step_s / 1e12 if flops else None
      row[kind]["mfu"] = flops / step_s / peak if flops and peak else None
    if "static" in row and "traced" in row:
      row["traced_over_static"] = ratio_summary(seconds[f"traced_{level}"], seconds[f"static_{level}"])
    row["flops_per_step"] = compiles.get(f"static_{level}", {}).get("flops")
    levels[str(level)] = row
  statics = [c["compile_s"] for name, c in compiles.items() if name != "traced"]
  out = dict(head, repeats=s["repeats"], steps=s["steps"], peak_flops=peak, levels=levels,
             static_compile_s_all_levels=sum(statics) if statics else None)
  if "traced" in compiles and statics and not any(c["cache_hit"] for c in compiles.values()):  # cold compiles only
    out["traced_compile_over_static"] = compiles["traced"]["compile_s"] / max(statics[0], 1e-9)
  return out


def part_train_torch(s) -> dict:
  import tempfile
  import jax
  import numpy as np
  from benchmarks.common import interleaved, rate_summary, ratio_summary
  from cat_jax import weights

  t = JaxTrain(s)
  compiles, jax_runs = {}, {}
  levels_run = [] if s["compile_only"] else [lvl for lvl in s["levels"] if f"static_{lvl}" in s["executables"]
                                             and lvl in s.get("torch_levels", s["levels"])]
  for level in levels_run:
    call, compiles[f"static_{level}"] = t.compile(level, traced=False)
    jax_runs[level] = t.runner(call, level)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "weights.npz"
    arrays = {f"g/{k}": v for k, v in weights.flatten(jax.device_get(t.state.params)).items()}
    arrays.update({f"d/{k}": v for k, v in weights.flatten(jax.device_get(t.state.d_params)).items()})
    np.savez(path, images=t.images_np, **arrays)
    torch_levels = [lvl for lvl in s["levels"] if lvl in s.get("torch_levels", s["levels"])]
    spec = dict(s, levels=torch_levels, weights=str(path), model=t.config.model.to_dict(),
                disc=t.config.disc.to_dict(), optimizer=t.config.optimizer.to_dict(), loss=t.config.loss.to_dict(),
                ema_decay=t.config.ema_decay)
    worker = subprocess.Popen([sys.executable, __file__, "--torch-worker", json.dumps(spec)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
      ready = json.loads(worker.stdout.readline())  # after torch.compile and warm-up at every level
      if s["compile_only"]:
        return {"config": s["config"], "image_size": t.size, "batch": t.batch, "dtype": s["dtype"],
                "torch_mode": ready["torch_mode"], "torch_first_steps_s": ready["first_steps_s"]}

      def torch_run(level):
        def run(n):
          worker.stdin.write(f"{level} {n}\n")
          worker.stdin.flush()
          json.loads(worker.stdout.readline())
        return run

      runs = {}
      for level in levels_run:
        jax_runs[level](s["warmup"])
        runs[f"jax_{level}"], runs[f"torch_{level}"] = jax_runs[level], torch_run(level)
      seconds = interleaved(runs, s["repeats"], s["steps"])
    finally:
      worker.stdin.close()
      worker.wait(timeout=60)
  levels = {}
  for level in levels_run:
    levels[str(level)] = {"jax": rate_summary(seconds[f"jax_{level}"], t.batch),
                          "torch": rate_summary(seconds[f"torch_{level}"], t.batch),
                          "jax_over_torch": ratio_summary(seconds[f"torch_{level}"], seconds[f"jax_{level}"])}
  return {"config": s["config"], "image_size": t.size, "batch": t.batch, "dtype": s["dtype"],
          "lpips": t.config.loss.lpips_weight > 0, "torch_mode": ready["torch_mode"],
          "torch_first_steps_s": ready["first_steps_s"], "torch_threads": ready["threads"],
          "repeats": s["repeats"], "steps": s["steps"], "jax_compiles": compiles, "levels": levels}


def torch_worker(spec_json: str) -> None:
  """The PyTorch side of train_torch: compiles and warms up, then runs ``LEVEL N`` requests from stdin."""
  import ml_collections
  import numpy as np
  import torch
  from benchmarks import torch_reference as tr
  from cat_jax import weights

  s = json.loads(spec_json)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_float32_matmul_precision("high")  # TF32 on NVIDIA, as XLA's default float32 precision
  data = np.load(s["weights"])
  g = weights.unflatten({k[2:]: data[k] for k in data.files if k.startswith("g/")})
  d = weights.unflatten({k[2:]: data[k] for k in data.files if k.startswith("d/")})
  vae = tr.load_flax_params(tr.NestedVAE(**s["model"]), g).to(device)
  disc = tr.load_flax_discriminator(tr.PatchDiscriminator(**s["disc"]), d).to(device)
  images = torch.from_numpy(data["images"].transpose(0, 3, 1, 2).copy()).to(device)
  o, lc = ml_collections.ConfigDict(s["optimizer"]), ml_collections.ConfigDict(s["loss"])
  perceptual = None
  if lc.lpips_weight > 0:
    import warnings
    import lpips
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      perceptual = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(device)
  mode = s["torch_mode"]
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def make(compile_):
    return tr.TorchTrainStep(vae, disc, lr=o.lr, d_lr=o.d_lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                             grad_clip=o.grad_clip, ema_decay=s["ema_decay"], recon=lc.recon,
                             recon_weight=lc.recon_weight, log_mse_weight=lc.log_mse_weight,
                             kl_weight=lc.kl_weight, gan_weight=lc.gan_weight,
                             perceptual=perceptual, perceptual_weight=lc.lpips_weight, compile=compile_,
                             autocast_dtype=torch.bfloat16 if s["dtype"] == "bfloat16" else None,
                             disc_float32=s["disc"].get("dtype", "float32") == "float32")

  step = make(mode == "compile")
  first = {}
  try:
    for level in s["levels"]:
      start = time.perf_counter()
      for _ in range(1 + s["warmup"]):
        step(images, level)
      sync()
      first[str(level)] = time.perf_counter() - start
  except Exception as e:  # noqa: BLE001 - inductor needs a working C++/Triton toolchain
    if mode != "compile":
      raise
    print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); eager instead",
          file=sys.stderr)
    mode, step = "eager (compile failed)", make(False)
    for level in s["levels"]:
      for _ in range(1 + s["warmup"]):
        step(images, level)
  print(json.dumps({"torch_mode": mode, "first_steps_s": first, "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    level, n = (int(v) for v in line.split())
    for _ in range(n):
      step(images, level)
    sync()
    print(json.dumps({"done": n}), flush=True)


def part_lpips(s) -> dict:
  from benchmarks import lpips_bench
  return lpips_bench.measure(batch=s["lpips_batch"], size=s["lpips_size"], warmup=s["warmup"], repeats=s["repeats"],
                             steps=s["steps"], grad=True)


def part_fid(s) -> dict:
  from benchmarks import fid_bench
  return fid_bench.measure(batch=s["fid_batch"], size=s["fid_size"], warmup=s["warmup"], repeats=s["repeats"],
                           steps=max(1, s["steps"] // 2), precision="default")


def part_inference(s) -> dict:
  import jax
  import numpy as np
  from benchmarks.common import interleaved, rate_summary
  from benchmarks.train_bench import load_config
  from cat_jax.models.nested_vae import NestedVAE, build_model, init_params

  config = load_config(s["config"])
  config.model.dtype = s["dtype"]
  model = build_model(config.model)
  params = jax.jit(functools.partial(init_params, model, image_size=2 * 32))(jax.random.key(0))
  images = jax.device_put(np.random.default_rng(0).uniform(
      -1, 1, (s["infer_batch"], s["size"], s["size"], 3)).astype(np.float32))
  compiles, runs = {}, {}
  for level in s["levels"]:
    enc = jax.jit(lambda p, x, lvl: model.apply({"params": p}, x, lvl, method=NestedVAE.encode).mean,
                  static_argnums=2)
    enc_c, compiles[f"encode_{level}"] = compile_timed(enc, params, images, level)
    z = enc_c(params, images)
    dec = jax.jit(lambda p, z, lvl: model.apply({"params": p}, z, lvl, method=NestedVAE.decode), static_argnums=2)
    dec_c, compiles[f"decode_{level}"] = compile_timed(dec, params, z, level)

    def make_run(fn, arg):
      def run(n):
        out = None
        for _ in range(n):
          out = fn(params, arg)
        jax.block_until_ready(out)
      return run
    runs[f"encode_{level}"], runs[f"decode_{level}"] = make_run(enc_c, images), make_run(dec_c, z)
  if s["compile_only"]:
    return {"config": s["config"], "image_size": s["size"], "batch": s["infer_batch"], "dtype": s["dtype"],
            "compiles": compiles}
  for run in runs.values():
    run(s["warmup"])
  seconds = interleaved(runs, s["repeats"], s["steps"])
  return {"config": s["config"], "image_size": s["size"], "batch": s["infer_batch"], "dtype": s["dtype"],
          "compiles": compiles,
          "levels": {str(level): {k: rate_summary(seconds[f"{k}_{level}"], s["infer_batch"])
                                  for k in ("encode", "decode")} for level in s["levels"]}}


PART_FNS = {"env": part_env, "train_jax": part_train_jax, "train_torch": part_train_torch, "lpips": part_lpips,
            "fid": part_fid, "inference": part_inference}


def run_part(name: str, s: dict) -> None:
  """In the part's own process: set up JAX (cache, hit counter), run the part, print its JSON line."""
  start = time.perf_counter()
  if name != "env":
    enable_cache(s["cache_dir"])
    _count_cache_hits()
  result = PART_FNS[name](s)
  print(json.dumps({"part": name, "status": "ok", "wall_s": time.perf_counter() - start, **result}), flush=True)


# -- the driver -----------------------------------------------------------------------------------------------------
def _fmt(v, spec=".2f"):
  return "n/a" if v is None else format(v, spec)


def _spread(r):
  return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


def _rate(r):
  return f"{r['images_per_s']:.1f} ({r['images_per_s_min']:.1f}–{r['images_per_s_max']:.1f})"


def markdown(results: list[dict], command: str) -> str:
  """A markdown summary of the parts' JSON lines (medians with their spread over interleaved rounds)."""
  by = {r["part"]: r for r in results}
  lines = []
  env = by.get("env", {})
  if env.get("status") == "ok":
    lines.append(f"Device: {env['device_kind']} ({env['backend']}, torch on {env['torch_device']}, "
                 f"{env['cpu_count']} CPUs, load {_fmt(env['load_avg_1m'], '.1f')}); jax {env['jax']}, "
                 f"flax {env['flax']}, torch {env['torch']}. Command: `{command}`.\n")
  lines += ["| part | what | figure (median, spread over rounds) |", "|---|---|---|"]
  for r in results:
    part = r["part"]
    if r.get("status") != "ok":
      lines.append(f"| {part} | status | {r.get('status')} |")
      continue
    if part.startswith("prewarm/"):
      for key, c in r.get("compiles", {}).items():
        lines.append(f"| {part} | cold compile {key}: lower / compile s | {c['lower_s']:.1f} / {c['compile_s']:.1f} |")
      if "torch_first_steps_s" in r:
        lines.append(f"| {part} | torch.compile + warm-up s per level | "
                     f"{', '.join(f'{k}: {v:.0f}' for k, v in r['torch_first_steps_s'].items())} |")
    elif part == "train_jax":
      for key, c in r["compiles"].items():
        lines.append(f"| train_jax | compile {key}: lower / compile s (cache hit) | {c['lower_s']:.1f} / "
                     f"{c['compile_s']:.1f} ({'hit' if c['cache_hit'] else 'miss'}) |")
      for level, row in r["levels"].items():
        if "static" in row:
          lines.append(f"| train_jax | level {level} static images/s (MFU) | {_rate(row['static'])} "
                       f"({_fmt(row['static']['mfu'] and 100 * row['static']['mfu'], '.1f')}%) |")
        if "traced" in row:
          lines.append(f"| train_jax | level {level} traced images/s | {_rate(row['traced'])} |")
        if "traced_over_static" in row:
          lines.append(f"| train_jax | level {level} traced_over_static (step time) | "
                       f"{_spread(row['traced_over_static'])} |")
    elif part == "train_torch":
      for level, row in r["levels"].items():
        lines.append(f"| train_torch | level {level} jax / torch ({r['torch_mode']}) images/s | "
                     f"{_rate(row['jax'])} / {_rate(row['torch'])} |")
        lines.append(f"| train_torch | level {level} jax_over_torch | {_spread(row['jax_over_torch'])} |")
    elif part == "lpips":
      lines.append(f"| lpips | {r['mode']} flax / torch images/s | {_rate(r['flax'])} / {_rate(r['torch'])} |")
      lines.append(f"| lpips | flax_over_torch | {_spread(r['flax_over_torch'])} |")
    elif part == "fid":
      lines.append(f"| fid | ours / pytorch-fid images/s | {_rate(r['ours'])} / {_rate(r['pytorch_fid'])} |")
      lines.append(f"| fid | ours_over_ref | {_spread(r['ours_over_ref'])} |")
    elif part == "inference":
      for level, row in r["levels"].items():
        lines.append(f"| inference | level {level} encode / decode images/s | {_rate(row['encode'])} / "
                     f"{_rate(row['decode'])} |")
  cold = {k: c["compile_s"] for r in results if r["part"].startswith("prewarm/train_jax/") and r.get("status") == "ok"
          for k, c in r["compiles"].items()}
  statics = [v for k, v in cold.items() if k != "traced"]
  if "traced" in cold and statics:
    lines.append(f"| prewarm | traced / static cold compile (static: mean of {len(statics)}) | "
                 f"{cold['traced'] / (sum(statics) / len(statics)):.2f} |")
  return "\n".join(lines)


def _start(args: list[str], env: dict) -> tuple[subprocess.Popen, float]:
  # A session of its own, so that a timeout also ends the part's children (train_torch's torch worker).
  proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT, start_new_session=True)
  return proc, time.perf_counter()


def _finish(name: str, proc: subprocess.Popen, start: float, wait_s: float, timeout: float) -> dict:
  """The part's JSON line once it exits (or a timeout / error line), with its wall seconds."""
  try:
    stdout, stderr = proc.communicate(timeout=wait_s)
    lines = [l for l in stdout.splitlines() if l.startswith("{") and '"part"' in l]
    result = json.loads(lines[-1]) if lines else {"status": "error", "returncode": proc.returncode}
    if result.get("status") != "ok":
      result["stderr_tail"] = stderr[-1500:]
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    result = {"status": "timeout", "timeout_s": timeout}
  result["part"] = name
  result.setdefault("wall_s", time.perf_counter() - start)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="5 rounds of 4 steps (default 10 of 5)")
  parser.add_argument("--cpu", action="store_true", help="the demo config at 64², float32, no LPIPS in the step")
  parser.add_argument("--markdown", action="store_true", help="print a markdown table after the JSON lines")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per part (default 600, --quick 240)")
  parser.add_argument("--config", default=None, help="configs/cat.py variant (default: imagenet; --cpu: demo)")
  parser.add_argument("--size", type=int, default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  parser.add_argument("--levels", default=None, help="comma-separated levels (default 0,1,2)")
  parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=None, help="steps per round")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps after compiling")
  parser.add_argument("--torch-mode", choices=("compile", "eager"), default=None)
  parser.add_argument("--no-lpips", action="store_true", help="LPIPS off in the train step")
  parser.add_argument("--small-aux", action="store_true", help="tiny LPIPS / FID / inference batches (tests)")
  parser.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s of one device for MFU")
  parser.add_argument("--cache-dir", default=os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_CACHE))
  parser.add_argument("--no-cache", action="store_true", help="JAX's persistent compilation cache off")
  parser.add_argument("--prewarm", action="store_true",
                      help="compile every executable in parallel processes first (see the module docstring)")
  parser.add_argument("--compile-only", action="store_true", help="compile and report compile records, no timing")
  parser.add_argument("--executables", default=None,
                      help="train_jax's executables, e.g. static_0,traced (default: every level static, and traced)")
  parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
  parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)  # internal: train_torch's torch side
  args = parser.parse_args(argv)

  if args.torch_worker:
    torch_worker(args.torch_worker)
    return 0
  if args.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
  s = settings(args)
  if args.part:
    try:
      run_part(args.part, s)
    except Exception as e:  # noqa: BLE001 - reported as the part's line
      print(json.dumps({"part": args.part, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}),
            flush=True)
      traceback.print_exc()
      return 1
    return 0

  timeout = args.timeout or (240.0 if args.quick else 600.0)
  # On CPU, torch.compile's first steps alone take ~170 s: that part gets twice the budget unless --timeout is given.
  part_timeout = {"train_torch": timeout * 2 if args.cpu and not args.timeout else timeout}
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # torch shares the accelerator in some parts
  forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--markdown", "--prewarm")]
  parts = args.parts.split(",")
  for name in parts:
    if name not in PARTS:
      parser.error(f"unknown part {name!r}; parts: {', '.join(PARTS)}")
  results = []
  executables = s["executables"]
  if args.prewarm:
    jobs = [(f"prewarm/train_jax/{x}", ["--part", "train_jax", "--executables", x]) for x in executables
            if "train_jax" in parts]
    jobs += [(f"prewarm/{p}", ["--part", p]) for p in ("train_torch", "inference") if p in parts]
    # Allocate on demand: several processes share the accelerator while they compile.
    warm_env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    procs = [(name, _start([*forwarded, *extra, "--compile-only"], warm_env)) for name, extra in jobs]
    deadline = time.monotonic() + timeout
    for name, (proc, start) in procs:
      result = _finish(name, proc, start, max(1.0, deadline - time.monotonic()), timeout)
      results.append(result)
      print(json.dumps(result), flush=True)
      if name.startswith("prewarm/train_jax/") and result.get("status") != "ok":
        executables = [x for x in executables if x != name.rsplit("/", 1)[1]]  # not compiled again below
    if not executables:
      parts = [p for p in parts if p != "train_jax"]
  for name in parts:
    extra = ["--executables", ",".join(executables)] if executables and name in ("train_jax", "train_torch") else []
    proc, start = _start([*forwarded, *extra, "--part", name], env)
    budget = part_timeout.get(name, timeout)
    result = _finish(name, proc, start, budget, budget)
    results.append(result)
    print(json.dumps(result), flush=True)
  if args.markdown:
    print()
    print(markdown(results, "python benchmarks/suite.py " + " ".join(forwarded)))
  return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
