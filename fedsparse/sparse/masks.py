"""Element-wise masks over embedding tables with exact budgets, and the shared prune/grow step.

A mask is ``bool [rows, dim]`` holding exactly ``budget(density, rows, dim)`` True entries. Every
selection here is deterministic: ties are broken by the lower row-major (flat) index, never left to
``torch.topk`` (whose choice among equal values is unspecified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def budget(density: float, rows: int, dim: int) -> int:
    """Exact number of active entries K = round(density * rows * dim) (at least one when density > 0)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(rows * dim, max(1, round(density * rows * dim))) if rows * dim else 0


def random_mask(rng: np.random.Generator, rows: int, dim: int, active: int) -> np.ndarray:
    """Uniformly random mask bool [rows, dim] with exactly ``active`` True entries."""
    if not 0 <= active <= rows * dim:
        raise ValueError(f"cannot activate {active} entries of a {rows} x {dim} table")
    mask = np.zeros(rows * dim, dtype=bool)
    mask[rng.choice(rows * dim, size=active, replace=False)] = True
    return mask.reshape(rows, dim)


def smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Sorted flat indices of the ``count`` smallest entries of ``values``; ties go to the lower index.

    O(n) with ``np.partition`` (no full sort): everything strictly below the count-th value, then the
    lowest-index entries equal to it.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    count = min(max(0, int(count)), flat.size)
    if count == 0:
        return np.empty(0, dtype=np.int64)
    threshold = np.partition(flat, count - 1)[count - 1]
    below = np.flatnonzero(flat < threshold)
    ties = np.flatnonzero(flat == threshold)[: count - below.size]
    return np.sort(np.concatenate([below, ties])).astype(np.int64)


def largest(values: np.ndarray, count: int) -> np.ndarray:
    """Sorted flat indices of the ``count`` largest entries of ``values``; ties go to the lower index."""
    return smallest(-np.asarray(values, dtype=np.float64), count)


def cosine_drop_fraction(step: int, end_step: int, initial: float, final: float) -> float:
    """Update fraction rho_t = final + (initial - final) * (1 + cos(pi * step / end_step)) / 2.

    The cosine annealing of RigL (final = 0) and DSL (final = rho_min); 0 at or after ``end_step``.
    """
    if end_step <= 0 or step >= end_step:
        return 0.0
    return final + (initial - final) * (1.0 + math.cos(math.pi * step / end_step)) / 2.0


@dataclass(frozen=True)
class MaskUpdate:
    """The outcome of one prune/grow step: the new mask and the flat indices that changed."""

    mask: np.ndarray
    pruned: np.ndarray  # int64 flat indices switched off
    grown: np.ndarray  # int64 flat indices switched on (their values start at zero unless grown_values is set)
    grown_values: np.ndarray | None = None  # float32 [len(grown)] start values (None = zero)


def smallest_active(magnitude: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """Sorted flat indices of the ``count`` active entries with the smallest |magnitude|."""
    active = np.flatnonzero(mask.ravel())
    return active[smallest(np.abs(np.asarray(magnitude).ravel()[active]), count)]


def prune_and_grow(
    magnitude: np.ndarray,
    mask: np.ndarray,
    grow_score: np.ndarray,
    swap: int,
    regrow_pruned: bool = True,
) -> MaskUpdate:
    """Prune the ``swap`` active entries of smallest magnitude, grow as many inactive ones by score.

    magnitude, grow_score: float [rows, dim]; mask: bool [rows, dim]. The active count is unchanged.
    With ``regrow_pruned`` False, the entries pruned now cannot be grown back in the same step (the
    swap is then capped by the number of entries that were inactive before).
    """
    if magnitude.shape != mask.shape or grow_score.shape != mask.shape:
        raise ValueError(f"shapes differ: magnitude {magnitude.shape}, mask {mask.shape}, score {grow_score.shape}")
    flat_mask = mask.ravel()
    swap = min(int(swap), int(flat_mask.sum()))
    if not regrow_pruned:
        swap = min(swap, flat_mask.size - int(flat_mask.sum()))
    pruned = smallest_active(magnitude, mask, swap)
    new_mask = flat_mask.copy()
    new_mask[pruned] = False
    candidates = np.flatnonzero(~new_mask if regrow_pruned else ~flat_mask)
    grown = candidates[largest(np.asarray(grow_score).ravel()[candidates], pruned.size)]
    new_mask[grown] = True
    return MaskUpdate(new_mask.reshape(mask.shape), pruned, grown)


def prune_and_grow_within_rows(
    magnitude: np.ndarray,
    mask: np.ndarray,
    grow_score: np.ndarray,
    fraction: float,
    regrow_pruned: bool = True,
) -> MaskUpdate:
    """Per row, prune the ceil(fraction * active_r) active entries of smallest magnitude and grow as many
    of that row's inactive entries by score: every row keeps its count (a per-row quota holds for good).

    magnitude, grow_score: float [rows, dim]; mask: bool [rows, dim]. Ties go to the lower column. With
    ``regrow_pruned`` False, a row's swap is capped by its entries that were inactive before.
    """
    if magnitude.shape != mask.shape or grow_score.shape != mask.shape:
        raise ValueError(f"shapes differ: magnitude {magnitude.shape}, mask {mask.shape}, score {grow_score.shape}")
    rows, dim = mask.shape
    active = mask.sum(axis=1)
    swap = np.ceil(fraction * active).astype(np.int64)
    if not regrow_pruned:
        swap = np.minimum(swap, dim - active)
    chosen = np.arange(dim)[None, :] < swap[:, None]  # the first swap_r places of each row's order
    row_of = np.repeat(np.arange(rows), swap)
    prune_order = np.argsort(np.where(mask, np.abs(magnitude), np.inf), axis=1, kind="stable")
    pruned_cols = prune_order[chosen]
    new_mask = mask.copy()
    new_mask[row_of, pruned_cols] = False
    candidates = ~new_mask if regrow_pruned else ~mask
    grow_order = np.argsort(-np.where(candidates, np.asarray(grow_score, dtype=np.float64), -np.inf), axis=1, kind="stable")
    grown_cols = grow_order[chosen]
    new_mask[row_of, grown_cols] = True
    return MaskUpdate(new_mask, np.sort(row_of * dim + pruned_cols), np.sort(row_of * dim + grown_cols))
