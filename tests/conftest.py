"""Shared pytest setup: CPU, 8 simulated devices, float32 highest-precision matmuls."""

import fcntl
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def compile_flags() -> str:
  """XLA flags that make XLA:CPU compile faster, for this process and every process the tests start. Most of the
  suite's time is XLA:CPU compiling small programs. LLVM at -O0 cut a typical test file by 30% here (even the
  300-step overfit test ran faster, 108 s vs 129 s); the older elemental fusion emitters on one codegen thread
  (instead of the default MLIR fusion emitters, which split codegen over threads) halve the CPU time of compiling
  the runlocal train step (13.3 -> 5.5 s) and took 19% of the CPU time out of test_evaluate.py + test_gan.py, at
  ~10% slower steps. The same HLO either way (no fast-math at any level); the benchmarks time XLA's default
  pipeline (test_benchmarks.py checks only that they run)."""
  if "CAT_JAX_TEST_COMPILE_FLAGS" in os.environ:  # another XLA:CPU configuration ('' for XLA's defaults)
    return os.environ["CAT_JAX_TEST_COMPILE_FLAGS"]
  return ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
          "--xla_cpu_parallel_codegen_split_count=1")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for this process and the processes tests start: ``devices`` simulated CPU devices (sharding tests
  on one machine) and ``compile_flags()``."""
  return f"--xla_force_host_platform_device_count={devices} {compile_flags()}".strip()


# The simulated devices of the test process: 8 (CAT_JAX_TEST_DEVICES to try another count; the tests that shard
# need at least 8 and use the first 8).
DEVICES = int(os.environ.get("CAT_JAX_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(DEVICES)).strip()

# One persistent compilation cache for the session, shared with the trainer subprocesses the tests start: many tests
# and processes compile the same small steps, and XLA:CPU compiles are most of the suite's time. Fresh for every
# session (removed at its end), so no test depends on an earlier run; tests that measure the cache use their own.
_JIT_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _JIT_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cat_jax_tests_jit_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Results several test files read (a trained runlocal checkpoint), made once per session: pytest-xdist's workers
# inherit this variable from the controller, so they share the directory too (see ``runlocal_workdir``).
_SHARED = None
if "CAT_JAX_TEST_SHARED_DIR" not in os.environ:
  _SHARED = os.environ["CAT_JAX_TEST_SHARED_DIR"] = tempfile.mkdtemp(prefix="cat_jax_tests_shared_")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


# The files that train in subprocesses run first, so that with two workers no long file starts last and runs alone.
# README's command keeps this order with `--no-loadscope-reorder` (xdist otherwise starts the files with the most
# tests first: test_train.py, 9 slow tests, started last and ran alone for 15 minutes).
_LONG_FIRST = ("test_train.py", "test_dit.py", "test_benchmarks.py", "test_elastic_resume.py", "test_evaluate.py",
               "test_nested_vae.py", "test_sd_vae.py", "test_quality.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order within a file


def pytest_sessionfinish(session, exitstatus):
  for path in (_JIT_CACHE, _SHARED):
    if path:
      shutil.rmtree(path, ignore_errors=True)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def matmul_chain_tolerance(x, *matrices):
  """Elementwise bound on the float32 rounding error of ``x @ m1 @ m2 ...``, whatever the summation order (which
  differs between CPUs' vector widths and XLA:CPU's dot emitters).

  A product with contraction length n is off by at most n u (|a| @ |b|) (Higham's bound, u = eps / 2, first order),
  and an error in ``a`` carries through ``|b|``; so a chain is off by at most (n1 + n2 + ...) eps (|x| @ |m1| @ ...),
  a factor 2 to spare. The operands' own rounding to float32 is counted as one more term per product.
  """
  bound = np.abs(np.asarray(x, np.float64))
  lengths = 0
  for m in matrices:
    m = np.asarray(m, np.float64)
    bound, lengths = bound @ np.abs(m), lengths + m.shape[0] + 1
  return lengths * np.finfo(np.float32).eps * bound


def patch_code_tolerance(x, f: int, channels: int, decode: bool = True):
  """What float32 rounding allows ``patch_code.encode_patches`` (then ``decode_patches``) of images ``x`` to be
  off, per element: an f*f*3-term sum per coefficient (3,072 at 32x), then a ``channels``-term sum per pixel."""
  import jax.numpy as jnp
  from cat_jax.models import patch_code as pc

  encode, decode_m = pc.code_matrices(f, channels)
  patches = np.asarray(pc.to_patches(jnp.asarray(x), f))
  if not decode:
    return matmul_chain_tolerance(patches, encode)
  return np.asarray(pc.from_patches(jnp.asarray(matmul_chain_tolerance(patches, encode, decode_m), jnp.float32), f))


def load_config(file: str, variant: str | None = None):
  """``cat_jax/configs/<file>``'s ``get_config(variant)``. A runlocal variant's global batch grows with
  CAT_JAX_TEST_DEVICES beyond 8, as the trainer needs it to split over every device."""
  from cat_jax import configs

  config = configs.load(pathlib.Path(file).stem + (f":{variant}" if variant else ""))
  if variant == "runlocal":
    config.batch_size *= max(1, DEVICES // 8)
  return config


def runlocal_workdir_config():
  """configs/cat.py:runlocal on a 4x2 (data, fsdp) mesh that shards the larger kernels: the shared checkpoint
  below, and what test_train.py checks end to end."""
  config = load_config("cat.py", "runlocal")
  # data=-1: 4 on the suite's 8 devices, all the others with CAT_JAX_TEST_DEVICES.
  config.update_from_flattened_dict({"mesh.data": -1, "mesh.fsdp": 2, "fsdp_min_size": 64})
  return config


@pytest.fixture(scope="session")
def runlocal_workdir():
  """A workdir of ``runlocal_workdir_config()`` trained to the end (6 steps, checkpoints 3 and 6), made once per
  session and shared by every xdist worker (a file lock: the first to ask trains, the others wait for it). Read
  it only: a test that writes into a run copies it first."""
  root = pathlib.Path(os.environ["CAT_JAX_TEST_SHARED_DIR"])
  workdir, done = root / "runlocal", root / "runlocal.done"
  with open(root / "runlocal.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      from cat_jax.train import train_and_evaluate

      shutil.rmtree(workdir, ignore_errors=True)  # a half-written run from a worker that failed
      train_and_evaluate(runlocal_workdir_config(), str(workdir))
      done.touch()
  return str(workdir)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Every test group is required (parity included): a skip is a failure unless CAT_JAX_ALLOW_SKIP=1."""
  outcome = yield
  report = outcome.get_result()
  if report.skipped and os.environ.get("CAT_JAX_ALLOW_SKIP") != "1":
    report.outcome = "failed"
    report.longrepr = f"skipped, but no test may be skipped in this suite (CAT_JAX_ALLOW_SKIP=1 allows it): {report.longrepr}"


@pytest.fixture
def chat_server():
  """Starts ``FakeChatServer(respond, ...)`` servers on 127.0.0.1 and always shuts them down at teardown."""
  from fake_chat_server import FakeChatServer  # tests/fake_chat_server.py

  servers = []

  def start(respond, **kwargs):
    server = FakeChatServer(respond, **kwargs).__enter__()
    servers.append(server)
    return server

  yield start
  for server in servers:
    server.__exit__(None, None, None)
    assert not server.overflowed, "a client sent more requests than the test allows"


@pytest.fixture
def object_store():
  """gs:// paths go to an in-memory object store (no append; ``.writes`` counts writes per object)."""
  import fake_object_store

  undo = fake_object_store.install()
  yield fake_object_store.FakeObjectStore
  undo()
