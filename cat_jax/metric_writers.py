"""Training observability: JSONL + TensorBoard metric writer, image grids, progress bar, step timer.

TensorBoard event files are written by tensorboardX's ``SummaryWriter`` (no TensorFlow). The workdir may be any
``etils.epath`` location: on an object store (``gs://``) ``metrics.jsonl`` is written in parts
(``cat_jax.storage.AppendFile``) and event files are written locally and uploaded once each, at most every
``object_store_flush_secs``, so nothing is ever rewritten in place. Multi-host runs create every object with
``enabled=jax.process_index() == 0`` so that metrics are written once.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm

from cat_jax import storage

_EVENT_FILES = itertools.count()  # Unique event-file names for writers opened within the same second.
_EVENTS_FLUSH_SECS = 10

# ---------------------------------------------------------------- Images.


def to_uint8(images: Any) -> np.ndarray:
  """uint8 images unchanged; float images in [-1, 1] mapped to [0, 255] (clipped, NaN to black)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  images = np.nan_to_num(images.astype(np.float32), nan=-1.0)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_image_grid(rows: Sequence[Any], *, separator: int = 2, separator_value: int = 255) -> np.ndarray:
  """Tiles image sets into one uint8 HWC image: row r, column i is ``rows[r][i]``.

  Args:
    rows: image sets of one shape, NHWC, float in [-1, 1] or uint8; e.g. ``[original, recon_8x,
      recon_16x, recon_32x]`` for a comparison grid.
    separator: pixels between neighbouring cells.
    separator_value: grey level of the separator lines.
  """
  rows = [to_uint8(row) for row in rows]
  if not rows or any(row.ndim != 4 or row.shape != rows[0].shape for row in rows):
    raise ValueError(f"make_image_grid needs NHWC image sets of one shape, got {[r.shape for r in rows]}")
  n, h, w, c = rows[0].shape
  grid = np.full((len(rows) * (h + separator) - separator, n * (w + separator) - separator, c),
                 separator_value, np.uint8)
  for r, row in enumerate(rows):
    for i, image in enumerate(row):
      grid[r * (h + separator):r * (h + separator) + h, i * (w + separator):i * (w + separator) + w] = image
  return grid


def _as_hwc(image: Any) -> np.ndarray:
  image = to_uint8(image)
  if image.ndim == 4:  # A batch becomes one row of images.
    image = make_image_grid([image])
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an HWC/NHWC image with 1, 3 or 4 channels, got shape {image.shape}")
  return image


# ---------------------------------------------------------------- Writers.


def _json_number(value: Any) -> int | float | str:
  value = np.asarray(value).item()  # Python scalar from a JAX/NumPy array or scalar.
  if isinstance(value, (bool, int)):
    return int(value)
  value = float(value)
  return value if math.isfinite(value) else str(value)  # "nan", "inf", "-inf": keeps the file valid JSON.


class _EventFiles:
  """A tensorboardX ``SummaryWriter`` over ``logdir``; on an object store, over a local staging folder whose
  finished event files are uploaded (one object each) at ``flush(force=True)`` or every ``part_secs``."""

  def __init__(self, logdir: str, *, part_secs: float):
    self.local = storage.is_local(logdir)
    self.logdir = logdir
    self._dir = logdir if self.local else tempfile.mkdtemp(prefix="cat_jax_events_")
    self._part_secs = part_secs
    self._opened = time.monotonic()
    self._writer = None

  @property
  def writer(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter

      # The writer's thread flushes every flush_secs; close() drains everything.
      self._writer = SummaryWriter(self._dir, flush_secs=_EVENTS_FLUSH_SECS,
                                   filename_suffix=f".{os.getpid()}.{next(_EVENT_FILES):06d}")
      self._opened = time.monotonic()
    return self._writer

  def flush(self, *, force: bool = False) -> None:
    if self._writer is None:
      return
    if self.local:
      self._writer.flush()
      return
    if not force and time.monotonic() - self._opened < self._part_secs:
      return
    self._writer.close()
    self._writer = None
    for name in sorted(os.listdir(self._dir)):
      local = os.path.join(self._dir, name)
      with open(local, "rb") as f:
        storage.write_bytes(storage.as_path(self.logdir) / name, f.read())
      os.remove(local)

  def close(self) -> None:
    self.flush(force=True)
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if not self.local:
      shutil.rmtree(self._dir, ignore_errors=True)


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and scalars and images to ``workdir/tensorboard/``.

  On a local workdir each ``write_*`` call flushes the JSONL log, and the event file is flushed by tensorboardX
  every few seconds, so a run that dies keeps (nearly) everything logged before; on an object store
  (``gs://...``) data reaches the store at most every ``object_store_flush_secs`` and at ``close``. With ``enabled=False`` (non-zero processes) every method does nothing and no file is created.
  Read ``metrics.jsonl`` back with ``read_metrics(workdir)`` (it also reads the parts an object store holds).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, object_store_flush_secs: float = 60.0):
    self.enabled = enabled
    if not enabled:
      return
    workdir = os.fspath(workdir)
    self.jsonl_path = storage.as_path(workdir) / "metrics.jsonl"
    # Appends: resumed runs continue the log.
    self._jsonl = storage.AppendFile(self.jsonl_path, min_part_seconds=object_store_flush_secs)
    # A new event file per run (TensorBoard reads all files in the directory).
    self._events = _EventFiles(os.path.join(workdir, "tensorboard") if storage.is_local(workdir)
                               else os.fspath(storage.as_path(workdir) / "tensorboard"),
                               part_secs=object_store_flush_secs)
    self._events.writer  # noqa: B018 (creates the event file now, as TensorFlow's writers do)
    self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs ``{name: number}`` (Python, NumPy or JAX scalars) at `step`."""
    if not self.enabled:
      return
    step = int(step)
    record = {"step": step, "time": time.time()}
    record.update({key: _json_number(value) for key, value in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    walltime = time.time()
    for key, value in scalars.items():
      self._events.writer.add_scalar(key, float(np.asarray(value)), step, walltime=walltime)
    self.flush()

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs ``{tag: image}``: HWC, or NHWC shown as one row; uint8, or float in [-1, 1]."""
    if not self.enabled:
      return
    walltime = time.time()
    for tag, image in images.items():
      self._events.writer.add_image(tag, _as_hwc(image), int(step), walltime=walltime, dataformats="HWC")
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._events.flush()

  def close(self) -> None:
    if self.enabled and not self._jsonl.closed:
      self._jsonl.close()
      self._events.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` in writing order (every run, every object-store part)."""
  return [json.loads(line) for line in storage.read_lines(storage.as_path(workdir) / "metrics.jsonl") if line]


# ---------------------------------------------------------------- Progress and throughput.


class ProgressBar:
  """A tqdm bar over training steps (on stderr) with step rate, ETA and a postfix of latest metrics.

  Redrawn at most once a second on a terminal and once a minute otherwise, so batch logs stay readable.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True,
               mininterval: float | None = None):
    if mininterval is None:
      mininterval = 1.0 if sys.stderr.isatty() else 60.0
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                          mininterval=mininterval, disable=not enabled, file=sys.stderr)

  def update(self, step: int, **postfix: Any) -> None:
    """Moves the bar to `step` and shows `postfix` (numbers formatted with 4 significant digits)."""
    if self._bar.disable:
      return
    if postfix:
      self._bar.set_postfix({k: f"{float(np.asarray(v)):.4g}" for k, v in postfix.items()}, refresh=False)
    self._bar.update(int(step) - self._bar.n)

  def close(self) -> None:
    self._bar.close()


class StepTimer:
  """Steps/s and images/s between consecutive `rates` calls.

  Call `rates` right after something that waits for the device (fetching the logged metrics), otherwise
  JAX's asynchronous dispatch makes the time meaningless. Call `reset` after an evaluation or a checkpoint
  save so their time is not counted as training.
  """

  def __init__(self, step: int, *, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self.reset(step)

  def reset(self, step: int) -> None:
    self._step, self._time = int(step), self._clock()

  def rates(self, step: int, *, batch_size: int) -> dict[str, float]:
    """Returns ``{"steps_per_sec", "images_per_sec"}`` since the last call; `batch_size` is global."""
    now = self._clock()
    steps, seconds = int(step) - self._step, max(now - self._time, 1e-9)
    self._step, self._time = int(step), now
    return {"steps_per_sec": steps / seconds, "images_per_sec": steps * batch_size / seconds}
