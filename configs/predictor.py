"""The config lives in the package: cat_jax/configs/predictor.py (also `cat_jax.configs.load("predictor:VARIANT")`)."""

from cat_jax.configs.predictor import get_config  # noqa: F401
