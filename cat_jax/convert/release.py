"""A training run as a weight folder to release (``python -m cat_jax.convert release --src WORKDIR --out DIR``).

DIR gets ``config.json`` (the run's config and step), ``model.safetensors`` (the EMA generator: what
``Tokenizer.from_pretrained(DIR)`` loads), ``generator.safetensors`` (the raw generator) and
``discriminator.safetensors`` (the discriminator and its spectral-norm vectors). No optimiser state: DIR is a
few times the generator's size, and ``python -m cat_jax.train --config.init_from=DIR`` fine-tunes from it with the
GAN as it was trained (cat_jax/warm_start.py).
"""

from __future__ import annotations

import os
import pathlib


def export_release(workdir: str, out: str | os.PathLike, *, step: int | None = None) -> dict:
  """Writes DIR from ``workdir``'s checkpoint (the latest, or ``step``); returns what was written, by file."""
  import jax
  import jax.numpy as jnp

  from cat_jax import checkpoint as ckpt
  from cat_jax import weights
  from cat_jax.models.discriminator import PatchDiscriminator
  from cat_jax.tokenizer import Tokenizer

  tok = Tokenizer.from_checkpoint(workdir, step=step, batch_size=1)
  config = ckpt.load_config(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
  generator = abstract(jax.tree.map(jnp.asarray, tok.params))
  disc = PatchDiscriminator(**config.disc)
  size = int(config.data.image_size)
  d_vars = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  parts = {"params": generator, "d_params": abstract(d_vars["params"])}
  if d_vars.get("batch_stats"):
    parts["d_batch_stats"] = abstract(d_vars["batch_stats"])
  restored, _ = ckpt.restore_train_state_parts(workdir, parts, step=tok.step)
  restored = jax.device_get(restored)
  discriminator = {"params": restored["d_params"], "batch_stats": restored.get("d_batch_stats", {})}
  weights.write_folder(out, tok.export_config(), jax.device_get(tok.params), generator=restored["params"],
                       discriminator=discriminator)
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  return {weights.MODEL: count(tok.params), weights.GENERATOR: count(restored["params"]),
          weights.DISCRIMINATOR: count(discriminator), "step": tok.step}


def convert_cli(src: str | None, out: str, *, step: int | None = None) -> None:
  """``python -m cat_jax.convert release --src WORKDIR --out DIR [--step N]``."""
  if src is None:
    raise FileNotFoundError("release needs --src WORKDIR: the --workdir of a training run")
  if not pathlib.Path(src).expanduser().is_dir():
    raise FileNotFoundError(f"--src {src} is not a directory: give the --workdir of a training run")
  written = export_release(src, out, step=step)
  step = written.pop("step")
  print(f"step {step} of {src} -> {out}: " + ", ".join(f"{name} ({n:,} parameters)" for name, n in written.items()))
