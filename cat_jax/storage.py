"""Run outputs on any ``etils.epath`` location: a local folder or an object store (``gs://``, ``s3://``, ...).

Whole files (PNG grids, ``results.json``, plots) are written once with ``write_bytes`` / ``write_text``.
Append-only logs (``metrics.jsonl``, ``index.jsonl``, TensorBoard events) go through ``AppendFile``: on a local
filesystem it appends to one file; an object store cannot append, and rewriting a whole object at every flush
costs O(size) per line, so there each ``flush`` writes the bytes added since the last one as a new object
``<name>.part-<n>`` next to ``<name>`` (n counts on across runs). ``read_appended`` reads a log back in order, whichever way it
was written.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath

PART_INFIX = ".part-"


FILE_SCHEME = "file://"


def as_path(path: str | os.PathLike) -> epath.Path:
  """A path on the local file system or an object store (``gs://``, ``s3://``); ``file:///x`` is the local ``/x``."""
  path = os.fspath(path)
  return epath.Path(path[len(FILE_SCHEME):] if path.startswith(FILE_SCHEME) else path)


def is_local(path: str | os.PathLike) -> bool:
  """True for a path on the local (appendable) file system, ``file://`` URIs included; False for an object store."""
  path = os.fspath(path)
  return path.startswith(FILE_SCHEME) or "://" not in path


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes one whole file (object), creating its parent folder."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def png_bytes(image: np.ndarray) -> bytes:
  """PNG encoding of a uint8 HW, HW1, HWC image."""
  from PIL import Image

  image = np.asarray(image)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  write_bytes(path, png_bytes(image))


class AppendFile:
  """An append-only log at ``path``: ``write`` buffers, ``flush`` makes the data durable (see module doc).

  On an object store a ``flush`` with nothing new writes nothing, and ``min_part_seconds`` > 0 lets ``flush``
  write a part only that often (``close`` always writes the rest), so frequent small logs do not become
  many tiny objects.
  """

  def __init__(self, path: str | os.PathLike, *, min_part_seconds: float = 0.0,
               clock=time.monotonic):
    self.path = as_path(path)
    self.local = is_local(path)
    self.min_part_seconds = float(min_part_seconds)
    self._clock = clock
    self._buffer = bytearray()
    self._parts = 0
    self._last_part = clock()
    self.closed = False
    if self.local:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, "ab")  # noqa: SIM115 (kept open: one file per run)
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      # Numbered after the parts earlier runs wrote, so names sort in writing order. One writer per log.
      self._parts = 1 + max(map(_part_number, appended_files(self.path)), default=-1)

  def write(self, data: bytes | str) -> None:
    if self.closed:
      raise ValueError(f"write to closed {self.path}")
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if self.local:
      self._file.write(data)
    else:
      self._buffer += data

  def flush(self, *, force: bool = False) -> None:
    if self.closed:
      return
    if self.local:
      self._file.flush()
      return
    if not self._buffer or (not force and self._clock() - self._last_part < self.min_part_seconds):
      return
    part = self.path.parent / f"{self.path.name}{PART_INFIX}{self._parts:08d}"
    part.write_bytes(bytes(self._buffer))
    self._parts += 1
    self._buffer.clear()
    self._last_part = self._clock()

  def close(self) -> None:
    if self.closed:
      return
    self.flush(force=True)
    if self.local:
      self._file.close()
    self.closed = True

  def __enter__(self) -> AppendFile:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def _part_number(path: epath.Path) -> int:
  suffix = path.name.rsplit(PART_INFIX, 1)[-1]
  return int(suffix) if suffix.isdigit() else -1


def appended_files(path: str | os.PathLike) -> list[epath.Path]:
  """``path`` (if it exists) then its parts, in writing order."""
  path = as_path(path)
  files = [path] if path.exists() else []
  if path.parent.exists():
    files += sorted(path.parent.glob(f"{path.name}{PART_INFIX}*"), key=_part_number)
  return files


def read_appended(path: str | os.PathLike) -> bytes:
  """Everything an ``AppendFile`` at ``path`` wrote, across runs and parts."""
  return b"".join(p.read_bytes() for p in appended_files(path))


def read_lines(path: str | os.PathLike) -> Iterator[str]:
  """Lines of an appended text log (empty when nothing was written)."""
  yield from read_appended(path).decode("utf-8").splitlines()
