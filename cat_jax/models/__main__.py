"""`python -m cat_jax.models --config configs/cat.py[:variant]`: parameter counts of the nested VAE."""

from __future__ import annotations

import sys

import jax


def main(argv=None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  from cat_jax.models.nested_vae import build_model, count_params, init_params

  config_flags.DEFINE_config_file("config", "configs/cat.py", "configs/cat.py[:variant]")

  def _main(_):
    model = build_model(flags.FLAGS.config.model)
    shapes = jax.eval_shape(lambda r: init_params(model, r, 64), jax.random.key(0))
    total = count_params(shapes)
    per_level = {k: v for k, v in shapes.items() if k.startswith(("enc_exit_", "dec_entry_"))}
    print(f"nested VAE parameters: {total:,} (one tree for all levels; "
          f"{count_params(per_level):,} in the per-level 1x1 exit/entry projections)")
    return 0

  app.run(_main, argv=argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
