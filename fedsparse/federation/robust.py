"""Server-side defences against hostile or poisoned sparse updates (``robust.*``).

Three layers, each optional: reject an upload whose delta norm is absurd; clip each device's per-row
delta to a norm bound (norm bounding, Sun et al. 2019); and combine a row's contributors by a
coordinate-wise median or trimmed mean instead of the (weighted) mean (Yin et al. 2018).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsparse.config import RobustConfig
from fedsparse.federation.aggregation import AggregatedRows, aggregate_row_updates
from fedsparse.federation.wire import RowUpdate, scatter_active


def row_delta_norms(update: RowUpdate, item_mask: np.ndarray) -> np.ndarray:
    """L2 norm of each uploaded row's delta, float64 [r] (values are in the rows' mask order)."""
    counts = update.carried_mask(item_mask).sum(axis=1)
    row_of_value = np.repeat(np.arange(counts.size), counts)
    return np.sqrt(np.bincount(row_of_value, weights=np.square(update.values.astype(np.float64)), minlength=counts.size))


def clip_rows(update: RowUpdate, item_mask: np.ndarray, bound: float) -> RowUpdate:
    """The update with every row's delta scaled down to L2 norm ``bound`` (rows within it unchanged)."""
    norms = row_delta_norms(update, item_mask)
    scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
    counts = update.carried_mask(item_mask).sum(axis=1)
    values = (update.values.astype(np.float64) * np.repeat(scale, counts)).astype(np.float32)
    return replace(update, values=values)


def too_large(update: RowUpdate, settings: RobustConfig) -> str | None:
    """Why the upload is rejected for its size (``robust.max-update-norm``: of the row deltas and NeuMF's
    network delta together), or None when it is within bounds."""
    if settings.max_update_norm <= 0:
        return None
    values = update.values if update.network is None else np.concatenate([update.values, update.network.flat()])
    norm = float(np.linalg.norm(values.astype(np.float64)))
    if norm > settings.max_update_norm:
        return f"delta norm {norm:.4g} exceeds robust.max-update-norm = {settings.max_update_norm:g}"
    return None


def robust_aggregate(updates: list[RowUpdate], item_mask: np.ndarray, settings: RobustConfig, mode: str) -> AggregatedRows:
    """Per-row combination of the (clipped) updates: ``fed.aggregation`` ``mode``, or a coordinate-wise median or
    trimmed mean over each row's contributors (unweighted: a robust statistic must not let one device's
    claimed example count decide), scaled by the row's contributors under ``sum`` and by contributors /
    devices under ``client-mean``. Regrowth signals are summed as in the mean."""
    if settings.clip_norm > 0:
        updates = [clip_rows(update, item_mask, settings.clip_norm) for update in updates]
    merged = aggregate_row_updates(updates, item_mask, mode)
    if settings.aggregator == "mean" or not updates:
        return merged
    per_row: list[list[np.ndarray]] = [[] for _ in range(merged.rows.size)]
    for update in updates:
        dense = scatter_active(update.values, update.carried_mask(item_mask))
        for index, row_delta in zip(np.searchsorted(merged.rows, update.row_ids), dense, strict=True):
            per_row[index].append(row_delta)
    deltas = np.stack([_combine(np.stack(deltas), settings) for deltas in per_row])
    # The robust statistic stands for one contributor's delta: scale it as the mode scales a mean.
    if mode == "sum":
        deltas = deltas * merged.contributors[:, None]
    elif mode == "client-mean":
        deltas = deltas * (merged.contributors[:, None] / len(updates))
    return replace(merged, deltas=(deltas * item_mask[merged.rows]).astype(np.float32))


def _combine(deltas: np.ndarray, settings: RobustConfig) -> np.ndarray:
    """Coordinate-wise median or trimmed mean of one row's contributor deltas [c, dim]."""
    if settings.aggregator == "median":
        return np.median(deltas, axis=0)
    cut = int(np.floor(settings.trim_fraction * deltas.shape[0]))
    ordered = np.sort(deltas, axis=0)
    return ordered[cut : deltas.shape[0] - cut].mean(axis=0)
