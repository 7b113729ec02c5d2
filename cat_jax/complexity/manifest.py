"""The score manifest: a header line, then one JSON object per image, appended as results arrive so a run can resume.

Header: ``{"header": {"scorer": {method, models, prompts, image size...}, ...}}``, the first line; a resumed run
must use the same scorer setup. Success: ``{"id", "score", "level", "method", ...}`` (the LLM method adds
``caption``, ``reason``, ``answers`` and, when perception answers were missing, ``fallback``). ``level`` is null
while a raw-score run (jpeg, mse) is in progress, because its thresholds depend on all scores; the end of the run
fills it in. Failure: ``{"id", "method", "error"}``, no score and no level. ``cat_jax.data.load_levels`` reads
finished manifests for training.

Any ``etils.epath`` path works. A local file is appended to, line by line; a crash leaves at most one partial last
line, which readers skip and the next writer terminates. Object stores (``gs://``) cannot append without
rewriting the object, so records go to new objects under ``<manifest>.parts/``, one per flush (every
``flush_every`` records or ``flush_seconds``, and at close). When a run completes, ``rewrite`` replaces the
manifest with the header and one record per id (the latest) with final levels, and removes the parts. One writer
per manifest at a time.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from typing import Any, Iterable

from etils import epath

from cat_jax import storage
from cat_jax.data.level_map import HEADER_KEY, is_header, parts_dir


class ManifestMismatch(ValueError):
  """The manifest holds scores of another method or scorer setup than the run that would resume it."""


def is_failure(record: dict[str, Any]) -> bool:
  return "error" in record


def _line(record: dict[str, Any]) -> bytes:
  return (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def header_record(header: dict[str, Any]) -> dict[str, Any]:
  return {HEADER_KEY: header}


class ManifestWriter:
  """Thread-safe writer of manifest records: appends to a local file, adds part objects on an object store.

  ``header`` is written first when the manifest holds nothing yet.
  """

  def __init__(self, path: str | os.PathLike, *, header: dict[str, Any] | None = None, fsync: bool = False,
               flush_every: int = 256, flush_seconds: float = 60.0):
    self.path = storage.as_path(path)
    self._local = storage.is_local(self.path)
    self._fsync = fsync
    self._flush_every = flush_every
    self._flush_seconds = flush_seconds
    self._lock = threading.Lock()
    self._pending: list[bytes] = []
    self._last_flush = time.monotonic()
    self._parts = 0
    fresh = next(iter(_decoded_lines(self.path)), None) is None
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = None
    if self._local:
      self._file = open(os.fspath(self.path), "a+b")  # pylint: disable=consider-using-with
      self._file.seek(0, os.SEEK_END)
      if self._file.tell() > 0:
        self._file.seek(-1, os.SEEK_END)
        if self._file.read(1) != b"\n":  # terminate a line cut short by a crash
          self._file.write(b"\n")
      self._file.seek(0, os.SEEK_END)
    if header is not None and fresh:
      self.write(header_record(header))

  def write(self, record: dict[str, Any]) -> None:
    line = _line(record)
    with self._lock:
      if self._file is not None:
        self._file.write(line)
        self._file.flush()
        if self._fsync:
          os.fsync(self._file.fileno())
        return
      self._pending.append(line)
      if len(self._pending) >= self._flush_every or time.monotonic() - self._last_flush >= self._flush_seconds:
        self._flush_part()

  def _flush_part(self) -> None:
    """Writes the pending records as one new object under ``<manifest>.parts/`` (caller holds the lock)."""
    if self._pending:
      folder = parts_dir(self.path)
      folder.mkdir(parents=True, exist_ok=True)
      # Names sort in write order, so the latest record of an id is read last.
      name = f"{time.time_ns():020d}-{os.getpid()}-{self._parts:06d}.jsonl"
      (folder / name).write_bytes(b"".join(self._pending))
      self._parts += 1
      self._pending = []
    self._last_flush = time.monotonic()

  def close(self) -> None:
    with self._lock:
      if self._file is not None:
        self._file.close()
      else:
        self._flush_part()

  def __enter__(self) -> "ManifestWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def manifest_files(path: str | os.PathLike) -> list[epath.Path]:
  """The manifest (if it exists) then its unmerged parts in write order: what a resuming run reads."""
  path = storage.as_path(path)
  files = [path] if path.exists() else []
  parts = parts_dir(path)
  if parts.exists():
    files += sorted(parts.glob("*.jsonl"), key=lambda p: p.name)
  return files


def _decoded_lines(path: str | os.PathLike) -> Iterable[Any]:
  """Every non-blank line of the manifest and its parts, decoded; an undecodable line yields None."""
  for file in manifest_files(path):
    with file.open("rb") as f:
      for line in f:
        if line.strip():
          try:
            yield json.loads(line)
          except ValueError:
            yield None


def read_header(path: str | os.PathLike) -> dict[str, Any] | None:
  """The manifest's header, or None (a manifest written before headers existed, or none yet)."""
  for record in _decoded_lines(path):
    if is_header(record):
      return record[HEADER_KEY]
  return None


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All image records in write order (empty if none); undecodable lines are skipped with a warning.

  Lenient on purpose: this is how a run resumes after a crash. Training reads manifests with the strict
  ``cat_jax.data.load_levels``.
  """
  records, bad = [], 0
  for record in _decoded_lines(path):
    if is_header(record):
      continue
    if isinstance(record, dict) and "id" in record:
      records.append(record)
    else:
      bad += 1
  if bad:
    warnings.warn(f"{path}: skipped {bad} unreadable line(s) (an interrupted write?)", stacklevel=2)
  return records


def latest_by_id(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """One record per id, the last one written (a retry's success replaces the earlier failure)."""
  latest: dict[str, dict[str, Any]] = {}
  for record in records:
    latest[str(record["id"])] = record
  return latest


def read_manifest(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """``latest_by_id(read_records(path))``."""
  return latest_by_id(read_records(path))


def check_header(path: str | os.PathLike, header: dict[str, Any]) -> None:
  """Raises ManifestMismatch when the manifest was scored with another scorer setup than ``header['scorer']``."""
  old = read_header(path)
  if old is None or old.get("scorer") == header.get("scorer"):
    return
  was, now = old.get("scorer") or {}, header.get("scorer") or {}
  changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
  detail = "; ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed if k != "prompts")
  if "prompts" in changed:
    detail = "; ".join(filter(None, [detail, "the prompts changed"]))
  raise ManifestMismatch(f"{path} was scored with another setup ({detail}); use another --out, or the same settings "
                   "to resume")


def ids_to_skip(path: str | os.PathLike, method: str, *, retry_failures: bool = False) -> set[str]:
  """Ids already in the manifest: successes, and failures unless ``retry_failures``.

  Raises:
    ManifestMismatch: if the manifest holds records of another method (one manifest per method).
  """
  latest = read_manifest(path)
  others = {r.get("method") for r in latest.values()} - {method}
  if others:
    raise ManifestMismatch(f"{path} holds scores of method(s) {sorted(map(str, others))}, not {method!r}; "
                     "use another --out")
  return {i for i, r in latest.items() if not (retry_failures and is_failure(r))}


def rewrite(path: str | os.PathLike, records: Iterable[dict[str, Any]],
            header: dict[str, Any] | None = None) -> None:
  """Replaces the manifest with ``header`` and ``records`` in one write (atomic), then removes its parts."""
  path = storage.as_path(path)
  data = b"".join(_line(r) for r in ([header_record(header)] if header is not None else []) + list(records))
  if storage.is_local(path):
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.fspath(path))
  else:
    path.write_bytes(data)  # an object is replaced whole, atomically
  parts = parts_dir(path)
  if parts.exists():
    parts.rmtree()
