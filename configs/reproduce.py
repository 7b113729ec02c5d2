"""The config lives in the package: cat_jax/configs/reproduce.py (also `cat_jax.configs.load("reproduce:VARIANT")`)."""

from cat_jax.configs.reproduce import get_config  # noqa: F401
