"""The config lives in the package: cat_jax/configs/dit.py (also `cat_jax.configs.load("dit:VARIANT")`)."""

from cat_jax.configs.dit import get_config  # noqa: F401
