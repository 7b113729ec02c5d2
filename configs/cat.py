"""The config lives in the package: cat_jax/configs/cat.py (also `cat_jax.configs.load("cat:VARIANT")`)."""

from cat_jax.configs.cat import get_config  # noqa: F401
