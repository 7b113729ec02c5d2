"""Shared pytest setup: CPU, 8 simulated devices, float32 highest-precision matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated CPU devices so sharding tests run on one machine.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


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
