"""A learned level predictor: a tiny CNN trained to reproduce an expensive teacher's complexity score in one cheap pass.

The teacher is any score manifest (``python -m cat_jax.score``: caption_llm, a tokenizer's reconstruction MSE, JPEG)
or the embedded data's grade; ``python -m cat_jax.train_predictor`` trains it (``cat_jax/configs/predictor.py``).
The network regresses the teacher's standardised score (the log for MSE), so only the ranking matters: levels come
from thresholds on its output, calibrated at a token budget like every other measure.

  pred = LevelPredictor.load("/tmp/pred/predictor")     # or Tokenizer.from_pretrained("demo").level_predictor
  scores = pred.predict(images)                          # [-1, 1] HWC arrays, any size; higher = more complex
  levels = levels_for_scores(scores, pred.thresholds)    # thresholds calibrated at the fixed-16x mean tokens

Images are prepared as every scorer prepares them (``scorers.prepare_image``: the shorter side resized to the
predictor's ``image_size``, centre-cropped square).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cat_jax.complexity import thresholds as complexity_thresholds

CONFIG_FILE = "predictor.json"
WEIGHTS_FILE = "predictor.safetensors"


class PredictorNet(nn.Module):
  """Stride-2 3x3 convolutions, then the mean and standard deviation of the last features over the image (how much
  detail, and how unevenly spread), then a small MLP to ``outputs`` values: one score (N,), or several (N, outputs)
  (a quality predictor: one per level and measure). ~32k parameters at the default widths.

  Fully convolutional: ``mask`` (N, H, W), the valid pixels of images zero-padded to a common shape, keeps the padding
  out of every layer and of the pooling, so an image gets the same numbers at any padded shape (the padding sits
  after the image, where a stride-2 'SAME' convolution pads anyway)."""

  widths: Sequence[int] = (16, 32, 64)
  hidden: int = 64
  outputs: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    # x: (N, H, W, 3) in [-1, 1] -> (N,) or (N, outputs)
    valid = jnp.ones(x.shape[:3] + (1,), x.dtype) if mask is None else mask[..., None].astype(x.dtype)
    x = x * valid
    for width in self.widths:
      x = nn.gelu(nn.Conv(width, (3, 3), strides=2)(x))
      valid = valid[:, ::2, ::2]
      x = x * valid
    count = valid.sum((1, 2))
    mean = x.sum((1, 2)) / count
    var = (((x - mean[:, None, None]) * valid) ** 2).sum((1, 2)) / count
    x = jnp.concatenate([mean, jnp.sqrt(var + 1e-12)], axis=-1)
    y = nn.Dense(self.outputs)(nn.gelu(nn.Dense(self.hidden)(x)))
    return y[:, 0] if self.outputs == 1 else y


# -- teachers and agreement ---------------------------------------------------------------------------------------
def teacher_transform(method: str | None, scores: np.ndarray) -> np.ndarray:
  """What the network regresses before standardising: log10 for MSE (spread over decades), the score otherwise."""
  scores = np.asarray(scores, np.float64)
  return np.log10(np.maximum(scores, 1e-10)) if method == "mse" else scores


def ranks(x: Sequence[float]) -> np.ndarray:
  """Ranks 0..n-1, ties given their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x))
  r[order] = np.arange(len(x))
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=r)
  return sums[inverse] / counts[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rank correlation (ties averaged)."""
  ra, rb = ranks(a), ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
  return float(np.sum(ra * rb) / denom) if denom else 0.0


def agreement(predicted: Sequence[float], teacher_scores: Sequence[float], teacher_levels: Sequence[int],
              thresholds: Sequence[float], majority_level: int) -> dict[str, float]:
  """How well predicted scores reproduce a teacher: Spearman on scores, exact-level accuracy of the predicted levels
  (``thresholds``) against the teacher's, and the trivial predictor's accuracy (``majority_level`` for all)."""
  teacher_levels = np.asarray(teacher_levels)
  levels = complexity_thresholds.levels_for_scores(predicted, thresholds)
  return {"images": int(len(teacher_levels)), "spearman": round(spearman(predicted, teacher_scores), 4),
          "exact_level": round(float(np.mean(levels == teacher_levels)), 4),
          "majority_exact_level": round(float(np.mean(teacher_levels == majority_level)), 4),
          "within_one_level": round(float(np.mean(np.abs(levels - teacher_levels) <= 1)), 4)}


def quality_agreement(predicted: np.ndarray, measured: np.ndarray, *, price: float | None, budget_tokens: float,
                      image_hw: tuple[int, int]) -> dict[str, float]:
  """How well predicted qualities (N, 3) choose levels, against the measured ones on the same images (all at
  ``image_hw``): Spearman of what each step buys (16x -> 8x, 32x -> 16x); at ``budget_tokens`` mean tokens the share
  of the exact choice's gain over fixed 16x that the choice made from the predictions gets, and the mean tokens
  each needs to reach fixed 16x's mean quality, as a multiple of ``budget_tokens`` (all measured in true quality);
  with a ``price``, levels at that price (exact agreement, within one level, two levels apart)."""
  from cat_jax.complexity import allocation

  n = len(measured)
  tokens = allocation.tokens_table([image_hw] * n)
  fixed = float(measured[:, 1].mean())
  oracle = allocation.mean_of(measured, allocation.best_within_budget(measured, tokens, budget_tokens))
  chosen = allocation.mean_of(measured, allocation.best_within_budget(predicted, tokens, budget_tokens))

  def tokens_ratio(table):
    need = allocation.tokens_to_match(lambda b: allocation.best_within_budget(table, tokens, b), measured, tokens,
                                      fixed, steps=96)
    return None if need is None else round(need / budget_tokens, 4)

  out = {"images": int(n),
         "spearman_gain_16x_to_8x": round(spearman(predicted[:, 0] - predicted[:, 1], measured[:, 0] - measured[:, 1]), 4),
         "spearman_gain_32x_to_16x": round(spearman(predicted[:, 1] - predicted[:, 2], measured[:, 1] - measured[:, 2]),
                                           4),
         "fixed_16x": round(fixed, 4), "oracle_gain": round(oracle - fixed, 4),
         "predicted_gain": round(chosen - fixed, 4),
         "share_of_oracle_gain": round((chosen - fixed) / (oracle - fixed), 4) if oracle > fixed else None,
         "tokens_for_fixed_16x": tokens_ratio(predicted), "oracle_tokens_for_fixed_16x": tokens_ratio(measured)}
  if price is not None:
    rate = allocation.rate_table(n)
    mine, best = allocation.at_price(predicted, rate, price), allocation.at_price(measured, rate, price)
    out.update({"level_at_price": round(float(np.mean(mine == best)), 4),
                "within_one_level": round(float(np.mean(np.abs(mine - best) <= 1)), 4),
                "two_levels_apart": int(np.sum(np.abs(mine - best) == 2))})
  return out


# -- the predictor ------------------------------------------------------------------------------------------------
def padded_side(side: int) -> int:
  """The side an image is zero-padded to (masked) before a quality predictor sees it whole: a multiple of 32 up to
  512, of 128 above, so a folder of many sizes compiles few shapes."""
  step = 32 if side <= 512 else 128
  return -(-int(side) // step) * step


def as_model_input(image: np.ndarray) -> np.ndarray:
  """An image as the network takes it, float32 in [-1, 1]: uint8 converted once (``to_model_range``), floats in
  [-1, 1] as they are (no rounding through uint8)."""
  from cat_jax.data.preprocess import to_model_range

  image = np.asarray(image)
  return to_model_range(image) if image.dtype == np.uint8 else image.astype(np.float32)


def pad_to(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(image zero-padded after its last row and column to ``shape``, (H, W) mask of its own pixels)."""
  h, w = image.shape[:2]
  padded = np.zeros(tuple(shape) + image.shape[2:], image.dtype)
  padded[:h, :w] = image
  mask = np.zeros(tuple(shape), bool)
  mask[:h, :w] = True
  return padded, mask


def steps_of(q: np.ndarray) -> np.ndarray:
  """(N, 3) qualities at 8x / 16x / 32x -> (N, 3) what a quality predictor regresses: the 16x quality, what 8x buys
  over 16x and what 16x buys over 32x (the level steps the choice weighs, each standardised on its own)."""
  q = np.asarray(q, np.float64)
  return np.stack([q[:, 1], q[:, 0] - q[:, 1], q[:, 1] - q[:, 2]], axis=1)


def levels_of(steps: np.ndarray) -> np.ndarray:
  """The inverse of ``steps_of``."""
  steps = np.asarray(steps, np.float64)
  return np.stack([steps[:, 0] + steps[:, 1], steps[:, 0], steps[:, 0] - steps[:, 2]], axis=1)


@dataclasses.dataclass
class LevelPredictor:
  """A trained ``PredictorNet`` with what it needs at use time.

  Two kinds. A *score* predictor reproduces a teacher's complexity score; ``thresholds`` (low, high) calibrated at
  ``budget_tokens`` mean tokens on its training data map it to levels. A *quality* predictor (``qualities`` set:
  ``{"measures": [...], "mean": [...], "std": [...], "targets": "steps"}``) predicts a tokenizer's reconstruction
  quality at every level in each measure (``predict_quality``) from the whole image at its own size, from which
  ``complexity.allocation`` chooses levels by what more tokens buy; its ``price`` (quality per token per 256x256
  pixels, in its first measure) is the knob-free rule. Its outputs, de-standardised by ``mean`` and ``std``, are per
  measure ``steps_of`` the qualities (``"targets": "steps"``) or the qualities themselves (``"levels"``, the files
  written before 2026-12-07's second predictor). ``image_size``: the size a score predictor resizes images to; for
  a quality predictor the size its price was calibrated at. ``teacher``: what it reproduces; ``info``: the training
  run's figures (validation agreement).
  """

  params: Any
  image_size: int
  widths: tuple[int, ...] = (16, 32, 64)
  hidden: int = 64
  thresholds: tuple[float, float] | None = None
  budget_tokens: float | None = None
  teacher: str = ""
  info: dict = dataclasses.field(default_factory=dict)
  qualities: dict | None = None
  price: float | None = None

  def __post_init__(self):
    outputs = 1 if self.qualities is None else len(self.qualities["measures"]) * 3
    self.net = PredictorNet(widths=tuple(self.widths), hidden=int(self.hidden), outputs=outputs)
    self._apply = jax.jit(lambda p, x, mask: self.net.apply({"params": p}, x, mask))

  @property
  def measures(self) -> tuple[str, ...]:
    """The measures a quality predictor predicts (empty for a score predictor)."""
    return () if self.qualities is None else tuple(self.qualities["measures"])

  def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """HWC images of any size (uint8, or float in [-1, 1]) -> (N, image_size, image_size, 3) uint8, as the scorers
    prepare images (shorter side resized, centre crop); images already at that size are only stacked."""
    from PIL import Image

    from cat_jax.complexity.scorers import prepare_image
    from cat_jax.data.preprocess import from_model_range

    s = self.image_size
    out = []
    for x in images:
      x = np.asarray(x)
      x = x if x.dtype == np.uint8 else from_model_range(x)
      out.append(x if x.shape == (s, s, 3) else np.asarray(prepare_image(Image.fromarray(x), s)))
    return np.stack(out) if out else np.zeros((0, s, s, 3), np.uint8)

  def _run(self, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The network on prepared (N, S, S, 3) images, in batches of exactly ``batch_size`` (the last zero-padded)."""
    out = []
    for start in range(0, len(x), batch_size):
      chunk = x[start:start + batch_size]
      padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(self._apply(self.params, as_model_input(padded), None))[:len(chunk)])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

  def predict(self, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """(N,) float64 scores of HWC images (uint8, or float in [-1, 1]; higher = more complex). A quality predictor's
    score is what 8x buys over 32x in its first measure. Batches are padded to a power of two so few shapes compile."""
    if self.qualities is not None:
      q = self.predict_quality(images)[self.measures[0]]
      return q[:, 0] - q[:, 2]
    x = self.prepare(list(images))
    scores = []
    for start in range(0, len(x), batch_size):
      chunk = x[start:start + batch_size]
      scores.append(self._run(chunk, 1 << (len(chunk) - 1).bit_length()))
    return np.concatenate(scores) if scores else np.zeros(0)

  def predict_quality(self, images: Sequence[np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """{measure: (N, 3)} predicted quality of each HWC image (uint8, or float in [-1, 1]) at 8x / 16x / 32x at its
    own size: the network sees the whole image, zero-padded and masked to ``padded_side`` on each side. One image at
    a time, so the same image gets the same numbers alone or in any batch, at the cost of its own pixels."""
    if self.qualities is None:
      raise ValueError("this is a score predictor: it predicts one complexity score, not qualities per level; train "
                       "a quality predictor (python -m cat_jax.train_predictor --config.teacher=quality:TOKENIZER)")
    from cat_jax.metrics.image_quality import MEASURES, oriented

    rows = []
    for image in images:
      image = as_model_input(image)
      x, mask = pad_to(image, tuple(padded_side(side) for side in image.shape[:2]))
      rows.append(np.asarray(self._apply(self.params, x[None], mask[None]), np.float64)[0])
    raw = np.stack(rows) if rows else np.zeros((0, len(self.measures) * 3))
    values = raw * np.asarray(self.qualities["std"]) + np.asarray(self.qualities["mean"])
    steps = self.qualities.get("targets", "levels") == "steps"
    out = {}
    for m, name in enumerate(self.measures):  # no prediction better than identical images
      q = values[:, 3 * m:3 * m + 3]
      out[name] = np.minimum(levels_of(q) if steps else q, oriented(name, MEASURES[name].best))
    return out

  def levels(self, images: Sequence[np.ndarray] | np.ndarray, *, qualities: dict | None = None) -> np.ndarray:
    """Level indices: a quality predictor's per image at its ``price`` (the ``LevelAssigner`` price rule on its first
    measure; ``qualities``: ``predict_quality(images)`` when already computed), a score predictor's at its calibrated
    thresholds."""
    if self.qualities is not None:
      from cat_jax.complexity.assign import LevelAssigner

      if self.price is None:
        raise ValueError("this quality predictor has no calibrated price (python -m cat_jax.train_predictor sets one)")
      assigner = LevelAssigner(qualities=self.predict_quality, measure=self.measures[0], price=self.price)
      table = qualities or self.predict_quality(images)
      return assigner.from_qualities(table, [np.shape(x)[:2] for x in images]).levels
    if self.thresholds is None:
      raise ValueError("this predictor has no calibrated thresholds; map its scores with levels_for_scores(scores, "
                       "(low, high)) or calibrate them (python -m cat_jax.train_predictor does at the end)")
    return complexity_thresholds.levels_for_scores(self.predict(images), self.thresholds)

  def config(self) -> dict[str, Any]:
    return {"image_size": int(self.image_size), "widths": [int(w) for w in self.widths], "hidden": int(self.hidden),
            "thresholds": None if self.thresholds is None else [float(t) for t in self.thresholds],
            "budget_tokens": self.budget_tokens, "teacher": self.teacher, "info": self.info,
            "qualities": self.qualities, "price": self.price}

  @classmethod
  def from_config(cls, config: Mapping[str, Any], params: Any) -> "LevelPredictor":
    th = config.get("thresholds")
    return cls(params=params, image_size=int(config["image_size"]), widths=tuple(config.get("widths", (16, 32, 64))),
               hidden=int(config.get("hidden", 64)), thresholds=None if th is None else tuple(float(t) for t in th),
               budget_tokens=config.get("budget_tokens"), teacher=str(config.get("teacher", "")),
               info=dict(config.get("info") or {}), qualities=config.get("qualities"), price=config.get("price"))

  def save(self, folder: str | os.PathLike) -> None:
    """``predictor.json`` + ``predictor.safetensors`` in ``folder`` (a tokenizer folder keeps them beside its own)."""
    from cat_jax import weights

    folder = pathlib.Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    weights.save_tree(folder / WEIGHTS_FILE, jax.device_get(self.params))
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(self.config(), indent=2, sort_keys=True))
    os.replace(tmp, folder / CONFIG_FILE)

  @classmethod
  def load(cls, folder: str | os.PathLike) -> "LevelPredictor":
    """A folder written by ``save`` (a ``train_predictor`` workdir's ``predictor/``, or a tokenizer folder)."""
    from cat_jax import weights

    folder = pathlib.Path(folder).expanduser()
    if (folder / "predictor" / CONFIG_FILE).is_file():  # a train_predictor workdir
      folder = folder / "predictor"
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
      raise FileNotFoundError(f"{folder} holds no level predictor ({CONFIG_FILE} + {WEIGHTS_FILE}); train one with "
                              "python -m cat_jax.train_predictor")
    config = json.loads((folder / CONFIG_FILE).read_text())
    predictor = cls.from_config(config, jax.tree.map(jnp.asarray, weights.load_tree(folder / WEIGHTS_FILE)))
    expected = jax.eval_shape(predictor.net.init, jax.random.key(0),
                              jnp.zeros((1, predictor.image_size, predictor.image_size, 3)))["params"]
    if jax.tree.structure(expected) != jax.tree.structure(predictor.params) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(predictor.params))):
      raise ValueError(f"{folder / WEIGHTS_FILE} does not match the network {folder / CONFIG_FILE} describes")
    return predictor


class PredictorScorer:
  """The predictor as a complexity scorer (``python -m cat_jax.score --method predictor``). A quality predictor with a
  price gives each image its own level (``assigns_levels``: the tokenizer's knob-free ``levels="auto"``, whatever
  else is scored with it) and records its predicted qualities; its score is what 8x buys over 32x."""

  method = "predictor"

  def __init__(self, predictor: LevelPredictor, *, image_size: int | None = 256):
    self.predictor = predictor
    self.image_size = image_size
    self.assigns_levels = predictor.qualities is not None and predictor.price is not None

  def config(self) -> dict[str, Any]:
    return {"method": self.method, "image_size": self.image_size, "predictor_image_size": self.predictor.image_size,
            "teacher": self.predictor.teacher}

  def score(self, item: dict[str, Any]) -> dict[str, Any]:
    from cat_jax.complexity.scorers import prepare_item

    x = np.asarray(prepare_item(item, self.image_size))  # uint8, converted once by the predictor
    if not self.assigns_levels:
      return {"score": float(self.predictor.predict([x])[0])}
    table = self.predictor.predict_quality([x])
    q = table[self.predictor.measures[0]][0]
    return {"score": float(q[0] - q[2]), "level": int(self.predictor.levels([x], qualities=table)[0]),
            "qualities": {m: [round(float(v), 6) for v in t[0]] for m, t in table.items()}}

  def scores(self, images: Sequence[np.ndarray]) -> list[float]:
    """Batched scores of [-1, 1] HWC images (what ``assign.score_images`` uses)."""
    return self.predictor.predict(images).tolist()
