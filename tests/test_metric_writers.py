"""Metric writers: events read back by TensorBoard's own loader, JSONL, object-store workdirs, grids, timers."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from cat_jax import metric_writers as mw
from cat_jax import storage


def _event_files(directory):
  return sorted(os.path.join(directory, name) for name in os.listdir(directory))


def _tb_events(path):
  """Events as written (legacy fields: simple_value, image)."""
  return list(event_file_loader.LegacyEventFileLoader(path).Load())


def _tb_tensors(path):
  """What the TensorBoard UI reads: events migrated to plugin tensors, {(step, tag): (plugin, array)}."""
  return {(e.step, v.tag): (v.metadata.plugin_data.plugin_name, tensor_util.make_ndarray(v.tensor))
          for e in event_file_loader.EventFileLoader(path).Load() for v in e.summary.value}


def test_scalars_round_trip_through_tensorboard_and_jsonl(tmp_path):
  writer = mw.MetricWriter(tmp_path)
  writer.write_scalars(10, {"loss/total": 0.25, "loss/level_8x": np.float32(1.5), "lr": 3e-4, "count": 7})
  writer.write_scalars(20, {"loss/total": float("nan"), "grad_norm": float("inf"), "lr": -2.0})
  writer.close()

  (event_file,) = _event_files(tmp_path / "tensorboard")
  assert os.path.basename(event_file).startswith("events.out.tfevents.")
  events = _tb_events(event_file)
  assert events[0].file_version == "brain.Event:2"
  got = {(e.step, v.tag): v.simple_value for e in events[1:] for v in e.summary.value}
  assert len(got) == 7
  assert got[(10, "loss/total")] == 0.25
  assert got[(10, "loss/level_8x")] == 1.5
  assert got[(10, "lr")] == pytest.approx(3e-4, rel=1e-7)
  assert got[(10, "count")] == 7.0
  assert np.isnan(got[(20, "loss/total")]) and got[(20, "grad_norm")] == np.inf and got[(20, "lr")] == -2.0
  assert all(e.wall_time > 1.6e9 for e in events)
  plugin, value = _tb_tensors(event_file)[(10, "loss/level_8x")]
  assert plugin == "scalars" and value == 1.5

  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [10, 20]
  assert lines[0]["loss/level_8x"] == 1.5 and lines[0]["count"] == 7 and isinstance(lines[0]["count"], int)
  assert lines[1]["loss/total"] == "nan" and lines[1]["grad_norm"] == "inf" and lines[1]["lr"] == -2.0
  assert mw.read_metrics(tmp_path) == lines


def test_jsonl_appends_on_resume_and_each_run_has_its_event_file(tmp_path):
  with mw.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"a": 1.0})
  with mw.MetricWriter(tmp_path) as writer:
    writer.write_scalars(2, {"a": 2.0})
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(line["step"], line["a"]) for line in lines] == [(1, 1.0), (2, 2.0)]
  files = _event_files(tmp_path / "tensorboard")
  assert len(files) == 2
  steps = [[e.step for e in _tb_events(f)[1:]] for f in files]
  assert steps == [[1], [2]]  # file names sort in writing order, as TensorBoard reads them


def test_images_round_trip_through_tensorboard(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  batch = rng.uniform(-1, 1, (3, 4, 6, 1)).astype(np.float32)
  with mw.MetricWriter(tmp_path) as writer:
    writer.write_images(30, {"recon/rgb": rgb, "recon/batch": batch})
  (event_file,) = _event_files(tmp_path / "tensorboard")
  events = _tb_events(event_file)[1:]
  assert {e.step for e in events} == {30}
  images = {v.tag: v.image for e in events for v in e.summary.value}
  assert (images["recon/rgb"].height, images["recon/rgb"].width, images["recon/rgb"].colorspace) == (5, 7, 3)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(images["recon/rgb"].encoded_image_string))),
                                rgb)
  # A batch of 3 images 4x6 becomes one row with 2-pixel separators: 4 x (3*6 + 2*2); grey is stored as RGB.
  gray = images["recon/batch"]
  assert (gray.height, gray.width) == (4, 22)
  decoded = np.asarray(Image.open(io.BytesIO(gray.encoded_image_string)))
  for channel in range(decoded.shape[-1] if decoded.ndim == 3 else 1):
    plane = decoded[..., channel] if decoded.ndim == 3 else decoded
    np.testing.assert_array_equal(plane[:, 8:14], mw.to_uint8(batch[1, ..., 0]))
  plugin, value = _tb_tensors(event_file)[(30, "recon/rgb")]
  assert plugin == "images" and list(value[:2]) == [b"7", b"5"]  # Width, height, PNG.


def test_object_store_workdir_writes_parts_never_rewrites(object_store, tmp_path):
  workdir = "gs://bucket/run"
  with mw.MetricWriter(workdir, object_store_flush_secs=0) as writer:
    writer.write_scalars(1, {"a": 1.0})
    writer.write_images(1, {"grid": np.zeros((4, 4, 3), np.uint8)})
    writer.write_scalars(2, {"a": 2.0})
  with mw.MetricWriter(workdir, object_store_flush_secs=3600) as writer:  # a resumed run, buffered to close
    writer.write_scalars(3, {"a": 3.0})
    writer.write_scalars(4, {"a": 4.0})
  assert [(r["step"], r["a"]) for r in mw.read_metrics(workdir)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
  assert object_store.writes and set(object_store.writes.values()) == {1}  # every object written once
  jsonl_parts = [p for p in object_store.writes if "metrics.jsonl" in p]
  assert len(jsonl_parts) == 2 + 1  # a part per scalar write in the first run; the second run's buffer at close
  # Every uploaded event file is a complete file TensorBoard reads; together they hold every step in order.
  events = sorted(p for p in object_store.writes if "/tensorboard/events.out.tfevents." in p)
  steps = []
  for k, path in enumerate(events):
    local = tmp_path / f"events.out.tfevents.{k}"
    local.write_bytes(storage.as_path("gs://" + path).read_bytes())
    steps += [e.step for e in _tb_events(str(local))[1:]]
  assert steps == [1, 1, 2, 3, 4]


def test_disabled_writer_is_a_no_op(tmp_path):
  writer = mw.MetricWriter(tmp_path / "run", enabled=False)
  writer.write_scalars(1, {"a": 1.0})
  writer.write_images(1, {"a": np.zeros((2, 2, 3), np.uint8)})
  writer.flush()
  writer.close()
  assert not (tmp_path / "run").exists()


def test_to_uint8_range_and_nan():
  x = np.array([-1.0, -2.0, 0.0, 1.0, 3.0, np.nan], np.float32)
  np.testing.assert_array_equal(mw.to_uint8(x), [0, 0, 128, 255, 255, 0])


def test_make_image_grid_layout():
  original = np.full((2, 3, 4, 3), -1.0, np.float32)
  recon = np.full((2, 3, 4, 3), 1.0, np.float32)
  recon[1, 0, 0] = 0.0
  grid = mw.make_image_grid([original, recon], separator=1, separator_value=77)
  assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 3) and grid.dtype == np.uint8
  assert (grid[:3, :4] == 0).all() and (grid[:3, 5:] == 0).all()  # Row 0: originals.
  assert (grid[3] == 77).all() and (grid[:, 4] == 77).all()  # Separators.
  assert (grid[4, 5] == 128).all() and grid[4:, 5:].sum() == 255 * 3 * (12 - 1) + 128 * 3
  with pytest.raises(ValueError):
    mw.make_image_grid([original, recon[:1]])


def test_step_timer_rates():
  now = [100.0]
  timer = mw.StepTimer(5, clock=lambda: now[0])
  now[0] = 102.0
  assert timer.rates(15, batch_size=8) == {"steps_per_sec": 5.0, "images_per_sec": 40.0}
  now[0] = 110.0
  timer.reset(15)  # E.g. after an evaluation: its 8 seconds are not training time.
  now[0] = 111.0
  assert timer.rates(19, batch_size=8) == {"steps_per_sec": 4.0, "images_per_sec": 32.0}


def test_progress_bar_tracks_steps_and_postfix(capsys):
  bar = mw.ProgressBar(100, initial_step=10, mininterval=0)
  bar.update(12, loss=0.123456)
  bar.update(30, loss=0.5)
  assert bar._bar.n == 30
  bar.close()
  err = capsys.readouterr().err
  assert "30/100" in err and "loss=0.5" in err and "loss=0.1235" in err
  disabled = mw.ProgressBar(100, enabled=False)
  disabled.update(50, loss=1.0)
  disabled.close()
  assert capsys.readouterr().err == ""
