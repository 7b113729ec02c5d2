"""Tokenizer API and `python -m cat_jax.encode` on a runlocal checkpoint trained once per session."""

import importlib.util
import io
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

import cat_jax
from cat_jax import checkpoint as ckpt
from cat_jax import encode as encode_cli
from cat_jax import parallel
from cat_jax.complexity import JpegScorer, levels_for_scores
from cat_jax.complexity.scorers import jpeg_bpp
from cat_jax.data.embedded import generate
from cat_jax.tokenizer import Latents, Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
_RUNLOCAL: dict = {}


def load_cat_config(variant):
  spec = importlib.util.spec_from_file_location("cat_config_tok", ROOT / "configs" / "cat.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def runlocal_checkpoint(tmp_path_factory) -> str:
  """Trains configs/cat.py:runlocal once per session (shared with test_evaluate.py)."""
  if "workdir" not in _RUNLOCAL:
    from cat_jax.train import train_and_evaluate
    workdir = tmp_path_factory.mktemp("runlocal")
    config = load_cat_config("runlocal")
    config.data.min_size = min(config.data.min_size, config.data.image_size)  # tiny drawn images are not "bad"
    train_and_evaluate(config, str(workdir))
    _RUNLOCAL["workdir"] = str(workdir)
  return _RUNLOCAL["workdir"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  return runlocal_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(workdir):
  return Tokenizer.from_checkpoint(workdir)


def _images(n, size=32, seed=0):
  """Embedded-dataset images of graded complexity, float32 in [-1, 1]."""
  out = [generate(seed * 100 + i, image_size=size, split="test")[0] for i in range(n)]
  return np.stack(out).astype(np.float32) / 127.5 - 1.0


def test_lazy_export():
  assert cat_jax.Tokenizer is Tokenizer


def test_from_checkpoint_loads_ema_params_of_latest_step(workdir, tok):
  assert tok.step == 6
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(tok.mesh)),
                          tok.params)
  ema, _ = ckpt.restore_inference_params(workdir, abstract, use_ema=True)
  for a, b in zip(jax.tree.leaves(tok.params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A step directory works too, and an older step gives other params.
  older = Tokenizer.from_checkpoint(pathlib.Path(workdir) / "checkpoints" / "3")
  assert older.step == 3
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(older.params), jax.tree.leaves(tok.params)))


def test_mixed_levels_round_trip_in_input_order_and_compile_once_per_level(tok):
  x = _images(11)
  levels = np.array([0, 2, 1, 1, 0, 2, 2, 0, 1, 2, 0])
  lat = tok.encode(x, levels)
  assert isinstance(lat, Latents)
  np.testing.assert_array_equal(lat.levels, levels)
  assert [v.shape for v in lat.values] == [(32 // f, 32 // f, tok.model.z_channels) for f in lat.factors]
  np.testing.assert_array_equal(lat.num_tokens, [{0: 16, 1: 4, 2: 1}[int(l)] for l in levels])
  y = tok.decode(lat)
  assert y.shape == x.shape and np.all(np.abs(y) <= 1.0)
  # Every image equals its own single-image round trip at its level: the outputs are not shuffled.
  for i in range(len(x)):
    single = tok.decode(tok.encode(x[i:i + 1], int(levels[i])))
    np.testing.assert_allclose(single[0], y[i], atol=1e-5, err_msg=f"image {i}")
  # Different images give different reconstructions (so the order check above can fail).
  assert np.abs(y[1] - y[5]).max() > 1e-3
  # Reversing the input reverses the output.
  y_rev = tok.decode(tok.encode(x[::-1], levels[::-1]))
  np.testing.assert_allclose(y_rev, y[::-1], atol=1e-5)
  np.testing.assert_allclose(tok.reconstruct(x, levels), y, atol=1e-5)
  counts = tok.compiled_count()
  assert counts["encode"] == 3 and counts["decode"] == 3, counts


def test_mixed_image_sizes_and_uint8(tok):
  small, big = _images(2, 32), _images(1, 64, seed=1)
  items = [small[0], big[0], small[1]]
  lat = tok.encode(items, [1, 1, 2])
  assert [v.shape[:2] for v in lat.values] == [(2, 2), (4, 4), (1, 1)]
  out = tok.decode(lat)
  assert isinstance(out, list) and [o.shape for o in out] == [(32, 32, 3), (64, 64, 3), (32, 32, 3)]
  as_uint8 = np.round((small + 1) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(tok.encode(as_uint8, 0).values[0],
                             tok.encode(as_uint8.astype(np.float32) / 127.5 - 1, 0).values[0], atol=1e-6)


def test_same_outputs_on_one_device(workdir, tok):
  one = Tokenizer.from_checkpoint(workdir, mesh=parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  assert tok.mesh.size == 8 and one.mesh.size == 1
  x = _images(3)
  np.testing.assert_allclose(one.reconstruct(x, 1), tok.reconstruct(x, 1), atol=1e-5)


def test_auto_levels_from_manifest_and_scorer(tok, tmp_path):
  x = _images(8)
  ids = [f"img{i}" for i in range(8)]
  want = np.array([2, 1, 0, 0, 1, 2, 2, 1])
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("".join(json.dumps({"id": i, "score": 1, "level": int(l)}) + "\n" for i, l in zip(ids, want)))
  lat = tok.encode(x, "auto", ids=ids, manifest=str(manifest))
  np.testing.assert_array_equal(lat.levels, want)
  np.testing.assert_array_equal(tok.encode(x, None, ids=ids, manifest=str(manifest)).levels, want)

  bpp = [jpeg_bpp(Image.fromarray(np.round((im + 1) * 127.5).astype(np.uint8))) for im in x]
  thresholds = tuple(np.quantile(bpp, [1 / 3, 2 / 3]))
  lat = tok.encode(x, "auto", scorer=JpegScorer(image_size=None), thresholds=thresholds)
  np.testing.assert_array_equal(lat.levels, levels_for_scores(bpp, thresholds))
  assert len(set(lat.levels.tolist())) == 3


def test_clear_errors(workdir, tok, tmp_path):
  x = _images(2)
  with pytest.raises(ValueError, match="level_for_factor"):
    tok.encode(x, 8)
  with pytest.raises(ValueError, match="manifest or a scorer"):
    tok.encode(x)
  with pytest.raises(ValueError, match="not in the manifest"):
    tok.encode(x, "auto", ids=["a", "b"], manifest={"a": 0})
  with pytest.raises(ValueError, match="thresholds"):
    tok.encode(x, "auto", scorer=JpegScorer())
  with pytest.raises(ValueError, match="multiples of 32"):
    tok.encode(np.zeros((1, 40, 40, 3), np.float32), 0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer.from_checkpoint(tmp_path / "nowhere")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((pathlib.Path(workdir) / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="checkpoints"):
    Tokenizer.from_checkpoint(empty)
  (tmp_path / "noconfig").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    Tokenizer.from_checkpoint(tmp_path / "noconfig")
  with pytest.raises(ValueError, match="model.ch"):
    Tokenizer.from_checkpoint(workdir, config=load_cat_config("demo"))


def _write_folder(path, n=5, size=48):
  (path / "sub").mkdir(parents=True)
  names = []
  for i in range(n):
    name = f"{'sub/' if i % 2 else ''}im{i}.png"
    Image.fromarray(generate(i, image_size=size, split="test")[0]).save(path / name)
    names.append(name)
  return sorted(names)


def test_encode_cli_npz_and_reconstructions(workdir, tok, tmp_path, capsys):
  names = _write_folder(tmp_path / "in")
  manifest = tmp_path / "levels.jsonl"
  want = {n: k % 3 for k, n in enumerate(names)}
  manifest.write_text("".join(json.dumps({"id": n, "level": l}) + "\n" for n, l in want.items()))
  out = tmp_path / "out"
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(tmp_path / "in"), "--out", str(out),
                          "--level", "auto", "--manifest", str(manifest)]) == 0
  index = [json.loads(l) for l in (out / "index.jsonl").read_text().splitlines()]
  assert [r["id"] for r in index] == names
  from cat_jax.data.preprocess import PreprocessConfig, preprocess
  for r in index:
    data = np.load(out / r["latent_file"])
    assert int(data["level"]) == want[r["id"]] and int(data["factor"]) == [8, 16, 32][want[r["id"]]]
    image = preprocess((tmp_path / "in" / r["id"]).read_bytes(), PreprocessConfig(image_size=32))
    np.testing.assert_allclose(data["latent"], tok.encode(image[None], want[r["id"]]).values[0], atol=1e-5)
    recon = np.asarray(Image.open(out / r["reconstruction"]))
    expected = np.round((tok.reconstruct(image[None], want[r["id"]])[0] + 1) * 127.5)
    assert np.abs(recon.astype(np.float32) - expected).max() <= 1.0


def test_encode_cli_array_record_and_errors(workdir, tmp_path, capsys):
  from array_record.python.array_record_module import ArrayRecordReader

  _write_folder(tmp_path / "in", n=3)
  out = tmp_path / "out"
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(tmp_path / "in" / "im0.png"), "--out", str(out),
                          "--level", "16", "--format", "array_record", "--no_reconstructions"]) == 0
  reader = ArrayRecordReader(str(out / "latents.array_record"))
  records = reader.read_all()
  reader.close()
  assert len(records) == 1
  data = np.load(io.BytesIO(records[0]))
  assert data["latent"].shape == (2, 2, 4) and int(data["factor"]) == 16
  assert not (out / "reconstructions").exists()

  capsys.readouterr()
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(tmp_path / "in"), "--out", str(out),
                          "--level", "12"]) == 2
  assert "8, 16, 32 or auto" in capsys.readouterr().err
  assert encode_cli.main(["--checkpoint", str(tmp_path / "missing"), "--input", str(tmp_path / "in"),
                          "--out", str(out)]) == 2
  assert "does not exist" in capsys.readouterr().err
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"id": "im0.png", "level": 5}) + "\n")
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(tmp_path / "in"), "--out", str(out),
                          "--level", "auto", "--manifest", str(bad)]) == 2
  assert "level" in capsys.readouterr().err


def test_save_and_load_pretrained_round_trip(tok, tmp_path):
  tok.save_pretrained(tmp_path / "exported")
  assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json", "params.msgpack"]
  loaded = Tokenizer.from_pretrained(tmp_path / "exported")
  assert loaded.model == tok.model and loaded.image_size == tok.image_size and loaded.step == tok.step
  x = _images(3)
  np.testing.assert_array_equal(loaded.reconstruct(x, 1), tok.reconstruct(x, 1))
  with pytest.raises(FileNotFoundError, match="neither a shipped tokenizer"):
    Tokenizer.from_pretrained(tmp_path / "nowhere")
  (tmp_path / "exported" / "params.msgpack").unlink()
  with pytest.raises(FileNotFoundError, match="params.msgpack"):
    Tokenizer.from_pretrained(tmp_path / "exported")
