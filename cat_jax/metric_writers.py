"""Training observability: JSONL + TensorBoard metric writer, image grids, progress bar, step timer.

TensorBoard event files are written without TensorFlow: each event is a hand-encoded `Event` protobuf
(only the handful of fields we need) framed as a TFRecord with masked CRC32C checksums. Multi-host runs
create every object with ``enabled=jax.process_index() == 0`` so that metrics are written once.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from PIL import Image

# ---------------------------------------------------------------- CRC32C (Castagnoli), table driven.


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (pure Python, ~15 MB/s: fine at logging intervals)."""
  crc, table = 0xFFFFFFFF, _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """Frames `data` as one TFRecord: length, crc(length), data, crc(data)."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---------------------------------------------------------------- Minimal protobuf encoding.


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # Negative int64 values are encoded as their 64-bit two's complement.
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _int_field(number: int, value: int) -> bytes:
  return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, summary_values: Sequence[bytes] = (), file_version: str | None = None) -> bytes:
  """An `Event` proto: wall_time=1 (double), step=2, file_version=3, summary=5 (`Summary.value`=1)."""
  event = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _int_field(2, step)
  if file_version is not None:
    event += _bytes_field(3, file_version.encode())
  if summary_values:
    event += _bytes_field(5, b"".join(_bytes_field(1, value) for value in summary_values))
  return event


def _scalar_value(tag: str, value: float) -> bytes:
  """`Summary.Value` with tag=1 and simple_value=2 (float32)."""
  return _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def _image_value(tag: str, image: np.ndarray) -> bytes:
  """`Summary.Value` with tag=1 and image=4 (`Image`: height=1, width=2, colorspace=3, PNG bytes=4)."""
  height, width, channels = image.shape
  png = io.BytesIO()
  Image.fromarray(image[..., 0] if channels == 1 else image).save(png, format="PNG")
  proto = (_int_field(1, height) + _int_field(2, width) + _int_field(3, channels)
           + _bytes_field(4, png.getvalue()))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, proto)


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


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and scalars and images to ``workdir/tensorboard/``.

  Each `write_*` call flushes both files, so a run that dies keeps everything logged before. With
  ``enabled=False`` (non-zero processes) every method does nothing and no file is created.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    tb_dir = os.path.join(workdir, "tensorboard")
    os.makedirs(tb_dir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # Append: resumed runs continue the log.
    # A new event file per run (TensorBoard reads all files in the directory), named as TensorFlow does.
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
    self.event_path = os.path.join(tb_dir, name)
    self._events = open(self.event_path, "wb")
    self._events.write(tfrecord(_event(0, file_version="brain.Event:2")))
    self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs ``{name: number}`` (Python, NumPy or JAX scalars) at `step`."""
    if not self.enabled:
      return
    step = int(step)
    record = {"step": step, "time": time.time()}
    record.update({key: _json_number(value) for key, value in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    values = [_scalar_value(key, float(np.asarray(value))) for key, value in scalars.items()]
    self._events.write(tfrecord(_event(step, summary_values=values)))
    self.flush()

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs ``{tag: image}``: HWC, or NHWC shown as one row; uint8, or float in [-1, 1]."""
    if not self.enabled:
      return
    values = [_image_value(tag, _as_hwc(image)) for tag, image in images.items()]
    self._events.write(tfrecord(_event(int(step), summary_values=values)))
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._events.flush()

  def close(self) -> None:
    if self.enabled and not self._events.closed:
      self._jsonl.close()
      self._events.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


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
