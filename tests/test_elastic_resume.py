"""Elastic resume: a data position saved by N jax.distributed processes continues on M (2 -> 1, 1 -> 2)."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cat_jax.data import EmbeddedSource, make_train_iterator
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_BATCH, SAVED_AT, MORE = 4, 5, 4

_CHILD = textwrap.dedent("""
    import hashlib, json, sys
    import jax, numpy as np
    from cat_jax.distributed import maybe_initialize_distributed
    maybe_initialize_distributed()
    from cat_jax import checkpoint as ckpt
    from cat_jax.data import EmbeddedSource, make_train_iterator

    workdir, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    it = make_train_iterator(EmbeddedSource("train", num_images=40, image_size=32), levels=None,
                             batch_size={batch} // jax.process_count(), image_size=24, seed=0)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    model = {{"w": jax.make_array_from_process_local_data(replicated, np.arange(3, dtype=np.float32))}}
    checkpointer = ckpt.Checkpointer(workdir, async_save=False)
    if mode == "resume":
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), model)
      model, _, it = checkpointer.restore(checkpointer.latest_step(), abstract, abstract, it)
      assert np.asarray(model["w"]).tolist() == [0.0, 1.0, 2.0]
    batches = []
    for _ in range(steps):
      b = next(it)
      batches.append([int(b["level"]), [[i, hashlib.sha1(x.tobytes()).hexdigest()] for i, x in zip(b["id"], b["image"])]])
    if mode == "save":
      checkpointer.save(steps, model, model, it)
      checkpointer.wait()
    checkpointer.close()
    print(json.dumps({{"index": jax.process_index(), "batches": batches}}), flush=True)
    if jax.process_count() > 1:
      jax.distributed.shutdown()
""").format(batch=GLOBAL_BATCH)


def _run(workdir, mode, steps, processes):
  """Runs the child on ``processes`` jax.distributed CPU processes; returns the global batches in order."""
  import portpicker

  port = portpicker.pick_unused_port()
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "TPU_", "CAT_", "OMPI_"))}
  base.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  procs = []
  for rank in range(processes):
    env = dict(base)
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(rank))
    procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, str(workdir), mode, str(steps)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  parts = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    parts.append(json.loads(out.strip().splitlines()[-1]))
  parts.sort(key=lambda r: r["index"])
  out = []
  for step in range(steps):
    levels = {p["batches"][step][0] for p in parts}
    assert len(levels) == 1, "processes drew different levels"
    out.append((levels.pop(), sorted(tuple(x) for p in parts for x in p["batches"][step][1])))
  return out


def _reference(steps):
  """One process, never interrupted: the global order every run must follow."""
  it = make_train_iterator(EmbeddedSource("train", num_images=40, image_size=32), levels=None,
                           batch_size=GLOBAL_BATCH, image_size=24, seed=0, process_index=0, process_count=1)
  out = []
  for _ in range(steps):
    b = next(it)
    out.append((int(b["level"]), sorted((i, hashlib.sha1(x.tobytes()).hexdigest())
                                        for i, x in zip(b["id"], b["image"]))))
  return out


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)])
def test_resume_on_another_process_count_continues_the_data_order(tmp_path, saved_on, resumed_on):
  before = _run(tmp_path, "save", SAVED_AT, saved_on)
  assert sorted(p.name for p in (tmp_path / "checkpoints" / str(SAVED_AT) / "data_iter").glob("process_*")) == [
      f"process_{i}-of-{saved_on}.json" for i in range(saved_on)]
  after = _run(tmp_path, "resume", MORE, resumed_on)
  assert before + after == _reference(SAVED_AT + MORE)


def test_training_saved_by_two_processes_resumes_on_one(tmp_path):
  """The whole trainer on 2 jax.distributed processes (metrics written once, by process 0; the eval measured where
  each image is and summed across processes), then its checkpoint (state, EMA, data position) continues on 1
  process."""
  import portpicker

  # The GAN from step 1 and one level (8x): one step to trace and compile per process. The data order across a
  # change of process count, levels included, is the test above's; this one checks the trainer carries it over.
  train = [sys.executable, "-m", "cat_jax.train", "--config", str(ROOT / "configs/cat.py:runlocal"),
           "--workdir", str(tmp_path), "--config.checkpoint_every=2", "--config.eval_every=2",
           "--config.log_every=1", "--config.loss.disc_start=0", "--config.data.levels=8x",
           "--config.data.eval_levels=8x"]
  base = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(train + ["--config.num_steps=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(base, XLA_FLAGS=xla_flags(1),
                                                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)))
           for rank in range(2)]
  for proc in procs:
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
  from cat_jax import checkpoint as ckpt
  assert ckpt.load_config(tmp_path).batch_size == 8  # the global batch, saved once
  resumed = subprocess.run(train + ["--config.num_steps=4"], capture_output=True, text=True, timeout=900,
                           env=dict(base, XLA_FLAGS=xla_flags(2)))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from step 2" in resumed.stderr
  assert "Data position saved by 2 processes, restored onto 1" in resumed.stderr
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 4
  from cat_jax.metric_writers import read_metrics
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows if "train/g_loss" in r] == [1, 2, 3, 4]
  # The 2-process eval covers the global eval batch, 4 images per process: its no-learning row equals one process's
  # measurement of all 8 (without the cross-process sum process 0 would log its own 4).
  from cat_jax import train as T
  from cat_jax.configs import load
  from cat_jax.metrics.baselines import area_bicubic

  config = load("cat:runlocal")
  batch = next(iter(T._make_data(config, split=config.data.eval_split, train=False, process_batch=8)))
  assert int(np.sum(batch["mask"])) == 8
  bicubic = lambda params, x, level: ({"": area_bicubic(x, level)}, {"l1": np.zeros(len(x))})
  one_process = T.evaluate_reconstruction(bicubic, None, [batch], level_arg=int, levels=(0,))
  logged = next(r for r in rows if r["step"] == 0 and "eval/loss" in r)
  assert logged["eval/level0/psnr_area_bicubic"] == pytest.approx(one_process["eval/level0/psnr"], abs=1e-9)


def test_a_position_from_another_pipeline_or_diverged_processes_is_a_clear_error(tmp_path):
  from etils import epath

  from cat_jax import checkpoint as ckpt

  it = make_train_iterator(EmbeddedSource("train", num_images=40, image_size=32), levels=None, batch_size=4,
                           image_size=24, seed=0, process_index=0, process_count=1)
  handler = ckpt.ElasticDataIterHandler()
  (tmp_path / "process_0-of-1.json").write_text(json.dumps({"next_index": 3}))  # an older per-process format
  with pytest.raises(ValueError, match="not written by this data pipeline"):
    handler.restore(epath.Path(tmp_path), item=it)
  for name, position in (("process_0-of-2.json", 4), ("process_1-of-2.json", 8)):
    (tmp_path / name).write_text(json.dumps({"global_next_index": position}))
  (tmp_path / "process_0-of-1.json").unlink()
  with pytest.raises(ValueError, match="different positions"):
    handler.restore(epath.Path(tmp_path), item=it)
