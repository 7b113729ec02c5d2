r"""Trains CAT's nested VAE: ``python -m cat_jax.train --config configs/cat.py[:variant] --workdir DIR``.

Read top to bottom: state and optimisers -> losses -> the jitted G/D step -> evaluation -> the loop
(mesh, sharded init, restore, steps, logging, checkpoints, preemption). The step functions live at module level
so tests can import them.

One step = one single-level batch (the data pipeline buckets by level): a generator update (reconstruction + LPIPS +
KL + hinge GAN loss with taming's adaptive weight), an EMA update, and a discriminator update. Before
``loss.disc_start`` the GAN terms are off and the discriminator is not updated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cat_jax import levels as L
from cat_jax import loop
from cat_jax import parallel
from cat_jax import warm_start
from cat_jax.losses import gan as gan_losses
from cat_jax.losses.reconstruction import weighted_reconstruction_loss
from cat_jax.metrics import image_quality
from cat_jax.metrics.baselines import area_bicubic
from cat_jax.models.discriminator import PatchDiscriminator
from cat_jax.models import with_dtypes
from cat_jax.models.nested_vae import NestedVAE, build_model, init_params

logger = logging.getLogger("cat_jax.train")


# -- state and optimisers -------------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any            # generator (nested VAE)
  opt_state: Any
  ema_params: Any
  d_params: Any          # discriminator
  d_opt_state: Any
  d_batch_stats: Any     # the discriminator's power-iteration vectors (disc.norm='spectral'); {} otherwise
  lecam_ema: jax.Array   # (2,): running means of real / fake discriminator logits (LeCam)
  all_finite: jax.Array  # False from the first step whose losses or gradients were not finite


def make_schedule(lr: float, opt_cfg, num_steps: int) -> optax.Schedule:
  warmup = max(1, min(opt_cfg.warmup_steps, num_steps - 1))
  # Warm up from lr / warmup (not 0) so the first update, the discriminator's first one included, moves weights.
  return optax.warmup_cosine_decay_schedule(lr / warmup, lr, warmup, max(num_steps, warmup + 1),
                                            lr * opt_cfg.end_lr_factor)


def make_optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation, optax.Schedule]:
  o = config.optimizer
  g_schedule = make_schedule(o.lr, o, config.num_steps)
  d_schedule = make_schedule(o.d_lr, o, config.num_steps)
  make = lambda schedule: optax.chain(optax.clip_by_global_norm(o.grad_clip),
                                      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                                  weight_decay=o.weight_decay))
  g_tx = warm_start.maybe_freeze(make(g_schedule), config)  # warm start: the 8x path held still for a while
  return g_tx, make(d_schedule), g_schedule


def make_discriminator(config) -> PatchDiscriminator:
  """``PatchDiscriminator(**config.disc)``, dtype names ('bfloat16') accepted."""
  kwargs = dict(config.disc)
  kwargs = with_dtypes(kwargs, "disc")
  return PatchDiscriminator(**kwargs)


def apply_discriminator(disc: PatchDiscriminator, d_params, d_batch_stats, images, *, update_stats: bool = False):
  """Patch logits and the discriminator's batch_stats, one power iteration further if ``update_stats``.

  Only 'spectral' normalisation has batch_stats (``{}`` otherwise, returned unchanged). The trainer advances
  them once per discriminator update, on the real batch, as PyTorch's spectral_norm does once per forward.
  """
  variables = {"params": d_params, **({"batch_stats": d_batch_stats} if d_batch_stats else {})}
  if not (update_stats and d_batch_stats):
    return disc.apply(variables, images), d_batch_stats
  logits, updates = disc.apply(variables, images, update_stats=True, mutable=["batch_stats"])
  return logits, updates["batch_stats"]


def init_train_state(rng, *, model: NestedVAE, disc: PatchDiscriminator, g_tx, d_tx, image_size: int) -> TrainState:
  g_rng, d_rng = jax.random.split(rng)
  # Parameter shapes do not depend on the image size: init the VAE on a small image (every branch runs at init).
  params = init_params(model, g_rng)
  d_variables = disc.init(d_rng, jnp.zeros((1, image_size, image_size, model.in_channels)))
  d_params = d_variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=g_tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), d_params=d_params, d_opt_state=d_tx.init(d_params),
                    d_batch_stats=dict(d_variables.get("batch_stats", {})),
                    lecam_ema=jnp.zeros((2,), jnp.float32), all_finite=jnp.ones((), bool))


# -- losses ---------------------------------------------------------------------------------------------------------
def generator_loss_fn(params, d_params, images, level, rng, lpips_params, *, model: NestedVAE,
                      disc: PatchDiscriminator, lpips_module, loss_cfg, use_gan: bool = True, d_batch_stats=None):
  """Total generator loss and its parts: reconstruction (+ LPIPS) and KL, and with ``use_gan`` (static) the
  adversarial term at taming's adaptive weight."""
  variables = {"params": params}
  posterior = model.apply(variables, images, level, method=NestedVAE.encode)
  z = posterior.sample(rng)
  features = model.apply(variables, z, level, method=NestedVAE.decode_features)
  code = model.apply(variables, z, level, method=NestedVAE.decode_code) if model.shortcuts else 0.0

  def decode_head(last_layer, feats):  # the image, the decoder's last layer apart (the adaptive weight's variable)
    head_variables = {"params": dict(params, **{model.last_layer: last_layer})}
    return model.apply(head_variables, feats, method=NestedVAE.output_head) + code

  recon = decode_head(params[model.last_layer], features)
  kl = jnp.mean(posterior.kl())
  nll_of = functools.partial(_reconstruction_objective, images, loss_cfg=loss_cfg, lpips_module=lpips_module,
                             lpips_params=lpips_params)
  if not use_gan:
    nll, (rec, lp) = nll_of(recon)
    g_loss = weight = jnp.zeros((), jnp.float32)
    value = total = nll + loss_cfg.kl_weight * kl
  else:
    # The losses' gradients w.r.t. the reconstruction, each taken once: the adaptive weight needs them separately
    # (through the last layer), the parameters' gradient needs their weighted sum. Differentiating the adaptive
    # weight's losses apart from the total ran the discriminator's and LPIPS's backward passes twice.
    nll, nll_vjp, (rec, lp) = jax.vjp(nll_of, recon, has_aux=True)
    g_loss, gan_vjp = jax.vjp(lambda r: _adversarial_loss(r, d_params, d_batch_stats, disc=disc, loss_cfg=loss_cfg),
                              recon)
    (d_nll,), (d_gan,) = nll_vjp(jnp.ones_like(nll)), gan_vjp(jnp.ones_like(g_loss))
    if loss_cfg.adaptive_gan_weight:
      last_layer_vjp = jax.vjp(lambda w: decode_head(w, jax.lax.stop_gradient(features)),
                               params[model.last_layer])[1]
      weight = _adaptive_weight(last_layer_vjp, d_nll, d_gan)
    else:
      weight = jnp.ones((), jnp.float32)
    gan_coef = loss_cfg.gan_weight * weight
    surrogate = gan_losses.surrogate_generator_loss(recon, nll_grad=d_nll, gan_grad=d_gan, gan_coef=gan_coef)
    value = nll + loss_cfg.kl_weight * kl + gan_coef * g_loss  # what is reported; the surrogate's value is not
    total = loss_cfg.kl_weight * kl + surrogate + jax.lax.stop_gradient(nll + gan_coef * g_loss - surrogate)
  aux = {"recon": recon, "metrics": {"g_loss": value, "recon_loss": rec, "lpips": lp, "kl": kl,
                                     "gan_g_loss": g_loss, "gan_adaptive_weight": weight}}
  return total, aux


def _reconstruction_objective(images, recon, *, loss_cfg, lpips_module, lpips_params):
  """``losses.reconstruction.weighted_reconstruction_loss`` with the config's weights and frozen LPIPS."""
  lpips_fn = None
  if loss_cfg.lpips_weight > 0:
    frozen = jax.lax.stop_gradient(lpips_params)
    lpips_fn = lambda a, b: lpips_module.apply({"params": frozen}, a, b)
  return weighted_reconstruction_loss(images, recon, kind=loss_cfg.recon, weight=loss_cfg.recon_weight,
                                      lpips_fn=lpips_fn, lpips_weight=loss_cfg.lpips_weight,
                                      log_mse_weight=loss_cfg.get("log_mse_weight", 0.0))


def _adversarial_loss(recon, d_params, d_batch_stats, *, disc: PatchDiscriminator, loss_cfg):
  """The generator's GAN loss on the discriminator's logits of ``recon``."""
  logits, _ = apply_discriminator(disc, d_params, d_batch_stats, recon)
  return gan_losses.generator_loss(fake_logit=logits, loss_type=loss_cfg.gan_loss)


def _adaptive_weight(last_layer_vjp, nll_grad, gan_grad):
  """taming's weight, ``||d nll / d W|| / ||d gan / d W||`` at the decoder's last kernel ``W`` (no gradient), from
  the losses' gradients w.r.t. the reconstruction and the last layer's VJP."""
  return gan_losses.adaptive_generator_weight(nll_grad=last_layer_vjp(nll_grad)[0]["kernel"],
                                              gan_grad=last_layer_vjp(gan_grad)[0]["kernel"])


def discriminator_loss_fn(d_params, images, recon, lecam_ema, *, disc: PatchDiscriminator, loss_cfg,
                          d_batch_stats=None):
  """The discriminator loss and ``(real logits, fake logits, updated batch_stats)``."""
  real, d_batch_stats = apply_discriminator(disc, d_params, d_batch_stats, images, update_stats=True)
  apply = lambda x: apply_discriminator(disc, d_params, d_batch_stats, x)[0]
  fake = apply(jax.lax.stop_gradient(recon))
  loss = gan_losses.discriminator_loss(real_logit=real, fake_logit=fake, loss_type=loss_cfg.gan_loss)
  if loss_cfg.lecam_weight > 0:
    loss += loss_cfg.lecam_weight * gan_losses.lecam_regularizer(
        real_logit=real, fake_logit=fake, ema_real=lecam_ema[0], ema_fake=lecam_ema[1])
  if loss_cfg.r1_weight > 0:
    loss += 0.5 * loss_cfg.r1_weight * gan_losses.r1_penalty(apply, images)
  return loss, (real, fake, d_batch_stats)


# -- the step -------------------------------------------------------------------------------------------------------
def gan_in_step(step: int, config) -> bool:
  """Whether the update to ``step`` (1-based, as the loop counts) has the GAN on (taming's ``adopt_weight``
  threshold): the static ``use_gan`` of ``train_step``."""
  return step - 1 >= config.loss.disc_start


def train_step(state: TrainState, images, level, lpips_params, base_rng, *, model, disc, lpips_module, g_tx, d_tx,
               g_schedule, config, use_gan: bool = True) -> tuple[TrainState, dict]:
  """One generator + EMA (+ discriminator) update on a single-level batch (``level``: int32 scalar).

  ``use_gan`` is static (``gan_in_step``: the loop compiles one step for before ``loss.disc_start`` and one for
  after): with it the GAN terms are in the generator loss and the discriminator is updated; without, the
  discriminator, its optimiser state and the LeCam averages are left as they are, and not computed.
  """
  loss_cfg = config.loss
  rng = jax.random.fold_in(base_rng, state.step)  # resume-exact: the noise depends only on the step

  g_fn = functools.partial(generator_loss_fn, model=model, disc=disc, lpips_module=lpips_module, loss_cfg=loss_cfg,
                           use_gan=use_gan, d_batch_stats=state.d_batch_stats)
  (g_total, aux), grads = jax.value_and_grad(g_fn, has_aux=True)(
      state.params, state.d_params, images, level, rng, lpips_params)
  updates, opt_state = g_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

  if use_gan:
    d_fn = functools.partial(discriminator_loss_fn, disc=disc, loss_cfg=loss_cfg, d_batch_stats=state.d_batch_stats)
    (d_loss, (real, fake, d_batch_stats)), d_grads = jax.value_and_grad(d_fn, has_aux=True)(
        state.d_params, images, aux["recon"], state.lecam_ema)
    d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
    d_params = optax.apply_updates(state.d_params, d_updates)
    lecam_ema = jnp.stack(gan_losses.lecam_ema_update(
        ema_real=state.lecam_ema[0], ema_fake=state.lecam_ema[1], real_logit=real, fake_logit=fake))
    d_grad_norm = optax.tree.norm(d_grads)
  else:
    d_params, d_opt_state, d_batch_stats, lecam_ema = (state.d_params, state.d_opt_state, state.d_batch_stats,
                                                       state.lecam_ema)
    d_loss = real = fake = d_grad_norm = jnp.zeros((), jnp.float32)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(g_total) & jnp.isfinite(d_loss) & jnp.isfinite(grad_norm) & jnp.isfinite(d_grad_norm)
  metrics = dict(aux["metrics"], d_loss=d_loss, logits_real=jnp.mean(real), logits_fake=jnp.mean(fake),
                 grad_norm=grad_norm, d_grad_norm=d_grad_norm, gan_on=jnp.float32(use_gan),
                 lr=g_schedule(state.step))
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                         d_params=d_params, d_opt_state=d_opt_state, d_batch_stats=d_batch_stats, lecam_ema=lecam_ema,
                         all_finite=state.all_finite & finite)
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """One training step built from a config by ``make_train_step``: what ``python -m cat_jax.train`` runs and what
  the benchmarks (benchmarks/suite.py, benchmarks/train_bench.py) time.

  ``step(state, images, level, lpips_params, base_rng, use_gan=True) -> (state, metrics)`` is ``train_step`` with
  the networks, optimisers and config bound (unjitted: callers choose shardings and static arguments);
  ``init(rng) -> TrainState`` makes its state.
  """

  model: NestedVAE
  disc: PatchDiscriminator
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation
  g_schedule: optax.Schedule
  lpips_module: Any
  step: Callable
  init: Callable


def make_train_step(config: ml_collections.ConfigDict, *, lpips_module=None,
                    image_size: int | None = None) -> TrainStep:
  """The train step of ``config``; ``lpips_module`` is needed when ``loss.lpips_weight > 0``; ``image_size``
  (default ``config.data.image_size``) only sizes the discriminator's init."""
  model, disc = build_model(config.model), make_discriminator(config)
  g_tx, d_tx, g_schedule = make_optimizers(config)
  step = functools.partial(train_step, model=model, disc=disc, lpips_module=lpips_module, g_tx=g_tx, d_tx=d_tx,
                           g_schedule=g_schedule, config=config)
  init = functools.partial(init_train_state, model=model, disc=disc, g_tx=g_tx, d_tx=d_tx,
                           image_size=image_size or config.data.image_size)
  return TrainStep(model=model, disc=disc, g_tx=g_tx, d_tx=d_tx, g_schedule=g_schedule, lpips_module=lpips_module,
                   step=step, init=init)


# -- evaluation -----------------------------------------------------------------------------------------------------
def eval_measures(height: int, width: int) -> tuple[str, ...]:
  """The measures the train loop's eval logs on ``height`` x ``width`` images: ``image_quality.CHEAP_MEASURES``
  (PSNR, GMSD, HaarPSI) less those whose ``min_side`` the images are under (HaarPSI needs 16x16)."""
  return tuple(name for name in image_quality.CHEAP_MEASURES
               if image_quality.MEASURES[name].min_side <= min(height, width))


def eval_step(params, images, level, *, model):
  """What the train loop's eval measures at ``level``: reconstructions clipped to [-1, 1], keyed by the suffix of their
  log keys -- the model's (``''``; the tokenizer's, ``NestedVAE.reconstruct``: per image the learned path or the fixed
  code, whichever is closer) and the no-learning baselines' (``'_area_bicubic'``; with shortcuts ``'_dct_code'``, the
  fixed code the model starts from) -- and per image the model's L1 and whether it kept the code (``code_share``)."""
  variables = {"params": params}
  recon, code_only = model.apply(variables, images, level, method=NestedVAE.reconstruct)
  recon = jnp.clip(recon, -1.0, 1.0)
  if isinstance(level, int):
    bicubic = area_bicubic(images, level)
  else:  # a traced level: every branch has the image's shape
    bicubic = jax.lax.switch(level, [functools.partial(area_bicubic, level=lvl) for lvl in range(L.NUM_LEVELS)],
                             images)
  reconstructions = {"": recon, "_area_bicubic": jnp.clip(bicubic, -1.0, 1.0)}
  per_image = {"l1": jnp.mean(jnp.abs(recon - images), axis=(1, 2, 3))}
  if model.shortcuts:
    code = model.apply(variables, images, level, method=NestedVAE.code_reconstruction)
    reconstructions["_dct_code"] = jnp.clip(code, -1.0, 1.0)
    per_image["code_share"] = code_only.astype(jnp.float32)
  return reconstructions, per_image


def evaluate_reconstruction(eval_fn, params, eval_batches, writer=None, step: int = 0,
                            level_arg=jnp.int32, image_dir: str | None = None,
                            levels: tuple[int, ...] = tuple(range(L.NUM_LEVELS))) -> dict[str, float]:
  """The ``eval_measures`` (PSNR, GMSD, HaarPSI), SSIM and L1 of the reconstructions and of the no-learning
  baselines at ``levels`` (default: every level) on the same images, as ``eval/level{k}/{measure}{suffix}``
  (``eval/level0/haarpsi_area_bicubic``); 'eval/loss' is the mean L1 over those levels.

  Measured by ``cat_jax.evaluate``'s evaluator (``ReconstructionEvaluator``, one per source): each process measures
  the images it holds, padding left out, and every process's are merged (``sync_across_processes``).
  ``eval_fn(params, images, level) -> (reconstructions, per_image)`` is a jitted ``eval_step``; the image grid is
  all-gathered once.
  """
  from jax.experimental import multihost_utils

  from cat_jax.metrics.evaluator import ReconstructionEvaluator

  evaluators: dict[str, ReconstructionEvaluator] = {}
  grid_rows = None
  for batch in eval_batches:
    keep = parallel.local_rows(batch["mask"]).astype(bool)
    originals = parallel.local_rows(batch["image"])
    rows = []
    for level in levels:
      reconstructions, per_image = eval_fn(params, batch["image"], level_arg(level))
      for suffix, recon in reconstructions.items():
        if suffix not in evaluators:
          evaluators[suffix] = ReconstructionEvaluator(measures=eval_measures(*originals.shape[1:3]),
                                                       extras=tuple(per_image) if suffix == "" else ())
        measured = evaluators[suffix].measure(originals, parallel.local_rows(recon))  # one shape: one compile
        if suffix == "":
          measured.measures.update({k: parallel.local_rows(v).astype(np.float64) for k, v in per_image.items()})
        evaluators[suffix].add(measured.take(keep), level)
      if grid_rows is None:
        rows.append(reconstructions[""])
    if grid_rows is None:
      gathered = multihost_utils.process_allgather([batch["image"], batch["mask"]] + rows, tiled=True)
      kept = np.asarray(gathered[1], bool)
      grid_rows = [np.asarray(a)[kept][:8] for a in [gathered[0]] + gathered[2:]]
  out = {}
  for suffix, evaluator in evaluators.items():
    evaluator.sync_across_processes()
    for key, value in evaluator.result().items():
      name, _, group = key.partition("/")
      if group != "all" and name != "num_images":
        out[f"eval/{group}/{name}{suffix}"] = value
  if not out:
    return {}
  out["eval/loss"] = float(np.mean([out[f"eval/level{lvl}/l1"] for lvl in levels]))
  if writer is not None and grid_rows and len(grid_rows[0]):
    from cat_jax.metric_writers import make_image_grid
    grid = make_image_grid(grid_rows)
    writer.write_images(step, {"reconstructions/original_" + "_".join(L.level_name(lvl) for lvl in levels): grid})
    if image_dir is not None and jax.process_index() == 0:  # also as PNG, to look at without TensorBoard
      from cat_jax import storage
      storage.write_png(storage.as_path(image_dir) / f"reconstructions_step{step:07d}.png", grid)
  return out


def eval_line(metrics: dict[str, float], levels: tuple[int, ...]) -> str:
  """The console summary of ``evaluate_reconstruction``'s metrics: per level, PSNR (and HaarPSI where measured) of the
  model and of the no-learning baselines, and the share of images keeping the DCT code."""
  def values(key, fmt):
    return " / ".join(format(metrics[f"eval/level{lvl}/{key}"], fmt) for lvl in levels)

  def part(suffix):
    text = f"{values('psnr' + suffix, '.2f')} dB"
    if f"eval/level{levels[0]}/haarpsi{suffix}" in metrics:
      text += f", HaarPSI {values('haarpsi' + suffix, '.3f')}"
    return text

  line = f"PSNR {' / '.join(L.level_name(lvl) for lvl in levels)} = {part('')}"
  line += f"; area+bicubic, no learning: {part('_area_bicubic')}"
  if f"eval/level{levels[0]}/psnr_dct_code" in metrics:
    line += f"; DCT code, no learning: {part('_dct_code')}; images keeping the code: {values('code_share', '.0%')}"
  return line


# -- the loop -------------------------------------------------------------------------------------------------------
def _load_lpips_params(config):
  if config.loss.lpips_weight <= 0:
    return None, {}
  from cat_jax.models.lpips import LPIPS, load_lpips
  try:
    lpips = load_lpips(config.lpips_path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{e}\nLPIPS weights are needed because loss.lpips_weight={config.loss.lpips_weight}. Convert them with "
        "`python -m cat_jax.convert lpips --out PATH` and pass --config.lpips_path=PATH, or train without LPIPS "
        "with --config.loss.lpips_weight=0.") from None
  return LPIPS(), lpips.params


def _make_data(config, *, split: str, train: bool, process_batch: int):
  from cat_jax import data as cat_data
  source = cat_data.get_source(config.data.source, split, **config.data.source_kwargs)
  common = dict(batch_size=process_batch, image_size=config.data.image_size, min_size=config.data.min_size,
                on_bad_image=config.data.on_bad_image, process_index=jax.process_index(),
                process_count=jax.process_count())
  if train:
    return cat_data.make_train_iterator(source, levels=config.data.levels, seed=config.seed,
                                        num_workers=config.data.num_workers, level_mode=config.data.level_mode,
                                        level_weights=config.data.level_weights, **common)
  # Evaluation reconstructs every image at every level, so the level assignment does not matter here.
  return cat_data.make_eval_dataset(source, levels=0, **common)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains to ``config.num_steps`` (resuming from ``workdir`` if it has checkpoints); returns the final state."""
  from cat_jax.data import make_global_batch
  from cat_jax import storage
  from cat_jax.metric_writers import MetricWriter

  is_main = jax.process_index() == 0
  eval_levels = L.parse_levels(config.data.get("eval_levels"))  # a bad spelling fails here, before any compile
  writer = MetricWriter(workdir, enabled=is_main)

  # Mesh and shapes.
  mesh = loop.make_mesh(config)
  process_batch = config.batch_size // jax.process_count()
  lpips_module, lpips_params = _load_lpips_params(config)
  parts = make_train_step(config, lpips_module=lpips_module)
  model, init_fn, step_fn = parts.model, parts.init, parts.step
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)

  # Sharded init: shapes first, then a jitted init that materialises each shard where it lives.
  abstract_state, state_shardings = loop.sharded_shapes(init_fn, init_rng, mesh, min_size=config.fsdp_min_size)

  # Restore (or init) state and data position.
  train_iter = _make_data(config, split=config.data.split, train=True, process_batch=process_batch)
  checkpoints = loop.Checkpoints(workdir, config)
  state, train_iter, resumed = checkpoints.restore_or_init(config, abstract_state, state_shardings, init_fn,
                                                           init_rng, train_iter)
  if not resumed and config.get("init_from"):  # a weight folder (cat_jax.warm_start says what it restores)
    state = warm_start.warm_start(state, config)
    if is_main:
      logger.info("Initialised the nested VAE from %s", config.init_from)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  if is_main:
    logger.info("Nested VAE: %s parameters; mesh %s; global batch %d", f"{n_params:,}", dict(mesh.shape),
                config.batch_size)

  # The jitted steps: explicit shardings, the state donated.
  rep = parallel.replicated(mesh)
  lpips_shardings = jax.tree.map(lambda _: rep, lpips_params)
  # The level is a traced scalar (one compilation serves all levels through lax.switch) or, with
  # config.static_level, a static int (one cached executable per level, picked per batch).
  static = bool(config.get("static_level", False))
  if is_main:
    logger.info("Levels: %s", "static (one executable per level)" if static else "traced (lax.switch)")

  def level_arg(level):
    return int(level) if static else jnp.int32(level)

  # use_gan is static too: before loss.disc_start the step leaves the discriminator out (a second compilation).
  rep_if_traced = () if static else (rep,)
  jit_step = jax.jit(lambda state, images, lpips_params, base_rng, use_gan, level: step_fn(
                         state, images, level, lpips_params, base_rng, use_gan=use_gan),
                     in_shardings=(state_shardings, parallel.batch_sharding(mesh), lpips_shardings, rep) + rep_if_traced,
                     out_shardings=(state_shardings, rep), donate_argnums=0,
                     static_argnums=(4, 5) if static else (4,))
  size = config.data.image_size
  for name in sorted(set(image_quality.CHEAP_MEASURES) - set(eval_measures(size, size))):
    side = image_quality.MEASURES[name].min_side
    if is_main:
      logger.info("The eval leaves out %s: it needs images of at least %dx%d, these are %dx%d", name, side, side,
                  size, size)
  jit_eval = jax.jit(functools.partial(eval_step, model=model), out_shardings=parallel.batch_sharding(mesh),
                     static_argnums=(2,) if static else ())

  def run_eval(step, state=state):
    eval_ds = _make_data(config, split=config.data.eval_split, train=False, process_batch=process_batch)
    batches = (_global(b) for _, b in zip(range(config.eval_batches), eval_ds))
    metrics = evaluate_reconstruction(jit_eval, state.ema_params, batches, writer, step, level_arg=level_arg,
                                      image_dir=os.fspath(storage.as_path(workdir) / "images"), levels=eval_levels)
    if is_main and metrics:
      logger.info("step %d, eval (EMA): %s", step, eval_line(metrics, eval_levels))
    return metrics

  def _global(batch):
    return make_global_batch(batch, parallel.batch_sharding(mesh))

  # The loop.
  start = int(jax.device_get(state.step))
  log = loop.TrainLog(writer, num_steps=config.num_steps, start=start, batch_size=config.batch_size,
                      loss_key="train/g_loss", enabled=is_main)

  def one_step(state, step):
    batch = _global(next(train_iter))
    state, metrics = jit_step(state, batch["image"], lpips_params, step_rng, gan_in_step(step, config),
                              level_arg(batch["level"]))
    return state, batch["level"], metrics

  def periodic(state, step):
    if config.eval_every and (step % config.eval_every == 0 or step == config.num_steps):
      eval_metrics = run_eval(step, state)
      writer.write_scalars(step, eval_metrics)
      return eval_metrics
    return None

  def baseline(state):  # before any update: the first point of every eval curve and grid
    writer.write_scalars(0, run_eval(0, state))

  state = loop.run_steps(state, start=start, config=config, train_iter=train_iter, train_step=one_step,
                         periodic=periodic, before=baseline if start == 0 and config.eval_every else None,
                         checkpoints=checkpoints, log=log, closing=(writer,))
  if is_main:
    logger.info("Done. In %s: checkpoints/, images/ (reconstruction grids: original, then 8x, 16x, 32x), "
                "metrics.jsonl, tensorboard/. Next: python -m cat_jax.evaluate --workdir %s", workdir, workdir)
  return state


# -- command line ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  return loop.run_cli(train_and_evaluate, logger=logger, argv=argv, config_help="configs/cat.py[:variant]",
                      usage="python -m cat_jax.train --config configs/cat.py[:demo|runlocal] --workdir DIR")


if __name__ == "__main__":
  main()
