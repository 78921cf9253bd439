"""Two-sample tests between a reference sample and a current one. Pure numpy, no I/O.

* :func:`mmd_test`: maximum mean discrepancy with a Gaussian (RBF) kernel between two sets
  of vectors (prompt embeddings), the unbiased estimate of MMD², and a permutation p-value.
  The kernel width is the median heuristic over the pooled sample (computed once, so every
  permutation uses the same kernel and the test is exact under exchangeability).
* :func:`ks_test`: the two-sample Kolmogorov-Smirnov statistic between two sets of numbers
  (response lengths) and its asymptotic p-value (Kolmogorov distribution with the Stephens
  small-sample correction, as in Numerical Recipes' ``kstwo``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class TwoSampleResult:
    """A statistic and its p-value (the chance of one at least as large with no drift)."""

    statistic: float
    p_value: float
    n_reference: int
    n_current: int


def _as_matrix(vectors: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {matrix.shape}")
    return matrix


def rbf_kernel(pooled: np.ndarray) -> np.ndarray:
    """The Gaussian kernel matrix of ``pooled`` rows, width from the median heuristic."""
    sq = np.sum(pooled * pooled, axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T, 0.0)
    off_diagonal = dist2[~np.eye(len(pooled), dtype=bool)]
    median = float(np.median(off_diagonal)) if off_diagonal.size else 0.0
    bandwidth2 = median if median > 0 else 1.0  # identical points: any width gives MMD 0
    return np.exp(-dist2 / bandwidth2)


def _unbiased_mmd2(kernel: np.ndarray, members: np.ndarray, n: int, m: int) -> np.ndarray:
    """MMD²_u for each row of ``members`` (0/1 indicators of the reference set)."""
    total = kernel.sum()
    k_members = members @ kernel
    s_xx = np.sum(k_members * members, axis=1)
    s_xy = np.sum(k_members * (1.0 - members), axis=1)
    s_yy = total - s_xx - 2.0 * s_xy
    diag = np.diag(kernel)
    tr_x = members @ diag
    tr_y = diag.sum() - tr_x
    return (s_xx - tr_x) / (n * (n - 1)) + (s_yy - tr_y) / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def mmd_test(
    reference: Sequence[Sequence[float]] | np.ndarray,
    current: Sequence[Sequence[float]] | np.ndarray,
    *,
    permutations: int = 200,
    rng: np.random.Generator | None = None,
) -> TwoSampleResult:
    """Unbiased MMD² (RBF kernel) between the two sets and its permutation p-value
    ``(1 + #{permuted >= observed}) / (1 + permutations)``."""
    x = _as_matrix(reference)
    y = _as_matrix(current)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 vectors on each side, got {n} and {m}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"vector sizes differ: {x.shape[1]} and {y.shape[1]}")
    if permutations < 1:
        raise ValueError("permutations must be at least 1")
    rng = rng if rng is not None else np.random.default_rng(0)
    kernel = rbf_kernel(np.vstack([x, y]))
    observed_members = np.zeros((1, n + m))
    observed_members[0, :n] = 1.0
    observed = float(_unbiased_mmd2(kernel, observed_members, n, m)[0])
    members = np.zeros((permutations, n + m))
    for row in members:
        row[rng.permutation(n + m)[:n]] = 1.0
    permuted = _unbiased_mmd2(kernel, members, n, m)
    exceed = int(np.sum(permuted >= observed - 1e-12))
    return TwoSampleResult(observed, (1 + exceed) / (1 + permutations), n, m)


def kolmogorov_p_value(statistic: float, n: int, m: int) -> float:
    """P(D >= statistic) for two samples of sizes n and m, asymptotic with correction."""
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * statistic
    if lam < 1e-3:
        return 1.0
    total = 0.0
    sign = 1.0
    for k in range(1, 101):
        term = sign * 2.0 * math.exp(-2.0 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-10:
            break
        sign = -sign
    return min(max(total, 0.0), 1.0)


def ks_test(reference: Sequence[float], current: Sequence[float]) -> TwoSampleResult:
    """Two-sample Kolmogorov-Smirnov: the largest gap between the two empirical CDFs."""
    a = np.sort(np.asarray(reference, dtype=np.float64))
    b = np.sort(np.asarray(current, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both samples must be non-empty")
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    statistic = float(np.max(np.abs(cdf_a - cdf_b)))
    return TwoSampleResult(statistic, kolmogorov_p_value(statistic, len(a), len(b)), len(a), len(b))
