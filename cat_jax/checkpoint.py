"""Checkpoint I/O: an orbax CheckpointManager over ``<workdir>/checkpoints`` plus the run's config.

Every checkpoint step holds three items:
  ``train_state``  the full TrainState except EMA (params, both optimiser states, discriminator, step),
  ``ema_params``   the EMA generator parameters (what inference loads; kept apart so a tokenizer restores only it),
  ``data_iter``    the grain iterator state of every process (exact data-order resume). The training pipeline's
                   position is global (``cat_jax.data.pipeline``), so a run saved by N processes restores onto M:
                   each process reads its own file, or any process's when the process count changed.
``<workdir>/config.json`` records the config the run was started with, so a tokenizer can rebuild the model and a
resumed run can refuse an incompatible config. Saves are asynchronous; ``wait()`` surfaces a failed save as an
exception instead of losing it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from cat_jax import storage

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Config keys whose change makes a checkpoint unusable (parameter or optimiser-state shapes change), except the
# compute dtype inside them (parameters stay in their param_dtype).
STRUCTURAL_KEYS = ("model", "disc")
COMPUTE_ONLY = ("dtype",)


def checkpoint_dir(workdir: str) -> epath.Path:
  return storage.as_path(workdir) / "checkpoints"


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` once (process 0); a resumed run keeps the original."""
  path = storage.as_path(workdir) / CONFIG_FILE
  if jax.process_index() == 0 and not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir_or_checkpoint: str) -> ml_collections.ConfigDict:
  """The config a run was started with; accepts a workdir or a step directory inside it."""
  path = storage.as_path(workdir_or_checkpoint)
  for candidate in (path, path.parent, path.parent.parent):
    if (candidate / CONFIG_FILE).exists():
      return ml_collections.ConfigDict(json.loads((candidate / CONFIG_FILE).read_text()))
  raise FileNotFoundError(f"no {CONFIG_FILE} found at {path} or its parents: is this a cat_jax workdir "
                          "(python -m cat_jax.train --workdir ...)?")


def check_compatible(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the keys where ``current`` cannot resume ``saved``'s checkpoints."""
  diffs = []
  for key in STRUCTURAL_KEYS:
    a = json.loads(json.dumps(saved.get(key, {}).to_dict() if saved.get(key) else {}, default=str))
    b = json.loads(json.dumps(current.get(key, {}).to_dict() if current.get(key) else {}, default=str))
    for k in sorted(set(a) | set(b)):
      if k not in COMPUTE_ONLY and a.get(k) != b.get(k):
        diffs.append(f"{key}.{k}: checkpoint has {a.get(k)!r}, config has {b.get(k)!r}")
  if diffs:
    raise ValueError("the config is incompatible with the checkpoints in this workdir:\n  " + "\n  ".join(diffs) +
                     "\nUse a new --workdir, or set these back to the checkpoint's values.")


class ElasticDataIterHandler(grain.checkpoint.CheckpointHandler):
  """grain's orbax handler, restoring onto a different process count.

  It writes ``process_<i>-of-<n>.json`` per process as grain's does. On restore, a process whose own file is
  missing (the run was saved by another number of processes) takes the saved state, which must be the same in
  every file: true for ``make_train_iterator`` (its state is the global element count), refused otherwise.
  """

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
    item = item if item is not None else args.item
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
    states = {json.dumps(json.loads(f.read_text()), sort_keys=True) for f in saved}
    if len(states) != 1:
      raise ValueError(
          f"cannot restore the data position saved in {directory} onto {jax.process_count()} processes: "
          f"{'no state was saved' if not states else 'the saved processes are at different positions'} "
          f"(files: {[f.name for f in saved]}). Resume with the process count the run was saved with.")
    if saved[0] != own:
      logger.warning("Data position saved by %d processes, restored onto %d.", len(saved), jax.process_count())
    state = json.loads(states.pop())
    try:
      item.set_state(state)
    except KeyError as e:
      raise ValueError(f"the data position in {directory} ({state}) was not written by this data pipeline "
                       f"(missing {e}); resume with the cat_jax version that wrote it, or use a new workdir") from None
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(ElasticDataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ElasticDataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
  item: Any


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's pytree handler (the same files as StandardCheckpointHandler), without replica-parallel saving on CPU.

  Replica-parallel saving splits each replicated array between its data-parallel copies so that devices copy to the
  host in parallel; CPU devices already live in host memory, and there it only compiled one small slice program
  per array and shape (several seconds of a short CPU run's first save). Other backends keep orbax's default.
  """
  array_handler = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False if jax.default_backend() == "cpu" else None)
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, array_handler), (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()), (str, ocp.type_handlers.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=96, restore_concurrent_gb=96)


class Checkpointer:
  """Keeps the latest ``keep`` checkpoints plus the best one by eval metric (lower is better)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, best_metric: str = "eval/loss"):
    self.best_metric = best_metric
    preservation = policies.AnyPreservationPolicy(policies=[
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=preservation, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options,
        item_handlers={"train_state": _pytree_handler(), "ema_params": _pytree_handler(),
                       "data_iter": ElasticDataIterHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, train_state: Any, ema_params: Any, data_iter: Any, *,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    args = ocp.args.Composite(train_state=ocp.args.PyTreeSave(train_state),
                              ema_params=ocp.args.PyTreeSave(ema_params),
                              data_iter=DataIterSave(data_iter))
    metrics = {self.best_metric: metrics[self.best_metric]} if metrics and self.best_metric in metrics else None
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, step: int, abstract_train_state: Any, abstract_ema: Any, data_iter: Any):
    """Restores into the given abstract trees (their shardings decide placement, any device count)."""
    restore = lambda abstract: ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    out = self.manager.restore(step, args=ocp.args.Composite(
        train_state=restore(abstract_train_state), ema_params=restore(abstract_ema),
        data_iter=DataIterRestore(data_iter)))
    return out["train_state"], out["ema_params"], out["data_iter"]

  def wait(self) -> None:
    """Blocks until pending async saves finish; raises if one failed."""
    self.manager.wait_until_finished()
    self.manager.check_for_errors()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _manager(workdir: str) -> tuple[ocp.CheckpointManager, epath.Path]:
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    raise FileNotFoundError(f"no checkpoints under {directory}")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"train_state": ocp.StandardCheckpointHandler(),
                                              "ema_params": ocp.StandardCheckpointHandler()}), directory


def _resolve_step(manager: ocp.CheckpointManager, directory: epath.Path, step: int | None) -> int:
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no finished checkpoint under {directory}")
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint of step {step} under {directory} (steps: {list(manager.all_steps())})")
  return step


def restore_train_state_parts(workdir: str, abstract_parts: dict[str, Any], *, step: int | None = None
                              ) -> tuple[dict[str, Any], int]:
  """Named subtrees of the saved train state (e.g. ``{"params": ..., "d_params": ...}``), nothing else read (no
  optimiser state), placed as the abstract trees say. Returns ``(parts, step)``."""
  manager, directory = _manager(workdir)
  step = _resolve_step(manager, directory, step)
  manager.close()
  with ocp.PyTreeCheckpointer() as reader:
    parts = reader.restore(directory / str(step) / "train_state", args=ocp.args.PyTreeRestore(
        item=abstract_parts, restore_args={k: ocp.checkpoint_utils.construct_restore_args(v)
                                           for k, v in abstract_parts.items()}, partial_restore=True))
  return {k: parts[k] for k in abstract_parts}, step


def restore_inference_params(workdir: str, abstract_params: Any, *, step: int | None = None,
                             use_ema: bool = True) -> tuple[Any, int]:
  """Generator parameters (EMA by default) from a workdir, placed as ``abstract_params`` says.

  Returns ``(params, step)``. Raises FileNotFoundError when the workdir has no checkpoint.
  """
  if not use_ema:  # only the 'params' subtree of the train state, straight into the requested placement
    parts, step = restore_train_state_parts(workdir, {"params": abstract_params}, step=step)
    return parts["params"], step
  manager, directory = _manager(workdir)
  step = _resolve_step(manager, directory, step)
  params = manager.restore(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardRestore(abstract_params)))["ema_params"]
  manager.close()
  return params, step
