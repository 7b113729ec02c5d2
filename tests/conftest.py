"""Shared pytest setup: CPU, 8 simulated devices, float32 highest-precision matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated CPU devices so sharding tests run on one machine.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
