"""Which level predictor: the tiny CNN (cat_jax.complexity.predictor) against an MLP head on the tokenizer's own
latents and against JPEG bits per pixel, on the same teacher (the embedded data's grade), training and validation
images drawn at 64x64. Prints one JSON object (Spearman and exact level on validation, the majority level's
accuracy, training seconds, CNN images/s). Each network trains with Adam on the standardised teacher score.

  python scripts/predictor_choice.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cat_jax import Tokenizer  # noqa: E402
from cat_jax.complexity.assign import score_images  # noqa: E402
from cat_jax.complexity.predictor import PredictorNet, spearman  # noqa: E402
from cat_jax.complexity.thresholds import mix_thresholds  # noqa: E402
from cat_jax.complexity.scorers import JpegScorer  # noqa: E402
from cat_jax.complexity.thresholds import levels_for_scores  # noqa: E402
from cat_jax.data import EmbeddedSource, PreprocessConfig, preprocess  # noqa: E402


def load(split: str, n: int):
  source = EmbeddedSource(split, num_images=n, image_size=64)
  prep = PreprocessConfig(image_size=64, min_size=1)
  images = np.stack([preprocess(source[i]["image"], prep) for i in range(n)])
  return images, np.array([source.kind(i).grade for i in range(n)], np.float32)


class Head(nn.Module):
  @nn.compact
  def __call__(self, f):
    return nn.Dense(1)(nn.gelu(nn.Dense(64)(f)))[:, 0]


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 1500, lr: float = 2e-3, batch: int = 64):
  mean, std = float(y.mean()), float(y.std())
  params = net.init(jax.random.key(0), x[:2])
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((net.apply(p, xb) - yb) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch)
    params, opt_state, _ = step(params, opt_state, x[idx], (y[idx] - mean) / std)
  apply = jax.jit(net.apply)
  return lambda f: np.asarray(apply(params, f))


def report(pred_train, pred_val, teacher_train_levels, teacher_val, teacher_val_levels) -> dict:
  counts = np.bincount(teacher_train_levels, minlength=3)
  th = mix_thresholds(pred_train, counts)
  return {"spearman": round(spearman(pred_val, teacher_val), 4),
          "exact_level": round(float(np.mean(levels_for_scores(pred_val, th) == teacher_val_levels)), 4)}


def main() -> None:
  xt, gt = load("train", 2000)
  xv, gv = load("validation", 400)
  lt, lv = levels_for_scores(gt, (3, 6)), levels_for_scores(gv, (3, 6))
  out = {"teacher": "embedded grade (levels at 3, 6)", "train_images": len(xt), "validation_images": len(xv),
         "majority_exact_level": round(float(np.mean(lv == np.bincount(lt).argmax())), 4)}

  jpeg = JpegScorer(image_size=64)
  jt = np.array(score_images(jpeg, [str(i) for i in range(len(xt))], xt))
  jv = np.array(score_images(jpeg, [str(i) for i in range(len(xv))], xv))
  out["jpeg"] = report(jt, jv, lt, gv, lv)

  start = time.perf_counter()
  cnn = train(PredictorNet(), xt, gt)
  out["cnn"] = report(cnn(xt), cnn(xv), lt, gv, lv) | {"train_s": round(time.perf_counter() - start, 1)}
  start = time.perf_counter()
  for _ in range(3):
    cnn(xv)
  out["cnn"]["images_per_s"] = round(3 * len(xv) / (time.perf_counter() - start))

  tok = Tokenizer.from_pretrained("demo", batch_size=64)

  def latent_features(x):  # per-channel |z| mean and std of the 8x and 32x posterior means: two encodes
    feats = []
    for level in (0, 2):
      z = np.stack(tok.encode(x, level).values)
      feats += [np.abs(z).mean((1, 2)), z.std((1, 2))]
    return np.concatenate(feats, -1).astype(np.float32)

  ft, fv = latent_features(xt), latent_features(xv)
  mu, sd = ft.mean(0), ft.std(0) + 1e-6
  start = time.perf_counter()
  head = train(Head(), (ft - mu) / sd, gt)
  out["latent_head"] = report(head((ft - mu) / sd), head((fv - mu) / sd), lt, gv, lv) | {
      "train_s": round(time.perf_counter() - start, 1)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
