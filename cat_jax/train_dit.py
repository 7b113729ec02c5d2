r"""Trains the class-conditional DiT on CAT latents: ``python -m cat_jax.train_dit --config configs/dit.py[:variant]
--workdir DIR``.

Read top to bottom: state and optimiser -> the jitted step -> latents (encode if needed, statistics) -> the loop.
The loop is the tokenizer trainer's (``cat_jax.loop``: mesh, sharded init, checkpoints with the data iterator,
writers, preemption, NaN guard); what is DiT-specific is the state, the rectified-flow step and the sample grids.

One step = one single-level batch of normalised latents (the latent pipeline buckets by level), so attention runs on
that level's sequence length: the level is a static argument and each level compiles its own step.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cat_jax import levels as L
from cat_jax import loop
from cat_jax import parallel
from cat_jax import storage
from cat_jax.data.latents import LatentDataset, LatentStatistics, make_latent_train_iterator
from cat_jax.generation import flow
from cat_jax.generation.dit import DiT, build_dit, init_dit

logger = logging.getLogger("cat_jax.train_dit")


# -- state and optimiser --------------------------------------------------------------------------------------------


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = optax.linear_schedule(o.lr / max(1, o.warmup_steps), o.lr, max(1, o.warmup_steps))
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def init_train_state(rng, *, model: DiT, tx) -> loop.SingleNetState:
  params = init_dit(model, rng)
  return loop.SingleNetState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             ema_params=jax.tree.map(jnp.copy, params), all_finite=jnp.ones((), bool))


# -- the step -------------------------------------------------------------------------------------------------------
def train_step(state: loop.SingleNetState, latents, labels, base_rng, level: int, *, model: DiT, tx, config
               ) -> tuple[loop.SingleNetState, dict]:
  """One rectified-flow update + EMA on a single-level batch of normalised latents (B, h, w, C)."""
  rng = jax.random.fold_in(base_rng, state.step)  # resume-exact: the noise depends only on the step
  apply_fn = lambda p, x, t, y, lvl: model.apply({"params": p}, x, t, y, lvl)
  loss_fn = functools.partial(flow.flow_matching_loss, apply_fn, null_class=model.null_class,
                              class_dropout=config.flow.class_dropout, time_sampling=config.flow.time_sampling)
  loss, grads = jax.value_and_grad(lambda p: loss_fn(p, latents, labels, level, rng))(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = loop.SingleNetState(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params, all_finite=state.all_finite & finite)
  return new_state, {"loss": loss, "grad_norm": grad_norm}


# -- latents --------------------------------------------------------------------------------------------------------
def encode_latents(config, workdir: str) -> str:
  """``data.latents``, or ``<workdir>/latents`` encoded here from ``data.source`` (once; a rerun reuses them)."""
  if config.data.latents:
    return config.data.latents
  from cat_jax import data as cat_data
  from cat_jax.data.latents import encode_source
  from cat_jax.generation.sampling import TOKENIZER_DIR, dit_tokenizer

  out = storage.as_path(workdir) / "latents"
  if (out / "index.jsonl").exists():
    return os.fspath(out)
  if jax.process_count() > 1:
    raise ValueError("encode the latents once with python -m cat_jax.encode and set data.latents: a multi-process "
                     "run does not encode its own")
  if not config.tokenizer.path:  # an untrained CAT tokenizer, kept with the run so sampling decodes with it
    from cat_jax.models.nested_vae import build_model, init_params
    from cat_jax.tokenizer import Tokenizer
    if not config.tokenizer.model:
      raise ValueError("set tokenizer.path (a cat_jax.train workdir or a pretrained tokenizer) or tokenizer.model")
    vae = build_model(config.tokenizer.model)
    tok = Tokenizer(vae, init_params(vae, jax.random.key(config.tokenizer.seed), 64),
                    config=ml_collections.ConfigDict({"data": {"image_size": config.data.image_size}}))
    tok.save_pretrained(storage.as_path(workdir) / TOKENIZER_DIR)
  tok = dit_tokenizer(config, workdir)
  source = cat_data.get_source(config.data.source, config.data.split, **config.data.source_kwargs)
  levels = cat_data.resolve_levels(source, config.data.levels)
  logger.info("Encoding %d images of %r with the tokenizer into %s", len(source), source, out)
  tmp = storage.as_path(workdir) / "latents.tmp"  # complete or absent: a killed encode starts again
  if tmp.exists():
    tmp.rmtree()
  encode_source(tok, source, tmp, levels=levels, labels=cat_data.source_labels(source, len(source)),
                image_size=config.data.image_size)
  tmp.rename(out)
  return os.fspath(out)


def latent_statistics(config, workdir: str, dataset: LatentDataset) -> LatentStatistics:
  """Measured once on the training latents and saved with the model (``<workdir>/latent_stats.json``)."""
  try:
    return LatentStatistics.load(workdir)
  except FileNotFoundError:
    stats = LatentStatistics.measure(dataset, config.model.num_classes)
    if jax.process_index() == 0:
      stats.save(workdir)
    return stats


# -- the loop -------------------------------------------------------------------------------------------------------
def write_sample_grid(state, config, workdir: str, stats: LatentStatistics, writer, step: int) -> None:
  """One row per class (at most 8), 8 samples each at the class's most frequent level, decoded: PNG + TensorBoard."""
  from cat_jax.generation.sampling import Generator, dit_tokenizer
  from cat_jax.metric_writers import make_image_grid

  model = build_dit(config.model)
  gen = Generator(model, state.ema_params, stats, image_size=config.data.image_size,
                  tokenizer=dit_tokenizer(config, workdir), batch_size=8, **config.sample)
  classes = range(min(8, model.num_classes))
  rows = []
  for y in classes:
    counts = stats.class_level_counts[y]
    if not sum(counts):
      continue
    images, _ = gen.generate([y] * 8, [int(np.argmax(counts))] * 8, seed=step)
    rows.append(images)
  if rows and jax.process_index() == 0:
    grid = make_image_grid(rows)
    writer.write_images(step, {"samples/class_rows": grid})
    storage.write_png(storage.as_path(workdir) / "images" / f"samples_step{step:07d}.png", grid)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.SingleNetState:
  """Trains to ``config.num_steps`` (resuming from ``workdir`` if it has checkpoints); returns the final state."""
  from cat_jax.data import make_global_batch
  from cat_jax.metric_writers import MetricWriter

  is_main = jax.process_index() == 0
  storage.as_path(workdir).mkdir(parents=True, exist_ok=True)
  writer = MetricWriter(workdir, enabled=is_main)

  # Mesh, latents and shapes.
  mesh = loop.make_mesh(config)
  process_batch = config.batch_size // jax.process_count()
  dataset = LatentDataset(encode_latents(config, workdir))
  stats = latent_statistics(config, workdir, dataset)
  model, tx = build_dit(config.model), make_optimizer(config)
  channels = dataset[0]["latent"].shape[-1]
  if channels != model.in_channels:
    raise ValueError(f"the latents have {channels} channels but model.in_channels={model.in_channels}")
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  init_fn = functools.partial(init_train_state, model=model, tx=tx)
  abstract_state, state_shardings = loop.sharded_shapes(init_fn, init_rng, mesh, min_size=config.fsdp_min_size)

  # Restore (or init) state and data position.
  train_iter = make_latent_train_iterator(dataset, batch_size=process_batch, seed=config.seed)
  checkpoints = loop.Checkpoints(workdir, config)
  state, train_iter, _ = checkpoints.restore_or_init(config, abstract_state, state_shardings, init_fn, init_rng,
                                                     train_iter)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  if is_main:
    logger.info("DiT: %s parameters; %d latents (levels %s: %s); mesh %s; global batch %d", f"{n_params:,}",
                len(dataset), "/".join(L.level_name(l) for l in range(L.NUM_LEVELS)),
                "/".join(str(int(np.sum(dataset.levels == l))) for l in range(L.NUM_LEVELS)), dict(mesh.shape),
                config.batch_size)

  # The jitted step: explicit shardings, the state donated, one compilation per level.
  rep, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  jit_step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                     in_shardings=(state_shardings, batch_sharding, batch_sharding, rep),
                     out_shardings=(state_shardings, rep), donate_argnums=0, static_argnums=4)

  # The loop.
  start = int(jax.device_get(state.step))
  log = loop.TrainLog(writer, num_steps=config.num_steps, start=start, batch_size=config.batch_size,
                      loss_key="train/loss", enabled=is_main)

  def one_step(state, step):
    batch = next(train_iter)
    level = int(batch["level"])
    batch["latent"] = stats.normalize(batch["latent"], level)
    batch = make_global_batch(batch, batch_sharding)
    state, metrics = jit_step(state, batch["latent"], batch["label"], step_rng, level)
    return state, level, metrics

  def periodic(state, step):
    if config.sample_every and step % config.sample_every == 0:
      write_sample_grid(state, config, workdir, stats, writer, step)
    return None

  state = loop.run_steps(state, start=start, config=config, train_iter=train_iter, train_step=one_step,
                         periodic=periodic, checkpoints=checkpoints, log=log, closing=(writer,))
  return state


# -- command line ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  return loop.run_cli(train_and_evaluate, logger=logger, argv=argv, config_help="configs/dit.py[:variant]",
                      usage="python -m cat_jax.train_dit --config configs/dit.py[:demo|runlocal] --workdir DIR")


if __name__ == "__main__":
  main()
