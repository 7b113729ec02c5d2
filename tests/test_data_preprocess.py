"""Decoding, mode conversion, resize/crop and bad-image handling (cat_jax.data.preprocess)."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cat_jax.data import get_source, make_eval_iterator, make_train_iterator
from cat_jax.data.preprocess import (BadImageError, PreprocessConfig, crop_box, decode_image, describe_sizes,
                                     from_model_range, preprocess, resize_and_crop, to_model_range)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def patterned_rgb(h=48, w=64, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def png_with_declared_size(width: int, height: int) -> bytes:
  """A small valid PNG whose IHDR is rewritten to claim width x height (a decompression bomb)."""
  data = bytearray(encode(Image.new("L", (8, 8))))
  ihdr = 8  # After the signature: length (4) + b'IHDR' (4) + 13 bytes of data + CRC (4).
  assert data[ihdr + 4:ihdr + 8] == b"IHDR"
  data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
  crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])) & 0xFFFFFFFF
  data[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
  return bytes(data)


# Mode conversions --------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly():
  arr = patterned_rgb()
  np.testing.assert_array_equal(decode_image(encode(Image.fromarray(arr))), arr)


def test_grayscale_becomes_three_equal_channels():
  gray = patterned_rgb()[..., 0]
  out = decode_image(encode(Image.fromarray(gray, "L")))
  assert out.shape == gray.shape + (3,) and out.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)
  one_bit = decode_image(encode(Image.fromarray(gray > 127)))  # mode '1'
  np.testing.assert_array_equal(one_bit[..., 1], np.where(gray > 127, 255, 0))


def test_palette_uses_palette_colours():
  colours = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 250]], np.uint8)
  index = np.random.default_rng(1).integers(0, 3, size=(40, 40)).astype(np.uint8)
  img = Image.fromarray(index, "P")
  img.putpalette(colours.flatten().tolist() + [0] * (768 - 9))
  np.testing.assert_array_equal(decode_image(encode(img)), colours[index])


def test_palette_transparency_composites_on_white():
  index = np.zeros((40, 40), np.uint8)
  index[:, 20:] = 1
  img = Image.fromarray(index, "P")
  img.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
  out = decode_image(encode(img, transparency=0))  # Index 0 (blue) is transparent.
  np.testing.assert_array_equal(out[:, :20], 255)
  np.testing.assert_array_equal(out[:, 20:], np.broadcast_to([255, 0, 0], (40, 20, 3)))


def test_rgba_and_la_composite_on_white():
  rgba = np.zeros((32, 48, 4), np.uint8)
  rgba[..., :3] = (0, 100, 200)
  rgba[:, :16, 3] = 0
  rgba[:, 16:32, 3] = 255
  rgba[:, 32:, 3] = 128
  out = decode_image(encode(Image.fromarray(rgba, "RGBA"))).astype(np.int32)
  np.testing.assert_array_equal(out[:, :16], 255)
  np.testing.assert_array_equal(out[:, 16:32], np.broadcast_to([0, 100, 200], (32, 16, 3)))
  expected = np.round((np.array([0, 100, 200]) * 128 + 255 * 127) / 255)
  np.testing.assert_allclose(out[:, 32:], np.broadcast_to(expected, (32, 16, 3)), atol=1)
  la = Image.fromarray(rgba[..., [1, 3]], "LA")
  out_la = decode_image(encode(la))
  np.testing.assert_array_equal(out_la[:, :16], 255)
  np.testing.assert_array_equal(out_la[:, 16:32], 100)


def test_cmyk_jpeg_decodes_to_the_right_colours():
  rgb = np.zeros((64, 64, 3), np.uint8)
  rgb[:, :32] = (220, 30, 30)
  rgb[:, 32:] = (30, 30, 220)
  data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
  assert Image.open(io.BytesIO(data)).mode == "CMYK"
  out = decode_image(data).astype(np.int32)
  assert np.abs(out[8:-8, 4:28] - [220, 30, 30]).max() <= 12
  assert np.abs(out[8:-8, 36:60] - [30, 30, 220]).max() <= 12


def test_16_bit_grayscale_is_scaled_not_clipped():
  values = np.array([[0, 257 * 100, 65535, 32896]], np.uint16).repeat(40, 0).repeat(10, 1)
  data = encode(Image.fromarray(values))
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  out = decode_image(data)
  np.testing.assert_array_equal(out[0, ::10, 0], [0, 100, 255, 128])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_arrays_follow_the_tokenizers_convention():
  """Floats are [-1, 1] (as cat_jax.Tokenizer reads them), uint16 is [0, 65535]; anything else is a bad image."""
  np.testing.assert_array_equal(decode_image(np.full((40, 40), 0.5, np.float32))[0, 0], 191)  # (0.5 + 1) * 127.5
  np.testing.assert_array_equal(decode_image(np.full((40, 40), -1.0, np.float32))[0, 0], 0)
  np.testing.assert_array_equal(decode_image(np.full((40, 40, 3), 65535, np.uint16))[0, 0], 255)
  rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent black: white
  np.testing.assert_array_equal(decode_image(rgba)[0, 0], 255)
  for bad, message in ((np.full((40, 40, 3), 200.0, np.float32), r"values in \[200, 200\], outside value_range"),
                       (np.full((40, 40, 3), np.nan, np.float32), "NaN or inf"),
                       (np.full((40, 40, 3), 7, np.int32), "dtype int32")):
    with pytest.raises(BadImageError, match=message):
      preprocess(bad, PreprocessConfig(image_size=16), path="array.npy")


# Bad images --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"not an image at all" * 20, bytes(range(256)) * 8,
                                     b"\x89PNG\r\n\x1a\n" + b"\x00" * 100])
def test_corrupt_bytes_raise_bad_image_with_path(payload):
  with pytest.raises(BadImageError, match="some/dir/broken.png"):
    preprocess(payload, PreprocessConfig(image_size=16), path="some/dir/broken.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_raise_bad_image(fmt):
  data = encode(Image.fromarray(patterned_rgb(128, 128)), fmt)
  with pytest.raises(BadImageError, match="cut.img"):
    preprocess(data[:len(data) // 2], PreprocessConfig(image_size=16), path="cut.img")


def test_tiny_images_are_bad_below_min_size():
  data = encode(Image.fromarray(patterned_rgb(10, 40)))
  with pytest.raises(BadImageError, match="smaller than min_size=16"):
    preprocess(data, PreprocessConfig(image_size=32, min_size=16), path="tiny.png")
  assert preprocess(data, PreprocessConfig(image_size=32, min_size=8)).shape == (32, 32, 3)


def test_declared_huge_image_is_rejected_before_decoding():
  bomb = png_with_declared_size(60_000, 60_000)  # 3.6e9 pixels, 8x8 of data.
  with pytest.raises(BadImageError, match="bomb.png"):
    preprocess(bomb, PreprocessConfig(image_size=32), path="bomb.png")
  over_limit = png_with_declared_size(3000, 3000)
  with pytest.raises(BadImageError, match="max_pixels"):
    preprocess(over_limit, PreprocessConfig(image_size=32, max_pixels=1_000_000), path="big.png")


def test_huge_jpeg_decodes_at_reduced_scale_close_to_full_decode():
  yy, xx = np.mgrid[0:2400, 0:3200]
  smooth = np.stack([xx * 255 // 3199, yy * 255 // 2399, (xx + yy) * 255 // 5598], -1)
  data = encode(Image.fromarray(smooth.astype(np.uint8)), "JPEG", quality=90)
  fast = preprocess(data, PreprocessConfig(image_size=64), path="huge.jpg")
  full = Image.open(io.BytesIO(data)).convert("RGB")
  reference = to_model_range(resize_and_crop(full, 64))
  assert fast.shape == (64, 64, 3)
  assert np.abs(fast - reference).mean() < 0.02


# Geometry and range ------------------------------------------------------------------------


def test_centre_crop_of_landscape_keeps_the_middle():
  arr = np.zeros((100, 300, 3), np.uint8)
  arr[:, 100:200] = 255  # The middle third is white.
  out = resize_and_crop(Image.fromarray(arr), 50)
  assert out.shape == (50, 50, 3)
  assert out[:, 2:-2].min() >= 250


def test_random_crop_moves_along_the_long_side_only():
  boxes = [crop_box(300, 100, 50, np.random.default_rng(s)) for s in range(20)]
  for x0, y0, x1, y1 in boxes:
    assert y0 == 0 and y1 == 100 and 0 <= x0 <= 200 and x1 - x0 == pytest.approx(100)
  assert len({round(b[0], 3) for b in boxes}) == 20
  assert crop_box(300, 100, 50) == (100.0, 0.0, 200.0, 100.0)


def test_model_range_ends_and_round_trip():
  arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  scaled = to_model_range(arr)
  assert scaled.dtype == np.float32 and scaled.min() == -1.0 and scaled.max() == 1.0
  np.testing.assert_array_equal(from_model_range(scaled), arr)


# Bad images inside the pipeline -------------------------------------------------------------


def write_folder_with_bad_images(root):
  good = {}
  for i in range(12):
    name = f"good/{i:02d}.png"
    good[name] = patterned_rgb(40, 56, seed=i)
    (root / "good").mkdir(exist_ok=True)
    Image.fromarray(good[name]).save(root / name)
  (root / "bad").mkdir()
  jpeg = encode(Image.fromarray(patterned_rgb(64, 64)), "JPEG")
  (root / "bad" / "corrupt.jpg").write_bytes(b"garbage" * 50)
  (root / "bad" / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
  Image.fromarray(patterned_rgb(8, 8)).save(root / "bad" / "tiny.png")
  (root / "bad" / "bomb.png").write_bytes(png_with_declared_size(50_000, 50_000))
  bad = {"bad/corrupt.jpg", "bad/truncated.jpg", "bad/tiny.png", "bad/bomb.png"}
  # Odd modes that must load fine.
  Image.fromarray(patterned_rgb(40, 40)[..., 0], "L").save(root / "good" / "gray.jpg")
  Image.fromarray(patterned_rgb(40, 40)).convert("CMYK").save(root / "good" / "cmyk.jpg")
  Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "good" / "deep.png")
  Image.fromarray(patterned_rgb(40, 40)).convert("P").save(root / "good" / "pal.bmp")
  rgba = np.concatenate([patterned_rgb(40, 40), np.full((40, 40, 1), 100, np.uint8)], -1)
  Image.fromarray(rgba, "RGBA").save(root / "good" / "alpha.webp", lossless=True)
  names = {f"good/{n}" for n in ("gray.jpg", "cmyk.jpg", "deep.png", "pal.bmp", "alpha.webp")}
  return set(good) | names, bad


def test_train_pipeline_skips_and_counts_bad_images(tmp_path, caplog):
  good, bad = write_folder_with_bad_images(tmp_path)
  source = get_source("folder", "train", path=str(tmp_path))
  assert len(source) == len(good) + len(bad)
  it = make_train_iterator(source, levels=1, batch_size=4, image_size=16, seed=0,
                           process_index=0, process_count=1, min_size=16)
  seen = set()
  with caplog.at_level(logging.WARNING, logger="cat_jax.data.preprocess"):
    for _ in range(20):  # 80 images: several passes over 17 good ones.
      batch = next(it)
      assert batch["image"].shape == (4, 16, 16, 3) and int(batch["level"]) == 1
      assert np.isfinite(batch["image"]).all() and np.abs(batch["image"]).max() <= 1.0
      seen.update(batch["id"].tolist())
  assert seen == good
  warnings = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
  assert warnings, "no warning about skipped images"
  assert "Skipped 4 unusable" in warnings[-1]
  for name in bad:
    assert name in warnings[-1]


def test_train_pipeline_raises_with_path_when_configured(tmp_path):
  write_folder_with_bad_images(tmp_path)
  source = get_source("folder", "all", path=str(tmp_path))
  it = make_train_iterator(source, levels=0, batch_size=4, image_size=16, seed=0,
                           process_index=0, process_count=1, min_size=16, on_bad_image="raise")
  with pytest.raises(BadImageError, match=r"bad/(corrupt|truncated)\.jpg|bad/(tiny|bomb)\.png"):
    for _ in range(20):
      next(it)


def test_eval_pipeline_masks_bad_images(tmp_path, caplog):
  good, bad = write_folder_with_bad_images(tmp_path)
  source = get_source("folder", "train", path=str(tmp_path))
  with caplog.at_level(logging.WARNING, logger="cat_jax.data.preprocess"):
    batches = list(make_eval_iterator(source, levels=2, batch_size=8, image_size=16,
                                      process_index=0, process_count=1, min_size=16))
  assert [b["image"].shape[0] for b in batches] == [8, 8, 8]
  ids = [i for b in batches for i, m in zip(b["id"], b["mask"]) if m]
  assert sorted(ids) == sorted(good)
  masked = np.concatenate([b["image"][~b["mask"]] for b in batches])
  assert len(masked) == 24 - len(good) and not masked.any()
  assert any("Skipped 4 unusable" in r.getMessage() for r in caplog.records)


def test_describe_sizes_counts_files_and_sizes(tmp_path):
  paths = []
  for i, (w, h) in enumerate([(40, 30), (40, 30), (90, 20)]):
    paths.append(tmp_path / f"{i}.png")
    Image.new("RGB", (w, h)).save(paths[-1])
  (tmp_path / "bad.png").write_bytes(b"not an image")
  assert describe_sizes(paths[:1]) == "1 file, one size: 40x30 (width x height)"
  assert describe_sizes(paths[:2]) == "2 files, one size: 40x30 (width x height)"
  assert describe_sizes(paths + [tmp_path / "bad.png"]) == "4 files, 2 sizes from 40x30 to 90x20 (width x height)"
  assert describe_sizes([tmp_path / "bad.png"]) == "1 file, none readable"
