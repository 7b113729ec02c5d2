"""The loop machinery both trainers share (``cat_jax.train``: the nested VAE, ``cat_jax.train_dit``: the DiT).

Each trainer stays one readable loop; what they have in common lives here, so a fix to resume or logging lands
once: ``make_mesh`` (the global batch must split over the devices) -> ``sharded_shapes`` (``jax.eval_shape``, then
each leaf's sharding) -> ``Checkpoints.restore_or_init`` (the train state and the data iterator from the latest
checkpoint, or a jitted init with ``out_shardings`` that materialises each shard where it lives) -> the loop, with
``TrainLog`` (step metrics overall and per level, images/s, a progress bar), ``Checkpoints.save`` (refuses a
non-finite state) and ``Preemption`` (SIGTERM: save and exit at the next step) -> ``run_cli`` (flags, distributed
init, logging). The model-specific parts, state, step function and evaluation, stay in each trainer.

A train state is a ``flax.struct.dataclass`` with at least ``step``, ``params``, ``ema_params`` and ``all_finite``
(``SingleNetState``: the DiT's and the level predictor's; ``train.TrainState``: the tokenizer's, with its GAN);
checkpoints hold it without its EMA params, the EMA params as their own item (what inference restores), and the data
iterator (``cat_jax.checkpoint``).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Callable, Sequence

import flax
import jax
import ml_collections
import numpy as np

from cat_jax import checkpoint as ckpt
from cat_jax import parallel

logger = logging.getLogger("cat_jax.loop")


@flax.struct.dataclass
class SingleNetState:
  """The train state of a single-network trainer (the DiT, the level predictor); the tokenizer's adds its GAN."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  all_finite: jax.Array  # False from the first step whose loss or gradient was not finite


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The ``config.mesh`` mesh; raises ValueError unless ``config.batch_size`` splits evenly over its devices."""
  mesh = parallel.make_mesh(config.mesh)
  if config.batch_size % mesh.size:  # mesh.size is a multiple of the process count, so hosts split evenly too
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of devices ({mesh.size})")
  return mesh


def sharded_shapes(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: jax.sharding.Mesh, *,
                   min_size: int) -> tuple[Any, Any]:
  """``(abstract state carrying its shardings, shardings)`` of ``init_fn(rng)``, without computing it."""
  abstract_state = jax.eval_shape(init_fn, rng)
  shardings = parallel.param_shardings(abstract_state, mesh, min_size=min_size)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
  return abstract_state, shardings


class Checkpoints:
  """A run's checkpoints in ``workdir``: restore or init, save, the non-finite guard, preemption saves."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
    self.checkpointer = ckpt.Checkpointer(workdir, keep=config.keep_checkpoints,
                                          async_save=config.async_checkpointing)

  def restore_or_init(self, config, abstract_state, shardings, init_fn, rng, data_iter) -> tuple[Any, Any, bool]:
    """``(state, data_iter, resumed)``: from the latest checkpoint (refusing an incompatible config, see
    ``checkpoint.check_compatible``), else ``init_fn(rng)`` placed by ``shardings`` and ``config.json`` written."""
    latest = self.checkpointer.latest_step()
    if latest is not None:
      ckpt.check_compatible(ckpt.load_config(self.workdir), config)
      saved_state, ema, data_iter = self.checkpointer.restore(latest, abstract_state.replace(ema_params=None),
                                                              abstract_state.ema_params, data_iter)
      if jax.process_index() == 0:
        logger.info("Resumed from step %d in %s", latest, self.workdir)
      return saved_state.replace(ema_params=ema), data_iter, True
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
    ckpt.save_config(self.workdir, config)
    return state, data_iter, False

  def check_finite(self, state, step: int) -> None:
    """Raises ``non_finite_error`` once any step up to ``step`` had a non-finite loss or gradient."""
    if not bool(jax.device_get(state.all_finite)):
      raise self.non_finite_error(step)

  def save(self, step: int, state, data_iter, metrics: dict | None = None, force: bool = False) -> None:
    """Saves ``step`` (unless already saved); never a state that went non-finite."""
    self.check_finite(state, step)
    if self.checkpointer.latest_step() != step:
      self.checkpointer.save(step, state.replace(ema_params=None), state.ema_params, data_iter, metrics=metrics,
                             force=force)

  def preempted(self, step: int, state, data_iter, preemption: "Preemption") -> bool:
    """On SIGTERM (or orbax's preemption signal): saves ``step``, waits for the save, returns True."""
    if not (preemption.requested or self.checkpointer.manager.reached_preemption(step)):
      return False
    self.save(step, state, data_iter, force=True)
    self.checkpointer.wait()
    logger.warning("Preempted: saved step %d; re-run the same command to resume.", step)
    return True

  def non_finite_error(self, step: int) -> FloatingPointError:
    self.checkpointer.wait()
    last = self.checkpointer.latest_step()
    return FloatingPointError(
        f"non-finite loss or gradient at or before step {step}; stopping without saving. The last good checkpoint "
        f"is step {last} (None: no checkpoint yet). Lower optimizer.lr, check the data, or enable bf16-safe "
        "settings, then re-run to resume from it.")

  def wait(self) -> None:
    self.checkpointer.wait()

  def close(self) -> None:
    self.checkpointer.close()


class Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logger.warning("SIGTERM received: saving a checkpoint and exiting at the next step.")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def mean_metrics(pending: list[tuple[int | None, dict]]) -> dict[str, float]:
  """Averages fetched step metrics overall ('train/x') and per level ('train/level{l}/x'; none for level None)."""
  out: dict[str, list[float]] = {}
  for level, m in jax.device_get(pending):
    for k, v in m.items():
      out.setdefault(f"train/{k}", []).append(float(v))
      if level is not None:
        out.setdefault(f"train/level{level}/{k}", []).append(float(v))
  return {k: float(np.mean(v)) for k, v in out.items()}


class TrainLog:
  """Step metrics between two ``write`` calls, averaged overall and per level, with steps/s and images/s.

  ``write`` fetches the metrics (which waits for the steps, so the rates are real), writes them to ``writer`` and
  moves the progress bar (process 0 only), showing ``loss_key``. Call ``reset`` after an evaluation or a checkpoint
  so their time is not counted as training.
  """

  def __init__(self, writer, *, num_steps: int, start: int, batch_size: int, loss_key: str, enabled: bool = True):
    from cat_jax.metric_writers import ProgressBar, StepTimer

    self.writer, self.batch_size, self.loss_key = writer, batch_size, loss_key
    self.progress = ProgressBar(num_steps, start) if enabled else None
    self.timer = StepTimer(start)
    self.pending: list[tuple[int, dict]] = []

  def add(self, level: int | None, metrics: dict) -> None:
    self.pending.append((level, metrics))

  def write(self, step: int) -> dict[str, float]:
    scalars = mean_metrics(self.pending)
    rates = self.timer.rates(step, batch_size=self.batch_size)
    scalars["train/images_per_s"], scalars["train/steps_per_s"] = rates["images_per_sec"], rates["steps_per_sec"]
    self.writer.write_scalars(step, scalars)
    if self.progress:
      self.progress.update(step, loss=f"{scalars[self.loss_key]:.4f}")
    self.pending = []
    return scalars

  def reset(self, step: int) -> None:
    self.timer.reset(step)

  def close(self) -> None:
    if self.progress:
      self.progress.close()


def run_steps(state, *, start: int, config: ml_collections.ConfigDict, train_iter,
              train_step: Callable[[Any, int], tuple[Any, int | None, dict]], checkpoints: Checkpoints, log: TrainLog,
              closing: Sequence[Any] = (), periodic: Callable[[Any, int], dict | None] | None = None,
              before: Callable[[Any], None] | None = None):
  """The train loop of cat_jax.train and cat_jax.train_dit, from step ``start + 1`` to ``config.num_steps``.

  ``before(state)`` runs first (the tokenizer's step-0 evaluation). Each step: ``train_step(state, step) -> (state,
  level, metrics)`` (level None: a model without levels); metrics logged every ``config.log_every`` steps (after a
  finiteness check of the state);
  ``periodic(state, step)`` (evaluation, sample grids) may return metrics, which are saved with a checkpoint; a
  checkpoint every ``config.checkpoint_every`` steps and at the end; on SIGTERM a checkpoint and a clean exit.
  ``checkpoints``, ``log`` and ``closing`` (writers) are closed at the end, also after an error (``before``'s too).
  """
  num_steps = config.num_steps
  preemption = Preemption()
  # On XLA:CPU with several devices, a step dispatched while the last one is still finishing on some device can
  # deadlock: half the devices wait in the step's all-reduce while the others' launches wait for their previous step
  # to release them, every launch thread taken (seen in gdb on the tests' 8 simulated devices); XLA aborts the process
  # after 40 s ("Fatal Python error: Aborted"). Waiting for each step there costs nothing: host and devices share the
  # cores. Accelerators keep dispatching ahead.
  wait_each_step = jax.default_backend() == "cpu" and jax.local_device_count() > 1
  try:
    if before:
      before(state)
      log.reset(start)  # its time is not training throughput
    for step in range(start + 1, num_steps + 1):
      state, level, metrics = train_step(state, step)
      if wait_each_step:
        jax.block_until_ready(state)
      log.add(level, metrics)
      if step % config.log_every == 0 or step == num_steps:
        checkpoints.check_finite(state, step)
        log.write(step)
      extra = periodic(state, step) if periodic else None
      if step % config.checkpoint_every == 0 or step == num_steps or extra:
        checkpoints.save(step, state, train_iter, extra)
        log.reset(step)  # evaluation, sampling and checkpoint time is not training throughput
      if checkpoints.preempted(step, state, train_iter, preemption):
        break
    checkpoints.wait()
  finally:
    preemption.restore()
    checkpoints.close()
    for thing in closing:
      thing.close()
    log.close()
  return state


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _one_line(e: BaseException) -> str:
  """A flag or config error as one line (ml_collections' messages span lines and quote a typo's suggestion)."""
  import re

  text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
  if isinstance(e, (AttributeError, KeyError)):  # an override names a key the config lacks
    text = re.sub(r"\\n|\\'", " ", text).replace("\\", "").strip("'\" ")
    return f"the config has no such key: {' '.join(text.split())} (fix the --config.KEY=VALUE override)"
  return text


def run_cli(train_and_evaluate: Callable[[ml_collections.ConfigDict, str], Any], *, logger: logging.Logger,
            usage: str, config_help: str, argv=None,
            check_config: Callable[[ml_collections.ConfigDict], None] | None = None) -> int:
  """``--config FILE[:variant] --workdir DIR`` (plus ``--config.x=y`` overrides) -> ``train_and_evaluate``.

  ``check_config(config)`` raises ValueError for a config the trainer cannot run; its message becomes the one line.

  ``--config`` also takes a shipped config by name (``cat:demo``, ``dit``). Bad flags, config keys and workdirs end in
  one line on stderr and exit status 2. ``logger`` (the trainer's) and this module's log at INFO on process 0,
  WARNING elsewhere.
  """
  from absl import app, flags
  from ml_collections import config_flags

  flags_ = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, f"{config_help}: a config file and variant, or a shipped config "
                                  "by name (cat:demo); override any key with --config.KEY=VALUE", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, logs and config.json go (local path or gs://); a "
                      "workdir with checkpoints resumes")
  for name in ("config", "workdir"):  # listed by --help, not only --helpfull
    flags_.register_key_flag_for_module(sys.argv[0], flags_[name])

  def fail(message: str):
    print(f"error: {message}\nusage: {usage}", file=sys.stderr)
    sys.exit(2)

  def parse(args):
    from cat_jax import configs

    args = list(args)
    for i, arg in enumerate(args):  # a shipped config by name -> its file; load it once here for a clean error
      at = i + 1 if arg == "--config" else i if arg.startswith("--config=") else None
      if at is None or at >= len(args):
        continue
      spec = args[at][len("--config="):] if at == i else args[at]
      try:
        configs.load(configs.resolve_spec(spec))
      except Exception as e:  # a missing file, an unknown variant, an error inside the config file
        fail(f"--config {spec}: {_one_line(e)}")
      args[at] = ("--config=" if at == i else "") + configs.resolve_spec(spec)
    try:
      return flags_(args)
    except SystemExit as e:  # absl's --help (--helpshort, --helpfull, -h) exits 1 after printing the usage
      if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in args[1:]):
        sys.exit(0)
      raise
    except Exception as e:  # absl and ml_collections raise several types for a bad flag, file or override
      fail(_one_line(e))

  def _main(_):
    from cat_jax import storage
    from cat_jax.distributed import maybe_initialize_distributed

    if flags_.config is None or flags_.workdir is None:
      fail("--config and --workdir are required")
    if storage.is_local(flags_.workdir) and storage.as_path(flags_.workdir).exists() and \
        not storage.as_path(flags_.workdir).is_dir():
      fail(f"--workdir {flags_.workdir} is a file; give a directory (new, or a run's to resume it)")
    if check_config is not None:
      try:
        check_config(flags_.config)
      except ValueError as e:
        fail(str(e))
    maybe_initialize_distributed()
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax and grain log every file they touch at INFO
    for log in (logger, logging.getLogger("cat_jax.loop")):
      log.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    train_and_evaluate(flags_.config, flags_.workdir)
    return 0

  app.run(_main, argv=argv, flags_parser=parse)
  return 0
