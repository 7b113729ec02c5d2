r"""Trains the level predictor: ``python -m cat_jax.train_predictor --config configs/predictor.py[:variant]
--workdir DIR``.

Read top to bottom: the teacher's scores -> state and the jitted step -> the loop (``cat_jax.loop``: mesh,
checkpoints with the data iterator, preemption, NaN guard) -> calibration and validation -> ``<workdir>/predictor``.

The network (``cat_jax.complexity.predictor``) regresses the teacher's standardised score on training images; at
the end its thresholds are calibrated so that ``calibration_images`` training images average ``budget_tokens`` mean
tokens (the knob-free default), and its agreement with the teacher on ``data.eval_split`` is measured: Spearman on
scores, exact level (at thresholds matching the teacher's level mix) against the majority level. A quality teacher
(``quality:<tokenizer>``) instead gives each training image, viewed whole at the sizes ``data.sizes`` lists, that
tokenizer's measured quality at every level; the network regresses what each level step buys (``ViewBatches``: one
size per step) and a price is calibrated in place of thresholds (``finish_quality``). Attach the result to a
tokenizer with ``Tokenizer.set_level_predictor`` (or ``scripts/calibrate_auto_levels.py``).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cat_jax import levels as L
from cat_jax import loop
from cat_jax import parallel
from cat_jax import storage
from cat_jax.complexity import predictor as predictor_lib
from cat_jax.complexity import thresholds as complexity_thresholds

logger = logging.getLogger("cat_jax.train_predictor")


# -- the teacher ----------------------------------------------------------------------------------------------------
def teacher_records(spec: str, source, split: str, *, image_size: int, workdir: str
                    ) -> tuple[dict[str, float], dict[str, int], str]:
  """``({id: score}, {id: level}, method)`` of the teacher ``spec`` on ``source`` (see configs/predictor.py); an
  'mse:' teacher is scored at ``image_size`` into ``workdir``."""
  from cat_jax.data.level_map import load_records

  if spec == "grade":
    if not hasattr(source, "kind"):
      raise ValueError("teacher 'grade' needs the embedded dataset (its generator's complexity grade)")
    ids = source.ids()
    kinds = [source.kind(k) for k in range(len(ids))]
    return ({i: float(k.grade) for i, k in zip(ids, kinds)}, {i: int(k.level) for i, k in zip(ids, kinds)}, "grade")
  if spec.startswith("mse:"):
    path = score_mse_teacher(spec[len("mse:"):], source, split, image_size=image_size, workdir=workdir)
  else:
    path = spec
  from cat_jax.complexity.manifest import read_header

  header = read_header(path) or {}
  method = (header.get("scorer") or {}).get("method")
  records = load_records(path)  # the one reader: an unfinished or malformed manifest is refused
  return {i: float(r["score"]) for i, r in records.items()}, {i: int(r["level"]) for i, r in records.items()}, method


def view(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """uint8 ``image`` -> uint8 (h, w, 3): the largest centred crop of aspect h:w, resized to (h, w) by one antialiased
  bicubic resampling (``data.preprocess.resize_and_crop``'s, for any aspect)."""
  from PIL import Image

  h, w = int(hw[0]), int(hw[1])
  height, width = image.shape[:2]
  scale = max(h / height, w / width)
  crop_h, crop_w = h / scale, w / scale
  y0, x0 = (height - crop_h) / 2, (width - crop_w) / 2
  out = Image.fromarray(image).resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h), reducing_gap=3.0)
  return np.asarray(out, np.uint8)


def size_views(source, sizes, redraw=None) -> list[dict[str, Any]]:
  """The images ``sizes`` asks for: per ``(height, width, count[, drawn])`` the next ``count`` records of ``source``
  (each record in one view only), ``view``ed to that size: ``[{"hw", "ids", "images": uint8 (count, h, w, 3)}]``.
  With ``drawn`` those records come from ``redraw(drawn)`` (the same records drawn at that side, e.g. the embedded
  generator at the tokenizer's own training size, whose pixels differ from a larger drawing resized)."""
  from cat_jax.complexity.scorers import to_pil_rgb

  ids_of = source_ids_of(source)
  groups, start = [], 0
  for h, w, count, drawn in sizes:
    count = min(int(count), len(source) - start)
    if count <= 0:
      raise ValueError(f"data.sizes asks for more images than the {len(source)} of {source!r}; lower the counts or "
                       "raise data.source_kwargs.num_images")
    records = source if drawn is None else redraw(drawn)
    index = range(start, start + count)
    images = np.stack([view(np.asarray(to_pil_rgb(records[k]["image"])), (h, w)) for k in index])
    groups.append({"hw": (int(h), int(w)), "ids": [ids_of[k] for k in index], "images": images,
                   "name": f"{h}x{w}" + (f" drawn at {drawn}" if drawn is not None else "")})
    start += count
  return groups


def source_ids_of(source) -> list[str]:
  from cat_jax.data import source_ids

  return [str(i) for i in source_ids(source)]


def quality_teacher(tokenizer: str, groups: list[dict[str, Any]], split: str, *, measures, workdir: str
                    ) -> list[np.ndarray]:
  """Per group of ``size_views``, (count, 3 * len(measures)) ``tokenizer``'s reconstruction quality of each image,
  whole at its size, at each level in each measure (measure-major: ``[m0@8x, m0@16x, m0@32x, m1@8x, ...]``, oriented
  so higher is better), measured once into ``<workdir>/quality-<split>.npz`` (a rerun with the same tokenizer,
  images and measures reuses it)."""
  from cat_jax.complexity.assign import quality_table
  from cat_jax.data.preprocess import to_model_range
  from cat_jax.tokenizer import load_tokenizer

  out = storage.as_path(workdir) / f"quality-{split}.npz"
  measures = list(measures)
  setup = np.array([tokenizer, *measures] + [f"{g['name']}:{len(g['ids'])}" for g in groups])
  ids = np.array([i for g in groups for i in g["ids"]])
  if out.exists():
    with np.load(out.open("rb")) as saved:
      if "setup" in saved and saved["setup"].tolist() == setup.tolist() and saved["ids"].tolist() == ids.tolist():
        values = saved["values"]
        return np.split(values, np.cumsum([len(g["ids"]) for g in groups])[:-1])
  tok = load_tokenizer(tokenizer)
  logger.info("Measuring the teacher (%s's quality at every level in %s) on %d images at %s", tokenizer,
              ", ".join(measures), len(ids), ", ".join(g["name"] for g in groups))
  rows = []
  for g in groups:
    for start in range(0, len(g["images"]), 256):
      images = [to_model_range(x) for x in g["images"][start:start + 256]]
      table = quality_table(images, lambda x, level: tok.reconstruct(x, level), measures)
      rows.append(np.concatenate([table[m] for m in measures], axis=1))
  values = np.concatenate(rows).astype(np.float32)
  if jax.process_index() == 0:
    with out.open("wb") as f:
      np.savez(f, ids=ids, values=values, setup=setup)
  return np.split(values, np.cumsum([len(g["ids"]) for g in groups])[:-1])


class ViewBatches:
  """Training batches of a quality predictor: each step one size group (drawn with probability proportional to its
  image count) and ``batch_pixels`` worth of its images (at least one), half of them mirrored left to right, with
  their standardised targets. Deterministic in (seed, step); its state is the step, so a run resumes exactly."""

  def __init__(self, groups: list[dict[str, Any]], targets: list[np.ndarray], *, batch_pixels: int, seed: int,
               multiple: int = 1):
    self.groups, self.targets, self.seed, self.step = groups, targets, int(seed), 0
    counts = np.array([len(g["ids"]) for g in groups], np.float64)
    self.weights = counts / counts.sum()
    self.batch_sizes = [max(multiple, batch_pixels // (g["hw"][0] * g["hw"][1]) // multiple * multiple)
                        for g in groups]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    from cat_jax.data.preprocess import to_model_range

    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    k = int(rng.choice(len(self.groups), p=self.weights))
    rows = rng.integers(0, len(self.groups[k]["ids"]), self.batch_sizes[k])
    images = to_model_range(self.groups[k]["images"][rows])
    mirror = rng.random(len(rows)) < 0.5
    images[mirror] = images[mirror, :, ::-1]
    return {"image": images, "target": self.targets[k][rows]}

  def get_state(self) -> bytes:
    return json.dumps({"step": self.step}).encode()

  def set_state(self, state) -> None:
    self.step = int((json.loads(state) if isinstance(state, (bytes, str)) else state)["step"])

  def start_prefetch(self) -> None:
    pass


def score_mse_teacher(tokenizer: str, source, split: str, *, image_size: int, workdir: str) -> str:
  """Scores ``source`` with ``tokenizer``'s 32x reconstruction MSE into ``<workdir>/teacher-<split>.jsonl`` (once; a
  rerun resumes or reuses it) and returns its path."""
  from cat_jax.complexity import runner
  from cat_jax.complexity.scorers import MseScorer
  from cat_jax.tokenizer import load_tokenizer

  out = storage.as_path(workdir) / f"teacher-{split}.jsonl"
  if jax.process_count() > 1:
    raise ValueError("score the teacher once with python -m cat_jax.score --method mse --checkpoint TOKENIZER and "
                     "set teacher to the manifest: a multi-process run does not score its own")
  scorer = MseScorer.of_tokenizer(load_tokenizer(tokenizer), image_size=image_size)
  logger.info("Scoring the teacher (%s's 32x reconstruction MSE) on %d images into %s", tokenizer, len(source), out)
  runner.score_source(source, scorer, out, workers=1, image_size=image_size, progress=False,
                      header={"tokenizer": tokenizer})
  return str(out)


def covered(source, scores: dict[str, float], what: str):
  """The records of ``source`` the teacher scored (a few failed scores leave images out, logged)."""
  from cat_jax.data import Subset, source_ids

  ids = source_ids(source)
  keep = [k for k, i in enumerate(ids) if i in scores]
  if not keep:
    raise ValueError(f"the teacher scored none of the {len(ids)} images of {source!r} ({what}): wrong manifest for "
                     "this source or split?")
  if len(keep) < len(ids):
    logger.warning("%d of %d %s images have no teacher score; left out", len(ids) - len(keep), len(ids), what)
    return Subset(source, keep)
  return source


# -- state and step -------------------------------------------------------------------------------------------------
TrainState = loop.SingleNetState


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(1, o.warmup_steps), max(2, config.num_steps))
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adamw(schedule, weight_decay=o.weight_decay))


def init_train_state(rng, *, net: predictor_lib.PredictorNet, tx, image_size: int) -> TrainState:
  params = net.init(rng, jnp.zeros((1, image_size, image_size, 3)))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), all_finite=jnp.ones((), bool))


def train_step(state: TrainState, images, targets, *, net, tx, ema_decay: float) -> tuple[TrainState, dict]:
  """One regression update (mean squared error on standardised teacher scores) + EMA."""
  def loss_fn(params):
    return jnp.mean((net.apply({"params": params}, images) - targets) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params,
                    all_finite=state.all_finite & finite), {"loss": loss, "grad_norm": grad_norm}


# -- calibration and validation -------------------------------------------------------------------------------------
def predict_source(predictor: predictor_lib.LevelPredictor, source, limit: int, *, min_size: int = 1
                   ) -> tuple[list[str], np.ndarray]:
  """(ids, scores) of the first ``limit`` records of ``source`` (centre crops at the predictor's size)."""
  from cat_jax.data import Subset, make_eval_iterator

  source = Subset(source, range(min(int(limit), len(source))))
  ids, scores = [], []
  for batch in make_eval_iterator(source, levels=0, batch_size=256, image_size=predictor.image_size,
                                  process_index=0, process_count=1, min_size=min_size):
    valid = np.asarray(batch["mask"], bool)
    ids += [str(i) for i in np.asarray(batch["id"])[valid]]
    scores.append(predictor.predict(np.asarray(batch["image"])[valid]))
  return ids, np.concatenate(scores) if scores else np.zeros(0)


def measure_agreement(predictor, source, teacher_scores: dict[str, float], teacher_thresholds, mix, majority: int, *,
                      limit: int, min_size: int = 1) -> dict[str, float]:
  """``predictor_lib.agreement`` of ``predictor`` with a teacher on ``source``: the teacher's levels are its scores
  at ``teacher_thresholds`` (its level mix on the training images), the predictor's at ``mix``."""
  ids, predicted = predict_source(predictor, source, limit, min_size=min_size)
  scores = [teacher_scores[i] for i in ids]
  return predictor_lib.agreement(predicted, scores, complexity_thresholds.levels_for_scores(scores, teacher_thresholds),
                                 mix, majority)


def finish(params, config, workdir: str, source, teacher: tuple, eval_source, eval_teacher
           ) -> predictor_lib.LevelPredictor:
  """Calibrates the thresholds, measures agreement with the teacher, writes ``<workdir>/predictor``."""
  scores, levels, method = teacher
  size = int(config.data.image_size)
  predictor = predictor_lib.LevelPredictor(params=jax.device_get(params), image_size=size,
                                           widths=tuple(config.model.widths), hidden=config.model.hidden,
                                           teacher=str(config.teacher))
  ids, predicted = predict_source(predictor, source, config.calibration_images, min_size=config.data.min_size)
  budget = float(config.budget_tokens or L.num_tokens((size, size), 1))
  predictor.thresholds = complexity_thresholds.budget_thresholds(predicted, budget, image_hw=(size, size))
  predictor.budget_tokens = budget
  teacher_counts = np.bincount([levels[i] for i in ids], minlength=L.NUM_LEVELS)
  # Levels to compare: the teacher's level mix on these training images, as thresholds on its scores and on ours.
  teacher_thresholds = complexity_thresholds.mix_thresholds([scores[i] for i in ids], teacher_counts)
  mix = complexity_thresholds.mix_thresholds(predicted, teacher_counts)
  majority = int(np.argmax(teacher_counts))
  info: dict[str, Any] = {
      "teacher": {"spec": str(config.teacher), "method": method, "level_counts": teacher_counts.tolist(),
                  "thresholds": list(teacher_thresholds)},
      "calibration": {"images": len(ids), "budget_tokens": budget,
                      "level_counts": complexity_thresholds.level_counts(predicted, predictor.thresholds)},
      "teacher_mix_thresholds": list(mix)}
  train_scores = [scores[i] for i in ids]
  info["train"] = predictor_lib.agreement(
      predicted, train_scores, complexity_thresholds.levels_for_scores(train_scores, teacher_thresholds), mix, majority)
  if eval_source is not None:
    info["validation"] = measure_agreement(predictor, eval_source, eval_teacher[0], teacher_thresholds, mix, majority,
                                           limit=config.data.eval_images, min_size=config.data.min_size)
  predictor.info = info
  if jax.process_index() == 0:
    predictor.save(storage.as_path(workdir) / "predictor")
    logger.info("Predictor written to %s/predictor: %s", workdir, json.dumps(info))
  return predictor


def source_images(source, limit: int, image_size: int, *, min_size: int = 1) -> tuple[list[str], list[np.ndarray]]:
  """(ids, [-1, 1] images) of the first ``limit`` records of ``source`` at ``image_size``."""
  from cat_jax.data import Subset, make_eval_iterator

  source = Subset(source, range(min(int(limit), len(source))))
  ids, images = [], []
  for batch in make_eval_iterator(source, levels=0, batch_size=256, image_size=image_size, process_index=0,
                                  process_count=1, min_size=min_size):
    valid = np.asarray(batch["mask"], bool)
    ids += [str(i) for i in np.asarray(batch["id"])[valid]]
    images += list(np.asarray(batch["image"])[valid])
  return ids, images


# Training images per size the recorded agreement is measured on (each figure solves the knapsack ~100 times).
AGREEMENT_IMAGES = 400


def finish_quality(params, config, workdir: str, groups: list[dict[str, Any]], values: list[np.ndarray], stats,
                   eval_group: dict[str, Any] | None, eval_values: np.ndarray | None) -> predictor_lib.LevelPredictor:
  """A quality predictor: its price calibrated so the training images at ``data.image_size`` (at most
  ``calibration_images``) average ``budget_tokens`` (default fixed 16x) at that price; its agreement with the
  measured qualities in every measure (up to ``AGREEMENT_IMAGES`` training images at each size, ``eval_group``),
  written to ``<workdir>/predictor``."""
  from cat_jax.complexity import allocation

  size = int(config.data.image_size)
  measures = list(config.measures)
  predictor = predictor_lib.LevelPredictor(
      params=jax.device_get(params), image_size=size, widths=tuple(config.model.widths), hidden=config.model.hidden,
      teacher=str(config.teacher), qualities={"measures": measures, "mean": [float(v) for v in stats[0]],
                                              "std": [float(v) for v in stats[1]], "targets": "steps"})
  budget = float(config.budget_tokens or L.num_tokens((size, size), 1))
  square = [k for k, g in enumerate(groups) if g["name"] == f"{size}x{size}"]  # as the source draws, not redrawn
  if not square:
    raise ValueError(f"data.sizes has no {size}x{size} images to calibrate the price on; add ({size}, {size}, N)")
  calibration = groups[square[0]]["images"][:int(config.calibration_images)]
  table = predictor.predict_quality(calibration)
  predictor.price = allocation.calibrate_price(table[measures[0]], allocation.rate_table(len(calibration)), budget,
                                               allocation.tokens_table([(size, size)] * len(calibration)))
  predictor.budget_tokens = budget
  levels = predictor.levels(calibration, qualities=table)  # the price is set now; the predictions are the same

  def agreement(images, measured, hw):
    predicted = predictor.predict_quality(images)
    scale = (hw[0] * hw[1]) / (size * size)  # the fixed-16x tokens at this size
    return {m: predictor_lib.quality_agreement(predicted[m], measured[:, 3 * k:3 * k + 3],
                                               budget_tokens=budget * scale, image_hw=hw,
                                               price=predictor.price if k == 0 else None)
            for k, m in enumerate(measures)}

  info: dict[str, Any] = {"teacher": {"spec": str(config.teacher), "method": "quality", "measures": measures,
                                      "sizes": [list(g["hw"]) + [len(g["ids"])] for g in groups]},
                          "calibration": {"images": len(calibration), "budget_tokens": budget, "price": predictor.price,
                                          "level_counts": np.bincount(levels, minlength=L.NUM_LEVELS).tolist()},
                          "train": {g["name"]: agreement(g["images"][:AGREEMENT_IMAGES], v[:AGREEMENT_IMAGES],
                                                         g["hw"])
                                    for g, v in zip(groups, values)}}
  if eval_group is not None:
    info["validation"] = agreement(eval_group["images"], eval_values, eval_group["hw"])
  predictor.info = info
  if jax.process_index() == 0:
    predictor.save(storage.as_path(workdir) / "predictor")
    logger.info("Quality predictor written to %s/predictor: %s", workdir, json.dumps(info))
  return predictor


def quality_sizes(config) -> list[tuple[int, int, int, int | None]]:
  """``data.sizes``: (height, width, count, drawn or None) of the training images a quality predictor learns from,
  whole; default ``calibration_images`` at ``data.image_size``."""
  size = int(config.data.image_size)
  sizes = config.data.get("sizes") or ((size, size, int(config.calibration_images)),)
  return [(int(e[0]), int(e[1]), int(e[2]), int(e[3]) if len(e) > 3 else None) for e in sizes]


# -- the loop -------------------------------------------------------------------------------------------------------
def check_config(config) -> None:
  """Raises ValueError, naming the fix, for a config this trainer cannot run."""
  teacher = config.teacher
  if not teacher:
    raise ValueError("set --config.teacher: 'mse:<tokenizer>', 'grade' (embedded data) or a score manifest path")
  if teacher == "grade" and config.data.source != "embedded":
    raise ValueError(f"--config.teacher=grade needs data.source=embedded (got {config.data.source!r}); use "
                     "'mse:<tokenizer>' or a score manifest")
  if teacher.startswith("quality:"):
    from cat_jax.metrics import image_quality
    unknown = [m for m in config.measures if m not in image_quality.MEASURES]
    if unknown or not config.measures:
      raise ValueError(f"--config.measures={','.join(config.measures)}: a quality teacher needs measures from "
                       f"{sorted(image_quality.MEASURES)}")
    sizes = quality_sizes(config)
    size = int(config.data.image_size)
    if any(min(v for v in entry if v is not None) < 1 for entry in sizes) or not any(
        (h, w, drawn) == (size, size, None) for h, w, _, drawn in sizes):
      raise ValueError(f"--config.data.sizes={sizes}: (height, width, count[, drawn]), all positive, one of them at "
                       f"data.image_size ({size}, {size}, N), where the price is calibrated")
    if any(drawn is not None for *_, drawn in sizes) and config.data.source != "embedded":
      raise ValueError("--config.data.sizes: a fourth number (the side images are drawn at) needs data.source="
                       f"embedded, got {config.data.source!r}")
  elif teacher != "grade" and not teacher.startswith("mse:") and not storage.as_path(teacher).exists():
    raise ValueError(f"--config.teacher={teacher}: no such score manifest; write one with python -m cat_jax.score, "
                     "or use 'quality:<tokenizer>', 'mse:<tokenizer>' or 'grade'")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> predictor_lib.LevelPredictor:
  """Trains to ``config.num_steps`` (resuming from ``workdir``), then calibrates, validates and saves."""
  from cat_jax.data import get_source, make_global_batch, make_train_iterator
  from cat_jax.metric_writers import MetricWriter

  check_config(config)
  is_main = jax.process_index() == 0
  storage.as_path(workdir).mkdir(parents=True, exist_ok=True)
  writer = MetricWriter(workdir, enabled=is_main)

  # The teacher's scores, standardised (on the log scale for MSE); or its qualities per level on whole images of
  # several sizes, as steps (``predictor_lib.steps_of``), each standardised.
  source = get_source(config.data.source, config.data.split, **config.data.source_kwargs)
  quality = config.teacher.startswith("quality:")
  if quality:
    redraw = lambda side: get_source(config.data.source, config.data.split,
                                     **dict(config.data.source_kwargs, image_size=side))
    groups = size_views(source, quality_sizes(config), redraw)
    values = quality_teacher(config.teacher[len("quality:"):], groups, config.data.split, measures=config.measures,
                             workdir=workdir)
    steps = [np.concatenate([predictor_lib.steps_of(v[:, 3 * k:3 * k + 3]) for k in range(len(config.measures))], 1)
             for v in values]
    every = np.concatenate(steps)
    mean, std = every.mean(0), every.std(0)
    std = np.where(std > 0, std, 1.0)
    num_outputs, num_images = every.shape[1], len(every)
  else:
    teacher = teacher_records(config.teacher, source, config.data.split, image_size=config.data.image_size,
                              workdir=workdir)
    source = covered(source, teacher[0], "training")
    ids = list(teacher[0])
    scores = np.array([predictor_lib.teacher_transform(teacher[2], teacher[0][i]) for i in ids])
    mean, std = scores.mean(), scores.std()
    std = std if std > 0 else 1.0
    target_of = {i: np.float32((v - mean) / std) for i, v in zip(ids, scores)}
    num_outputs, num_images = 1, len(ids)

  mesh = loop.make_mesh(config)
  process_batch = config.batch_size // jax.process_count()
  net = predictor_lib.PredictorNet(widths=tuple(config.model.widths), hidden=config.model.hidden,
                                   outputs=num_outputs)
  tx = make_optimizer(config)
  init_rng = jax.random.key(config.seed)
  init_fn = functools.partial(init_train_state, net=net, tx=tx, image_size=config.data.image_size)
  abstract_state, state_shardings = loop.sharded_shapes(init_fn, init_rng, mesh, min_size=config.fsdp_min_size)
  if quality:
    if jax.process_count() > 1:
      raise ValueError("a quality predictor trains in one process (its images and their measured qualities are held "
                       "in memory); run it on one host")
    size = int(config.data.image_size)
    train_iter = ViewBatches(groups, [((t - mean) / std).astype(np.float32) for t in steps],
                             batch_pixels=process_batch * size * size, seed=config.seed,
                             multiple=int(np.prod(list(mesh.shape.values()))))
  else:
    train_iter = make_train_iterator(source, levels=0, batch_size=process_batch, image_size=config.data.image_size,
                                     seed=config.seed, num_workers=config.data.num_workers,
                                     min_size=config.data.min_size, on_bad_image=config.data.on_bad_image)
  checkpoints = loop.Checkpoints(workdir, config)
  state, train_iter, _ = checkpoints.restore_or_init(config, abstract_state, state_shardings, init_fn, init_rng,
                                                     train_iter)
  if is_main:
    logger.info("Level predictor: %s parameters; teacher %s (%s) on %d images; mesh %s; global batch %d",
                f"{sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)):,}", config.teacher,
                "quality" if quality else teacher[2], num_images, dict(mesh.shape), config.batch_size)

  rep, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  jit_step = jax.jit(functools.partial(train_step, net=net, tx=tx, ema_decay=config.ema_decay),
                     in_shardings=(state_shardings, batch_sharding, batch_sharding),
                     out_shardings=(state_shardings, rep), donate_argnums=0)
  start = int(jax.device_get(state.step))
  log = loop.TrainLog(writer, num_steps=config.num_steps, start=start, batch_size=config.batch_size,
                      loss_key="train/loss", enabled=is_main)

  def one_step(state, step):
    batch = next(train_iter)
    if not quality:
      batch["target"] = np.stack([target_of[str(i)] for i in np.asarray(batch["id"])]).astype(np.float32)
    batch = make_global_batch(batch, batch_sharding)
    state, metrics = jit_step(state, batch["image"], batch["target"])
    return state, None, metrics  # no levels: only train/x is logged

  state = loop.run_steps(state, start=start, config=config, train_iter=train_iter, train_step=one_step,
                         checkpoints=checkpoints, log=log, closing=(writer,))
  if int(jax.device_get(state.step)) < config.num_steps:  # preempted: the next run resumes and finishes
    return None
  eval_source = eval_teacher = None
  eval_spec = config.eval_teacher or (config.teacher if config.teacher == "grade" or
                                      config.teacher.startswith(("mse:", "quality:")) else None)
  if eval_spec and config.data.eval_images:
    from cat_jax.data import Subset
    eval_source = get_source(config.data.source, config.data.eval_split, **config.data.source_kwargs)
    eval_source = Subset(eval_source, range(min(int(config.data.eval_images), len(eval_source))))
    if quality:  # at data.image_size, as the price is calibrated
      size = int(config.data.image_size)
      eval_group = size_views(eval_source, [(size, size, len(eval_source), None)])
      eval_values = quality_teacher(eval_spec[len("quality:"):], eval_group, config.data.eval_split,
                                    measures=config.measures, workdir=workdir)
      return finish_quality(state.ema_params, config, workdir, groups, values, (mean, std), eval_group[0],
                            eval_values[0])
    eval_teacher = teacher_records(eval_spec, eval_source, config.data.eval_split,
                                   image_size=config.data.image_size, workdir=workdir)
    eval_source = covered(eval_source, eval_teacher[0], "validation")
  if quality:
    return finish_quality(state.ema_params, config, workdir, groups, values, (mean, std), None, None)
  return finish(state.ema_params, config, workdir, source, teacher, eval_source, eval_teacher)


# -- command line ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
  return loop.run_cli(train_and_evaluate, logger=logger, argv=argv, config_help="configs/predictor.py[:variant]",
                      check_config=check_config,
                      usage="python -m cat_jax.train_predictor --config configs/predictor.py[:demo|runlocal] "
                            "--workdir DIR")


if __name__ == "__main__":
  main()
