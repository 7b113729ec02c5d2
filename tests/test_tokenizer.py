"""Tokenizer API and `python -m cat_jax.encode` on a runlocal checkpoint trained once per session."""

import io
import json
import pathlib
import re

import jax
import numpy as np
import pytest
from PIL import Image

import cat_jax
from cat_jax import checkpoint as ckpt
from cat_jax import encode as encode_cli
from cat_jax import parallel
from cat_jax.complexity import JpegScorer, levels_for_scores
from cat_jax.complexity.assign import LevelAssigner
from cat_jax.complexity.scorers import jpeg_bpp
from cat_jax.data.embedded import generate
from cat_jax.data.latents import read_index
from cat_jax.tokenizer import Latents, Tokenizer
from conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_cat_config(variant):
  return load_config("cat.py", variant)


@pytest.fixture(scope="session")
def workdir(runlocal_workdir):
  return runlocal_workdir  # conftest.py: configs/cat.py:runlocal trained once per session


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


def test_levels_in_either_spelling(tok):
  x = _images(3)
  for spelling in (1, 16, "1", "16", "16x", np.int32(1)):
    np.testing.assert_array_equal(tok.assign_levels(x, spelling), [1, 1, 1])
  np.testing.assert_array_equal(tok.assign_levels(x, ["8x", 32, 1]), [0, 2, 1])
  np.testing.assert_array_equal(tok.encode(x, "32x").levels, tok.encode(x, 2).levels)


def test_same_outputs_on_one_device(workdir, tok):
  one = Tokenizer.from_checkpoint(workdir, mesh=parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  assert tok.mesh.size == jax.device_count() > 1 and one.mesh.size == 1
  x = _images(3)
  np.testing.assert_allclose(one.reconstruct(x, 1), tok.reconstruct(x, 1), atol=1e-5)


def test_auto_levels_from_manifest_and_scorer(tok, tmp_path):
  x = _images(8)
  ids = [f"img{i}" for i in range(8)]
  want = np.array([2, 1, 0, 0, 1, 2, 2, 1])
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("".join(json.dumps({"id": i, "score": 1, "level": int(l)}) + "\n" for i, l in zip(ids, want)))
  lat = tok.encode(x, LevelAssigner(manifest=str(manifest)), ids=ids)
  np.testing.assert_array_equal(lat.levels, want)
  np.testing.assert_array_equal(tok.assign_levels(x[::-1], LevelAssigner(manifest=str(manifest)), ids=ids[::-1]),
                                want[::-1])

  bpp = [jpeg_bpp(Image.fromarray(np.round((im + 1) * 127.5).astype(np.uint8))) for im in x]
  thresholds = tuple(np.quantile(bpp, [1 / 3, 2 / 3]))
  lat = tok.encode(x, LevelAssigner(scorer=JpegScorer(image_size=None), thresholds=thresholds))
  np.testing.assert_array_equal(lat.levels, levels_for_scores(bpp, thresholds))
  assert len(set(lat.levels.tolist())) == 3


def test_clear_errors(workdir, tok, tmp_path):
  x = _images(2)
  with pytest.raises(ValueError, match="a level must be"):
    tok.encode(x, 5)
  with pytest.raises(ValueError, match="a level must be"):
    tok.encode(x, "12x")
  with pytest.raises(ValueError, match="no knob-free levels=.auto."):
    tok.encode(x)
  with pytest.raises(ValueError, match="not in the manifest"):
    tok.encode(x, LevelAssigner(manifest={"a": 0}), ids=["a", "b"])
  with pytest.raises(ValueError, match="need ids="):
    tok.encode(x, LevelAssigner(manifest={"a": 0, "b": 1}))
  with pytest.raises(ValueError, match="thresholds"):
    LevelAssigner(scorer=JpegScorer())
  with pytest.raises(TypeError, match=r"levels=LevelAssigner\(manifest="):  # the keyword before the assigner
    tok.encode(x, "auto", ids=["a", "b"], manifest={"a": 0})
  with pytest.raises(ValueError, match=r"image 1 has values in \[-3, 2\], outside value_range \(-1, 1\).*value_range=\(0, 1\)"):
    tok.encode([x[0], np.linspace(-3, 2, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)], 0)
  with pytest.raises(ValueError, match="image 0 has NaN or inf"):
    tok.reconstruct(np.full((1, 32, 32, 3), np.nan, np.float32), 0)
  with pytest.raises(ValueError, match=r"images\[None\]"):
    tok.encode(x[0], 0)  # one image without its batch axis
  with pytest.raises(ValueError, match="image 0 has dtype int64"):
    tok.encode([np.zeros((32, 32, 3), np.int64)], 0)
  with pytest.raises(ValueError, match="image 0 has shape"):
    tok.encode([np.zeros((32, 32, 5), np.uint8)], 0)
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
  from cat_jax.data.preprocess import to_model_range
  for r in index:
    data = np.load(out / r["latent_file"])
    assert int(data["level"]) == want[r["id"]] and int(data["factor"]) == [8, 16, 32][want[r["id"]]]
    assert r["original_size"] == r["encoded_size"] == [48, 48] and "resized" not in r  # the native size
    image = to_model_range(np.asarray(Image.open(tmp_path / "in" / r["id"]).convert("RGB")))
    encoded = tok.encode(image[None], want[r["id"]])
    np.testing.assert_allclose(data["latent"], encoded.values[0], atol=1e-5)
    assert r.get("code_only", False) == bool(encoded.code_only[0])  # the bit travels with the latent
    recon = np.asarray(Image.open(out / r["reconstruction"]))
    expected = np.round((tok.reconstruct(image[None], want[r["id"]])[0] + 1) * 127.5)
    assert np.abs(recon.astype(np.float32) - expected).max() <= 1.0

  # decode: the same images from the latents alone, with the tokenizer encode recorded.
  from cat_jax import decode as decode_cli

  capsys.readouterr()
  assert decode_cli.main(["--latents", str(out), "--out", str(tmp_path / "decoded")]) == 0
  assert f"decoded {len(names)} images" in capsys.readouterr().out
  for r in index:
    decoded = np.asarray(Image.open(tmp_path / "decoded" / (r["id"][:-4] + ".png")))
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(out / r["reconstruction"])))
  latents = tok.encode([np.asarray(Image.open(tmp_path / "in" / names[0]))], 2)
  latents.save(tmp_path / "one.npz")
  assert decode_cli.main(["--latents", str(tmp_path / "one.npz"), "--out", str(tmp_path / "d2"),
                          "--checkpoint", workdir]) == 0
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d2" / "0.png")),
                                np.round((tok.decode(latents)[0] + 1) * 127.5).astype(np.uint8))
  assert decode_cli.main(["--latents", str(tmp_path / "one.npz"), "--out", str(tmp_path / "d3")]) == 2
  assert "pass --checkpoint" in capsys.readouterr().err


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
  assert data["latent"].shape == (4, 4, 4) and int(data["factor"]) == 16  # 48 x 48, padded to 64
  assert not (out / "reconstructions").exists()

  capsys.readouterr()
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(tmp_path / "in"), "--out", str(out),
                          "--level", "12"]) == 2
  assert "--level must be auto or a level" in capsys.readouterr().err
  assert encode_cli.main(["--checkpoint", str(tmp_path / "missing"), "--input", str(tmp_path / "in"),
                          "--out", str(out)]) == 2
  assert "does not exist" in capsys.readouterr().err
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"id": "im0.png", "level": 5}) + "\n")
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(tmp_path / "in"), "--out", str(out),
                          "--level", "auto", "--manifest", str(bad)]) == 2
  assert "level" in capsys.readouterr().err
  # Latents of two tokenizers never mix in one folder.
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(tmp_path / "in"), "--out", str(out)]) == 2
  assert "holds latents of another tokenizer" in capsys.readouterr().err


def _huge_png_header(width=100_000, height=100_000):
  """A valid 1x1 PNG whose header claims width x height pixels (nothing that large is ever decoded)."""
  import struct
  import zlib

  buf = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buf, format="PNG")
  data = bytearray(buf.getvalue())
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def test_encode_cli_gets_through_a_real_folder_and_resumes(workdir, tmp_path, capsys):
  folder = tmp_path / "in"
  names = _write_folder(folder, n=4)
  good = io.BytesIO()
  Image.fromarray(generate(9, image_size=48, split="test")[0]).save(good, format="JPEG")
  (folder / "broken.jpg").write_bytes(good.getvalue()[:300])  # truncated
  Image.new("RGB", (16, 16)).save(folder / "tiny.png")
  (folder / "huge.png").write_bytes(_huge_png_header())
  (folder / "gone.png").symlink_to(tmp_path / "deleted.png")  # listed, unreadable
  out = tmp_path / "out"
  argv = ["--checkpoint", workdir, "--input", str(folder), "--out", str(out), "--level", "32x", "--chunk", "3"]

  capsys.readouterr()
  assert encode_cli.main(argv) == 1  # some files failed
  captured = capsys.readouterr()
  assert "encoded 4 images (8x/16x/32x: 0/0/4" in captured.out
  assert "skipped 4 files that could not be used" in captured.err
  assert re.search(r"8/8 \[.*(img/s|s/img)", captured.err)  # the progress bar: count, elapsed<ETA, rate
  rows = read_index(out)
  assert sorted(r for r in rows if "error" not in rows[r]) == names
  assert all(rows[n]["factor"] == 32 and (out / rows[n]["latent_file"]).exists() for n in names)
  errors = {i: r["error"] for i, r in rows.items() if "error" in r}
  assert set(errors) == {"broken.jpg", "tiny.png", "huge.png", "gone.png"}
  assert "smaller than min_size" in errors["tiny.png"] and "cannot read file" in errors["gone.png"]
  assert "pixels" in errors["huge.png"]

  # The same command again: nothing encoded twice, the bad files retried (and recorded) again.
  lines_before = len((out / "index.jsonl").read_text().splitlines())
  assert encode_cli.main(argv) == 1
  stdout = capsys.readouterr().out
  assert "encoded 0 images" in stdout and "4 already encoded" in stdout
  new_lines = [json.loads(l) for l in (out / "index.jsonl").read_text().splitlines()[lines_before:]]
  assert sorted(r["id"] for r in new_lines) == sorted(errors) and all("error" in r for r in new_lines)

  # Fixed and new files are encoded on the next run, at the same level in the other spelling.
  (folder / "broken.jpg").write_bytes(good.getvalue())
  for bad in ("tiny.png", "huge.png", "gone.png"):
    (folder / bad).unlink()
  assert encode_cli.main(argv[:-4] + ["--level", "2"]) == 0
  captured = capsys.readouterr()
  assert "encoded 1 images (8x/16x/32x: 0/0/1" in captured.out and "4 already encoded" in captured.out
  rows = read_index(out)
  assert sorted(i for i, r in rows.items() if "error" not in r) == sorted(names + ["broken.jpg"])

  # Strict mode stops at the first bad file, naming it.
  Image.new("RGB", (16, 16)).save(folder / "tiny.png")
  assert encode_cli.main(argv[:5] + [str(tmp_path / "strict"), "--on_bad_image", "raise"]) == 2
  assert "tiny.png" in capsys.readouterr().err


def test_encode_cli_to_an_object_store_resumes_without_rewrites(workdir, tmp_path, object_store, capsys):
  names = _write_folder(tmp_path / "in", n=3)
  argv = ["--checkpoint", workdir, "--input", str(tmp_path / "in"), "--out", "gs://bucket/lat", "--level", "1"]
  assert encode_cli.main(argv) == 0
  assert encode_cli.main(argv) == 0  # resumed: nothing left to encode
  assert "encoded 0 images" in capsys.readouterr().out
  rows = read_index("gs://bucket/lat")
  assert sorted(rows) == names and all(r["factor"] == 16 for r in rows.values())
  assert set(object_store.writes.values()) == {1}  # every object (latents, PNGs, index parts) written once
  assert {f"bucket/lat/{r['latent_file']}" for r in rows.values()} <= set(object_store.writes)


def test_save_and_load_pretrained_round_trip(tok, tmp_path):
  from cat_jax import weights
  from cat_jax.weights import save_params

  tok.save_pretrained(tmp_path / "exported")
  assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json", "model.safetensors"]
  loaded = Tokenizer.from_pretrained(tmp_path / "exported")
  assert loaded.model == tok.model and loaded.image_size == tok.image_size and loaded.step == tok.step
  x = _images(3)
  np.testing.assert_array_equal(loaded.reconstruct(x, 1), tok.reconstruct(x, 1))
  # A folder written before safetensors (params.msgpack) loads to the same tokenizer.
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "config.json").write_text((tmp_path / "exported" / "config.json").read_text())
  save_params(legacy / "params.msgpack", jax.device_get(tok.params))
  np.testing.assert_array_equal(Tokenizer.from_pretrained(legacy).reconstruct(x, 1), tok.reconstruct(x, 1))
  with pytest.raises(FileNotFoundError, match="neither a shipped tokenizer"):
    Tokenizer.from_pretrained(tmp_path / "nowhere")
  # Weights of another model: the first mismatching parameter is named.
  params = weights.read_params(tmp_path / "exported")
  params["dec_conv_out"]["bias"] = np.zeros(4, np.float32)
  weights.write_folder(tmp_path / "bad", weights.read_config(tmp_path / "exported"), params)
  with pytest.raises(ValueError, match=r"dec_conv_out/bias: shape \(4,\), the model's \(3,\)"):
    Tokenizer.from_pretrained(tmp_path / "bad")
  (tmp_path / "exported" / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    Tokenizer.from_pretrained(tmp_path / "exported")


def test_the_shipped_demo_tokenizer_beats_both_no_learning_baselines_on_unseen_images():
  """``from_pretrained("demo")`` loads without a download and beats area+bicubic by >= 1 dB at 8x and at every
  level (mean PSNR capped at 50 dB), on embedded validation images and on photos it never trained on; PSNR falls
  from 8x to 32x; and it is not merely its own untrained DCT code (mean L1 below the code's at every level)."""
  from cat_jax.data.heldout import heldout_image
  from cat_jax.metrics.baselines import area_bicubic, dct_code
  from cat_jax.metrics.image_quality import PSNR_MAX_DB, psnr

  tok = Tokenizer.from_pretrained("demo", batch_size=8)
  size = int(tok.config.data.image_size)
  assert size == 64 and tok.config.data.level_mode == "all"
  val = np.stack([generate(i, split="validation", image_size=size)[0] for i in range(48)]) / 127.5 - 1.0
  photos = np.stack([heldout_image(i, crops_per_image=4, image_size=size) for i in range(32)]) / 127.5 - 1.0
  mean_db = lambda recon, x: float(np.mean(psnr(np.clip(recon, -1, 1), x, max_db=PSNR_MAX_DB)))
  for name, x in (("embedded validation", val.astype(np.float32)), ("unseen photos", photos.astype(np.float32))):
    previous = np.inf
    for level in range(3):
      recon = np.asarray(tok.reconstruct(x, level))
      model_db, baseline_db = mean_db(recon, x), mean_db(area_bicubic(x, level), x)
      assert model_db > baseline_db + (1.0 if level == 0 else 0.0), (name, level, model_db, baseline_db)
      assert model_db < previous, (name, level)
      previous = model_db
      code = np.asarray(dct_code(x, level, tok.model.z_channels))
      assert np.mean(np.abs(np.clip(recon, -1, 1) - x)) < np.mean(np.abs(code - x)), (name, level)


def test_keep_code_is_one_bit_per_image_never_below_the_code_and_travels_with_the_latents(tmp_path):
  """Per image the tokenizer keeps the DCT code it starts from where the learned path is worse: the output is never
  further from the image than the code, flat images keep the code exactly, decode(encode) is reconstruct, and the
  bit survives Latents.save/load (a file from before the bit loads as all-learned)."""
  from cat_jax.metrics.baselines import dct_code
  from cat_jax.models.nested_vae import NestedVAE, init_params

  tok = Tokenizer.from_pretrained("demo", batch_size=8)
  flat = np.broadcast_to(np.array([30, 140, 140], np.float32) / 127.5 - 1.0, (2, 64, 64, 3)).copy()
  flat[1] = -0.2
  x = np.concatenate([np.stack([generate(i, split="validation", image_size=64)[0] for i in range(16)])
                      / 127.5 - 1.0, flat]).astype(np.float32)
  mse = lambda y, ref=x: np.mean(np.square(np.clip(y, -1, 1) - ref), axis=(1, 2, 3))
  for level in range(3):
    latents = tok.encode(x, level)
    flags = latents.code_only
    assert flags.dtype == bool and flags[-2:].all(), (level, flags)
    assert 0 < flags[:16].sum() < 16, (level, flags)  # the shipped demo: some images gain, some do not
    y = tok.decode(latents)
    np.testing.assert_allclose(y, tok.reconstruct(x, level), atol=1e-5)
    code = np.asarray(dct_code(x, level, tok.model.z_channels))
    np.testing.assert_allclose(y[flags], code[flags], atol=1e-5)
    assert np.all(mse(y) <= mse(code) + 1e-7), level
    learned = tok.reconstruct(x, level, keep_code=False)
    assert np.all(mse(learned[~flags], x[~flags]) < mse(code[~flags], x[~flags])), level
    assert np.all(mse(learned[flags], x[flags]) >= mse(code[flags], x[flags])), level
    assert tok.encode(x, level, keep_code=False).code_only is None
  latents.save(tmp_path / "bits.npz")
  np.testing.assert_array_equal(Latents.load(tmp_path / "bits.npz").code_only, flags)
  old = dict(np.load(tmp_path / "bits.npz"))
  del old["code_only"]
  np.savez(tmp_path / "old.npz", **old)
  assert Latents.load(tmp_path / "old.npz").code_only is None
  with pytest.raises(ValueError, match="code_only flags"):
    Latents(latents.values, latents.levels, code_only=flags[:3])
  # Through the command lines: the bit is in index.jsonl, decode honours it, --no-keep-code leaves it out.
  from cat_jax import decode as decode_cli
  (tmp_path / "in").mkdir()
  for i in (0, 16, 17):
    Image.fromarray(np.round((x[i] + 1) * 127.5).astype(np.uint8)).save(tmp_path / "in" / f"{i:02d}.png")
  for extra, want in (([], True), (["--no_keep_code"], False)):
    out = tmp_path / f"out{len(extra)}"
    assert encode_cli.main(["--checkpoint", "demo", "--input", str(tmp_path / "in"), "--out", str(out),
                            "--level", "32x", *extra]) == 0
    rows = {r["id"]: r for r in map(json.loads, (out / "index.jsonl").read_text().splitlines())}
    assert [rows[f"{i}.png"].get("code_only", False) for i in (16, 17)] == [want, want]
    assert decode_cli.main(["--latents", str(out), "--out", str(tmp_path / f"decoded{len(extra)}")]) == 0
    for name, row in rows.items():
      decoded = np.asarray(Image.open(tmp_path / f"decoded{len(extra)}" / name))
      np.testing.assert_array_equal(decoded, np.asarray(Image.open(out / row["reconstruction"])))
  plain = NestedVAE(ch=8, ch_mult=(1,) * 6, num_res_blocks=1, z_channels=4, head_attention=False, shortcuts=False)
  params = init_params(plain, jax.random.key(0))
  assert Tokenizer(plain, params).keep_code is False
  with pytest.raises(ValueError, match="shortcuts"):
    Tokenizer(plain, params, keep_code=True)
  with pytest.raises(ValueError, match="patch code"):
    Tokenizer(plain, params).decode(Latents([np.zeros((4, 4, 4), np.float32)], [0], code_only=[True]))


def test_the_command_lines_take_any_tokenizer_name(tmp_path, capsys):
  """encode and score --method mse take the shipped name, a tokenizer folder and a workdir alike (load_tokenizer)."""
  from cat_jax import score

  demo = Tokenizer.from_pretrained("demo")
  names = _write_folder(tmp_path / "in", n=3, size=64)
  demo.save_pretrained(tmp_path / "folder")
  for spec in ("demo", str(tmp_path / "folder")):
    out = tmp_path / f"out_{len(spec)}"
    assert encode_cli.main(["--checkpoint", spec, "--input", str(tmp_path / "in"), "--out", str(out),
                            "--level", "16x", "--no_reconstructions"]) == 0
    rows = read_index(out)
    assert sorted(rows) == names
    for name in names:
      image = np.asarray(Image.open(tmp_path / "in" / name), np.float32) / 127.5 - 1.0
      np.testing.assert_allclose(np.load(out / rows[name]["latent_file"])["latent"],
                                 demo.encode(image[None], "16x").values[0], atol=1e-5)
  from cat_jax import decode as decode_cli  # decode --checkpoint takes the shipped name too

  assert decode_cli.main(["--latents", str(out), "--out", str(tmp_path / "decoded"), "--checkpoint", "demo"]) == 0
  first = np.asarray(Image.open(tmp_path / "in" / names[0]), np.float32)[None] / 127.5 - 1.0
  expected = np.round((demo.reconstruct(first, "16x")[0] + 1) * 127.5)
  decoded = np.asarray(Image.open(tmp_path / "decoded" / (names[0][:-4] + ".png")), np.float32)
  assert np.abs(decoded - expected).max() <= 1.0  # latents stored as float32: within one 8-bit level
  scores = tmp_path / "mse.jsonl"
  assert score.main(["--method", "mse", "--checkpoint", "demo", "--split", "test", "--limit", "4",
                     "--image-size", "64", "--out", str(scores)]) == 0
  records = [json.loads(line) for line in scores.read_text().splitlines()]
  assert sum("score" in r for r in records) == 4


def test_any_kind_and_size_of_image(tok, tmp_path, recwarn):
  """PIL images, paths, uint8 / uint16 / bfloat16 arrays, gray and RGBA, any size: outputs have the inputs' sizes."""
  import warnings

  import ml_dtypes

  from cat_jax import tokenizer as tokenizer_lib

  rgb = np.round((_images(1, 48)[0] + 1) * 127.5).astype(np.uint8)
  as_float = rgb.astype(np.float32) / 127.5 - 1
  path = tmp_path / "im.png"
  Image.fromarray(rgb).save(path)
  gray = rgb[..., 0]
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], axis=-1)
  on_white = (rgb.astype(np.float32) * (128 / 255) + 255 * (1 - 128 / 255)) / 127.5 - 1
  reference = tok.reconstruct([as_float], 1)[0]
  for same in (Image.fromarray(rgb), str(path), path, [rgb], rgb[None].astype(np.uint16) * 257,
               (rgb[None] / 255.0).astype(np.float32)):
    kwargs = {"value_range": (0, 1)} if isinstance(same, np.ndarray) and same.dtype == np.float32 else {}
    np.testing.assert_allclose(np.asarray(tok.reconstruct(same, 1, **kwargs))[0], reference, atol=1e-5)
  bf16 = tok.reconstruct(as_float[None].astype(ml_dtypes.bfloat16), 1)[0]
  assert np.abs(bf16 - reference).max() < 0.05  # bfloat16 keeps 8 bits: inputs move by up to 2^-8
  np.testing.assert_allclose(tok.reconstruct([gray], 1)[0], tok.reconstruct([np.stack([gray] * 3, -1)], 1)[0],
                             atol=1e-5)
  np.testing.assert_allclose(tok.reconstruct([rgba], 1)[0], tok.reconstruct([on_white], 1)[0], atol=2e-3)
  # Any size >= 1, mixed in one call: padded internally, cropped back.
  odd = [np.zeros((1, 1, 3), np.uint8), rgb[:37, :45], rgb[:32, :32]]
  out = tok.reconstruct(odd, 0)
  assert [o.shape for o in out] == [(1, 1, 3), (37, 45, 3), (32, 32, 3)]
  latents = tok.encode(odd, 0)
  assert latents.image_sizes == [(1, 1), (37, 45), (32, 32)] and latents.values[1].shape[:2] == (8, 8)
  assert [o.shape for o in tok.decode(latents)] == [(1, 1, 3), (37, 45, 3), (32, 32, 3)]
  np.testing.assert_allclose(tok.decode(latents)[1], out[1], atol=1e-5)
  # Latents.save / load round trip, local files.
  latents.save(tmp_path / "z.npz")
  loaded = Latents.load(tmp_path / "z.npz")
  assert loaded.image_sizes == latents.image_sizes and loaded.levels.tolist() == latents.levels.tolist()
  for a, b in zip(loaded.values, latents.values):
    np.testing.assert_array_equal(a, b)
  # A float batch entirely in [0, 1] is probably a [0, 1] image: warned once per process.
  tokenizer_lib._warned_unit_range = False
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tok.encode((rgb[None] / 255.0).astype(np.float32), 0)
    tok.encode((rgb[None] / 255.0).astype(np.float32), 0)
  assert sum("value_range=(0, 1)" in str(w.message) for w in caught) == 1
  # An explicit value_range is trusted: a bright [-1, 1] image given as such is not warned about.
  tokenizer_lib._warned_unit_range = False
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tok.encode((rgb[None] / 255.0).astype(np.float32), 0, value_range=(-1, 1))
  assert not [w for w in caught if "value_range=(0, 1)" in str(w.message)]


def test_batches_hold_the_images_given_and_large_images_go_one_at_a_time(workdir):
  one = Tokenizer.from_checkpoint(workdir, mesh=parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                                  batch_size=8)
  shapes = []
  put = one._put
  one._put = lambda batch: shapes.append(batch.shape) or put(batch)
  one.encode(_images(1), 0)
  one.encode(_images(11), 0)
  assert [s[0] for s in shapes] == [8, 8, 8]  # shape buckets: one batch size, so one compile
  assert one.compiled_count()["encode"] == 1
  shapes.clear()
  one.max_batch_pixels = 2 * 64 * 64
  one.reconstruct(_images(5, 64), 1)
  assert [s[0] for s in shapes] == [2, 2, 2]
  shapes.clear()
  one.shape_buckets = False  # exact: a batch holds the images given
  one.encode(_images(1), 0)
  one.encode(_images(11), 0)
  assert [s[0] for s in shapes] == [1, 8, 3]
  shapes.clear()
  one.reconstruct(_images(5, 64), 1)
  assert [s[0] for s in shapes] == [2, 2, 1]


def test_bad_files_go_through_score_encode_and_evaluate(workdir, tmp_path, capsys):
  """A truncated and a tiny file: score records them as failures, encode skips them (and says why), evaluate leaves
  them out and lists them; nothing stops. --strict keeps the old refusal."""
  from cat_jax import evaluate as evaluate_cli
  from cat_jax import score as score_cli

  folder = tmp_path / "in"
  names = _write_folder(folder, n=4)
  good = io.BytesIO()
  Image.fromarray(generate(9, image_size=48, split="test")[0]).save(good, format="JPEG")
  (folder / "broken.jpg").write_bytes(good.getvalue()[:300])
  Image.new("RGB", (16, 16)).save(folder / "tiny.png")
  scores = tmp_path / "scores.jsonl"
  assert score_cli.main(["--method", "jpeg", "--path", str(folder), "--out", str(scores), "--image-size", "32",
                         "--no-progress"]) == 1  # 1: some files failed (as encode)
  records = [json.loads(line) for line in scores.read_text().splitlines()[1:]]
  assert sorted(r["id"] for r in records if "error" in r) == ["broken.jpg", "tiny.png"]  # as encode judges them

  out = tmp_path / "latents"
  argv = ["--checkpoint", workdir, "--input", str(folder), "--out", str(out), "--level", "auto",
          "--manifest", str(scores)]
  capsys.readouterr()
  assert encode_cli.main(argv + ["--strict"]) == 2
  assert "2 of 6 images are not in the manifest" in capsys.readouterr().err
  assert encode_cli.main(argv) == 1
  assert "encoded 4 images" in capsys.readouterr().out
  errors = {i: r["error"] for i, r in read_index(out).items() if "error" in r}
  assert sorted(i for i, r in read_index(out).items() if "error" not in r) == names
  # each with its real reason, not the manifest's lack of it
  assert "cannot" in errors["broken.jpg"] and "smaller than min_size" in errors["tiny.png"], errors

  assert evaluate_cli.main(["--workdir", workdir, "--data", f"folder:{folder}", "--manifest", str(scores),
                            "--scorers", "jpeg", "--out", str(tmp_path / "eval"), "--bootstrap", "0"]) == 0
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["num_images"] == 4 and results["rows"]["adaptive"]["num_images"] == 4
  assert any("2 of 6 images left out" in note for note in results["notes"])


def test_target_psnr_gives_the_coarsest_level_that_reaches_it(workdir, tok, tmp_path, capsys):
  """Checked against reconstructing every image at every level."""
  from cat_jax.metrics.image_quality import reported_psnr

  x = _images(12)
  psnr = np.stack([np.asarray(reported_psnr(x, tok.reconstruct(x, level))) for level in range(3)], axis=1)
  target = float(np.median(psnr[:, 1]))  # some images reach it at 32x or 16x, some at 8x only
  want = np.array([next((lvl for lvl in (2, 1) if p[lvl] >= target), 0) for p in psnr])
  assert len(set(want.tolist())) >= 2
  np.testing.assert_array_equal(tok.assign_levels(x, LevelAssigner(target_psnr=target)), want)
  np.testing.assert_array_equal(tok.encode(x, LevelAssigner(target_psnr=target)).levels, want)
  # encode --target-psnr writes the same levels.
  folder = tmp_path / "in"
  folder.mkdir()
  for i, image in enumerate(x):
    Image.fromarray(np.round((image + 1) * 127.5).astype(np.uint8)).save(folder / f"{i:02d}.png")
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(folder), "--out", str(tmp_path / "out"),
                          "--level", "auto", "--target-psnr", str(target), "--no-reconstructions"]) == 0
  rows = read_index(tmp_path / "out")
  np.testing.assert_array_equal([rows[f"{i:02d}.png"]["level"] for i in range(12)], want)
  assert encode_cli.main(["--checkpoint", workdir, "--input", str(folder), "--out", str(tmp_path / "o2"),
                          "--level", "16x", "--target-psnr", "30"]) == 2
  assert "only apply with --level auto" in capsys.readouterr().err


def test_knob_free_auto_levels_calibrate_and_reach_the_encode_cli(tok, tmp_path):
  """A tokenizer without a level predictor calibrates JPEG thresholds (auto_levels) that meet the fixed-16x token
  budget, save_pretrained keeps them; encode --level auto with the shipped demo gives Tokenizer.encode's levels.
  (The demo's own predictor: tests/test_predictor.py.)"""
  from cat_jax.complexity.assign import auto_assigner
  from cat_jax.data import EmbeddedSource, PreprocessConfig, preprocess

  source = EmbeddedSource("validation", num_images=48, image_size=64)  # as the demo trained
  prep = PreprocessConfig(image_size=64, min_size=1)
  images = [preprocess(source[i]["image"], prep) for i in range(len(source))]
  with pytest.raises(ValueError, match="no knob-free levels=.auto."):
    tok.encode(_images(2), "auto")  # the runlocal tokenizer ships none
  block = tok.calibrate_auto_levels(images, image_size=64)
  assert block.rule == "thresholds" and block.scorer == "jpeg" and "auto_levels" not in tok.config  # config as read
  levels = tok.encode(images, "auto").levels
  np.testing.assert_array_equal(levels, auto_assigner(block)([str(i) for i in range(48)], images))
  tokens = np.array([64, 16, 4])[levels]  # tokens of a 64x64 image at 8x, 16x, 32x
  assert sum(block.level_counts) == 48 and abs(tokens.mean() - 16) <= 4  # the fixed-16x budget, to granularity
  tok.save_pretrained(tmp_path / "with_auto")
  assert Tokenizer.from_pretrained(tmp_path / "with_auto").auto_levels == block
  saved = json.loads((tmp_path / "with_auto" / "config.json").read_text())["auto_levels"]
  assert "rule" not in saved and saved["thresholds"] == list(block.thresholds)  # the file format of earlier versions

  demo = Tokenizer.from_pretrained("demo")
  folder = tmp_path / "in"
  folder.mkdir()
  for i in (0, 1):
    Image.fromarray(to_uint8(images[i])).save(folder / f"{i}.png")
  assert encode_cli.main(["--checkpoint", "demo", "--input", str(folder), "--out", str(tmp_path / "out"),
                          "--level", "auto", "--no-reconstructions"]) == 0
  rows = read_index(tmp_path / "out")
  assert [rows[f"{i}.png"]["level"] for i in (0, 1)] == demo.encode(images[:2], levels="auto").levels.tolist()


def to_uint8(image):
  return np.round((np.asarray(image) + 1) * 127.5).astype(np.uint8)
