"""benchmarks/suite.py runs end to end on a CPU (a tiny config) and every part reports sane fields.

No timings are asserted (a shared CI machine makes them meaningless); what is checked: each part's JSON line, the
compile records (the persistent cache misses in a fresh cache directory, then hits when a later part compiles the
same step again), per-level ratios with their spreads, parity figures of the LPIPS and FID comparisons, and the
markdown table.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402
from conftest import compile_flags  # noqa: E402


def _ratio_ok(r):
  return 0 < r["min"] <= r["median"] <= r["max"]


def _rate_ok(r, rounds):
  return r["rounds"] == rounds and 0 < r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]


def test_suite_quick_cpu(tmp_path):
  cache = tmp_path / "jax_cache"
  cmd = [sys.executable, "benchmarks/suite.py", "--quick", "--cpu", "--markdown", "--prewarm", "--config", "runlocal",
         "--size", "32", "--batch", "2", "--levels", "0", "--repeats", "2", "--steps", "1", "--warmup", "1",
         "--torch-mode", "eager", "--small-aux", "--cache-dir", str(cache), "--timeout", "900"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  # Not conftest's 8 simulated devices; its faster compiles as in every test (conftest.compile_flags): no timing is
  # asserted.
  env["XLA_FLAGS"] = compile_flags()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  by_part = {line["part"]: line for line in lines}
  prewarm = ["prewarm/train_jax/static_0", "prewarm/train_jax/traced", "prewarm/train_torch", "prewarm/inference"]
  assert list(by_part) == prewarm + list(suite.PARTS), proc.stdout + proc.stderr[-3000:]
  for part, line in by_part.items():
    assert line["status"] == "ok", (part, line)
  assert proc.returncode == 0

  # The prewarm compiles every executable cold (a fresh cache directory), side by side ...
  for name in ("static_0", "traced"):
    record = by_part[f"prewarm/train_jax/{name}"]["compiles"][name]
    assert record["lower_s"] > 0 and record["compile_s"] > 0 and record["flops"] > 0
    assert record["cache_hit"] is False
  assert by_part["prewarm/train_torch"]["torch_first_steps_s"].keys() == {"0"}
  assert set(by_part["prewarm/inference"]["compiles"]) == {"encode_0", "decode_0"}
  assert any(cache.iterdir())  # compiled executables were written

  env_line = by_part["env"]
  assert env_line["backend"] == "cpu" and env_line["jax"] == jax.__version__ and env_line["torch"]

  # ... and the timed parts load them from the persistent cache.
  train = by_part["train_jax"]
  assert (train["config"], train["image_size"], train["batch"], train["gan"]) == ("runlocal", 32, 2, True)
  assert set(train["compiles"]) == {"static_0", "traced"}
  for name, record in train["compiles"].items():
    assert record["cache_hit"] is True
    assert record["flops"] == by_part[f"prewarm/train_jax/{name}"]["compiles"][name]["flops"]
  assert "traced_compile_over_static" not in train  # only from cold compiles
  level = train["levels"]["0"]
  assert _rate_ok(level["static"], 2) and _rate_ok(level["traced"], 2)
  assert _ratio_ok(level["traced_over_static"])
  assert level["static"]["mfu"] is None  # no known peak for a CPU
  assert all(c["cache_hit"] for c in by_part["inference"]["compiles"].values())

  vs_torch = by_part["train_torch"]
  assert vs_torch["torch_mode"] == "eager"
  assert vs_torch["jax_compiles"]["static_0"]["cache_hit"] is True  # compiled in the prewarm
  assert _rate_ok(vs_torch["levels"]["0"]["torch"], 2) and _ratio_ok(vs_torch["levels"]["0"]["jax_over_torch"])

  lpips = by_part["lpips"]
  assert lpips["mode"] == "distance+grad" and lpips["max_abs_diff"] < 1e-4 and _ratio_ok(lpips["flax_over_torch"])
  fid = by_part["fid"]
  assert fid["max_abs_feature_diff"] < 1e-3 and _ratio_ok(fid["ours_over_ref"])
  inference = by_part["inference"]["levels"]["0"]
  assert _rate_ok(inference["encode"], 2) and _rate_ok(inference["decode"], 2)

  table = proc.stdout[proc.stdout.index("| part |"):]
  for part in suite.PARTS[1:]:
    assert f"| {part} |" in table
  assert "traced_over_static" in table and "jax_over_torch" in table
  assert "| prewarm/train_jax/traced | cold compile traced" in table and "traced / static cold compile" in table


def test_markdown_reports_failed_parts():
  table = suite.markdown([{"part": "env", "status": "timeout"}, {"part": "fid", "status": "error"}], "cmd")
  assert "| env | status | timeout |" in table and "| fid | status | error |" in table


def test_flops_fall_back_to_the_cpu_lowering_where_a_backend_has_no_count():
  from benchmarks.train_bench import xla_flops

  class NoCount:  # a GPU lowering in jax 0.11.2: no cost analysis before compiling
    def cost_analysis(self):
      return None

  f = jax.jit(lambda x, w: jax.lax.conv(x, w, (1, 1), "SAME"))
  x, w = jax.numpy.ones((1, 3, 8, 8)), jax.numpy.ones((4, 3, 3, 3))
  counted = xla_flops(f.lower(x, w))
  assert counted > 8 * 8 * 4 * 3  # at least one multiply-add per output and input channel
  assert xla_flops(NoCount(), lambda: f.trace(x, w).lower(lowering_platforms=("cpu",))) == counted
  assert xla_flops(NoCount()) is None


def test_profile_step_builds_the_suites_settings():
  """benchmarks/profile_step.py reuses suite.settings (it broke once when the suite grew new options)."""
  from benchmarks import profile_step

  s = profile_step.suite_settings(profile_step.parse_args(["--cpu"]))
  assert (s["config"], s["size"], s["batch"], s["dtype"], s["cache_dir"]) == ("demo", 64, 16, "float32", None)
  s = profile_step.suite_settings(profile_step.parse_args(["--config", "runlocal", "--size", "32", "--batch", "2"]))
  assert (s["config"], s["size"], s["batch"]) == ("runlocal", 32, 2)


def test_profile_step_names_the_layer_each_xla_op_computes():
  """profile_step's by-layer view: an XLA op's time goes to the Flax module and pass its HLO metadata names."""
  import collections

  import flax.linen as nn
  from benchmarks import profile_step

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.RMSNorm(name="norm1")(nn.Dense(4, name="fc")(x))

  net = Net()
  x = jax.numpy.ones((2, 3))
  params = net.init(jax.random.key(0), x)
  loss = lambda p: jax.numpy.sum(net.apply(p, x) ** 2)
  text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  sources = profile_step.instruction_sources(text)
  assert any(s.startswith("jit(<lambda>)/transpose(jvp(Net))/") for s in sources.values()), sources
  # Every instruction given one nanosecond: each key counts the instructions from that layer and pass.
  layers = profile_step.by_source(collections.Counter({name: 1 for name in sources}), text)
  assert {"fwd fc", "fwd norm#", "bwd norm#"} <= set(layers), layers
  assert sum(layers.values()) == len(sources)

  key = profile_step.source_key
  assert key("jit(step)/transpose(jvp(NestedVAE))/enc_stages_0_1/norm2/mul") == "bwd enc_stages_#_#/norm#"
  assert key("jit(step)/jvp(NestedVAE)/NestedVAE._dispatch/dec_conv_out/conv_general_dilated") == "fwd dec_conv_out"
  assert key("jit(step)/mul") == "fwd (no module)" and key(None) == "(no source)"
  assert profile_step.by_op_kind(collections.Counter({"add_fusion.1": 2, "add_fusion.12.clone": 3})) == {
      "add_fusion": 5}


def test_ops_bench_compares_the_same_math_per_layer(capsys):
  """benchmarks/ops_bench.py: JAX runs the model's own layers, torch the same math in NCHW; every op's outputs and
  gradients agree, and each line carries the interleaved rates and ratio."""
  from benchmarks import ops_bench

  results = ops_bench.main(["--batch", "2", "--size", "8", "--channels", "4", "--repeats", "2", "--steps", "1",
                            "--torch-mode", "eager"])
  assert [r["op"] for r in results] == list(ops_bench.OPS)
  for r in results:
    assert r["max_abs_diff"] < 1e-4, r
    assert r["backward"] == (r["op"] != "conv3x3_fwd")
    assert _rate_ok(r["jax"], 2) and _rate_ok(r["torch"], 2) and _ratio_ok(r["jax_over_torch"])
  assert "jax_over_torch" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    ops_bench.main(["--ops", "rmsnorm,layernorm"])


def test_the_suite_times_the_trainers_step_with_the_configs_discriminator_dtype():
  import jax.numpy as jnp

  from cat_jax import train
  from conftest import load_config

  t = suite.JaxTrain(dict(config="runlocal", batch=2, size=32, lpips=False, dtype="bfloat16"))
  assert t.step_fn.func is train.train_step and t.step_fn.keywords["config"] is t.config
  assert t.model.dtype == jnp.bfloat16 and t.disc.dtype == jnp.float32  # config.disc.dtype, not the model's
  config = load_config("cat.py", "runlocal")
  assert config.disc.dtype == "float32"
  config.disc.dtype = "bfloat16"
  assert train.make_train_step(config).disc.dtype == jnp.bfloat16
  config.disc.dtype = "int8"
  with pytest.raises(ValueError, match="disc.dtype must be one of"):
    train.make_train_step(config)


def test_score_concurrency_runs_and_counts_every_request():
  cmd = [sys.executable, "benchmarks/score_concurrency.py", "--images", "4", "--workers", "1,2", "--latency_s", "0.01"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert proc.returncode == 0 and [line["workers"] for line in lines] == [1, 2], proc.stderr[-2000:]
  for line in lines:  # three requests per image (caption, perception answers, score), all scored
    assert line["images"] == 4 and line["requests"] == 12 and line["images_per_s"] > 0
  assert lines[0]["max_in_flight"] == 1


def test_level_cost_runs_every_way_of_choosing_levels():
  cmd = [sys.executable, "benchmarks/level_cost.py", "--images", "4", "--repeats", "1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  lines = {line["what"]: line for line in map(json.loads, (l for l in proc.stdout.splitlines() if l.startswith("{")))}
  assert proc.returncode == 0 and list(lines) == ["encode", "jpeg", "predictor", "predictor_each", "target_psnr",
                                                  "auto"], proc.stderr[-2000:]
  assert lines["encode"]["over_encode"] == 1.0 and all(line["images_per_s"] > 0 for line in lines.values())
  assert sum(lines["target_psnr"]["level_counts"]) == 4


def test_encode_mixed_sizes_counts_compiles_before_and_after(tmp_path):
  """Four photos with sides up to 200: each way encodes and decodes them all; with buckets one program per bucket
  shape and entry point (one batch size), without at least one per padded shape; the buckets' extra padding changes
  the reconstructions of the real pixels a little (the convolutions' zero padding sits further out), not the
  images' sizes. No timing is asserted."""
  out = tmp_path / "mixed.json"
  cmd = [sys.executable, "benchmarks/encode_mixed_sizes.py", "--num-images", "4", "--min-side", "100", "--max-side",
         "200", "--json", str(out)]
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=compile_flags())
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  exact, bucketed = r["exact"], r["bucketed"]
  assert bucketed["compiles_encode"] == bucketed["compiles_decode"] == r["distinct_bucket_shapes"]
  assert exact["compiles_encode"] >= r["distinct_padded_shapes"] >= r["distinct_bucket_shapes"]
  assert r["bucket_pixels_over_padded"] >= 1.0 and r["ratio"]["compiles"] >= 1.0
  for way in (exact, bucketed):
    assert 0 < way["compile_s"] and way["images_per_s"] > 0 and 15 < way["mean_psnr"] < 50
  assert abs(r["psnr_change_db"]) < 0.5 and r["max_pixel_difference"] < 1.0


def test_measure_cost_times_every_measure_against_psnr(capsys):
  """benchmarks/measure_cost.py: every registry measure timed in the same interleaved rounds as PSNR, with its
  ratio and the mean value of the (blurred) batch; no timing is asserted."""
  from benchmarks import measure_cost
  from cat_jax.metrics import image_quality

  results = measure_cost.main(["--batch", "2", "--size", "32", "--repeats", "2", "--steps", "1"])
  assert [r["measure"] for r in results] == list(image_quality.MEASURES)  # psnr, the reference, first
  for r in results:
    assert (r["batch"], r["image_size"], r["rounds"]) == (2, 32, 2)
    assert 0 < r["ms_per_image_min"] <= r["ms_per_image"] <= r["ms_per_image_max"] and _ratio_ok(r["over_psnr"])
  assert results[0]["over_psnr"] == {"median": 1.0, "min": 1.0, "max": 1.0}
  values = {r["measure"]: r["mean_value_vs_blur"] for r in results}
  assert 20 < values["psnr"] < 50 and 0 < values["gmsd"] < 0.3 and 0.5 < values["haarpsi"] < 1  # blurred, not equal
  assert "| haarpsi |" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    measure_cost.main(["--measures", "psnr,lpips"])
  with pytest.raises(SystemExit):
    measure_cost.main(["--size", "8"])  # under SSIM's 11x11
