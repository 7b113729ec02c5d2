"""evaluate and score at the images' native sizes (issue #42), through the command lines on a folder of mixed sizes
with a truncated and a tiny file: evaluate's `auto` row gives each image the level `encode --level auto` gives it, in
the folder and alone; a token budget of `score` is counted at each image's own size, as `encode --manifest` spends
it and as the API's budget counts it."""

import json

import numpy as np
import pytest

from cat_jax import encode as encode_cli
from cat_jax import evaluate as evaluate_cli
from cat_jax import score as score_cli
from cat_jax.complexity import allocation
from cat_jax.complexity import runner
from cat_jax.data.latents import read_index
from test_cli_sizes import SIZES, folder  # noqa: F401 (the fixture: three good images, a truncated and a tiny file)


def _own_tokens(hw):
  """(3,) tokens at 8x / 16x / 32x of an image of ``hw``: its latent grid padded to a multiple of 32."""
  h, w = (-(-s // 32) * 32 for s in hw)
  return np.array([(h // f) * (w // f) for f in (8, 16, 32)])


def _levels(path):
  """{id: record} of a JSON-lines file (a manifest's header, without an id, left out)."""
  return {r["id"]: r for r in map(json.loads, path.read_text().splitlines()) if "id" in r}


def test_evaluate_at_native_sizes_and_auto_as_encode_chooses(folder, tmp_path, capsys):
  out = tmp_path / "eval"
  assert evaluate_cli.main(["--workdir", "demo", "--data", f"folder:{folder}", "--out", str(out), "--bootstrap", "0",
                            "--scorers", "jpeg", "--no-baselines", "--measures", "ssim", "--allocate-by", "psnr"]) == 0
  first = capsys.readouterr().err.splitlines()[0]
  assert first.startswith(f"evaluate: step 14400 on folder:{folder.name} (all), 5 files, 5 sizes from 24x20 to "
                          "150x70 (width x height); native size (no resize), computed at up to 5 padded shapes"), first
  assert "measured on its own pixels" in first and "measures psnr, ssim" in first and "no rFID, no LPIPS" in first
  results = json.loads((out / "results.json").read_text())
  assert results["num_images"] == 3 and results["sizes"].startswith("native size (no resize): 3 sizes")
  tokens = np.stack([_own_tokens(hw) for hw in SIZES.values()])  # 240/60/15, 160/40/10, 64/16/4
  for lvl, f in enumerate((8, 16, 32)):
    assert results["rows"][f"fixed_{f}x"]["mean_tokens"] == pytest.approx(tokens[:, lvl].mean(), rel=1e-12)
  assert results["budget_tokens"] == pytest.approx(tokens[:, 1].mean(), rel=1e-12)  # 38.67: fixed 16x's
  assert any("2 of 5 files skipped" in n and "tiny.png (24x20 is smaller than min_size=32)" in n
             and "truncated.png (cannot decode" in n for n in results["notes"]), results["notes"]
  rows = _levels(out / "levels.jsonl")
  assert {i: tuple(r["size"]) for i, r in rows.items()} == SIZES
  auto = {i: r["levels"]["auto"] for i, r in rows.items()}
  # A row's mean tokens are each image's tokens at its own size at the level the row gave it.
  assert results["rows"]["auto"]["mean_tokens"] == pytest.approx(
      np.mean([_own_tokens(SIZES[i])[lvl] for i, lvl in auto.items()]), rel=1e-12)
  jpeg = [_own_tokens(SIZES[i])[r["levels"]["budget:jpeg"]] for i, r in rows.items()]
  assert results["rows"]["budget:jpeg"]["mean_tokens"] == pytest.approx(np.mean(jpeg), rel=1e-12)

  # One answer for one image: encode --level auto on the folder, and on each image alone.
  latents = tmp_path / "latents"
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(latents), "--level", "auto",
                          "--no-reconstructions"]) == 1
  index = read_index(latents)
  assert {i: index[i]["level"] for i in SIZES} == auto
  for name in SIZES:
    alone = tmp_path / f"alone_{name.replace('/', '_')}"
    assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder / name), "--out", str(alone), "--level",
                            "auto", "--no-reconstructions"]) == 0
    assert read_index(alone)[name.rsplit("/", 1)[-1]]["level"] == auto[name], name


def test_evaluate_resizes_on_request(folder, tmp_path, capsys):
  from cat_jax.data.preprocess import Sizing

  out = tmp_path / "eval"
  assert evaluate_cli.main(["--workdir", "demo", "--data", f"folder:{folder}", "--out", str(out), "--bootstrap", "0",
                            "--scorers", "none", "--no-baselines", "--measures", "ssim", "--allocate-by", "psnr",
                            "--max-side", "100"]) == 0
  assert "resized to at most 100 on the longer side" in capsys.readouterr().err.splitlines()[0]
  sizes = {i: tuple(r["size"]) for i, r in _levels(out / "levels.jsonl").items()}
  assert sizes == {i: Sizing(max_side=100).sized_hw(hw) for i, hw in SIZES.items()}
  assert sizes["wide.png"] == (47, 100) and sizes["square.png"] == (64, 64)


def test_evaluate_max_side_on_fixed_size_data_is_one_error(capsys):
  assert evaluate_cli.main(["--workdir", "demo", "--data", "embedded", "--max-side", "100", "--num-images", "2"]) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "--max-side applies to --data folder:PATH" in errors[0], errors


def test_score_budget_counts_tokens_at_each_images_own_size(folder, tmp_path, capsys):
  from cat_jax.data.preprocess import Sizing, load_sized
  from cat_jax.tokenizer import Tokenizer

  manifest = tmp_path / "scores.jsonl"
  # 100 mean tokens: outside [4, 64], the range at 64x64, inside [9.67, 154.67] at these images' own sizes
  assert score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(manifest), "--no-progress",
                         "--budget-tokens", "100"]) == 1  # the two bad files
  err = capsys.readouterr().err
  assert "(at each image's own (encoded) size)" in err, err
  records = _levels(manifest)
  for name, hw in SIZES.items():
    assert records[name]["original_size"] == records[name]["encoded_size"] == list(hw)
  info = json.loads((tmp_path / "scores.jsonl.thresholds.json").read_text())
  assert info["mode"] == "budget" and info["image_size"] == "each image's own"
  levels = {i: records[i]["level"] for i in SIZES}
  spent = np.mean([_own_tokens(SIZES[i])[lvl] for i, lvl in levels.items()])
  assert info["mean_tokens"] == pytest.approx(spent, rel=1e-12)
  # The closest mean any pair of thresholds on these scores reaches (three images: every ordered split).
  order = sorted(SIZES, key=lambda i: records[i]["score"])
  reachable = [np.mean([_own_tokens(SIZES[i])[2 if k < a else 1 if k < b else 0] for k, i in enumerate(order)])
               for a in range(4) for b in range(a, 4)]
  assert abs(spent - 100) == pytest.approx(min(abs(m - 100) for m in reachable), abs=1e-9)

  # encode --manifest spends what the manifest counted, at the same sizes.
  latents = tmp_path / "latents"
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(latents), "--level", "auto",
                          "--manifest", str(manifest), "--no-reconstructions"]) == 1
  index = read_index(latents)
  assert np.mean([index[i]["tokens"] for i in SIZES]) == pytest.approx(spent, rel=1e-12)

  # The API's budget counts the same tokens: its choice spends at most the budget, and encode stores those tokens.
  tok = Tokenizer.from_pretrained("demo")
  images = [load_sized((folder / name).read_bytes(), Sizing())[0] for name in SIZES]
  chosen = tok.choose_levels(images, budget_tokens=100).levels
  table = allocation.tokens_table([x.shape[:2] for x in images])
  assert allocation.mean_of(table, chosen) <= 100
  latent = tok.encode(images, chosen)
  assert [v.shape[0] * v.shape[1] for v in latent.values] == [table[k, lvl] for k, lvl in enumerate(chosen)]

  # --max-side: the sizes recorded, and the budget counted, are those encode --max-side encodes at.
  small = tmp_path / "small.jsonl"
  assert score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(small), "--no-progress",
                         "--budget-tokens", "30", "--max-side", "64"]) == 1
  records = _levels(small)
  encoded = {i: Sizing(max_side=64).sized_hw(hw) for i, hw in SIZES.items()}
  assert {i: tuple(records[i]["encoded_size"]) for i in SIZES} == encoded
  info = json.loads((tmp_path / "small.jsonl.thresholds.json").read_text())
  assert info["mean_tokens"] == pytest.approx(
      np.mean([_own_tokens(encoded[i])[records[i]["level"]] for i in SIZES]), rel=1e-12)
  # a budget no image reaches at its size (1 to 240 tokens: tiny.png at 32x, wide.png at 8x): one error line, nothing
  # scored
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(tmp_path / "x.jsonl"),
                    "--budget-tokens", "300"])
  errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert e.value.code == 2 and len(errors) == 1 and "outside [1, 240]" in errors[0], errors
  assert "these images' own sizes" in errors[0] and not (tmp_path / "x.jsonl").exists()
  # one that the scored images cannot average is one error line once they are scored (rerun with another to resume)
  assert score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(tmp_path / "y.jsonl"),
                         "--no-progress", "--budget-tokens", "200"]) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
  assert len(errors) == 1 and "outside [9.66667, 154.667]" in errors[0] and "own sizes" in errors[0], errors


def test_an_old_manifest_without_sizes_counts_at_one_size_and_says_so(folder, tmp_path):
  from cat_jax.complexity.scorers import JpegScorer
  from cat_jax.data import get_source
  from cat_jax.data.preprocess import Sizing

  out = tmp_path / "scores.jsonl"
  source = get_source("folder", "all", path=str(folder))
  runner.score_source(source, JpegScorer(image_size=None), out, progress=False, sizing=Sizing())
  records = [json.loads(line) for line in out.read_text().splitlines()]
  for r in records:  # as a version that recorded no sizes wrote them
    r.pop("original_size", None), r.pop("encoded_size", None)
  out.write_text("".join(json.dumps(r) + "\n" for r in records))
  summary = runner.score_source(source, JpegScorer(image_size=None), out, progress=False, sizing=Sizing(),
                                budget_tokens=300, image_size=256)
  assert summary.skipped == 5 and summary.threshold_mode == "budget"
  assert summary.tokens_at.startswith("256x256 for every image (3 of 3 records lack their size")
  levels = [r["level"] for r in _levels(out).values() if "error" not in r]
  assert len(levels) == 3 and summary.mean_tokens == pytest.approx(np.mean(np.array([1024, 256, 64])[levels]))
