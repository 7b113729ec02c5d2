"""cat_jax.loop.run_steps, the loop both trainers share: its cadence, and that everything is closed after an error."""

import ml_collections
import pytest

from cat_jax import loop


class Recorder:
  """Stands in for the checkpoints, the log and a writer: records the calls the loop makes."""

  def __init__(self, calls, name, preempt_at=None):
    self.calls, self.name, self.preempt_at = calls, name, preempt_at

  # Checkpoints
  def check_finite(self, state, step):
    self.calls.append(("check_finite", step))

  def save(self, step, state, data_iter, metrics=None):
    self.calls.append(("save", step, metrics))

  def preempted(self, step, state, data_iter, preemption):
    return step == self.preempt_at

  def wait(self):
    self.calls.append(("wait",))

  # TrainLog
  def add(self, level, metrics):
    self.calls.append(("add", level))

  def write(self, step):
    self.calls.append(("write", step))

  def reset(self, step):
    self.calls.append(("reset", step))

  def close(self):
    self.calls.append(("close", self.name))


def _config(num_steps=6):
  return ml_collections.ConfigDict(dict(num_steps=num_steps, log_every=2, checkpoint_every=4))


def test_cadence_from_a_resumed_step():
  calls = []
  ckpts, log, writer = Recorder(calls, "checkpoints"), Recorder(calls, "log"), Recorder(calls, "writer")
  step_fn = lambda state, step: (state + 1, step % 3, {})
  periodic = lambda state, step: {"eval": step} if step == 5 else None
  state = loop.run_steps(10, start=2, config=_config(), train_iter=None, train_step=step_fn, checkpoints=ckpts,
                         log=log, closing=(writer,), periodic=periodic, before=lambda s: calls.append(("before", s)))
  assert state == 14  # steps 3..6
  assert calls[:2] == [("before", 10), ("reset", 2)]
  assert [c[1] for c in calls if c[0] == "add"] == [0, 1, 2, 0]
  assert [c[1] for c in calls if c[0] == "write"] == [4, 6]
  # every checkpoint_every steps, when periodic returns metrics (saved with them), and at the end
  assert [c[1:] for c in calls if c[0] == "save"] == [(4, None), (5, {"eval": 5}), (6, None)]
  assert calls[-4:] == [("wait",), ("close", "checkpoints"), ("close", "writer"), ("close", "log")]


def test_preemption_stops_after_the_step():
  calls = []
  ckpts = Recorder(calls, "checkpoints", preempt_at=3)
  state = loop.run_steps(0, start=0, config=_config(), train_iter=None, train_step=lambda s, i: (s + 1, 0, {}),
                         checkpoints=ckpts, log=Recorder(calls, "log"))
  assert state == 3


@pytest.mark.parametrize("where", ["before", "step"])
def test_an_error_still_closes_checkpoints_writers_and_log(where):
  calls = []

  def fail(*args):
    raise RuntimeError("boom")

  ok_step = lambda state, step: (state, 0, {})
  with pytest.raises(RuntimeError, match="boom"):
    loop.run_steps(0, start=0, config=_config(), train_iter=None, train_step=fail if where == "step" else ok_step,
                   checkpoints=Recorder(calls, "checkpoints"), log=Recorder(calls, "log"),
                   closing=(Recorder(calls, "writer"),), before=fail if where == "before" else None)
  assert calls[-3:] == [("close", "checkpoints"), ("close", "writer"), ("close", "log")]
  assert not [c for c in calls if c[0] == "save"]


def test_metrics_are_averaged_overall_and_per_level_and_a_model_without_levels_logs_none():
  with_levels = loop.mean_metrics([(0, {"loss": 1.0}), (2, {"loss": 6.0}), (0, {"loss": 5.0})])
  assert with_levels == {"train/loss": 4.0, "train/level0/loss": 3.0, "train/level2/loss": 6.0}
  assert loop.mean_metrics([(None, {"loss": 1.0}), (None, {"loss": 2.0})]) == {"train/loss": 1.5}
