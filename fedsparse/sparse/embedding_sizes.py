"""Embedding sizes per row (prefix-of-dimensions masks) that meet a memory budget exactly.

A size method keeps row r's leading s_r dimensions: M[r, j] = 1[j < s_r], so the table holds
K = sum_r s_r active entries (docs/methods.md#embedding-sizes). Every allocation here ends in ``fit_sizes``, which returns
integers in [min_size, dim] summing to exactly K: the budget holds by construction, whatever the scores.
"""

from __future__ import annotations

import numpy as np

BISECTION_STEPS = 200  # halvings of the scale/exponent interval; below float64 resolution well before that
RAW_FLOOR = 1e-12  # smallest relative score ``fit_sizes`` works with
POWER_LAW_BOUND = 50.0  # |exponent| searched by ``power_law_exponent``; beyond it P(s) is a point mass


def prefix_mask(sizes: np.ndarray, dim: int) -> np.ndarray:
    """bool [rows, dim] with row r active on its first ``sizes[r]`` columns."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes.size and (sizes.min() < 0 or sizes.max() > dim)):
        raise ValueError(f"sizes must be a 1-D array of integers in [0, {dim}]")
    return np.arange(dim)[None, :] < sizes[:, None]


def prefix_sizes(mask: np.ndarray) -> np.ndarray:
    """int64 [rows] sizes of a prefix-form mask; ValueError naming the first row that is not a prefix."""
    mask = np.asarray(mask, dtype=bool)
    sizes = mask.sum(axis=1).astype(np.int64)
    bad = np.flatnonzero((prefix_mask(sizes, mask.shape[1]) != mask).any(axis=1))
    if bad.size:
        raise ValueError(f"row {int(bad[0])} of the mask is not a prefix of its dimensions")
    return sizes


def width_mask(mask: np.ndarray, width: int) -> np.ndarray:
    """``mask`` bool [rows, dim] with every column from ``width`` on cleared: the entries a device holding
    only the leading ``width`` dimensions has."""
    return mask if width >= mask.shape[1] else mask & (np.arange(mask.shape[1]) < width)


def fit_sizes(raw: np.ndarray, total: int, dim: int, min_size: int = 1) -> np.ndarray:
    """Integer sizes in [min_size, dim] proportional to ``raw`` (float >= 0, [rows]) summing to exactly ``total``.

    Water-filling: find the scale c with sum clip(c * raw, min_size, dim) = total by bisection, floor,
    then hand the remaining units to the rows with the largest remainders (lower row first on ties).
    Raises ValueError when no allocation exists (total outside [rows * min_size, rows * dim]).
    """
    raw = np.asarray(raw, dtype=np.float64)
    rows = raw.size
    if raw.ndim != 1 or not np.all(np.isfinite(raw)) or (rows and raw.min() < 0):
        raise ValueError("raw sizes must be a 1-D array of finite values >= 0")
    if not 0 <= min_size <= dim:
        raise ValueError(f"min_size must be in [0, {dim}], got {min_size}")
    if not rows * min_size <= total <= rows * dim:
        raise ValueError(f"a budget of {total} entries cannot give {rows} rows sizes in [{min_size}, {dim}]")
    if rows == 0:
        return np.zeros(0, dtype=np.int64)
    # Scores relative to the largest, floored at RAW_FLOOR: zero-score rows still take units once every
    # other row is full, and the bisection interval [0, dim / RAW_FLOOR] stays finite.
    raw = np.maximum(raw / raw.max(), RAW_FLOOR) if raw.max() > 0 else np.ones(rows)

    def filled(scale: float) -> np.ndarray:
        return np.clip(scale * raw, min_size, dim)

    low, high = 0.0, dim / RAW_FLOOR  # filled(high) = dim everywhere
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if filled(middle).sum() < total else (low, middle)
    continuous = filled(high)
    sizes = np.floor(continuous).astype(np.int64)
    missing = int(total - sizes.sum())
    if missing > 0:  # largest remainders first among rows with room
        room = np.flatnonzero(sizes < dim)
        order = room[np.lexsort((room, -(continuous[room] - sizes[room])))]
        sizes[order[:missing]] += 1
    elif missing < 0:  # float rounding overshoot: smallest remainders first among rows above the floor
        spare = np.flatnonzero(sizes > min_size)
        order = spare[np.lexsort((spare, continuous[spare] - sizes[spare]))]
        sizes[order[:-missing]] -= 1
    return sizes


def frequency_sizes(popularity: np.ndarray, total: int, dim: int, exponent: float, min_size: int = 1) -> np.ndarray:
    """Sizes ∝ (popularity + 1) ** exponent meeting ``total`` exactly: popular rows get more dimensions."""
    return fit_sizes((np.asarray(popularity, dtype=np.float64) + 1.0) ** exponent, total, dim, min_size)


def power_law_probabilities(exponent: float, dim: int, min_size: int = 1) -> np.ndarray:
    """P(s) ∝ s ** -exponent over sizes s = min_size..dim, float64 [dim - min_size + 1]."""
    support = np.arange(max(1, min_size), dim + 1, dtype=np.float64)
    logits = -exponent * np.log(support)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def power_law_exponent(mean_size: float, dim: int, min_size: int = 1) -> float:
    """The exponent a whose P(s) ∝ s^-a on [min_size, dim] has expectation ``mean_size`` (bisection;
    the mean falls as a grows, so a < 0 puts the mass on large sizes)."""
    low_support = max(1, min_size)
    if not low_support <= mean_size <= dim:
        raise ValueError(f"a mean size of {mean_size} is outside [{low_support}, {dim}]")
    support = np.arange(low_support, dim + 1, dtype=np.float64)
    low, high = -POWER_LAW_BOUND, POWER_LAW_BOUND
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        mean = float(support @ power_law_probabilities(middle, dim, min_size))
        low, high = (middle, high) if mean > mean_size else (low, middle)
    return (low + high) / 2


def sampled_sizes(
    rng: np.random.Generator, popularity: np.ndarray, total: int, dim: int, min_size: int = 1
) -> np.ndarray:
    """SCALL-style sizes: drawn from the power law whose mean is total / rows, ranked so that more popular
    rows take the larger draws, then repaired to sum to exactly ``total`` (``fit_sizes`` on the draws)."""
    popularity = np.asarray(popularity, dtype=np.float64)
    rows = popularity.size
    if rows == 0:
        return np.zeros(0, dtype=np.int64)
    low_support = max(1, min_size)
    exponent = power_law_exponent(min(max(total / rows, low_support), dim), dim, min_size)
    probabilities = power_law_probabilities(exponent, dim, min_size)
    draws = np.sort(rng.choice(np.arange(low_support, dim + 1), size=rows, p=probabilities))
    ranked = np.empty(rows, dtype=np.float64)
    ranked[np.lexsort((np.arange(rows), popularity))] = draws  # least popular row gets the smallest draw
    return fit_sizes(ranked, total, dim, min_size)


def popularity_groups(popularity: np.ndarray, groups: int) -> np.ndarray:
    """int64 [rows] group of each row: equal-count popularity quantiles, 0 = the most popular."""
    popularity = np.asarray(popularity, dtype=np.float64)
    order = np.lexsort((np.arange(popularity.size), -popularity))
    group_of = np.empty(popularity.size, dtype=np.int64)
    group_of[order] = np.arange(popularity.size) * groups // max(1, popularity.size)
    return group_of


def grown_sizes(sizes: np.ndarray, raw_new: np.ndarray, total: int, dim: int, min_size: int = 1) -> np.ndarray:
    """Sizes after new rows join a table whose budget stays ``total``: the old rows keep their relative
    sizes, the new rows enter with ``raw_new``, and everything is refitted to exactly ``total`` (old rows
    shrink when the table outgrows the budget, as a streaming recommender under a fixed memory cap must)."""
    raw = np.concatenate([np.asarray(sizes, dtype=np.float64), np.asarray(raw_new, dtype=np.float64)])
    return fit_sizes(raw, total, dim, min_size)
