"""A gs:// object store in memory, with an object store's rules: no append, and every write counted."""

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FakeObjectStore(MemoryFileSystem):
  """fsspec filesystem for ``gs://`` / ``gcs://`` (what etils.epath uses without TensorFlow).

  Opening for append raises, as on GCS; ``writes[path]`` counts how often each object was written, so a test can
  check that no object is rewritten.
  """

  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs: list = [""]
  writes: dict = {}

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")

  def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...) do not apply
    super().__init__()

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"an object store cannot open {path} with mode {mode!r}")
    path = self._strip_protocol(path)
    if "w" in mode:
      self.writes[path] = self.writes.get(path, 0) + 1
    return super()._open(path, mode, **kwargs)

  @classmethod
  def reset(cls):
    cls.store.clear()
    cls.pseudo_dirs[:] = [""]
    cls.writes.clear()


def install():
  """Routes gs:// through FakeObjectStore for etils.epath; returns an undo function."""
  from etils.epath import backend
  from fsspec.registry import _registry

  previous = {p: _registry.get(p) for p in FakeObjectStore.protocol}
  for p in FakeObjectStore.protocol:
    fsspec.register_implementation(p, FakeObjectStore, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  FakeObjectStore.reset()

  def undo():
    FakeObjectStore.reset()
    for p, cls in previous.items():
      if cls is None:
        _registry.pop(p, None)
      else:
        _registry[p] = cls
    backend.fsspec_backend._get_filesystem.cache_clear()

  return undo
