"""Where the train step's time goes: compile records, HLO statistics and a per-op profile, static vs traced level.

  python benchmarks/profile_step.py [--cpu] [--config demo] [--level 0] [--steps 3] [--variants static,traced]
                                    [--no-adaptive-weight] [--top 15]

Compiles ``cat_jax.train.train_step`` (as benchmarks/suite.py's train_jax part) for each variant, prints lower and
compile seconds, the optimised HLO's size (instructions, convolutions, conditionals), then runs ``--steps`` steps
under ``jax.profiler`` and prints each variant's busiest XLA ops by self time (time inside an op minus the ops it
contains, e.g. a ``conditional`` minus its branch's ops), grouped by op name with the trailing numbers dropped, and
again by the model layer each op computes (the optimised HLO's metadata: ``fwd``/``bwd`` and the Flax module path).
Self times are summed over all threads, so on a multi-core machine they can exceed the wall time.
One JSON line per variant at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def hlo_stats(text: str) -> dict[str, int]:
  """Counts of instructions, convolutions (including those inside fusions) and conditionals in HLO text."""
  return {"instructions": len(re.findall(r"^\s+(?:ROOT )?%?[\w.\-]+ = ", text, re.M)),
          "convolutions": len(re.findall(r" convolution\(", text)),
          "conditionals": len(re.findall(r" conditional\(", text)),
          "computations": len(re.findall(r"^(?:ENTRY )?%?[\w.\-]+ .*\{$", text, re.M))}


def op_self_times(trace_dir: str) -> collections.Counter:
  """Self time (ns) per XLA op (HLO instruction name) from a jax.profiler trace of XLA:CPU or GPU host threads."""
  from jax._src.lib import _profile_data
  paths = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
  totals: collections.Counter = collections.Counter()
  for plane in _profile_data.ProfileData.from_file(str(paths[-1])).planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events if e.duration_ns > 0),
                      key=lambda e: (e[0], -e[1]))
      stack: list[tuple[int, str]] = []  # (end, name) of the enclosing events
      for start, duration, name in events:
        while stack and stack[-1][0] <= start:
          stack.pop()
        totals[name] += duration
        if stack:  # time inside a child is not its parent's own
          totals[stack[-1][1]] -= duration
        stack.append((start + duration, name))
  for name in list(totals):
    if name.startswith(("end: ", "ThreadpoolListener", "ThunkExecutor", "$", "Pjit", "CommonPjRt")):
      del totals[name]
  return totals


def by_op_kind(totals: collections.Counter) -> collections.Counter:
  """Self times grouped by op name, trailing numbers dropped (``add_divide_fusion.12`` -> ``add_divide_fusion``)."""
  grouped: collections.Counter = collections.Counter()
  for name, ns in totals.items():
    grouped[re.sub(r"(\.\d+)+(\.clone)?(\.\d+)*$", "", name)] += ns
  return grouped


def instruction_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX source of its metadata (``op_name``, e.g.
  ``jit(step)/transpose(jvp(NestedVAE))/enc_stages_0_0/norm1/mul``): where an XLA op in a profile came from."""
  return {m.group(1): m.group(2) for m in
          re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text, re.M)}


def source_key(op_name: str | None) -> str:
  """A model layer and pass for an ``op_name``: ``bwd enc_stages_#_#/norm#``; wrappers (``jit(..)``, ``jvp(..)``),
  method scopes (``NestedVAE._dispatch``) and the primitive dropped, numbers as ``#``. Ops outside any module
  (losses, optimiser, EMA) are ``(no module)``."""
  if not op_name:
    return "(no source)"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/")[:-1] if "(" not in p and "." not in p]  # the last part is the primitive
  return f"{direction} {re.sub(r'[0-9]+', '#', '/'.join(parts)) if parts else '(no module)'}"


def by_source(totals: collections.Counter, hlo_text: str) -> collections.Counter:
  """Self times grouped by ``source_key`` of each op's HLO metadata (the layer of the model it computes)."""
  sources = instruction_sources(hlo_text)
  grouped: collections.Counter = collections.Counter()
  for name, ns in totals.items():
    grouped[source_key(sources.get(name))] += ns
  return grouped


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cpu", action="store_true", help="demo config at 64², float32 (as suite.py --cpu)")
  parser.add_argument("--config", default=None)
  parser.add_argument("--size", type=int, default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--level", type=int, default=0)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", default="static,traced")
  parser.add_argument("--no-adaptive-weight", action="store_true", help="the GAN weight fixed at 1")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--dump-hlo", default=None, help="write each variant's optimised HLO into this folder")
  return parser.parse_args(argv)


def suite_settings(args: argparse.Namespace) -> dict:
  """benchmarks/suite.py's settings for this run (its train_jax part's model, data and step), compile cache off."""
  from benchmarks import suite

  ns = argparse.Namespace(cpu=args.cpu, quick=True, config=args.config, size=args.size, batch=args.batch, dtype=None,
                          repeats=None, steps=None, warmup=None, torch_mode=None, levels=None, no_lpips=False,
                          small_aux=False, no_cache=True, cache_dir=None, peak_tflops=None, executables=None,
                          compile_only=False)
  return suite.settings(ns)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.cpu:
    os.environ["JAX_PLATFORMS"] = "cpu"

  import jax
  from benchmarks import suite

  s = suite_settings(args)
  suite._count_cache_hits()
  t = suite.JaxTrain(s)
  if args.no_adaptive_weight:
    t.config.loss.adaptive_gan_weight = False
  results = []
  for variant in args.variants.split(","):
    call, info = t.compile(args.level, traced=variant == "traced")
    run = t.runner(call, args.level)
    run(2)
    start = time.perf_counter()
    run(args.steps)
    step_s = (time.perf_counter() - start) / args.steps
    with tempfile.TemporaryDirectory() as trace_dir:
      jax.profiler.start_trace(trace_dir)
      run(args.steps)
      jax.profiler.stop_trace()
      raw = op_self_times(trace_dir)
    text = t.last_compiled.as_text()
    ops, layers = by_op_kind(raw), by_source(raw, text)
    if args.dump_hlo:
      pathlib.Path(args.dump_hlo).mkdir(parents=True, exist_ok=True)
      (pathlib.Path(args.dump_hlo) / f"{variant}_level{args.level}.hlo.txt").write_text(text)
    total = sum(v for v in ops.values() if v > 0)
    row = {"variant": variant, "level": args.level, "config": s["config"], "adaptive_weight":
           not args.no_adaptive_weight, "step_s": step_s, **info, "hlo": hlo_stats(text),
           "op_self_ms_per_step": {k: v / 1e6 / args.steps for k, v in ops.most_common(args.top)},
           "source_self_ms_per_step": {k: v / 1e6 / args.steps for k, v in layers.most_common(args.top)},
           "profiled_ms_per_step": total / 1e6 / args.steps}
    results.append(row)
    print(f"\n== {variant} (level {args.level}): lower {info['lower_s']:.1f} s, compile {info['compile_s']:.1f} s, "
          f"step {1e3 * step_s:.0f} ms, HLO {row['hlo']}")
    for title, counter in (("by XLA op", ops), ("by model layer (HLO metadata)", layers)):
      print(f"  {title}:")
      for name, ns_ in counter.most_common(args.top):
        print(f"  {ns_ / 1e6 / args.steps:9.1f} ms/step  {100 * ns_ / total:5.1f}%  {name}")
  for row in results:
    print(json.dumps(row))


if __name__ == "__main__":
  main()
