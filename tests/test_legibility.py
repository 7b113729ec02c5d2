"""The text legibility set and measure: deterministic, read by the recogniser, lowered by blur, chance when shuffled."""

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cat_jax.data import text_set
from cat_jax.data.preprocess import to_model_range
from cat_jax.metrics import legibility as G

VOCAB = sorted({G.normalise(w) for w in text_set.VOCABULARY})


def _of_groups(groups, n):
  """The first ``n`` images of the set in ``groups`` (the set cycles through the groups)."""
  picked = [i for i in range(4 * n * len(text_set.SIZE_GROUPS)) if text_set.group_of(i).name in groups][:n]
  return [text_set.render(i) for i in picked]


def _filtered(texts, fn):
  return to_model_range(np.stack([fn(t.image) for t in texts]))


def _jpeg(image, quality=75):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


def _blur(image, sigma=3.0):
  return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def test_the_set_is_deterministic_and_its_truth_fits_the_image():
  a, b = text_set.text_set(8), text_set.text_set(8)
  other_seed = text_set.text_set(8, seed=1)
  for x, y, z in zip(a, b, other_seed):
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.boxes, y.boxes)
    assert (x.words, x.group, x.font_px) == (y.words, y.group, y.font_px)
    assert x.words != z.words
  assert [t.group for t in a] == list(text_set.GROUP_NAMES) * 2
  for size in (256, 512):
    for t in text_set.text_set(8, image_size=size):
      group = text_set.group_of(text_set.GROUP_NAMES.index(t.group))
      assert round(group.lo * size) <= t.font_px <= round(group.hi * size)
      assert t.image.shape == (size, size, 3) and t.image.dtype == np.uint8
      assert 1 <= len(t.words) <= text_set.MAX_WORDS and t.boxes.shape == (len(t.words), 4)
      assert (t.boxes[:, :2] >= 0).all() and (t.boxes[:, 2:] <= size).all()
      assert (t.boxes[:, 2] > t.boxes[:, 0]).all() and (t.boxes[:, 3] > t.boxes[:, 1]).all()
      # Every box holds ink: pixels unlike the background (the corner) inside it.
      ground = t.image[0, 0].astype(int)
      for x0, y0, x1, y1 in t.boxes:
        assert np.abs(t.image[y0:y1, x0:x1].astype(int) - ground).max() > 64


def test_normalisation_and_edit_distance():
  assert G.normalise("Policy,") == G.normalise(" POLICY") == "policy"
  assert G.edit_distance("kitten", "sitting") == 3 and G.edit_distance("", "abc") == 3
  assert G.one_minus_ned("Model", "model!") == 1.0 and G.one_minus_ned("", "model") == 0.0
  assert G.one_minus_ned("modl", "model") == pytest.approx(1 - 1 / 5)
  assert G.score_readings(["Rate", "citi"], ["rate", "city"]) == {"word_accuracy": 0.5, "one_minus_ned": 0.875}


def test_the_recogniser_reads_the_largest_words_of_the_originals():
  # 12 images of the largest group: scripts/legibility_report.py read 100% of the words of the first 30 (at 256²,
  # docs/guide.md), and all 4 groups' words from `small` up.
  texts = _of_groups({"large"}, 12)
  rows = G.legibility(text_set.model_images(texts), texts)
  summary = G.by_group(rows)
  assert summary["large"]["images"] == 12 and summary["large"]["words"] == sum(len(t.words) for t in texts)
  assert summary["large"]["word_accuracy"] >= 0.9
  assert summary["large"]["one_minus_ned"] >= 0.95


def test_a_blur_that_destroys_text_scores_lower_than_a_jpeg_that_keeps_it():
  texts = _of_groups({"small", "medium"}, 4)
  blurred = G.by_group(G.legibility(_filtered(texts, _blur), texts))["all"]
  jpeg = G.by_group(G.legibility(_filtered(texts, _jpeg), texts))["all"]
  # Gaussian blur of sigma 3 px smears strokes 1-2 px wide at 10-20 px text; JPEG at quality 75 keeps them.
  assert jpeg["word_accuracy"] >= 0.9 and jpeg["one_minus_ned"] >= 0.95
  assert blurred["word_accuracy"] <= 0.1 and blurred["one_minus_ned"] <= 0.3


def test_readings_scored_against_another_images_words_are_at_chance():
  texts = _of_groups({"small", "medium", "large"}, 18)
  readings = G.read_words(text_set.model_images(texts), texts)
  own = [G.score_readings(r, t.words) for r, t in zip(readings, texts)]
  assert np.mean([s["word_accuracy"] for s in own]) >= 0.9  # the readings are good; only the truth is wrong below
  hits, ned, n = 0.0, 0.0, 0
  for i, r in enumerate(readings):
    other = texts[(i + 1) % len(texts)].words
    k = min(len(r), len(other))
    s = G.score_readings(r[:k], other[:k])
    hits, ned, n = hits + s["word_accuracy"] * k, ned + s["one_minus_ned"] * k, n + k
  # Words are drawn uniformly from the vocabulary, so a perfect reading matches an unrelated word with probability
  # p = 1/V (V distinct words) and has 1 - NED of the vocabulary's mean over pairs; both bounds are 4 standard errors.
  p = 1 / len(VOCAB)
  pairs = np.array([[G.one_minus_ned(a, b) for b in VOCAB] for a in VOCAB])
  assert n >= 100
  assert hits / n <= p + 4 * np.sqrt(p * (1 - p) / n)
  assert abs(ned / n - pairs.mean()) <= 4 * pairs.std() / np.sqrt(n)


def test_legibility_rows_keys_and_a_reader_that_reads_nothing():
  texts = _of_groups({"tiny", "large"}, 2)
  calls = []

  def blank(crops):
    calls.append(len(crops))
    return [""] * len(crops)

  rows = G.legibility_rows(lambda x, level: x * 0.5, text_set.model_images(texts), texts, recognise=blank)
  assert list(rows) == ["original", "8x", "16x", "32x"]
  assert set(rows["8x"]) == {"tiny", "large", "all"}
  assert rows["32x"]["all"] == {"word_accuracy": 0.0, "one_minus_ned": 0.0, "images": 2,
                                "words": sum(len(t.words) for t in texts)}
  assert calls == [sum(len(t.words) for t in texts)] * 4


def test_a_missing_recogniser_says_what_to_install(monkeypatch):
  G.rapidocr_recogniser.cache_clear()
  monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
  with pytest.raises(ImportError, match=r"pip install 'cat_jax\[ocr\]'"):
    G.rapidocr_recogniser()
  G.rapidocr_recogniser.cache_clear()


def _report(*args):
  root = pathlib.Path(__file__).resolve().parents[1]
  return subprocess.run([sys.executable, "scripts/legibility_report.py", *args], capture_output=True, text=True,
                        cwd=root, timeout=600)


def test_the_report_script_ranks_the_originals_above_a_32x_baseline_and_names_a_bad_row():
  proc = _report("--rows", "original,area_bicubic", "--num-images", "2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result["rows"]) == {"original", "area_bicubic"} and result["rows"]["original"]["-"]["all"]["images"] == 2
  original = result["rows"]["original"]["-"]["all"]["one_minus_ned"]
  assert original >= 0.9 and result["rows"]["area_bicubic"]["32x"]["all"]["one_minus_ned"] < original - 0.5
  bad = _report("--rows", "original,jpeg")
  assert bad.returncode == 2 and "error: --rows: unknown row(s) jpeg" in bad.stderr and "Traceback" not in bad.stderr
