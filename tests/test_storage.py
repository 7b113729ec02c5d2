"""Run outputs on object stores (an in-memory gs://): append-only logs in parts, whole files written once."""

import io

import jax.numpy as jnp
import pytest
from PIL import Image

from cat_jax import storage
from cat_jax import train as T


def test_append_file_local_and_object_store(tmp_path, object_store):
  for path in (tmp_path / "log.jsonl", "gs://bucket/log.jsonl"):
    for run in range(2):
      with storage.AppendFile(path) as f:
        f.write(f"run{run} a\n")
        f.flush()
        f.flush()  # nothing new: no empty part
        f.write(f"run{run} b\n")
    assert list(storage.read_lines(path)) == ["run0 a", "run0 b", "run1 a", "run1 b"]
  assert len(object_store.writes) == 4 and set(object_store.writes.values()) == {1}
  clock = [0.0]
  with storage.AppendFile("gs://bucket/slow.jsonl", min_part_seconds=60, clock=lambda: clock[0]) as f:
    for i in range(5):
      f.write(f"{i}\n")
      f.flush()
      clock[0] += 20.0  # a part at most every 60 s
  parts = [p for p in object_store.writes if "slow.jsonl" in p]
  assert len(parts) == 2 and list(storage.read_lines("gs://bucket/slow.jsonl")) == [str(i) for i in range(5)]
  with pytest.raises(NotImplementedError):
    storage.as_path("gs://bucket/log.jsonl.part-x").open("a")  # the fake refuses appends, as GCS does


def test_train_eval_grid_png_goes_to_an_object_store(object_store):
  def eval_fn(params, images, level):  # a stand-in model: level l darkens by l / 4
    recon = images - level / 4
    return {"": recon}, {"l1": jnp.abs(recon - images).mean((1, 2, 3))}

  batch = {"image": jnp.zeros((2, 8, 8, 3)), "mask": jnp.array([True, True])}
  out = T.evaluate_reconstruction(eval_fn, None, [batch], writer=_NullWriter(), step=40,
                                  image_dir="gs://bucket/run/images")
  assert out["eval/level2/l1"] == pytest.approx(0.5)
  (path,) = object_store.writes
  assert path == "bucket/run/images/reconstructions_step0000040.png"
  with Image.open(io.BytesIO(storage.as_path("gs://" + path).read_bytes())) as im:
    assert im.size == (2 * 8 + 2, 4 * 8 + 3 * 2)  # 2 images; rows: original, 8x, 16x, 32x


class _NullWriter:
  def write_images(self, step, images):
    self.images = images


def test_file_uris_are_local_everywhere(tmp_path):
  """One ``is_local``: a ``file://`` URI is the local path for storage, score manifests and checkpoints alike."""
  from cat_jax import checkpoint
  from cat_jax.complexity import manifest

  uri = f"file://{tmp_path}/run"
  assert storage.is_local(uri) and storage.is_local(tmp_path) and not storage.is_local("gs://b/x")
  assert str(storage.as_path(uri)) == f"{tmp_path}/run"
  writer = manifest.ManifestWriter(uri + "/scores.jsonl", header={"method": "jpeg"})
  writer.write({"id": "a", "score": 1.0, "level": 0})
  writer.close()
  assert (tmp_path / "run" / "scores.jsonl").read_text().count("\n") == 2  # appended to the local file, no parts
  assert manifest.read_manifest(uri + "/scores.jsonl")["a"]["score"] == 1.0
  assert checkpoint.checkpoint_dir(uri) == tmp_path / "run" / "checkpoints"
