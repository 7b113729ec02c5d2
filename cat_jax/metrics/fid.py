"""Streaming FID statistics and the Fréchet distance, in float64.

Features are never kept: ``FidStatistics`` holds the count, the sum and the sum of outer products of
the features seen so far (float64, on the host), so 50k images cost one 2048x2048 matrix. States from
different batches, levels or hosts combine with ``merge``.

``frechet_distance`` equals ``pytorch_fid.fid_score.calculate_frechet_distance`` on the same
statistics, but takes the trace of the matrix square root from symmetric eigendecompositions
(tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))), which is real and finite also for the singular
covariances of small image sets, where pytorch-fid falls back to adding ``eps`` to the diagonals.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np


@dataclasses.dataclass
class FidStatistics:
  """Running count, sum and sum of outer products (float64) of feature vectors.

  The covariance is the unbiased one (``np.cov``'s), as pytorch-fid computes it.
  """
  count: int
  total: np.ndarray  # (D,) float64
  outer: np.ndarray  # (D, D) float64

  @classmethod
  def zeros(cls, dim: int = 2048) -> "FidStatistics":
    return cls(0, np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64))

  @classmethod
  def from_features(cls, features: Any) -> "FidStatistics":
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
      raise ValueError(f"features must be (N, D), got shape {f.shape}")
    return cls(f.shape[0], f.sum(axis=0), f.T @ f)

  @property
  def dim(self) -> int:
    return self.total.shape[0]

  def update(self, features: Any) -> "FidStatistics":
    """Adds a batch of (N, D) features in place; returns self."""
    other = FidStatistics.from_features(features)
    self._check_dim(other)
    self.count += other.count
    self.total += other.total
    self.outer += other.outer
    return self

  def merge(self, other: "FidStatistics") -> "FidStatistics":
    """The statistics of both sets of features together (a new object)."""
    self._check_dim(other)
    return FidStatistics(self.count + other.count, self.total + other.total,
                         self.outer + other.outer)

  def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as ``np.mean(f, 0)`` and ``np.cov(f, rowvar=False)`` would give."""
    if self.count < 2:
      raise ValueError(f"FID statistics need at least 2 feature vectors, have {self.count}")
    mu = self.total / self.count
    sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, (sigma + sigma.T) / 2

  def _check_dim(self, other: "FidStatistics") -> None:
    if other.dim != self.dim:
      raise ValueError(f"feature dims differ: {self.dim} vs {other.dim}")


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (rounding noise clipped)."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, roots: dict | None = None) -> float:
  """tr(sqrtm(sigma1 @ sigma2)) for symmetric PSD matrices, in float64.

  ``roots``: a dict the caller keeps across calls that share ``sigma1`` (the real images' covariance when several
  models or rows are compared against the same set); sigma1's square root is cached there by a digest of its bytes.
  """
  sigma1 = np.ascontiguousarray(sigma1, np.float64)
  if roots is None:
    root1 = _sqrt_psd(sigma1)
  else:
    key = hashlib.sha256(sigma1.tobytes()).hexdigest()
    if key not in roots:
      roots[key] = _sqrt_psd(sigma1)
    root1 = roots[key]
  inner = root1 @ np.asarray(sigma2, np.float64) @ root1
  eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, roots: dict | None = None) -> float:
  """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)), in float64 (``roots``: see
  ``trace_sqrt_product``)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError("the two distributions have statistics of different shapes: "
                     f"{mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2, roots))


def fid_from_statistics(a: FidStatistics, b: FidStatistics, roots: dict | None = None) -> float:
  """FID between the feature sets summarised by ``a`` (the reference: its covariance root is cached in ``roots``,
  a dict kept by the caller, when given) and ``b``."""
  return frechet_distance(*a.mean_and_covariance(), *b.mean_and_covariance(), roots)


