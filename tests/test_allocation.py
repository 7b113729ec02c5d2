"""The rate-distortion level choice (complexity/allocation.py) against brute force over every assignment."""

import itertools

import numpy as np
import pytest

from cat_jax.complexity import allocation


def _small_set(seed, n=7):
  """Qualities rising with tokens at image-specific rates, at mixed image sizes (so token costs differ per image)."""
  rng = np.random.default_rng(seed)
  sizes = [(64, 64), (96, 160), (64, 128), (256, 256), (40, 33)]
  hw = [sizes[k] for k in rng.integers(0, len(sizes), n)]
  tokens = allocation.tokens_table(hw)
  base = rng.uniform(20, 35, n)
  slope = rng.uniform(0.0, 4.0, n)  # dB per doubling of tokens
  quality = base[:, None] + slope[:, None] * np.log2(tokens / tokens[:, 2:3]) + rng.normal(0, 0.3, (n, 3))
  return quality, tokens


def _every_assignment(quality, tokens):
  """The mean quality and mean tokens of every one of the 3^N assignments of levels."""
  combos = np.array(list(itertools.product(range(3), repeat=len(quality))), np.int32)
  rows = np.arange(len(quality))
  return quality[rows, combos].mean(1), tokens[rows, combos].mean(1)


@pytest.mark.parametrize("seed", range(6))
def test_best_within_budget_equals_brute_force(seed):
  quality, tokens = _small_set(seed)
  q, t = _every_assignment(quality, tokens)
  for budget in (t.min(), np.median(t), tokens[:, 1].mean(), t.max()):
    levels = allocation.best_within_budget(quality, tokens, budget)
    assert allocation.mean_of(tokens, levels) <= budget + 1e-9
    best = q[t <= budget + 1e-9].max()
    assert allocation.mean_of(quality, levels) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_fewest_tokens_for_equals_brute_force(seed):
  quality, tokens = _small_set(seed)
  q, t = _every_assignment(quality, tokens)
  for target in (q.min(), quality[:, 1].mean(), np.quantile(q, 0.9), q.max()):
    levels = allocation.fewest_tokens_for(quality, tokens, target)
    assert allocation.mean_of(quality, levels) >= target - 1e-9
    assert allocation.mean_of(tokens, levels) == pytest.approx(t[q >= target - 1e-9].min())


def test_unreachable_quality_gives_every_image_its_best_level_and_low_budget_is_refused():
  quality, tokens = _small_set(0)
  levels = allocation.fewest_tokens_for(quality, tokens, quality.max(1).mean() + 1.0)
  np.testing.assert_array_equal(levels, quality.argmax(1))
  with pytest.raises(ValueError, match="below"):
    allocation.best_within_budget(quality, tokens, tokens[:, 2].mean() - 1)


def test_at_price_is_per_image_and_calibrate_price_meets_the_budget():
  quality, tokens = _small_set(1, n=40)
  levels = allocation.at_price(quality, tokens, 0.05)
  alone = np.concatenate([allocation.at_price(quality[i:i + 1], tokens[i:i + 1], 0.05) for i in range(40)])
  np.testing.assert_array_equal(levels, alone)
  # Price 0: the best quality; an enormous price: the fewest tokens.
  np.testing.assert_array_equal(allocation.at_price(quality, tokens, 0.0), quality.argmax(1))
  np.testing.assert_array_equal(allocation.at_price(quality, tokens, 1e6), np.full(40, 2))
  budget = tokens[:, 1].mean()
  price = allocation.calibrate_price(quality, tokens, budget)
  chosen = allocation.at_price(quality, tokens, price)
  spent = allocation.mean_of(tokens, chosen)
  assert spent <= budget + 1e-9
  # The price is the lowest that fits: a little less overspends.
  assert price == 0.0 or allocation.mean_of(tokens, allocation.at_price(quality, tokens, price * (1 - 1e-6))) > budget
  # The price rule is the knapsack's Lagrangian: at its own mean tokens nothing beats it (exact on the hull).
  exact = allocation.best_within_budget(quality, tokens, spent)
  assert allocation.mean_of(quality, exact) == pytest.approx(allocation.mean_of(quality, chosen), abs=1e-9)
  # Priced by rate (tokens per 256x256 pixels) one price serves every size: a 64x64 and a 512x512 image pay the
  # same per pixel, and the rate table is their tokens scaled by their pixels.
  rate = allocation.rate_table(2)
  sizes = [(64, 64), (512, 512)]
  np.testing.assert_allclose(allocation.tokens_table(sizes) * 65536 / np.array([[64 * 64], [512 * 512]]), rate)
  np.testing.assert_array_equal(rate[0], [1024, 256, 64])


def test_ties_go_to_fewer_tokens_and_bad_tables_are_refused():
  tokens = allocation.tokens_table([(64, 64)] * 3)
  flat = np.full((3, 3), 40.0)
  np.testing.assert_array_equal(allocation.best_within_budget(flat, tokens, 64), [2, 2, 2])
  np.testing.assert_array_equal(allocation.at_price(flat, tokens, 0.0), [2, 2, 2])
  with pytest.raises(ValueError, match="NaN"):
    allocation.at_price(np.full((3, 3), np.nan), tokens, 1.0)
  with pytest.raises(ValueError, match="shape"):
    allocation.at_price(flat[:, :2], tokens, 1.0)
  np.testing.assert_array_equal(allocation.image_tokens((600, 400)), [76 * 52, 38 * 26, 19 * 13])
