r"""The reproduction at our scale: the nested tokenizer and separately trained fixed 8x/16x/32x tokenizers.

  bash scripts/reproduce.sh     # trains all four with this file's variants, then runs python -m cat_jax.evaluate

  configs/reproduce.py              the nested VAE in the paper's mode: each image at its complexity level
  configs/reproduce.py:fixed8x      the same widths trained only at 8x on every image (also fixed16x, fixed32x)

Builds on ``configs/cat.py:demo`` (embedded graded-complexity dataset, 64x64 images, the 1.07M-parameter nested VAE
with shortcuts). Every variant gets the same training compute in steps and images: ``num_steps`` x ``batch_size``
(FLOPs differ: a 32x step is cheaper than an 8x one, and the nested run mixes them as the data does). The
complexity level of each training image is the embedded generator's built-in grade, standing in for the
caption-LLM score (no LLM is reachable offline). See docs/reproduction.md.
"""

from cat_jax.configs import cat

VARIANTS = ("nested", "fixed8x", "fixed16x", "fixed32x")


def get_config(arg: str | None = None):
  variant = arg or "nested"
  if variant not in VARIANTS:
    raise ValueError(f"unknown reproduce variant {variant!r}; use one of {VARIANTS}")
  c = cat.get_config("demo")
  c.variant = f"reproduce_{variant}"
  c.batch_size = 8
  c.num_steps = 1_600  # a third of the demo's steps: ~6 minutes a model here (400 left the 16x and 32x exits at the code)
  c.optimizer.update(lr=1e-3, warmup_steps=20)
  c.ema_decay = 0.98
  # The comparison is between level assignments and fixed rates, not GAN sharpness: no discriminator.
  c.loss.update(disc_start=10**9)
  # The data's own level mix (the demo's 2 : 1 : 1 does not apply: the paper's mode, and one-level models).
  c.data.level_weights = "proportional"
  if variant == "nested":
    c.data.level_mode = "content"  # the paper's mode
  else:
    c.data.levels = variant.removeprefix("fixed")  # '8x' / '16x' / '32x': every image at that level
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 400
  return c
