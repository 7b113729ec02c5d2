r"""The reproduction at our scale: CAT's demo setup, shortened to train on a 2-core CPU in about 10 minutes.

  bash scripts/reproduce.sh            # trains with this config, then runs python -m cat_jax.evaluate

Builds on ``configs/cat.py:demo`` (embedded graded-complexity dataset, 64x64 images, tiny nested VAE). As in the
paper, each training image is used at its complexity level (here the embedded generator's built-in grade, which
stands in for the caption-LLM score because no LLM is available offline). See docs/reproduction.md.
"""

import importlib.util
import os

_CAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cat.py")


def get_config(arg: str | None = None):
  spec = importlib.util.spec_from_file_location("_cat_base_config", _CAT)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config("demo")
  c.variant = "reproduce"
  c.batch_size = 8
  c.num_steps = 1200 if arg is None else int(arg)
  c.optimizer.update(lr=1e-3, warmup_steps=20)
  c.ema_decay = 0.98
  # The GAN would only start after the run ends; the reproduction compares level assignments, not GAN sharpness.
  c.loss.update(disc_start=c.num_steps + 1)
  c.static_level = True  # one compilation per level: XLA:CPU runs lax.switch's backward pass slowly
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 200
  return c
