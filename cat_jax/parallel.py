"""The one place that decides meshes and shardings.

Mesh axes: ('data', 'fsdp'). Batches are split over both axes on their leading (batch) dimension. Parameters and
optimiser state follow ``param_shardings``: a leaf of at least ``fsdp_min_size`` elements is sharded over 'fsdp' on
its largest dimension divisible by the 'fsdp' size; everything else is replicated.
"""

from __future__ import annotations

import pickle
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh; one size may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axis_sizes) - set(AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh has axes {AXES}")
  sizes = [int(axis_sizes.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or len(devices) % known:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def local_rows(x: Any) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (all of them when one process holds the array)."""
  if getattr(x, "is_fully_addressable", True):  # numpy, or a jax.Array this process holds whole
    return np.asarray(x)
  blocks = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}  # replicas hold the same rows
  return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def allgather_objects(obj: Any) -> list[Any]:
  """``obj`` of every JAX process, in process order (pickled, sent as bytes); ``[obj]`` in one process. Every
  process must call it."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(every[k, :int(n)].tobytes()) for k, n in enumerate(sizes)]


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def spec_for(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """PartitionSpec of one leaf: FSDP on the largest divisible dim above ``min_size``, else replicated."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree: Any, mesh: jax.sharding.Mesh, *, min_size: int = 2**18) -> Any:
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, optimiser state, EMA)."""
  fsdp_size = mesh.shape["fsdp"]

  def one(leaf):
    return NamedSharding(mesh, spec_for(tuple(getattr(leaf, "shape", ())), fsdp_size, min_size))

  return jax.tree.map(one, tree)
