"""The command lines at the images' native sizes (issue #42): encode, decode and score on a folder of mixed sizes
with a truncated and a tiny file; --image-size / --max-side on request; the sizes in index.jsonl; decode writing the
original size back; what each command says it measures in its first lines."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from cat_jax import decode as decode_cli
from cat_jax import encode as encode_cli
from cat_jax import score as score_cli
from cat_jax.data.latents import read_index

# (height, width) of the good images: none a multiple of 32 but the last
SIZES = {"wide.png": (70, 150), "sub/tall.jpg": (130, 60), "square.png": (64, 64)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  import skimage.data

  photo = skimage.data.astronaut()
  root = tmp_path_factory.mktemp("mixed")
  (root / "sub").mkdir()
  for k, (name, (h, w)) in enumerate(SIZES.items()):
    Image.fromarray(photo[40 * k:40 * k + h, 60 * k:60 * k + w]).save(root / name, quality=95)
  whole = io.BytesIO()
  Image.fromarray(photo[:100, :100]).save(whole, format="PNG")
  (root / "truncated.png").write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])
  Image.fromarray(photo[:20, :24]).save(root / "tiny.png")
  return root


def _png_size(path):
  with Image.open(path) as img:
    return img.height, img.width


def _check_bad_rows(rows):
  assert "cannot decode" in rows["truncated.png"]["error"], rows["truncated.png"]
  assert "24x20 is smaller than min_size=32" in rows["tiny.png"]["error"], rows["tiny.png"]


def test_encode_and_decode_at_the_native_size(folder, tmp_path, capsys):
  out, decoded = tmp_path / "latents", tmp_path / "decoded"
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(out), "--level", "16x"]) == 1
  err = capsys.readouterr().err
  first = err.splitlines()[0]
  assert first.startswith(f"encode: {folder}: 5 files, 5 sizes from 24x20 to 150x70 (width x height); native size")
  assert "levels: every image at 16x" in first
  assert re.search(r"5/5 \[[0-9:]+<[0-9:]+, +[0-9.]+(img/s|s/img)", err), err  # the bar: done, time, left, rate
  rows = read_index(out)
  _check_bad_rows(rows)
  for name, (h, w) in SIZES.items():
    row = rows[name]
    assert row["original_size"] == row["encoded_size"] == [h, w] and "resized" not in row
    # the latent covers the image padded to a multiple of 32, not a bucket: tokens at the image's own size
    assert row["latent_shape"][:2] == [-(-h // 32) * 2, -(-w // 32) * 2] and row["tokens"] == np.prod(
        row["latent_shape"][:2])
    assert _png_size(out / row["reconstruction"]) == (h, w)
  assert decode_cli.main(["--latents", str(out), "--out", str(decoded)]) == 0
  captured = capsys.readouterr()
  assert captured.err.splitlines()[0].startswith(f"decode: 3 latents in {out} with ")
  assert re.search(r"3/3 \[[0-9:]+<[0-9:]+, +[0-9.]+(img/s|s/img)", captured.err), captured.err
  for name, hw in SIZES.items():
    decoded_png = decoded / (name.rsplit(".", 1)[0] + ".png")
    assert _png_size(decoded_png) == hw
    np.testing.assert_array_equal(np.asarray(Image.open(decoded_png)),
                                  np.asarray(Image.open(out / rows[name]["reconstruction"])))


@pytest.mark.parametrize("flag,value", [("--max-side", 100), ("--image-size", 48)])
def test_resized_on_request_and_decoded_back(folder, tmp_path, flag, value):
  out, decoded = tmp_path / "latents", tmp_path / "decoded"
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(out), "--level", "32x",
                          "--no-reconstructions", flag, str(value)]) == 1
  rows = read_index(out)
  _check_bad_rows(rows)
  assert decode_cli.main(["--latents", str(out), "--out", str(decoded)]) == 0
  for name, (h, w) in SIZES.items():
    row = rows[name]
    assert row["original_size"] == [h, w]
    if flag == "--image-size":
      assert row["encoded_size"] == [value, value]
      want = (min(h, w), min(h, w))  # the square the centre crop covered
    else:
      scale = min(1.0, value / max(h, w))
      assert row["encoded_size"] == [max(1, round(h * scale)), max(1, round(w * scale))]
      want = (h, w)
    assert row.get("resized") == (None if row["encoded_size"] == [h, w] else flag[2:].replace("-", "_"))
    assert _png_size(decoded / (name.rsplit(".", 1)[0] + ".png")) == want


def test_a_file_the_manifest_lacks_keeps_its_real_reason(folder, tmp_path):
  manifest = tmp_path / "levels.jsonl"
  manifest.write_text(json.dumps({"id": "wide.png", "level": 2}) + "\n" +
                      json.dumps({"id": "square.png", "method": "caption_llm", "error": "EndpointError: timed out"}) + "\n")
  out = tmp_path / "latents"
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(out), "--level", "auto",
                          "--manifest", str(manifest), "--no-reconstructions"]) == 1
  rows = read_index(out)
  _check_bad_rows(rows)  # bad files say why they are bad, not that the manifest lacks them
  assert rows["wide.png"]["level"] == 2
  assert "its scoring failed" in rows["square.png"]["error"] and "EndpointError: timed out" in rows["square.png"]["error"]
  assert "not in the manifest" in rows["sub/tall.jpg"]["error"] and "new since it was scored" in rows["sub/tall.jpg"][
      "error"]


@pytest.mark.parametrize("argv,expected", [
    (["--image-size", "0"], "--image-size/--image_size: expected a positive integer, got 0"),
    (["--max-side", "-3"], "expected a positive integer, got -3"),
    (["--image-size", "64", "--max-side", "64"], "not allowed with argument"),
])
def test_sizes_that_mean_nothing_are_refused(folder, tmp_path, capsys, argv, expected):
  from cat_jax import evaluate as evaluate_cli

  for main, base in ((encode_cli.main, ["--checkpoint", "demo", "--input", str(folder), "--out", str(tmp_path)]),
                     (score_cli.main, ["--method", "jpeg", "--path", str(folder)]),
                     (evaluate_cli.main, ["--workdir", "demo", "--data", f"folder:{folder}"])):
    with pytest.raises(SystemExit) as exit_info:
      main(base + argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors


def test_score_at_the_native_size_or_max_side(folder, tmp_path, capsys):
  from cat_jax.complexity.scorers import jpeg_bpp

  native, small = tmp_path / "native.jsonl", tmp_path / "small.jsonl"
  assert score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(native), "--no-progress"]) == 1
  first = capsys.readouterr().err.splitlines()[0]
  assert first.startswith(f"score: {folder}: 5 files, 5 sizes from 24x20") and "native size" in first
  assert "method jpeg" in first
  assert score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(small), "--no-progress",
                         "--max-side", "40"]) == 1
  rows = [{r["id"]: r for r in map(json.loads, p.read_text().splitlines()) if "id" in r} for p in (native, small)]
  for name in SIZES:
    with Image.open(folder / name) as img:
      assert rows[0][name]["score"] == pytest.approx(jpeg_bpp(img.convert("RGB")), rel=1e-9)
      img = img.convert("RGB")
      scale = 40 / max(img.size)
      resized = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC, reducing_gap=3.0)
      assert rows[1][name]["score"] == pytest.approx(jpeg_bpp(resized), rel=1e-9)
  for r in rows:
    assert "cannot decode" in r["truncated.png"]["error"] and "smaller than min_size" in r["tiny.png"]["error"]


def test_evaluate_says_what_it_measures_and_shows_progress(folder, tmp_path, capsys):
  from cat_jax import evaluate as evaluate_cli

  assert evaluate_cli.main(["--workdir", "demo", "--data", f"folder:{folder}", "--out", str(tmp_path / "eval"),
                            "--bootstrap", "0", "--scorers", "none", "--no-baselines"]) == 0
  err = capsys.readouterr().err
  first = err.splitlines()[0]
  assert first.startswith(f"evaluate: step 14400 on folder:{folder.name} (all), 5 files, 5 sizes from 24x20 to "
                          "150x70 (width x height); native size (no resize)"), first
  assert "; every image at 8x, 16x and 32x; measures psnr, ssim" in first, first
  assert "no rFID, no LPIPS" in first and first.endswith("level scorers none")
  assert re.search(r"evaluate: .*3/5 \[[0-9:]+<[0-9:]+, +[0-9.]+(img/s|s/img)", err), err  # 2 files are bad
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["num_images"] == 3


def test_evaluate_lists_images_a_manifest_lacks_with_their_scoring_failure(folder, tmp_path, capsys):
  from cat_jax import evaluate as evaluate_cli

  scores = tmp_path / "scores.jsonl"
  assert score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(scores), "--no-progress"]) == 1
  assert evaluate_cli.main(["--workdir", "demo", "--data", f"folder:{folder}", "--manifest", str(scores),
                            "--out", str(tmp_path / "eval"), "--bootstrap", "0", "--scorers", "none",
                            "--no-baselines"]) == 0
  notes = json.loads((tmp_path / "eval" / "results.json").read_text())["notes"]
  note = next(n for n in notes if "images left out" in n)
  assert note.startswith("2 of 5 images left out") and "tiny.png (" in note and "truncated.png (" in note, note
  assert "smaller than min_size=32" in note and "cannot decode" in note, note


def test_a_dit_training_set_needs_one_size(folder, tmp_path, capsys):
  """--labels subfolder (latents for train_dit, which batches them) refuses native sizes instead of writing latents
  of many shapes."""
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(tmp_path / "o"),
                          "--labels", "subfolder"]) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "pass --image-size N" in errors[0], errors
  assert not (tmp_path / "o").exists()


def test_chunks_are_bounded_in_pixels_at_native_sizes(folder, tmp_path, monkeypatch):
  """A chunk of encode ends at MAX_CHUNK_PIXELS (from the files' headers), so large photos at their native size do not
  fill the memory; an image above the budget goes alone. The latents do not depend on the chunks."""
  from cat_jax.data.preprocess import Sizing

  files = encode_cli.list_inputs(str(folder))
  pixels = {i: encode_cli._pixels(p, Sizing()) for i, p in files}  # noqa: SLF001
  assert pixels["wide.png"] == 70 * 150 and pixels["truncated.png"] == 100 * 100  # its header is intact
  chunks = list(encode_cli._chunks(files, 10, Sizing(), max_pixels=12_000))  # noqa: SLF001
  assert [len(c) for c in chunks] == [2, 2, 1] and sum(chunks, []) == files  # 11,896 | 10,480 | 10,500, [[i for i, _ in c] for c in chunks]
  for chunk in chunks:
    assert len(chunk) == 1 or sum(pixels[i] for i, _ in chunk) <= 12_000
  assert [len(c) for c in encode_cli._chunks(files, 2, Sizing(max_side=40))] == [2, 2, 1]  # noqa: SLF001
  monkeypatch.setattr(encode_cli, "MAX_CHUNK_PIXELS", 12_000)
  small, whole = tmp_path / "small", tmp_path / "whole"
  for out in (small, whole):
    assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(out), "--level", "16x",
                            "--no-reconstructions"]) == 1
    monkeypatch.setattr(encode_cli, "MAX_CHUNK_PIXELS", 1 << 26)
  for name in SIZES:
    np.testing.assert_array_equal(np.load(small / "latents" / f"{name}.npz")["latent"],
                                  np.load(whole / "latents" / f"{name}.npz")["latent"])
  # decode's chunks, the same way: from the index's encoded sizes (or latent grids of older rows)
  rows = [{"encoded_size": [100, 100]}, {"encoded_size": [70, 150]}, {"factor": 16, "latent_shape": [4, 4, 16]},
          {"encoded_size": [200, 200]}, {"encoded_size": [10, 10]}]
  assert [list(r) for r in decode_cli._spans(rows, 10, max_pixels=21_000)] == [[0, 1], [2], [3], [4]]  # noqa: SLF001
  assert [list(r) for r in decode_cli._spans(rows, 2, max_pixels=1 << 26)] == [[0, 1], [2, 3], [4]]  # noqa: SLF001
  monkeypatch.setattr(decode_cli, "MAX_CHUNK_PIXELS", 12_000)
  assert decode_cli.main(["--latents", str(small), "--out", str(tmp_path / "d_small")]) == 0
  monkeypatch.setattr(decode_cli, "MAX_CHUNK_PIXELS", 1 << 26)
  assert decode_cli.main(["--latents", str(small), "--out", str(tmp_path / "d_whole")]) == 0
  for name in SIZES:
    png = name.rsplit(".", 1)[0] + ".png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d_small" / png)),
                                  np.asarray(Image.open(tmp_path / "d_whole" / png)))
