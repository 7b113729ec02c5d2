"""Multi-process setup: turns cluster environment variables into `jax.distributed` arguments.

Call `maybe_initialize_distributed()` once, before anything touches a JAX device. It decides, from the
environment only, between three cases:

* single process (a laptop, one GPU node started without srun, a single-host TPU VM): nothing to do;
* a TPU pod slice or Multislice job: `jax.distributed.initialize()` with no arguments, because JAX reads the
  worker list from the TPU metadata server better than we could;
* SLURM or explicit ``JAX_*`` variables: `jax.distributed.initialize(...)` with the coordinator, process
  count, process id and the GPUs this process owns, all computed here and unit tested.

Variables read (first match wins):

``CAT_DISTRIBUTED``
  ``off`` (or ``0``/``none``) never initialises; ``auto`` (or ``tpu``) always calls ``initialize()`` with no
  arguments (`launch/tpu_vm.sh` sets ``auto`` on pods, where the worker list lives in metadata, not in env).
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` [, ``JAX_LOCAL_DEVICE_IDS``]
  explicit settings, for any launcher (torchrun-style scripts, Kubernetes, a hand-written loop over ssh).
``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` (more than one host), ``MEGASCALE_COORDINATOR_ADDRESS``,
``CLOUD_TPU_TASK_ID``
  a TPU pod or Multislice worker: autodetect.
``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``), ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``),
``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_GPUS_PER_TASK``, ``SLURM_STEP_TASKS_PER_NODE``,
``SLURM_NODEID``, ``CUDA_VISIBLE_DEVICES``, ``CAT_COORDINATOR_PORT``
  a SLURM step started by ``srun``: coordinator on the first node of the step.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax

DEFAULT_COORDINATOR_PORT = 12345
# Same window as JAX's own SLURM detection: above Linux's default ephemeral range (32768-60999), so the
# port is free, and spread over 4096 values by job id so two jobs sharing a first node do not collide.
_PORT_WINDOW_START = 61440
_PORT_WINDOW_SIZE = 4096

_OFF = ("0", "off", "none", "false", "no")
_AUTO = ("auto", "tpu")

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
  """Expands a SLURM hostlist such as ``gpu-[01-03,07],login1`` into host names, in order.

  Supports comma-separated items, bracketed ranges and lists with zero padding kept from the range start
  (``n[08-10]`` -> n08 n09 n10), and several bracket groups in one item (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1
  r2n2), which is what ``scontrol show hostnames`` prints for the same input.
  """
  hosts = []
  for item in _split_top_level(hostlist.strip()):
    # Alternating literal text and bracket contents: "gpu-", "01-03,07", "" for "gpu-[01-03,07]".
    parts = re.split(r"\[([^\[\]]*)\]", item)
    if "[" in "".join(parts[::2]) or "]" in "".join(parts[::2]):
      raise ValueError(f"unbalanced brackets in hostlist item {item!r} of {hostlist!r}")
    choices = []
    for i, part in enumerate(parts):
      choices.append([part] if i % 2 == 0 else _expand_ranges(part, hostlist))
    hosts.extend("".join(combo) for combo in itertools.product(*choices))
  if not hosts:
    raise ValueError(f"empty hostlist {hostlist!r}")
  return hosts


def _split_top_level(hostlist: str) -> list[str]:
  """Splits on commas that are outside brackets, dropping empty items."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(hostlist):
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
      if depth < 0:
        raise ValueError(f"unbalanced ']' in hostlist {hostlist!r}")
    elif ch == "," and depth == 0:
      items.append(hostlist[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"unbalanced '[' in hostlist {hostlist!r}")
  items.append(hostlist[start:])
  return [item.strip() for item in items if item.strip()]


def _expand_ranges(spec: str, hostlist: str) -> list[str]:
  """``01-03,07`` -> ['01', '02', '03', '07'], keeping the start's zero padding."""
  out = []
  for piece in spec.split(","):
    match = _RANGE.match(piece.strip())
    if not match:
      raise ValueError(f"bad range {piece!r} in hostlist {hostlist!r}")
    first, last = match.group(1), match.group(2) or match.group(1)
    if int(last) < int(first):
      raise ValueError(f"descending range {piece!r} in hostlist {hostlist!r}")
    width = len(first)
    out.extend(str(n).zfill(width) for n in range(int(first), int(last) + 1))
  return out


def expand_tasks_per_node(spec: str) -> list[int]:
  """Expands SLURM's ``SLURM_STEP_TASKS_PER_NODE`` form ``8(x2),4`` into ``[8, 8, 4]``."""
  counts = []
  for piece in spec.split(","):
    match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", piece)
    if not match:
      raise ValueError(f"bad tasks-per-node spec {spec!r}")
    counts.extend([int(match.group(1))] * int(match.group(2) or 1))
  return counts


def _int_env(env: Mapping[str, str], name: str) -> int:
  value = env[name]
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _first_present(env: Mapping[str, str], *names: str) -> str | None:
  return next((name for name in names if env.get(name, "").strip()), None)


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
  spec_name = _first_present(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
  if spec_name is not None:
    counts = expand_tasks_per_node(env[spec_name])
    node = _int_env(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if node < len(counts):
      return counts[node]
  if env.get("SLURM_NTASKS_PER_NODE", "").strip():
    return _int_env(env, "SLURM_NTASKS_PER_NODE")
  return None


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  """The CUDA device indices (after CUDA_VISIBLE_DEVICES renumbering) owned by this SLURM task.

  None means "every device this process sees". Cases:
    * SLURM bound the task to its GPUs (CUDA_VISIBLE_DEVICES lists exactly its share): all visible ones;
    * every task on the node sees every GPU: a contiguous block chosen by SLURM_LOCALID, of
      SLURM_GPUS_PER_TASK devices, or of visible / tasks-on-node when gpus-per-task was not requested;
    * one task per node (or no GPU information): None.
  """
  visible = _visible_gpu_count(env)
  if visible == 0:
    return None  # No GPU here (a CPU job): JAX's default device set is the right one.
  per_task = _gpus_per_task(env)
  if per_task is None and visible:
    tasks_here = _tasks_on_this_node(env)
    if tasks_here and tasks_here > 1:
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


def coordinator_port(env: Mapping[str, str]) -> int:
  """CAT_COORDINATOR_PORT, else a port derived from SLURM_JOB_ID, else DEFAULT_COORDINATOR_PORT."""
  if env.get("CAT_COORDINATOR_PORT", "").strip():
    port = _int_env(env, "CAT_COORDINATOR_PORT")
  elif env.get("SLURM_JOB_ID", "").strip().isdigit():
    port = _PORT_WINDOW_START + int(env["SLURM_JOB_ID"]) % _PORT_WINDOW_SIZE
  else:
    port = DEFAULT_COORDINATOR_PORT
  if not 0 < port < 65536:
    raise ValueError(f"coordinator port must be in 1..65535, got {port}")
  return port


def _explicit_kwargs(env: Mapping[str, str]) -> dict[str, Any] | None:
  missing = [n for n in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(n, "").strip()]
  if missing:
    raise ValueError(
        f"explicit distributed settings are incomplete: {', '.join(missing)} not set (set "
        "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID together)")
  num_processes = _int_env(env, "JAX_NUM_PROCESSES")
  process_id = _int_env(env, "JAX_PROCESS_ID")
  _check_rank(process_id, num_processes, "JAX_PROCESS_ID", "JAX_NUM_PROCESSES")
  if num_processes == 1:
    return None
  address = env.get("JAX_COORDINATOR_ADDRESS", "").strip()
  if not address:
    raise ValueError(f"JAX_NUM_PROCESSES={num_processes} needs JAX_COORDINATOR_ADDRESS=host:port")
  local_ids = env.get("JAX_LOCAL_DEVICE_IDS", "").strip()
  return _kwargs(address, num_processes, process_id,
                 [int(i) for i in local_ids.split(",")] if local_ids else None)


def _slurm_kwargs(env: Mapping[str, str]) -> dict[str, Any] | None:
  count_name = _first_present(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
  num_processes = _int_env(env, count_name)
  process_id = _int_env(env, "SLURM_PROCID")
  _check_rank(process_id, num_processes, "SLURM_PROCID", count_name)
  if num_processes == 1:
    return None
  nodes_name = _first_present(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
  if nodes_name is None:
    raise ValueError(f"{count_name}={num_processes} but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set")
  # SLURM places task 0 on the first node of the step, and process 0 hosts the coordinator.
  host = expand_hostlist(env[nodes_name])[0]
  return _kwargs(f"{host}:{coordinator_port(env)}", num_processes, process_id, slurm_local_device_ids(env))


def _check_rank(process_id: int, num_processes: int, id_name: str, count_name: str) -> None:
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"{id_name}={process_id} is not a rank of {count_name}={num_processes}")


def _kwargs(address: str, num_processes: int, process_id: int,
            local_device_ids: list[int] | None) -> dict[str, Any]:
  return {
      "coordinator_address": address,
      "num_processes": num_processes,
      "process_id": process_id,
      "local_device_ids": local_device_ids,
      # Our values are final: without this, JAX's own SLURM detection replaces local_device_ids=None
      # ("all visible GPUs") by [SLURM_LOCALID], which starves one-process-per-node jobs down to one GPU.
      "cluster_detection_method": "deactivate",
  }


def _is_tpu_pod_worker(env: Mapping[str, str]) -> bool:
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    hosts = [h for h in env.get(name, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return True
  return bool(_first_present(env, "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID"))


def distributed_init_kwargs(env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
  """Arguments for `jax.distributed.initialize`, read from ``env``.

  Returns None for a single process, ``{}`` where JAX must autodetect (TPU pods), and otherwise a dict
  with ``coordinator_address``, ``num_processes``, ``process_id``, ``local_device_ids`` (None: all
  visible devices) and ``cluster_detection_method="deactivate"``. Raises ValueError on inconsistent
  settings rather than letting every process hang at the coordinator.
  """
  mode = env.get("CAT_DISTRIBUTED", "").strip().lower()
  if not mode:
    return _detect(env)
  if mode in _OFF:
    return None
  if mode in _AUTO:
    return {}
  raise ValueError(f"CAT_DISTRIBUTED must be one of {_OFF + _AUTO} or unset, got {mode!r}")


def _detect(env: Mapping[str, str]) -> dict[str, Any] | None:
  if _first_present(env, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    return _explicit_kwargs(env)
  if _is_tpu_pod_worker(env):
    return {}
  if _first_present(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") and "SLURM_PROCID" in env:
    return _slurm_kwargs(env)
  return None


def maybe_initialize_distributed(env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
  """Calls `jax.distributed.initialize` when ``env`` describes a multi-process job.

  Returns the keyword arguments it used (``{}`` for TPU autodetection), or None when it did nothing.
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
