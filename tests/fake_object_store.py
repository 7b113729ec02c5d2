"""An in-memory object store behind ``etils.epath`` for ``gs://`` paths, with the limits of a real one.

Objects are read and written whole: opening for append raises (GCS cannot append without rewriting the object),
"directories" exist only as name prefixes, and every completed write is counted per object, so a test can show
that a writer adds new objects instead of rewriting old ones. Install with ``use_fake_object_store(monkeypatch)``.
"""

from __future__ import annotations

import collections
import fnmatch
import io
import posixpath

from etils.epath import backend, gpath, stat_utils


class _ObjectWriter(io.BytesIO):
  def __init__(self, store: "FakeObjectStore", path: str):
    super().__init__()
    self._store, self._path = store, path

  def close(self) -> None:
    if not self.closed:
      self._store.objects[self._path] = self.getvalue()
      self._store.writes[self._path] += 1
    super().close()


class FakeObjectStore(backend.Backend):
  """The subset of ``etils.epath.backend.Backend`` a ``gs://`` path uses, kept in a dict."""

  def __init__(self):
    self.objects: dict[str, bytes] = {}
    self.writes: collections.Counter = collections.Counter()

  def _children(self, path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    return [k for k in self.objects if k.startswith(prefix)]

  def open(self, path, mode):
    if "a" in mode or "+" in mode:
      raise io.UnsupportedOperation(f"{path}: an object store cannot append (mode {mode!r})")
    if "w" in mode:
      writer = _ObjectWriter(self, path)
      return writer if "b" in mode else io.TextIOWrapper(writer, encoding="utf-8")
    if path not in self.objects:
      raise FileNotFoundError(path)
    data = io.BytesIO(self.objects[path])
    return data if "b" in mode else io.TextIOWrapper(data, encoding="utf-8")

  def exists(self, path) -> bool:
    return path in self.objects or bool(self._children(path))

  def isdir(self, path) -> bool:
    return bool(self._children(path))

  def listdir(self, path) -> list[str]:
    prefix = path.rstrip("/") + "/"
    return sorted({k[len(prefix):].split("/", 1)[0] for k in self._children(path)})

  def glob(self, path) -> list[str]:
    return sorted(k for k in self.objects if fnmatch.fnmatchcase(k, path) and
                  posixpath.dirname(k) == posixpath.dirname(path))

  def walk(self, top, *, top_down=True, on_error=None):
    raise NotImplementedError("walk")

  def makedirs(self, path, *, exist_ok=False, mode=None) -> None:
    pass  # an object store has no directories

  def mkdir(self, path, *, exist_ok=False, mode=None) -> None:
    pass

  def rmtree(self, path) -> None:
    children = self._children(path)
    if not children:
      raise FileNotFoundError(path)
    for k in children:
      del self.objects[k]

  def remove(self, path) -> None:
    if path not in self.objects:
      raise FileNotFoundError(path)
    del self.objects[path]

  def rename(self, path, dst) -> None:
    self.replace(path, dst)

  def replace(self, path, dst) -> None:
    self.copy(path, dst, overwrite=True)
    self.remove(path)

  def copy(self, path, dst, overwrite: bool) -> None:
    if dst in self.objects and not overwrite:
      raise FileExistsError(dst)
    self.objects[dst] = self.objects[path]
    self.writes[dst] += 1

  def stat(self, path) -> stat_utils.StatResult:
    return stat_utils.StatResult(is_directory=self.isdir(path), length=len(self.objects.get(path, b"")),
                                 mtime=0, owner=None, group=None, mode=None)


def use_fake_object_store(monkeypatch) -> FakeObjectStore:
  """Routes every ``gs://`` epath operation to a new ``FakeObjectStore`` for the rest of the test."""
  store = FakeObjectStore()
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", store)  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False, raising=False)  # else tf's gfile is used
  return store
