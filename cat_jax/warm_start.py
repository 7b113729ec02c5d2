"""Training from converted weights: ``--config.init_from=DIR`` (a ``Tokenizer.from_pretrained`` directory, e.g. a
Stable Diffusion VAE converted by ``python -m cat_jax.convert sd_vae``) and ``--config.freeze_pretrained_steps=N``.

The run starts with DIR's parameters (EMA included); the discriminator and the optimiser states start fresh. With
``freeze_pretrained_steps`` the modules DIR's ``config.json`` lists under ``sd_vae.pretrained`` / ``sd_vae.identity``
(the whole 8x path) get no updates for the first N steps (-1: never; only the new 16x/32x stages train).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cat_jax.models.nested_vae import build_model

CONFIG, PARAMS = "config.json", "params.msgpack"
_NOT_STRUCTURAL = ("dtype", "param_dtype")  # the run may compute in bf16 from float32 weights


def read_init_config(path: str) -> dict[str, Any]:
  """``config.json`` of an ``init_from`` directory."""
  p = pathlib.Path(path).expanduser()
  if not (p / CONFIG).is_file() or not (p / PARAMS).is_file():
    raise FileNotFoundError(f"init_from={path!r} must be a directory with {CONFIG} and {PARAMS}: convert a "
                            "Stable Diffusion VAE with `python -m cat_jax.convert sd_vae --src PATH --out DIR` or "
                            "export a tokenizer with Tokenizer.save_pretrained(DIR)")
  return json.loads((p / CONFIG).read_text())


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
  """``init_from``'s parameters (numpy), after checking that they are the run's model."""
  from cat_jax.convert.common import load_params as read_params

  check_model_matches(read_init_config(init_from)["model"], run_model)
  return read_params(pathlib.Path(init_from).expanduser() / PARAMS)


def place(params, like) -> Any:
  """``params`` as global arrays with the shapes, dtypes and shardings of ``like`` (each process its own shards)."""
  if jax.tree.structure(params) != jax.tree.structure(like) or any(
      np.shape(p) != l.shape for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(like))):
    raise ValueError(f"the init_from {PARAMS} does not match the model its {CONFIG} describes")
  return jax.tree.map(lambda p, l: jax.make_array_from_callback(
      l.shape, l.sharding, lambda index: np.asarray(p, l.dtype)[index]), params, like)


def warm_start(state, config):
  """``state`` with its generator and EMA parameters replaced by ``config.init_from``'s (a fresh run only)."""
  params = load_params(config.init_from, config.model)
  # Two buffers, not one: the train step donates the state.
  return state.replace(params=place(params, state.params), ema_params=place(params, state.ema_params))
