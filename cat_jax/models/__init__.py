"""Networks: the nested VAE and its DCT patch code, the GAN discriminator, the LPIPS and FID-Inception ports."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(value, key: str):
  """A dtype from its config name ('float32', 'bfloat16', 'float16'); other values pass through. ``key`` names the
  config key in the error."""
  if not isinstance(value, str):
    return value
  if value not in DTYPES:
    raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {value!r}")
  return DTYPES[value]


def with_dtypes(kwargs: dict, prefix: str) -> dict:
  """``kwargs`` (a module's config) with its ``dtype`` and ``param_dtype`` names parsed (``parse_dtype``); errors name
  ``<prefix>.<key>``."""
  return {k: parse_dtype(v, f"{prefix}.{k}") if k in ("dtype", "param_dtype") else v for k, v in kwargs.items()}
