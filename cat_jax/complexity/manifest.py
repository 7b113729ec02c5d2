"""The score manifest: one JSON object per line, appended as results arrive, so a run can resume.

Success: ``{"id", "score", "level", "method", ...}`` (the LLM method adds ``caption``, ``reason``, ``answers``).
``level`` is null while a raw-score run (jpeg, mse) is in progress, because its thresholds depend on all scores;
the end of the run fills it in. Failure: ``{"id", "method", "error"}``, no score and no level.

Lines are only ever appended during a run; a crash can leave at most one partial last line, which readers skip
and the next writer terminates. When a run completes, ``rewrite`` replaces the file atomically with one record
per id (the latest) and final levels. One writer per file at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
import warnings
from typing import Any, Iterable


def is_failure(record: dict[str, Any]) -> bool:
  return "error" in record


class ManifestWriter:
  """Thread-safe append-only JSONL writer; each record is flushed as it is written."""

  def __init__(self, path: str | os.PathLike, *, fsync: bool = False):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._fsync = fsync
    self._lock = threading.Lock()
    self._file = open(self.path, "a+b")
    self._file.seek(0, os.SEEK_END)
    if self._file.tell() > 0:
      self._file.seek(-1, os.SEEK_END)
      if self._file.read(1) != b"\n":  # terminate a line cut short by a crash
        self._file.write(b"\n")
    self._file.seek(0, os.SEEK_END)

  def write(self, record: dict[str, Any]) -> None:
    line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    with self._lock:
      self._file.write(line)
      self._file.flush()
      if self._fsync:
        os.fsync(self._file.fileno())

  def close(self) -> None:
    with self._lock:
      self._file.close()

  def __enter__(self) -> "ManifestWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All records in file order (empty if the file does not exist); undecodable lines are skipped with a warning."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records, bad = [], 0
  with open(path, "rb") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        bad += 1
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


def ids_to_skip(path: str | os.PathLike, method: str, *, retry_failures: bool = False) -> set[str]:
  """Ids already in the manifest: successes, and failures unless ``retry_failures``.

  Raises:
    ValueError: if the manifest holds records of another method (one manifest per method).
  """
  latest = read_manifest(path)
  others = {r.get("method") for r in latest.values()} - {method}
  if others:
    raise ValueError(f"{path} holds scores of method(s) {sorted(map(str, others))}, not {method!r}; "
                     "use another --out")
  return {i for i, r in latest.items() if not (retry_failures and is_failure(r))}


def rewrite(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
  """Atomically replaces the manifest with ``records``."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    for record in records:
      f.write((json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load_levels(path: str | os.PathLike) -> dict[str, int]:
  """``{id: level}`` of a finished manifest's successes (for level bucketing); failures are left out.

  Raises:
    ValueError: if a success has no level yet (the scoring run did not finish).
  """
  levels = {}
  for i, record in read_manifest(path).items():
    if is_failure(record):
      continue
    if record.get("level") is None:
      raise ValueError(f"{path}: {i!r} has no level yet; finish the scoring run (rerun the same command)")
    levels[i] = int(record["level"])
  return levels
