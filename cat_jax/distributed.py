"""Multi-process start-up: ``jax.distributed.initialize()`` detects the cluster; this module fills its gaps.

Call ``maybe_initialize_distributed()`` once, before anything touches a JAX device. ``initialize()`` with no
arguments already reads SLURM (inside ``srun``), Cloud TPU pods and Multislice, Open MPI (``mpirun``) and
Kubernetes (with ``jax[k8s]``), plus ``JAX_COORDINATOR_ADDRESS``, ``JAX_COORDINATOR_PORT`` and
``JAX_LOCAL_DEVICE_IDS``. What it does not do, and we do here:

* **Whether to call it.** On a laptop or a single-node job ``initialize()`` fails ("coordinator_address should be
  defined"), so we call it only when the environment describes more than one process: ``JAX_NUM_PROCESSES`` > 1,
  a SLURM step of several tasks, a TPU pod worker, an Open MPI job of several ranks, or ``CAT_DISTRIBUTED=auto``
  (any other launcher JAX detects, e.g. Kubernetes). ``CAT_DISTRIBUTED=off`` never calls it.
* **JAX_NUM_PROCESSES / JAX_PROCESS_ID.** JAX reads the coordinator address from the environment but not the
  process count and id; with these two any launcher can start a job (torchrun-style scripts, ssh loops, tests).
* **SLURM GPUs.** JAX gives every SLURM task ``local_device_ids=[SLURM_LOCALID]``: one GPU. That starves a task
  that owns several (one task per node with 8 GPUs uses 1) and breaks a task SLURM bound to its GPU (it sees
  only its own, renumbered 0, so ``[SLURM_LOCALID]`` does not exist). We pass the task's GPUs, computed from
  ``SLURM_GPUS_PER_TASK``, ``CUDA_VISIBLE_DEVICES`` and the tasks on the node.
* **SLURM step size.** JAX takes the process count from the job's ``SLURM_NTASKS``; a step that runs fewer tasks
  (``srun -n 2`` in a larger allocation) would wait forever. We pass ``SLURM_STEP_NUM_TASKS``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax

_OFF = ("0", "off", "none", "false", "no")
_AUTO = ("auto", "tpu")
# What JAX's SLURM detection needs (jax._src.clusters.slurm_cluster): without them it does not recognise SLURM.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int_env(env: Mapping[str, str], name: str) -> int:
  value = env[name]
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _present(env: Mapping[str, str], name: str) -> bool:
  return bool(env.get(name, "").strip())


def expand_tasks_per_node(spec: str) -> list[int]:
  """Expands SLURM's ``SLURM_STEP_TASKS_PER_NODE`` form ``8(x2),4`` into ``[8, 8, 4]``."""
  counts = []
  for piece in spec.split(","):
    match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", piece)
    if not match:
      raise ValueError(f"bad tasks-per-node spec {spec!r}")
    counts.extend([int(match.group(1))] * int(match.group(2) or 1))
  return counts


def _visible_gpu_count(env: Mapping[str, str]) -> int | None:
  """GPUs listed in CUDA_VISIBLE_DEVICES (indices or UUIDs); None when the variable is unset."""
  value = env.get("CUDA_VISIBLE_DEVICES")
  if value is None:
    return None
  value = value.strip()
  if value in ("", "NoDevFiles", "-1"):
    return 0
  return len([d for d in value.split(",") if d.strip()])


def _gpus_per_task(env: Mapping[str, str]) -> int | None:
  """Parses SLURM_GPUS_PER_TASK: ``1``, ``h100:1`` or ``a100:1,v100:1`` (summed)."""
  value = env.get("SLURM_GPUS_PER_TASK", "").strip()
  if not value:
    return None
  total = 0
  for piece in value.split(","):
    count = piece.rsplit(":", 1)[-1].strip()
    if not count.isdigit():
      raise ValueError(f"cannot read a GPU count from SLURM_GPUS_PER_TASK={value!r}")
    total += int(count)
  return total


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
  """Tasks of this step that share this process's node, or None when SLURM does not say."""
  name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if _present(env, n)), None)
  if name is not None:
    counts = expand_tasks_per_node(env[name])
    node = _int_env(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if node < len(counts):
      return counts[node]
  if _present(env, "SLURM_NTASKS_PER_NODE"):
    return _int_env(env, "SLURM_NTASKS_PER_NODE")
  return None


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """The CUDA device indices (after CUDA_VISIBLE_DEVICES renumbering) owned by this SLURM task.

  None means "no GPU information: leave JAX's default". Cases:
    * SLURM bound the task to its GPUs (CUDA_VISIBLE_DEVICES lists exactly its share): all visible ones;
    * every task on the node sees every GPU: a contiguous block chosen by SLURM_LOCALID, of
      SLURM_GPUS_PER_TASK devices, or of visible / tasks-on-node when gpus-per-task was not requested;
    * one task per node: every visible GPU.
  """
  visible = _visible_gpu_count(env)
  if visible == 0:
    return None  # No GPU here (a CPU job).
  per_task = _gpus_per_task(env)
  if per_task is None and visible:
    tasks_here = _tasks_on_this_node(env) or 1
    if visible % tasks_here:
      raise ValueError(
          f"{visible} visible GPUs cannot be split evenly among {tasks_here} tasks on this node; "
          "request --gpus-per-task so SLURM assigns them")
    per_task = visible // tasks_here
  if per_task is None:
    return None
  if visible is not None and visible <= per_task:
    return list(range(visible))
  local_id = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
  ids = list(range(local_id * per_task, (local_id + 1) * per_task))
  if visible is not None and ids[-1] >= visible:
    raise ValueError(
        f"SLURM_LOCALID={local_id} with {per_task} GPU(s) per task needs device {ids[-1]}, but only "
        f"{visible} are visible (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')!r})")
  return ids


def _check_rank(process_id: int, num_processes: int, id_name: str, count_name: str) -> None:
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"{id_name}={process_id} is not a rank of {count_name}={num_processes}")


def _explicit_kwargs(env: Mapping[str, str]) -> dict[str, Any] | None:
  missing = [n for n in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not _present(env, n)]
  if missing:
    raise ValueError(
        f"explicit distributed settings are incomplete: {', '.join(missing)} not set (set "
        "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID together)")
  num_processes, process_id = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
  _check_rank(process_id, num_processes, "JAX_PROCESS_ID", "JAX_NUM_PROCESSES")
  if num_processes == 1:
    return None
  if not _present(env, "JAX_COORDINATOR_ADDRESS"):
    raise ValueError(f"JAX_NUM_PROCESSES={num_processes} needs JAX_COORDINATOR_ADDRESS=host:port")
  # Explicit settings are final: JAX's detection would mix in a cluster around us (a SLURM allocation's
  # SLURM_LOCALID as the device list). JAX still reads JAX_LOCAL_DEVICE_IDS itself.
  return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"].strip(), "num_processes": num_processes,
          "process_id": process_id, "cluster_detection_method": "deactivate"}


def _slurm_kwargs(env: Mapping[str, str]) -> dict[str, Any] | None:
  count_name = "SLURM_STEP_NUM_TASKS" if _present(env, "SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
  num_processes = _int_env(env, count_name)
  _check_rank(_int_env(env, "SLURM_PROCID"), num_processes, "SLURM_PROCID", count_name)
  if num_processes == 1:
    return None
  kwargs: dict[str, Any] = {"num_processes": num_processes}
  local_ids = slurm_local_device_ids(env)
  if local_ids is not None:
    kwargs["local_device_ids"] = local_ids
  return kwargs  # coordinator (first host of the step, port from the job id) and process id: JAX's own


def _multi_process_cluster(env: Mapping[str, str]) -> bool:
  """A TPU pod worker or an Open MPI job of several ranks: JAX detects everything itself."""
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    if len([h for h in env.get(name, "").split(",") if h.strip()]) > 1:
      return True
  if _present(env, "MEGASCALE_COORDINATOR_ADDRESS") or _present(env, "CLOUD_TPU_TASK_ID"):
    return True
  size = env.get("OMPI_COMM_WORLD_SIZE", "").strip()
  return size.isdigit() and int(size) > 1


def distributed_init_kwargs(env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
  """Arguments for ``jax.distributed.initialize``, read from ``env``; None for a single process.

  ``{}`` lets JAX detect everything; a SLURM step gets ``num_processes`` and, on GPUs, ``local_device_ids``
  (JAX detects the rest); explicit ``JAX_*`` settings give ``coordinator_address``, ``num_processes``,
  ``process_id`` and ``cluster_detection_method="deactivate"``. Raises ValueError on inconsistent settings rather than letting every process hang at the
  coordinator.
  """
  mode = env.get("CAT_DISTRIBUTED", "").strip().lower()
  if mode in _OFF:
    return None
  if mode in _AUTO:
    return {}
  if mode:
    raise ValueError(f"CAT_DISTRIBUTED must be one of {_OFF + _AUTO} or unset, got {mode!r}")
  if any(_present(env, n) for n in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
    return _explicit_kwargs(env)
  if _multi_process_cluster(env):
    return {}
  if all(_present(env, n) for n in _SLURM_VARS):
    return _slurm_kwargs(env)
  if _present(env, "SLURM_NTASKS") and env["SLURM_NTASKS"].strip() != "1":
    logging.warning("SLURM_NTASKS=%s but no srun step (SLURM_STEP_NODELIST unset): running as one process; "
                    "start the trainer with srun to use every task.", env["SLURM_NTASKS"])
  return None


def maybe_initialize_distributed(env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
  """Calls ``jax.distributed.initialize`` when ``env`` describes a multi-process job.

  Returns the keyword arguments it used (``{}``: JAX detected everything), or None when it did nothing.
  Must run before the first use of a JAX device; a second call is a no-op.
  """
  kwargs = distributed_init_kwargs(env)
  if kwargs is None:
    return None
  if jax.distributed.is_initialized():
    return kwargs
  logging.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
  jax.distributed.initialize(**kwargs)
  return kwargs
