"""Sampling a trained DiT: classes -> levels -> latents (rectified-flow ODE) -> images through the tokenizer.

  gen = Generator.from_workdir("/tmp/dit_demo")                       # EMA params, latent statistics, tokenizer
  levels = gen.choose_levels(labels, "auto", seed=0)                  # or a level for all ("16x" / 1)
  images, latents = gen.generate(labels, levels, seed=0)              # (N, H, W, 3) in [-1, 1], input order

How the level is chosen (``choose_levels``): ``auto`` draws each sample's level from its class's empirical level
distribution in the training latents (``LatentStatistics.class_level_counts``); a level forces it; a text prompt's
complexity score (``python -m cat_jax.score --text ...``) maps to a level the same way an image's score does, and
is passed as a forced level. Samples are bucketed by level: each level runs on its own grid (and sequence length),
in fixed-size batches so each level compiles once.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import levels as L
from cat_jax import storage
from cat_jax.data.latents import LatentStatistics
from cat_jax.generation import flow
from cat_jax.generation.dit import DiT, build_dit, init_dit

TOKENIZER_DIR = "tokenizer"  # <workdir>/tokenizer: the untrained tokenizer a run encoded with, when none was named


def dit_tokenizer(config, workdir: str, *, batch_size: int = 64):
  """The tokenizer a DiT run's latents come from: ``config.tokenizer.path`` or ``<workdir>/tokenizer``."""
  from cat_jax.tokenizer import load_tokenizer

  path = config.tokenizer.get("path") or os.fspath(storage.as_path(workdir) / TOKENIZER_DIR)
  return load_tokenizer(path, batch_size=batch_size)


def _sample(params, rng, labels, cfg_scale, *, model: DiT, level: int, grid: tuple[int, int], num_steps: int,
            solver: str):
  apply_fn = lambda p, x, t, y, lvl: model.apply({"params": p}, x, t, y, lvl)
  return flow.sample(apply_fn, params, rng, labels, level, grid=grid, channels=model.in_channels,
                     null_class=model.null_class, cfg_scale=cfg_scale, num_steps=num_steps, solver=solver)


class Generator:
  """A DiT with its latent statistics and tokenizer; samples latents and images for classes at given levels."""

  def __init__(self, model: DiT, params: Any, stats: LatentStatistics, *, image_size: int, tokenizer=None,
               num_steps: int = 50, solver: str = "heun", cfg_scale: float = 1.5, batch_size: int = 64):
    self.model, self.params, self.stats, self.tokenizer = model, params, stats, tokenizer
    self.image_size, self.num_steps, self.solver, self.cfg_scale = image_size, num_steps, solver, cfg_scale
    self.batch_size = int(batch_size)
    self._sample_fn = jax.jit(functools.partial(_sample, model=model, num_steps=num_steps, solver=solver),
                              static_argnames=("level", "grid"))

  @classmethod
  def from_workdir(cls, workdir: str, *, use_ema: bool = True, tokenizer=None, **overrides) -> "Generator":
    """Loads a ``python -m cat_jax.train_dit`` workdir: config, latest (EMA) params, statistics, tokenizer.
    ``overrides``: num_steps, solver, cfg_scale, batch_size (default: the config's ``sample`` block)."""
    from cat_jax import checkpoint as ckpt

    config = ckpt.load_config(workdir)
    if "tokenizer" not in config or "sample" not in config:
      raise ValueError(f"{workdir} is not a python -m cat_jax.train_dit workdir (its config.json has no tokenizer and "
                       "sample blocks: a tokenizer's run?); sampling needs the DiT's workdir")
    model = build_dit(config.model)
    abstract = jax.eval_shape(functools.partial(init_dit, model), jax.random.key(0))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
    params, _ = ckpt.restore_inference_params(workdir, abstract, use_ema=use_ema)
    settings = dict(config.sample.to_dict(), batch_size=64)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    tokenizer = tokenizer if tokenizer is not None else dit_tokenizer(config, workdir,
                                                                       batch_size=settings["batch_size"])
    return cls(model, params, LatentStatistics.load(workdir), image_size=int(config.data.image_size),
               tokenizer=tokenizer, **settings)

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  def grid(self, level: int) -> tuple[int, int]:
    side = L.latent_hw((self.image_size, self.image_size), level)[0]
    if side % self.model.patch_size:
      raise ValueError(f"level {L.level_name(level)} has a {side}x{side} latent grid, not divisible by the DiT's "
                       f"patch_size={self.model.patch_size}")
    return side, side

  def choose_levels(self, labels: Sequence[int], level: Any = "auto", *, seed: int = 0) -> np.ndarray:
    """Level of each sample: ``"auto"`` (drawn from the class's training level distribution, seeded) or a level
    (0 / 1 / 2 or 8x / 16x / 32x) for all."""
    labels = self._check_labels(labels)
    if str(level).strip().lower() != "auto":
      return np.full(len(labels), L.parse_level(level), np.int32)
    rng = np.random.default_rng([seed, 0xA11])
    return np.array([rng.choice(L.NUM_LEVELS, p=self.stats.level_distribution(int(y))) for y in labels], np.int32)

  def _check_labels(self, labels) -> np.ndarray:
    labels = np.asarray(labels, np.int32).reshape(-1)
    bad = labels[(labels < 0) | (labels >= self.num_classes)]
    if bad.size:
      raise ValueError(f"classes {sorted(set(bad.tolist()))} are out of range: the model has {self.num_classes} "
                       f"classes (0..{self.num_classes - 1})")
    return labels

  def sample_latents(self, labels: Sequence[int], level: int, *, seed: int = 0) -> np.ndarray:
    """De-normalised latents (N, h, w, C) of ``labels`` at one level; a seed fixes them (batch by batch)."""
    labels, level = self._check_labels(labels), L.check_level(int(level))
    out = []
    for b, start in enumerate(range(0, len(labels), self.batch_size)):
      chunk = labels[start:start + self.batch_size]
      padded = np.pad(chunk, (0, self.batch_size - len(chunk)))  # one batch shape: one compilation per level
      rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), level), b)
      z = self._sample_fn(self.params, rng, jnp.asarray(padded), jnp.float32(self.cfg_scale), level=level,
                          grid=self.grid(level))
      out.append(np.asarray(z)[:len(chunk)])
    return self.stats.denormalize(np.concatenate(out), level)

  def generate(self, labels: Sequence[int], levels: Sequence[int], *, seed: int = 0):
    """Images (N, H, W, 3) in [-1, 1] and their ``Latents``, in input order; samples are bucketed by level."""
    from cat_jax.tokenizer import Latents

    if self.tokenizer is None:
      raise ValueError("this Generator has no tokenizer to decode with")
    labels, levels = self._check_labels(labels), np.asarray(levels, np.int32).reshape(-1)
    if len(levels) != len(labels):
      raise ValueError(f"{len(labels)} labels but {len(levels)} levels")
    values: list[Any] = [None] * len(labels)
    for level in np.unique(levels):
      where = np.flatnonzero(levels == level)
      for i, z in zip(where, self.sample_latents(labels[where], int(level), seed=seed)):
        values[i] = z
    latents = Latents(values, levels)
    return np.asarray(self.tokenizer.decode(latents)), latents
