"""Rate-distortion level choice: each image's level from what more tokens buy it.

Input: a quality table ``quality`` (N, 3), image i's quality at level 0 / 1 / 2 (8x / 16x / 32x) in a measure where
higher is better (PSNR in dB, HaarPSI, ...; a distortion such as GMSD is negated first), and ``tokens`` (N, 3), the
tokens each level costs that image at its own size (``image_tokens``). Three ways to choose, all exact given the
table:

  best_within_budget(quality, tokens, budget)   the highest mean quality whose mean tokens are <= budget (a
                                                multiple-choice knapsack, solved by dynamic programming);
  fewest_tokens_for(quality, tokens, target)    the fewest mean tokens whose mean quality is >= target (the same
                                                programme read the other way);
  at_price(quality, cost, price)                per image, argmax_l quality[l] - price * cost[l]: a level is worth
                                                its extra tokens when it buys more than ``price`` quality per token.
                                                Independent of the other images, so one image gets the same level
                                                alone, in a batch or in a folder. With ``cost = rate_table(N)``
                                                (tokens per 256x256 pixels: 1024 / 256 / 64) one price serves every
                                                image size: 8x must buy 768 * price over 16x, 16x 192 * price over
                                                32x.

The knapsack's levels depend on the whole set (they are the ceiling any per-image rule can reach at that budget);
``at_price`` is the per-image rule the tokenizer's knob-free ``levels="auto"`` uses, with qualities predicted by its
level predictor and a price saved with it (``calibrate_price``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cat_jax import levels as L

# The dynamic programme keeps one choice byte per (image, total tokens in units of their gcd); above this many the
# table would not fit comfortably in memory and ``best_within_budget`` refuses with a message.
MAX_TABLE_CELLS = 1 << 30


def image_tokens(image_hw: tuple[int, int]) -> np.ndarray:
  """(3,) tokens of an image of any size at each level: the latent grid of the image padded to a multiple of 32
  (what ``Tokenizer.encode`` stores)."""
  h, w = (int(math.ceil(s / L.MAX_FACTOR)) * L.MAX_FACTOR for s in image_hw)
  return np.array([L.num_tokens((h, w), lvl) for lvl in range(L.NUM_LEVELS)], np.int64)


def tokens_table(image_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
  """(N, 3) tokens of each image at each level."""
  return np.stack([image_tokens(hw) for hw in image_sizes]) if len(image_sizes) else np.zeros((0, 3), np.int64)


def _check(quality: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  quality = np.asarray(quality, np.float64)
  tokens = np.asarray(tokens, np.int64)
  if quality.ndim != 2 or quality.shape[1] != L.NUM_LEVELS or tokens.shape != quality.shape:
    raise ValueError(f"expected quality and tokens of shape (N, {L.NUM_LEVELS}), got {quality.shape} and "
                     f"{tokens.shape}")
  if len(quality) == 0:
    raise ValueError("no images to choose levels for")
  if not np.all(np.isfinite(quality)):
    raise ValueError("the quality table has NaN or infinite entries (cap PSNR, e.g. reported_psnr's 50 dB)")
  if np.any(tokens <= 0):
    raise ValueError("every level must cost at least one token")
  return quality, tokens


def _knapsack(quality: np.ndarray, tokens: np.ndarray, capacity: int | None):
  """Best total quality for every total token count t <= capacity (in units of the tokens' gcd), and the choices to
  rebuild it: ``best[t]`` (-inf where t cannot be reached exactly) and ``choice[i, t]`` (image i's level in the best
  selection of images 0..i summing to t)."""
  unit = int(np.gcd.reduce(tokens.reshape(-1)))
  cost = tokens // unit
  top = int(cost.max(axis=1).sum()) if capacity is None else min(int(capacity // unit), int(cost.max(axis=1).sum()))
  n = len(quality)
  if n * (top + 1) > MAX_TABLE_CELLS:
    raise ValueError(f"an exact choice over {n} images with {top + 1} token counts is too large to solve here; "
                     "choose over smaller groups (e.g. per image size) or use at_price")
  best = np.full(top + 1, -np.inf)
  best[0] = 0.0
  choice = np.zeros((n, top + 1), np.int8)
  for i in range(n):
    new = np.full(top + 1, -np.inf)
    for lvl in range(L.NUM_LEVELS):
      c = int(cost[i, lvl])
      if c > top:
        continue
      cand = np.full(top + 1, -np.inf)
      cand[c:] = best[:top + 1 - c] + quality[i, lvl]
      # Ties keep the level tried first; levels are tried 32x first, so a tie goes to the fewer tokens.
      better = cand > new
      new = np.where(better, cand, new)
      choice[i] = np.where(better, lvl, choice[i])
    best = new
  return best, choice, cost, unit


def _rebuild(choice: np.ndarray, cost: np.ndarray, t: int) -> np.ndarray:
  levels = np.zeros(len(choice), np.int32)
  for i in range(len(choice) - 1, -1, -1):
    levels[i] = choice[i, t]
    t -= int(cost[i, levels[i]])
  return levels


def _levels_coarse_first(quality: np.ndarray, tokens: np.ndarray):
  """The table with levels reversed (32x first), so the programme's ties favour fewer tokens."""
  return quality[:, ::-1], tokens[:, ::-1]


def best_within_budget(quality, tokens, budget_tokens: float) -> np.ndarray:
  """(N,) int32 levels with the highest mean quality whose mean tokens per image are at most ``budget_tokens``
  (exact; among equal qualities the fewest tokens). Raises ValueError when even 32x for all exceeds the budget."""
  quality, tokens = _check(quality, tokens)
  n = len(quality)
  floor = float(tokens.min(axis=1).mean())
  if budget_tokens < floor - 1e-9:
    raise ValueError(f"a budget of {budget_tokens:g} mean tokens is below {floor:g}, these images' tokens at 32x")
  q, t = _levels_coarse_first(quality, tokens)
  capacity = int(math.floor(budget_tokens * n + 1e-6))
  best, choice, cost, _ = _knapsack(q, t, capacity)
  total = int(np.argmax(best))  # the first maximum: the fewest tokens among the best
  return (L.NUM_LEVELS - 1 - _rebuild(choice, cost, total)).astype(np.int32)


def fewest_tokens_for(quality, tokens, target_quality: float) -> np.ndarray:
  """(N,) int32 levels with the fewest mean tokens whose mean quality is at least ``target_quality`` (exact; among
  equal token counts the best quality). When no choice reaches it, every image at its best level."""
  quality, tokens = _check(quality, tokens)
  n = len(quality)
  q, t = _levels_coarse_first(quality, tokens)
  best, choice, cost, _ = _knapsack(q, t, None)
  # A relative slack of 1e-12 so a target equal to a reachable mean (summed in another order) counts as reached.
  reached = np.flatnonzero(best >= target_quality * n - 1e-12 * max(1.0, abs(target_quality) * n))
  if reached.size == 0:
    return np.argmax(quality, axis=1).astype(np.int32)
  return (L.NUM_LEVELS - 1 - _rebuild(choice, cost, int(reached[0]))).astype(np.int32)


def at_price(quality, cost, price: float) -> np.ndarray:
  """(N,) int32: per image, the level maximising ``quality - price * cost``; ties go to the lower cost. ``cost``:
  tokens (the Lagrangian of a token budget over images of one size) or ``rate_table`` (tokens per 256x256 pixels:
  the same price for an image of any size)."""
  quality, cost = _check(quality, cost)
  net = quality - float(price) * cost
  order = np.argsort(cost, axis=1, kind="stable")  # cheapest first, so argmax's ties pick it
  picked = np.argmax(np.take_along_axis(net, order, axis=1), axis=1)
  return np.take_along_axis(order, picked[:, None], axis=1)[:, 0].astype(np.int32)


def rate_table(n: int) -> np.ndarray:
  """(n, 3) tokens per 256x256 pixels at each level (1024 / 256 / 64), whatever the image size: the rate a price
  for images of any size is paid in."""
  return np.tile(image_tokens((256, 256)), (n, 1))


def calibrate_price(quality, cost, budget_tokens: float, tokens=None) -> float:
  """The lowest price at which ``at_price(quality, cost, price)`` spends at most ``budget_tokens`` mean ``tokens``
  (default: ``cost``) on these images. Exact: the choice only changes at prices where two of an image's net
  qualities tie, so those prices are the candidates."""
  quality, cost = _check(quality, cost)
  tokens = cost if tokens is None else _check(quality, tokens)[1]
  breaks = [0.0]
  for a in range(L.NUM_LEVELS):
    for b in range(a + 1, L.NUM_LEVELS):
      d = cost[:, b] - cost[:, a]
      ok = d != 0
      breaks += ((quality[ok, b] - quality[ok, a]) / d[ok]).tolist()
  candidates = np.unique(np.maximum(np.asarray(breaks), 0.0))
  for price in candidates:  # mean tokens fall as the price rises: the first that fits
    if mean_of(tokens, at_price(quality, cost, price)) <= budget_tokens + 1e-9:
      return float(price)
  raise ValueError(f"no price brings these images to {budget_tokens:g} mean tokens (their 32x mean is "
                   f"{tokens.min(axis=1).mean():g})")


def mean_of(table: np.ndarray, levels: np.ndarray) -> float:
  """The mean over images of ``table[i, levels[i]]`` (a quality or tokens table)."""
  return float(np.take_along_axis(np.asarray(table), np.asarray(levels)[:, None], axis=1).mean())


def compare(tables: dict[str, np.ndarray], tokens: np.ndarray, choices: dict[str, np.ndarray], *,
            reference: str = "fixed_16x", bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
  """Every level choice (``choices``: name -> (N,) levels) judged in every measure (``tables``: name -> (N, 3), higher
  is better) against ``reference`` on the same images: mean tokens, the share of images at each level, and per
  measure the mean quality and the paired difference to the reference with a 95% bootstrap interval over images."""
  n = len(tokens)
  draws = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n)) if bootstrap else None
  ref = np.asarray(choices[reference])
  out = {}
  for name, levels in choices.items():
    levels = np.asarray(levels)
    entry = {"mean_tokens": mean_of(tokens, levels),
             "level_share": (np.bincount(levels, minlength=L.NUM_LEVELS) / n).round(4).tolist()}
    for m, q in tables.items():
      diff = np.take_along_axis(q, levels[:, None], 1)[:, 0] - np.take_along_axis(q, ref[:, None], 1)[:, 0]
      entry[m] = mean_of(q, levels)
      entry[f"{m}_minus_{reference}"] = float(diff.mean())
      if draws is not None:
        entry[f"{m}_minus_{reference}_ci"] = np.quantile(diff[draws].mean(1), [0.025, 0.975]).tolist()
    out[name] = entry
  return out


def tokens_to_match(choose, quality: np.ndarray, tokens: np.ndarray, target: float, *, steps: int = 64) -> float | None:
  """The fewest mean tokens at which a choice made at a budget (``choose(budget) -> levels``, e.g. from predicted
  qualities or a complexity score) reaches ``target`` mean ``quality`` (true qualities), searched over ``steps``
  budgets from the 32x to the 8x mean tokens; None when none does."""
  low, high = float(tokens[:, 2].mean()), float(tokens[:, 0].mean())
  for budget in np.linspace(low, high, steps):
    levels = choose(budget)
    if mean_of(quality, levels) >= target - 1e-9:
      return mean_of(tokens, levels)
  return None
