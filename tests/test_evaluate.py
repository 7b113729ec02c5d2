"""`python -m cat_jax.evaluate` on a runlocal checkpoint: every output file, per-level metrics, clear errors."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import lpips
import pytest
import torch
from PIL import Image

from cat_jax import evaluate as E
from cat_jax import weights as weight_files
from cat_jax.convert import lpips as convert_lpips
from cat_jax.data import get_source
from cat_jax.data.embedded import generate
from cat_jax.models import inception as inception_lib
from cat_jax.tokenizer import Tokenizer
from conftest import xla_flags
from test_tokenizer import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


@pytest.fixture(scope="session")
def workdir(runlocal_workdir):
  return runlocal_workdir  # conftest.py: configs/cat.py:runlocal trained once per session


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Converted LPIPS weights of a random torch LPIPS-VGG (real ones cannot be downloaded here), and a path for
  --inception_weights that ``cheap_inception`` below serves."""
  tmp = tmp_path_factory.mktemp("weights")
  torch.manual_seed(0)
  net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
  state = net.state_dict()
  weight_files.save_params(tmp / "lpips.msgpack", convert_lpips.convert_torch_lpips(state, state))
  return str(tmp / "inception.msgpack"), str(tmp / "lpips.msgpack")


@pytest.fixture
def cheap_inception(monkeypatch):
  """Stands in for ``load_inception``: 12 cheap image statistics per image instead of the Inception network's 2048
  features. The network and its loader are tested against pytorch-fid in test_fid.py; here the rFID bookkeeping of
  every row is what is checked, and 2048-d features made this one test cost ~10 Inception passes at 299x299 and ~25
  eigendecompositions of 2048x2048 covariances (the slowest test of the suite on a busy machine)."""
  loaded = []

  def load(path):
    loaded.append(str(path))
    def features(images):
      x = jnp.asarray(images, jnp.float32)
      h, w = x.shape[1] // 2, x.shape[2] // 2
      quads = [x[:, :h, :w], x[:, :h, w:], x[:, h:, :w], x[:, h:, w:]]
      edges = jnp.abs(jnp.diff(x, axis=1)).mean(axis=(1, 2))
      return jnp.concatenate([q.mean(axis=(1, 2, 3))[:, None] for q in quads] + [x.std(axis=(1, 2)), edges,
                             x.mean(axis=(1, 2))[:, :2]], axis=-1)
    return features

  monkeypatch.setattr(inception_lib, "load_inception", load)
  return loaded


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_evaluate_writes_every_file_with_finite_numbers(workdir, weights, cheap_inception, tmp_path, capsys):
  inception, lpips_path = weights
  out = tmp_path / "eval"
  rc = E.main(["--workdir", workdir, "--num_images", "8", "--scorers", "random,jpeg,mse,grade",
               "--inception_weights", inception, "--lpips_weights", lpips_path, "--out", str(out),
               "--num_grid_images", "4"])
  assert rc == 0
  assert cheap_inception == [inception]
  results = json.loads((out / "results.json").read_text())
  rows = results["rows"]
  assert list(rows) == ["fixed_8x", "fixed_16x", "fixed_32x", "area_bicubic_8x", "area_bicubic_16x",
                        "area_bicubic_32x", "dct_code_8x", "dct_code_16x", "dct_code_32x", "adaptive",
                        "budget:random", "budget:jpeg", "budget:mse", "budget:grade", "budget:oracle:psnr",
                        "budget:oracle:haarpsi"]
  for name, row in rows.items():
    for key in ("rfid", "lpips", "psnr", "ssim", "ms_ssim", "haarpsi", "gmsd", "mean_tokens", "images_per_s"):
      assert _finite(row[key]), (name, key, row.get(key))
    assert row["num_images"] == 8
  # The exact choice is the ceiling at the budget: fixed 16x is one of the choices it weighed.
  for m in ("psnr", "haarpsi"):
    assert rows[f"budget:oracle:{m}"]["mean_tokens"] <= 4 + 1e-9
    assert rows[f"budget:oracle:{m}"][m] >= rows["fixed_16x"][m] - 1e-9
  choices = results["allocation"]["all"]["choices"]
  assert set(choices) >= {"fixed_16x", "oracle:psnr", "oracle:haarpsi", "random", "jpeg", "mse", "grade"}
  assert all(choices["oracle:psnr"]["psnr"] >= c["psnr"] - 1e-9 for c in choices.values() if c["mean_tokens"] <= 4)
  assert [rows[f"fixed_{f}x"]["mean_tokens"] for f in (8, 16, 32)] == [16, 4, 1]
  # Budget mode: every measure is held to the fixed-16x mean token count.
  assert results["budget_tokens"] == 4
  for name in ("budget:random", "budget:jpeg", "budget:mse", "budget:grade"):
    assert abs(rows[name]["mean_tokens"] - 4) <= 1.0, (name, rows[name]["mean_tokens"])
  assert results["skipped"] == {}
  md = (out / "results.md").read_text()
  assert "| fixed_16x |" in md and "budget:jpeg" in md and "rFID" in md
  with Image.open(out / "rate_distortion.png") as im:
    assert im.size[0] > 400
  with Image.open(out / "reconstructions_000.png") as im:
    assert im.size == (4 * 32 + 3 * 2, 4 * 32 + 3 * 2)  # 4 images, rows: original, 8x, 16x, 32x
  assert "| adaptive |" in capsys.readouterr().out


def test_without_weights_rfid_and_lpips_are_reported_as_skipped(workdir, tmp_path, capsys):
  out = tmp_path / "eval"
  assert E.main(["--workdir", workdir, "--num_images", "4", "--scorers", "none", "--out", str(out)]) == 0
  results = json.loads((out / "results.json").read_text())
  assert set(results["skipped"]) == {"rfid", "lpips"}
  assert "python -m cat_jax.convert inception" in results["skipped"]["rfid"]
  assert all("rfid" not in r and "lpips" not in r and _finite(r["psnr"]) for r in results["rows"].values())
  stdout = capsys.readouterr().out
  assert "rFID skipped" in stdout and "LPIPS skipped" in stdout


def test_outputs_go_to_an_object_store(workdir, object_store, capsys):
  from cat_jax import storage

  assert E.main(["--workdir", workdir, "--num_images", "4", "--scorers", "none", "--out", "gs://bucket/eval",
                 "--num_grid_images", "2"]) == 0
  assert sorted(object_store.writes) == ["bucket/eval/levels.jsonl", "bucket/eval/rate_distortion.png",
                                         "bucket/eval/reconstructions_000.png", "bucket/eval/results.json",
                                         "bucket/eval/results.md"]
  results = json.loads(storage.as_path("gs://bucket/eval/results.json").read_text())
  assert results["num_images"] == 4 and _finite(results["rows"]["fixed_16x"]["psnr"])


def test_per_level_metrics_use_that_levels_reconstructions(workdir, tmp_path):
  """A decoder tampered at 32x only (it returns 0.9 x the input: near perfect) changes only the 32x numbers."""
  tok = Tokenizer.from_checkpoint(workdir)
  tampered = tok.with_params(tok.params)
  honest = tampered._reconstruct_fn

  def tampered_reconstruct(params, images, *, level, keep_code):
    recon, code_only = honest(params, images, level=level, keep_code=keep_code)
    return (0.9 * images if level == 2 else recon), code_only

  tampered._reconstruct_fn = tampered_reconstruct
  source = E._first(get_source("embedded", "validation", num_images=48, image_size=32), 12)
  kwargs = dict(dataset="embedded", image_size=32, scorers=["grade"], num_grid_images=2)
  good = E.run_evaluation(tok, source, out_dir=tmp_path / "good", **kwargs)["rows"]
  bad = E.run_evaluation(tampered, source, out_dir=tmp_path / "bad", **kwargs)["rows"]
  for name in ("fixed_8x", "fixed_16x"):
    assert good[name]["psnr"] == bad[name]["psnr"] and good[name]["ssim"] == bad[name]["ssim"], name
  assert bad["fixed_32x"]["psnr"] > good["fixed_32x"]["psnr"] + 5.0
  assert good["adaptive"]["level_counts"]["32x"] > 0
  for key in ("psnr/level0", "psnr/level1"):
    assert good["adaptive"]["per_level"][key] == bad["adaptive"]["per_level"][key]
  # (0.9 x the input is ~31.5 dB on these simple images; the tokenizer's own 32x ~26.8, flat ones kept exact)
  assert bad["adaptive"]["per_level"]["psnr/level2"] > good["adaptive"]["per_level"]["psnr/level2"] + 3.0


def test_baseline_rows_intervals_per_kind_and_compared_tokenizers(workdir, tmp_path):
  tok = Tokenizer.from_checkpoint(workdir)
  source = E._first(get_source("embedded", "validation", num_images=48, image_size=32), 16)
  results = E.run_evaluation(tok, source, out_dir=tmp_path, dataset="embedded", image_size=32, scorers=[],
                             num_grid_images=2, compare={"same_at_16x": (tok, "16x")}, bootstrap=200)
  rows = results["rows"]
  # A compared tokenizer is evaluated on the same images: the same model at 16x is fixed 16x, paired difference 0.
  assert rows["same_at_16x"]["psnr"] == pytest.approx(rows["fixed_16x"]["psnr"], abs=1e-4)
  assert results["paired_reference"] == "fixed_16x"
  assert rows["same_at_16x"]["psnr_minus_reference"] == pytest.approx(0.0, abs=1e-4)
  assert rows["adaptive"]["psnr_minus_reference"] == pytest.approx(
      rows["adaptive"]["psnr"] - rows["fixed_16x"]["psnr"], abs=1e-4)
  for name, row in rows.items():
    lo, hi = row["psnr_ci95"]
    assert lo <= row["psnr"] <= hi and hi - lo > 0.0, (name, lo, row["psnr"], hi)
    assert row["num_images"] == 16
    assert sum(results["kinds"].values()) == 16 and set(row["psnr_per_kind"]) == set(results["kinds"])
  # Fewer numbers per position, lower PSNR: the no-learning rows fall from 8x to 32x.
  for baseline in ("area_bicubic", "dct_code"):
    assert rows[f"{baseline}_8x"]["psnr"] > rows[f"{baseline}_16x"]["psnr"] > rows[f"{baseline}_32x"]["psnr"]
  md = (tmp_path / "results.md").read_text()
  assert "95% bootstrap interval" in md and "| dct_code_16x |" in md and "| same_at_16x |" in md


def test_paired_differences_against_any_row():
  from cat_jax import reports

  ids = [f"i{k}" for k in range(5)]
  psnr = {"fixed_16x": [20.0, 30.0, 25.0, 40.0, 22.0], "trained_16x": [21.0, 30.5, 26.0, 40.0, 23.0],
          "adaptive": [19.0, 33.0, 25.0, 41.0, 22.0]}
  results = {"rows": {n: {"level_counts": {"8x": 0, "16x": 5, "32x": 0}} for n in psnr}}
  reports.add_intervals_and_breakdown(results, {n: {"psnr": v} for n, v in psnr.items()}, ids, source=None,
                                      bootstrap=50, seed=0, reference="trained_16x")
  rows = results["rows"]
  assert results["paired_reference"] == "trained_16x" and "psnr_minus_reference" not in rows["trained_16x"]
  assert rows["fixed_16x"]["psnr_minus_reference"] == pytest.approx(-0.7)
  assert rows["adaptive"]["psnr_minus_reference"] == pytest.approx(-0.1)
  lo, hi = rows["fixed_16x"]["psnr_minus_reference_ci95"]  # every image's difference is -1, -0.5 or 0
  assert -1.0 <= lo <= -0.7 <= hi <= 0.0
  assert "| PSNR - trained_16x |" in reports._table(rows, list(rows), "trained_16x")[0]


def test_an_untrained_shortcut_model_is_the_dct_code_row(tmp_path):
  """With shortcuts, every residual branch starts at zero, so the untrained model is the DCT patch code exactly."""
  from cat_jax.models.nested_vae import NestedVAE, init_params

  model = NestedVAE(ch=8, ch_mult=(1, 1, 2, 2, 2, 2), num_res_blocks=1, z_channels=8, head_attention=False,
                    shortcuts=True, norm="rms")
  params = jax.jit(lambda rng: init_params(model, rng, image_size=32))(jax.random.key(0))  # faster than eager
  tok = Tokenizer(model, params, batch_size=8)
  source = E._first(get_source("embedded", "validation", num_images=48, image_size=32), 8)
  rows = E.run_evaluation(tok, source, out_dir=tmp_path, dataset="embedded", image_size=32, scorers=[],
                          num_grid_images=0, bootstrap=0)["rows"]
  for f in (8, 16, 32):
    assert rows[f"fixed_{f}x"]["psnr"] == pytest.approx(rows[f"dct_code_{f}x"]["psnr"], abs=1e-3), f
    assert rows[f"fixed_{f}x"]["psnr"] != pytest.approx(rows[f"area_bicubic_{f}x"]["psnr"], abs=0.1), f


def test_folder_data(workdir, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(3):
    Image.fromarray(generate(i, image_size=40, split="test")[0]).save(folder / f"{i}.png")
  out = tmp_path / "eval"
  assert E.main(["--workdir", workdir, "--data", f"folder:{folder}", "--scorers", "jpeg", "--out", str(out)]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["num_images"] == 3 and "adaptive" not in results["rows"]
  assert "budget:jpeg" in results["rows"] and results["notes"]


def _manifest(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_clear_errors(workdir, tmp_path, capsys):
  ids = get_source("embedded", "validation", num_images=48, image_size=32).ids()
  base = ["--workdir", workdir, "--num_images", "4", "--scorers", "none", "--out", str(tmp_path / "o")]

  def error(argv):
    capsys.readouterr()
    assert E.main(argv) == 2
    return capsys.readouterr().err

  bad_id = _manifest(tmp_path / "a.jsonl", [{"id": "embedded/validation/999999", "level": 0}])
  message = error(base + ["--manifest", bad_id])
  assert "999999" in message and "not in the dataset" in message
  bad_level = _manifest(tmp_path / "b.jsonl", [{"id": ids[0], "level": 7}])
  assert "level" in error(base + ["--manifest", bad_level])
  partial = _manifest(tmp_path / "c.jsonl", [{"id": ids[0], "level": 1}, {"id": ids[1], "level": 2},
                                            {"id": ids[2], "error": "unreadable"}])
  assert "no entry" in error(base + ["--manifest", partial, "--strict"])
  scores = _manifest(tmp_path / "d.jsonl", [{"id": ids[0], "score": 3, "level": 1}])
  assert "no entry" in error(base + ["--score_manifest", f"caption_llm={scores}", "--strict"])
  # Without --strict, images a manifest lacks (failed scores) are left out of every row and listed.
  assert E.main(base + ["--manifest", partial]) == 0
  results = json.loads((tmp_path / "o" / "results.json").read_text())
  assert results["num_images"] == 2 and all(r["num_images"] == 2 for r in results["rows"].values())
  assert results["rows"]["adaptive"]["level_counts"] == {"8x": 0, "16x": 1, "32x": 1}
  assert any("2 of 4 images left out" in note and ids[2] in note for note in results["notes"])
  # Score manifests go through the one reader too: an unfinished scoring run is refused, as for --manifest.
  unfinished = _manifest(tmp_path / "e.jsonl", [{"id": i, "score": 3, "level": None} for i in ids[:4]])
  assert "has not finished" in error(base + ["--score_manifest", f"caption_llm={unfinished}"])
  assert "does not exist" in error(["--workdir", str(tmp_path / "missing")])
  assert "incompatible" in error(base + ["--config", str(ROOT / "configs" / "cat.py") + ":demo"])
  folder = tmp_path / "images"
  folder.mkdir()
  Image.fromarray(generate(0, image_size=32, split="test")[0]).save(folder / "0.png")
  assert "'grade' needs the embedded" in error(base[:-2] + ["--data", f"folder:{folder}", "--scorers", "grade"])
  message = error(base + ["--paired-against", "fixed_64x"])
  assert "'fixed_64x' is not a row" in message and "dct_code_16x" in message


def test_evaluate_text_legibility_per_level_and_size_group(tmp_path, capsys):
  """evaluate --data text: the shipped demo, its DCT code and area+bicubic read by OCR on the text set; the originals'
  large words read, more tokens read more (1 - NED over all words: 8x above 32x for the model and the code)."""
  out = tmp_path / "text"
  assert E.main(["--workdir", "demo", "--data", "text", "--num-images", "4", "--out", str(out)]) == 0
  report = json.loads((out / "legibility.json").read_text())
  rows = report["rows"]
  assert set(rows) == {"original", "model", "dct_code", "area_bicubic"} and report["image_size"] == 256
  assert rows["original"]["-"]["large"]["word_accuracy"] >= 0.9
  for row in ("model", "dct_code"):
    assert rows[row]["8x"]["all"]["one_minus_ned"] > rows[row]["32x"]["all"]["one_minus_ned"] + 0.2, rows[row]
  md = (out / "legibility.md").read_text()
  assert "| model | 8x |" in md and "| original | - |" in md
  assert "legibility.md" in capsys.readouterr().out


def test_two_processes_evaluate_their_halves_into_one_report(workdir, tmp_path):
  """On 2 jax.distributed processes each reconstructs and measures its half of the images on its own devices (the
  checkpoint restored onto each process's mesh); the kept measurements are gathered, so the report (every row, its
  per-level numbers, bootstrap intervals and level choices) is one process's on all the images, written once."""
  import portpicker

  evaluate = [sys.executable, "-m", "cat_jax.evaluate", "--workdir", workdir, "--data", "embedded",
              "--num-images", "16", "--batch-size", "8", "--scorers", "jpeg,mse,random,grade", "--bootstrap", "50"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  one = subprocess.run(evaluate + ["--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=900,
                       env=env)
  assert one.returncode == 0, one.stderr[-3000:]
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(evaluate + ["--out", str(tmp_path / "two")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID=str(rank))) for rank in range(2)]
  outs = [proc.communicate(timeout=900) for proc in procs]
  for proc, (_, err) in zip(procs, outs):
    assert proc.returncode == 0, err[-3000:]
  assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]  # process 0 prints the table; both computed it

  def report(name):
    results = json.loads((tmp_path / name / "results.json").read_text())
    del results["command"], results["images_per_s_per_level"], results["processes"]
    for row in results["rows"].values():
      del row["images_per_s"]
    return results

  assert [json.loads((tmp_path / name / "results.json").read_text())["processes"] for name in ("one", "two")] == [1, 2]
  one_process, two_processes = report("one"), report("two")
  assert two_processes["num_images"] == 16 and {"budget:oracle:haarpsi", "budget:jpeg"} <= set(two_processes["rows"])
  # The same batches on the same kind of device: the numbers agree to the last bit.
  assert json.dumps(two_processes, sort_keys=True) == json.dumps(one_process, sort_keys=True)
  assert (tmp_path / "two" / "levels.jsonl").read_text() == (tmp_path / "one" / "levels.jsonl").read_text()
