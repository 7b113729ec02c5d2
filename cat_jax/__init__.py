"""cat_jax: Content-Adaptive Tokenization (arXiv 2501.03120) in JAX/Flax."""

from cat_jax.levels import FACTORS, NUM_LEVELS, factor_for_level, latent_hw, level_for_factor, num_tokens

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so `import cat_jax` does not import jax/flax.
  if name in ("Tokenizer", "Latents", "load_tokenizer"):
    from cat_jax import tokenizer
    return getattr(tokenizer, name)
  raise AttributeError(f"module 'cat_jax' has no attribute {name!r}")
