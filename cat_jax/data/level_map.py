"""Which level each image trains at: id -> level index (0/1/2 = 8x/16x/32x).

Levels come from a score manifest (JSON lines with at least ``'id'`` and ``'level'``,
written by ``cat_jax.score``; ``load_levels`` is its one reader), from one fixed level for every
image, or, for the embedded dataset, from its generator's built-in grade.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from etils import epath

from cat_jax import storage
from cat_jax.data.sources import source_ids
from cat_jax.levels import NUM_LEVELS, parse_level


# A manifest's first line may be ``{"header": {...}}`` (how it was scored: method, models, prompts); it has no id.
HEADER_KEY = "header"
# Where a scoring run on an object store (gs://...) appends its records, one object per flush, until it finishes.
PARTS_SUFFIX = ".parts"


def parts_dir(manifest_path: str | os.PathLike) -> epath.Path:
  """``<manifest>.parts``: the unfinished records of a scoring run that writes to an object store."""
  return storage.as_path(os.fspath(manifest_path) + PARTS_SUFFIX)


def is_header(record: Any) -> bool:
  """Whether a decoded manifest line is the header (not an image's record)."""
  return isinstance(record, dict) and HEADER_KEY in record and "id" not in record


def _check_level_value(value: Any, where: str) -> int:
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  try:
    return parse_level(value)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def is_level_spelling(text: str) -> bool:
  try:
    parse_level(text)
    return True
  except ValueError:
    return False


def load_records(manifest_path: str | os.PathLike, known_ids: Iterable[str] | None = None) -> dict[str, dict]:
  """Reads a finished score manifest into {id: record} (its 'level' as an index): the one reader of manifests,
  for every caller (``load_levels`` for levels, ``cat_jax.evaluate`` for scores).

  Args:
    manifest_path: JSON lines file, local or any ``etils.epath`` path (``gs://...``). Every line is an object with
      'id' (str) and 'level', spelled as an index (0/1/2) or a factor (8/16/32, '16x'); other keys are ignored.
      The header line and failure lines of ``cat_jax.score`` (an 'error' and no level) are left out.
    known_ids: if given, every manifest id must be one of them.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the scoring run has not finished (a record without a level yet, or unmerged parts on an object
      store), bad JSON, a missing key, a bad level, an id listed twice with different levels, or an id not in
      ``known_ids``; the message names the line.
  """
  path = storage.as_path(manifest_path)
  unfinished = f"the scoring run that writes {path} has not finished; rerun the same cat_jax.score command"
  if parts_dir(path).exists():
    raise ValueError(f"{unfinished} ({parts_dir(path)} holds records not yet merged)")
  if not path.exists():
    raise FileNotFoundError(f"score manifest {path} does not exist; write one with "
                            "cat_jax.score or pass a fixed level instead")
  records: dict[str, dict] = {}
  known = None if known_ids is None else set(known_ids)
  with path.open("r") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); if a run was interrupted, {unfinished}") from None
      if is_header(rec) or (isinstance(rec, dict) and "error" in rec and rec.get("level") is None):
        continue  # the header, or a failed score: its image stays without a level
      if not isinstance(rec, dict) or "id" not in rec or "level" not in rec:
        raise ValueError(f"{where}: each line needs 'id' and 'level', got {line.strip()[:200]}")
      image_id = str(rec["id"])
      if rec["level"] is None:
        raise ValueError(f"{where}: id {image_id!r} has no level yet: {unfinished}")
      level = _check_level_value(rec["level"], where)
      if known is not None and image_id not in known:
        raise ValueError(f"{where}: id {image_id!r} is not in the dataset (wrong manifest for "
                         "this source or split?)")
      if records.get(image_id, {}).get("level", level) != level:
        raise ValueError(f"{where}: id {image_id!r} listed again with level {level} "
                         f"(was {records[image_id]['level']})")
      records[image_id] = dict(rec, id=image_id, level=level)
  if not records:
    raise ValueError(f"score manifest {path} is empty")
  return records


def load_levels(manifest_path: str | os.PathLike, known_ids: Iterable[str] | None = None) -> dict[str, int]:
  """{id: level} of a finished score manifest (``load_records`` says what it checks)."""
  return {i: r["level"] for i, r in load_records(manifest_path, known_ids).items()}


def resolve_levels(source: Any, levels: Mapping[str, int] | int | str | None) -> np.ndarray:
  """Level of every record of ``source``, in index order, as an int array.

  Args:
    source: a source (see ``cat_jax.data.sources``).
    levels: {id: level}; one level for all (0/1/2, or a factor 8/16/32, '8x'/'16x'/'32x', also as a string
      from the command line); a manifest path; or None for the source's built-in levels (only the embedded
      dataset has them).

  Raises:
    ValueError: an id without a level, or a bad level.
  """
  ids = source_ids(source)
  if levels is None:
    if not hasattr(source, "builtin_levels"):
      raise ValueError(f"{source!r} has no built-in levels; pass levels= a score manifest "
                       "path, an {id: level} mapping or one fixed level (0, 1 or 2)")
    levels = source.builtin_levels()
  if isinstance(levels, str) and is_level_spelling(levels):  # e.g. --config.data.levels=0 or =16x
    levels = parse_level(levels)
  if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool):
    return np.full(len(ids), parse_level(int(levels)), np.int32)
  if isinstance(levels, (str, os.PathLike)):
    levels = load_levels(os.fspath(levels))
  if not isinstance(levels, Mapping):
    raise ValueError(f"levels must be a mapping, an int level, a manifest path or None, got "
                     f"{type(levels).__name__}")
  missing = [i for i in ids if i not in levels]
  if missing:
    raise ValueError(f"{len(missing)} of {len(ids)} images of {source!r} have no level (unscored, or their "
                     f"score failed), e.g. {missing[:3]}; score them (python -m cat_jax.score ... "
                     "--retry-failures) or pass a fixed level")
  out = np.empty(len(ids), np.int32)
  for k, image_id in enumerate(ids):
    out[k] = _check_level_value(levels[image_id], f"level of {image_id!r}")
  assert out.max(initial=0) < NUM_LEVELS
  return out
