"""Percentile-bootstrap intervals (the mean of one sample; the ratio of means of paired samples, dense and
sparse values of the same prompts resampled together) and Spearman rank correlation: the one implementation,
used by component circuits (`curves`) and the comparison stage."""

from __future__ import annotations

import numpy as np


def bootstrap_mean(values: np.ndarray, samples: int, confidence: float, rng: np.random.Generator
                   ) -> tuple[float, float, float]:
    """(mean, CI low, CI high): percentile bootstrap of the mean over `values` resampled with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(1)
    alpha = (1 - confidence) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_ratio(dense: np.ndarray, sparse: np.ndarray, samples: int, confidence: float,
                    rng: np.random.Generator) -> tuple[float, float, float]:
    """(mean(dense) / mean(sparse), CI low, CI high) over paired values, pairs resampled together.
    NaN where the sparse mean is 0 (the ratio does not exist)."""
    dense, sparse = np.asarray(dense, dtype=np.float64), np.asarray(sparse, dtype=np.float64)
    if len(dense) == 0:
        return np.nan, np.nan, np.nan
    index = rng.integers(0, len(dense), size=(samples, len(dense)))
    with np.errstate(divide="ignore", invalid="ignore"):
        point = dense.mean() / sparse.mean() if sparse.mean() != 0 else np.nan
        ratios = dense[index].mean(1) / sparse[index].mean(1)
    ratios = ratios[np.isfinite(ratios)]
    if not np.isfinite(point) or len(ratios) == 0:
        return float(point), np.nan, np.nan
    alpha = (1 - confidence) / 2
    return float(point), float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of paired values (ties averaged); NaN if fewer than 2 or either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"spearman needs paired values, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return np.nan
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    norm = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else np.nan
