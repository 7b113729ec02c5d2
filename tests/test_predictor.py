"""The learned level predictor: it learns its teacher (far past the majority level), saves and resumes, ships with a
tokenizer for knob-free levels="auto", and scores through score / evaluate like the other measures."""

import json

import numpy as np
import pytest

from cat_jax import Tokenizer
from cat_jax.complexity import predictor as predictor_lib
from cat_jax.complexity.thresholds import levels_for_scores
from cat_jax.data import EmbeddedSource, PreprocessConfig, preprocess
from conftest import load_config


def _embedded(n, split="validation", size=64):
  source = EmbeddedSource(split, num_images=n, image_size=size)  # drawn at the demo's size, as it trained
  prep = PreprocessConfig(image_size=size, min_size=1)
  return [preprocess(source[i]["image"], prep) for i in range(n)], [source.kind(i) for i in range(n)]


def test_agreement_statistics():
  assert predictor_lib.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert predictor_lib.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  np.testing.assert_allclose(predictor_lib.ranks([5, 1, 5, 3]), [2.5, 0, 2.5, 1])  # ties share their mean rank
  scores = np.arange(10.0)
  low, high = predictor_lib.mix_thresholds(scores, [2, 3, 5])  # 2 at 8x, 3 at 16x, 5 at 32x
  assert np.bincount(levels_for_scores(scores, (low, high)), minlength=3).tolist() == [2, 3, 5]
  a = predictor_lib.agreement([0, 1, 2, 3], [0, 1, 2, 3], [2, 2, 1, 0], (1.5, 2.5), majority_level=2)
  assert a["exact_level"] == 1.0 and a["majority_exact_level"] == 0.5 and a["spearman"] == pytest.approx(1.0)


def test_predictor_learns_its_teacher_far_past_the_majority_level(tmp_path):
  """A short run on the embedded grade: on validation images it never saw, its scores rank like the teacher's and its
  levels match the teacher's far more often than the majority level does; it saves, loads and resumes."""
  from cat_jax import train_predictor

  config = load_config("predictor.py", "runlocal")
  config.update_from_flattened_dict({
      "data.source_kwargs": {"num_images": 512, "image_size": 64}, "data.image_size": 64, "data.min_size": 64,
      "data.eval_images": 200, "batch_size": 32, "num_steps": 300, "optimizer.warmup_steps": 20,
      "ema_decay": 0.95, "calibration_images": 512, "log_every": 100, "checkpoint_every": 300})
  workdir = str(tmp_path / "pred")
  predictor = train_predictor.train_and_evaluate(config, workdir)
  val = predictor.info["validation"]
  # Measured: Spearman ~0.9 and exact level ~0.8 against a majority level of ~0.38 (the grade has 8 kinds).
  assert val["images"] == 200 and val["spearman"] > 0.7, val
  assert val["exact_level"] > val["majority_exact_level"] + 0.25, val
  # The thresholds are calibrated to the fixed-16x mean token count on the training images (64x64: 64 / 16 / 4).
  counts = np.array(predictor.info["calibration"]["level_counts"])
  assert abs(counts @ np.array([64, 16, 4]) / counts.sum() - 16) < 1.0
  loaded = predictor_lib.LevelPredictor.load(workdir)
  images, _ = _embedded(8)
  np.testing.assert_allclose(loaded.predict(images), predictor.predict(images), rtol=1e-6, atol=1e-6)
  assert loaded.thresholds == pytest.approx(predictor.thresholds)
  # Attached to a tokenizer, it is that tokenizer's knob-free levels="auto", at its calibrated thresholds.
  tok = Tokenizer.from_pretrained("demo")
  block = tok.set_level_predictor(workdir)
  assert block["scorer"] == "predictor" and block["thresholds"] == pytest.approx(predictor.thresholds)
  np.testing.assert_array_equal(tok.assign_levels(images, "auto"),
                                levels_for_scores(predictor.predict(images), predictor.thresholds))
  # Re-running the finished run resumes at its last step and writes the same predictor again.
  again = train_predictor.train_and_evaluate(config, workdir)
  np.testing.assert_allclose(again.predict(images), predictor.predict(images), rtol=1e-6, atol=1e-6)


def test_demo_ships_its_predictor_for_knob_free_auto(tmp_path):
  """Tokenizer.from_pretrained("demo").encode(x, levels="auto"): its predictor sends flat images to 32x and dense text
  and noise textures to 8x or 16x; budget_tokens and thresholds override; save_pretrained carries it."""
  demo = Tokenizer.from_pretrained("demo")
  assert demo.level_predictor is not None and demo.auto_levels["scorer"] == "predictor"
  assert demo.auto_levels["teacher"] == "mse:demo" and demo.auto_levels["budget_tokens"] == 16
  images, kinds = _embedded(96)
  source = EmbeddedSource("validation", num_images=96, image_size=64)
  levels = demo.encode(images, levels="auto").levels
  names = [k.name for k in kinds]
  noise = [i for i in range(96) if "noise texture" in source[i]["caption"]]
  assert {"flat", "dense_text"} <= set(names) and noise
  assert all(lvl == 2 for lvl, name in zip(levels, names) if name == "flat")
  assert all(lvl in (0, 1) for lvl, name in zip(levels, names) if name == "dense_text")
  # Its teacher is the demo's own 32x error: the tinted gravel, grass and brick close-ups reconstruct well at 32x
  # at this size and go there; the fine noise textures do not.
  assert all(levels[i] in (0, 1) for i in noise)
  np.testing.assert_array_equal(levels, levels_for_scores(demo.level_predictor.predict(images),
                                                          demo.auto_levels["thresholds"]))
  # Overrides: a budget of 4 tokens per 64x64 image is 32x for all; 40 is met within budget_thresholds' 1% (the
  # images at 8x / 16x / 32x cost 64 / 16 / 4 tokens); explicit thresholds.
  assert set(demo.assign_levels(images, "auto", budget_tokens=4).tolist()) == {2}
  tokens = np.array([64, 16, 4])[demo.assign_levels(images, "auto", budget_tokens=40)]
  assert abs(tokens.mean() - 40) <= 0.4
  assert set(demo.assign_levels(images, "auto", thresholds=(1e9, 1e9)).tolist()) == {2}
  with pytest.raises(ValueError, match="budget_tokens applies to levels='auto'"):
    demo.assign_levels(images, "16x", budget_tokens=16)

  demo.save_pretrained(tmp_path / "copy")
  copy = Tokenizer.from_pretrained(tmp_path / "copy")
  assert copy.auto_levels == demo.auto_levels
  np.testing.assert_array_equal(copy.encode(images, levels="auto").levels, levels)
  (tmp_path / "copy" / predictor_lib.WEIGHTS_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="holds no level predictor"):
    Tokenizer.from_pretrained(tmp_path / "copy")


def test_score_and_evaluate_take_the_predictor(tmp_path, capsys):
  """score --method predictor writes the predictor's scores; evaluate's budget table gets a predictor row at the
  fixed-16x mean token count."""
  from cat_jax import evaluate, score
  from cat_jax.complexity.manifest import read_manifest
  from cat_jax.complexity.scorers import prepare_image
  from cat_jax.data import get_source
  from cat_jax.data.preprocess import to_model_range

  out = tmp_path / "m.jsonl"
  assert score.main(["--method", "predictor", "--checkpoint", "demo", "--source", "embedded", "--split",
                     "validation", "--limit", "12", "--image-size", "64", "--out", str(out), "--no-progress"]) == 0
  records = read_manifest(out)
  source = get_source("embedded", "validation")
  demo = Tokenizer.from_pretrained("demo")
  want = demo.level_predictor.predict([to_model_range(np.asarray(prepare_image(source[i]["image"], 64)))
                                       for i in range(12)])
  got = [records[source.id_of(i)]["score"] for i in range(12)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(SystemExit) as exit_info:  # a folder without a predictor: one line, status 2
    score.main(["--method", "predictor", "--checkpoint", str(tmp_path), "--limit", "1"])
  assert exit_info.value.code == 2 and "has no level predictor" in capsys.readouterr().err

  assert evaluate.main(["--workdir", "demo", "--data", "embedded", "--num-images", "24", "--scorers",
                        "predictor,random", "--bootstrap", "0", "--no-baselines", "--out", str(tmp_path / "ev")]) == 0
  rows = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
  assert abs(rows["budget:predictor"]["mean_tokens"] - 16) <= 4  # the budget, to the granularity of 24 images


def test_agreement_script_on_unseen_photos():
  """scripts/predictor_agreement.py: the demo's predictor against its teacher on photos it never saw."""
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "scripts/predictor_agreement.py", "--predictor", "demo", "--data", "heldout",
                         "--teacher", "mse:demo", "--num-images", "24"], capture_output=True, text=True, cwd=root,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # Measured on these 24 crops: Spearman ~0.97; the majority level is right for about a third.
  assert result["images"] == 24 and result["spearman"] > 0.8, result
  assert result["exact_level"] > result["majority_exact_level"], result
