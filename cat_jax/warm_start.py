"""Training from a weight folder: ``--config.init_from=DIR`` (``cat_jax.weights``: a ``save_pretrained`` folder, a
release written by ``python -m cat_jax.convert release``, or a Stable Diffusion VAE converted by ``python -m
cat_jax.convert sd_vae``) and ``--config.freeze_pretrained_steps=N``.

What a fresh run restores from DIR: the EMA generator (``model.safetensors``) as the EMA parameters, and as the
trained parameters the raw generator (``generator.safetensors``) when the folder has it, else the EMA one; the
discriminator's parameters and spectral-norm vectors (``discriminator.safetensors``) when the folder has them (the
run's ``config.disc`` must then be the folder's), else a fresh discriminator. Optimiser states and the step start
fresh. A resumed run (a checkpoint in its workdir) ignores ``init_from``. With
``freeze_pretrained_steps`` the modules DIR's ``config.json`` lists under ``sd_vae.pretrained`` / ``sd_vae.identity``
(the whole 8x path) get no updates for the first N steps (-1: never; only the new 16x/32x stages train).
"""

from __future__ import annotations

import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cat_jax import weights
from cat_jax.models.nested_vae import build_model

_NOT_STRUCTURAL = ("dtype", "param_dtype")  # the run may compute in bf16 from float32 weights


def read_init_config(path: str) -> dict[str, Any]:
  """``config.json`` of an ``init_from`` directory."""
  if not weights.is_folder(path):
    raise FileNotFoundError(f"init_from={path!r} must be a directory with {weights.CONFIG} and {weights.MODEL}: "
                            "export a training run with `python -m cat_jax.convert release --src WORKDIR --out DIR`, "
                            "a tokenizer with Tokenizer.save_pretrained(DIR), or convert a Stable Diffusion VAE with "
                            "`python -m cat_jax.convert sd_vae --src PATH --out DIR`")
  return weights.read_config(path)


def check_model_matches(init_model: dict[str, Any], run_model) -> None:
  """Raises ValueError naming the ``config.model`` fields where the run's model differs from ``init_from``'s."""
  a, b = build_model(init_model), build_model(run_model)
  fields = [f for f in type(a).__dataclass_fields__ if f not in ("parent", "name") + _NOT_STRUCTURAL]
  diffs = [f"model.{f}: init_from has {getattr(a, f)!r}, config has {getattr(b, f)!r}"
           for f in fields if getattr(a, f) != getattr(b, f)]
  if diffs:
    raise ValueError("config.model does not match the init_from weights:\n  " + "\n  ".join(diffs) +
                     "\nUse the matching configs/cat.py variant (sd3, sdxl) or set these fields.")


def pretrained_modules(init_config: dict[str, Any]) -> list[str]:
  """Top-level parameter names that came from the source (converted or identity), from ``config.json``."""
  parts = init_config.get("sd_vae") or {}
  names = list(parts.get("pretrained", [])) + list(parts.get("identity", []))
  if not names:
    raise ValueError("freeze_pretrained_steps needs an init_from directory written by `python -m cat_jax.convert "
                     "sd_vae` (its config.json lists the pretrained modules under sd_vae.pretrained)")
  return names


def pretrained_mask(params, names) -> Any:
  """True for every leaf under one of the top-level modules ``names``."""
  names = set(names)
  return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key in names, params)


class FreezeState(NamedTuple):
  count: jax.Array


def zero_frozen(names, steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of the modules ``names`` for the first ``steps`` updates (``steps < 0``: always)."""

  def init(params):
    del params
    return FreezeState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    frozen = jnp.asarray(True) if steps < 0 else state.count < steps
    mask = pretrained_mask(updates, names)
    updates = jax.tree.map(lambda u, m: jnp.where(frozen, jnp.zeros_like(u), u) if m else u, updates, mask)
    return updates, FreezeState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def freeze_pretrained(tx: optax.GradientTransformation, init_from: str, steps: int) -> optax.GradientTransformation:
  """``tx`` with the pretrained modules frozen for ``steps`` updates.

  Gradients are zeroed before ``tx`` (so frozen modules neither count in gradient clipping nor fill Adam's moments)
  and updates after it (so weight decay does not move them either).
  """
  names = pretrained_modules(read_init_config(init_from))
  return optax.chain(zero_frozen(names, steps), tx, zero_frozen(names, steps))


def maybe_freeze(tx: optax.GradientTransformation, config) -> optax.GradientTransformation:
  """``tx``, with ``freeze_pretrained`` applied when the config asks for it."""
  steps = config.get("freeze_pretrained_steps") or 0
  if not steps:
    return tx
  if not config.get("init_from"):
    raise ValueError(f"freeze_pretrained_steps={steps} needs --config.init_from=DIR (converted weights to freeze)")
  return freeze_pretrained(tx, config.init_from, steps)


def load_params(init_from: str, run_model) -> Any:
  """``init_from``'s EMA generator parameters (numpy), after checking that they are the run's model."""
  check_model_matches(read_init_config(init_from)["model"], run_model)
  return weights.read_params(init_from)


def place(params, like, what: str = "generator") -> Any:
  """``params`` (nested dicts) as global arrays with the tree, shapes, dtypes and shardings of ``like`` (each process
  its own shards)."""
  flat = weights.flatten(params)
  want = {weights.path_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]}
  if flat.keys() != want.keys() or any(flat[k].shape != want[k].shape for k in want):
    raise ValueError(f"the init_from {what} weights do not match the model its {weights.CONFIG} describes")
  return jax.tree_util.tree_map_with_path(lambda path, l: jax.make_array_from_callback(
      l.shape, l.sharding, lambda index: np.asarray(flat[weights.path_key(path)], l.dtype)[index]), like)


def warm_start(state, config):
  """``state`` with what ``config.init_from`` holds (a fresh run only; the module docstring says what)."""
  folder = pathlib.Path(config.init_from).expanduser()
  ema = load_params(config.init_from, config.model)
  raw = weights.read_params(folder, weights.GENERATOR) if (folder / weights.GENERATOR).is_file() else ema
  # Two buffers, not one: the train step donates the state.
  state = state.replace(params=place(raw, state.params), ema_params=place(ema, state.ema_params))
  if not (folder / weights.DISCRIMINATOR).is_file():
    return state
  saved_disc = dict(read_init_config(config.init_from).get("disc") or {})
  run_disc = dict(config.disc)
  diffs = [f"disc.{k}: init_from has {saved_disc.get(k)!r}, config has {run_disc.get(k)!r}"
           for k in sorted(set(saved_disc) | set(run_disc))
           if k not in ("dtype",) and saved_disc.get(k) != run_disc.get(k)]
  if diffs:
    raise ValueError("config.disc does not match the discriminator in init_from:\n  " + "\n  ".join(diffs) +
                     f"\nSet these fields, or remove {folder / weights.DISCRIMINATOR} to start the discriminator "
                     "fresh.")
  disc = weights.read_params(folder, weights.DISCRIMINATOR)
  stats = disc.get("batch_stats", {})
  return state.replace(d_params=place(disc["params"], state.d_params, "discriminator"),
                       d_batch_stats=place(stats, state.d_batch_stats, "discriminator") if stats else
                       state.d_batch_stats)
