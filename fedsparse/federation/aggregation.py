"""Per-row merge of sparse item updates (``fed.aggregation``).

- ``weighted`` / ``uniform``: each row is averaged over the devices that touched it (weighted by
  examples, or one vote each). A sparse upload says exactly who touched which row, so a rarely touched
  row is not shrunk towards zero as plain FedAvg would.
- ``sum``: each row gets the sum of its contributors' deltas, FedMF's rule (the server subtracts every
  device's item gradient): a round with every device equals one pass of full-batch SGD.
- ``client-mean``: the sum divided by the number of devices in the round, an untouched row counting
  as a zero delta: FedAvg of whole tables with equal weights, as PFedRec's server does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsparse.federation.wire import RowUpdate, SecureUpload, scatter_active


@dataclass(frozen=True)
class AggregatedRows:
    """The merged update: rows int64 [r] (sorted), mean deltas float32 [r, dim] (zero off-mask),
    contributors int64 [r] (devices per row), and the summed regrowth signal (dense [r, dim], zero
    where no device reported)."""

    rows: np.ndarray
    deltas: np.ndarray
    contributors: np.ndarray
    signal: np.ndarray


def aggregate_row_updates(updates: list[RowUpdate], item_mask: np.ndarray, mode: str = "weighted") -> AggregatedRows:
    """Per-entry merge of the updates' deltas under ``mode`` (see the module docstring).

    The means run over the devices that hold an entry: all of a row's contributors (``weighted``,
    ``uniform``) or all of the round's devices (``client-mean``), unless devices of smaller widths
    (``RowUpdate.width``) hold only a row's leading dimensions (prefix-aligned aggregation).
    ``item_mask`` bool [n_items, dim] is the mask the updates were encoded against.
    """
    dim = item_mask.shape[1]
    if not updates:
        empty = np.empty((0, dim), dtype=np.float32)
        return AggregatedRows(np.empty(0, dtype=np.int64), empty, np.empty(0, dtype=np.int64), empty)
    rows = np.unique(np.concatenate([update.row_ids for update in updates])).astype(np.int64)
    sums = np.zeros((rows.size, dim), dtype=np.float64)
    weights = np.zeros((rows.size, dim), dtype=np.float64)
    contributors = np.zeros(rows.size, dtype=np.int64)
    signal = np.zeros((rows.size, dim), dtype=np.float64)
    columns = np.arange(dim)
    holders = np.zeros(dim, dtype=np.float64)  # devices of the round holding each column
    for update in updates:
        index = np.searchsorted(rows, update.row_ids)
        weight = update.weight if mode == "weighted" else 1.0
        sums[index] += weight * scatter_active(update.values, update.carried_mask(item_mask))
        weights[index] += weight * (columns < (update.width or dim))
        holders += columns < (update.width or dim)
        contributors[index] += 1
        if update.signal_rows is not None and update.signal_cols is not None and update.signal_values is not None:
            signal_index = np.searchsorted(rows, update.signal_rows)
            np.add.at(signal, (signal_index[:, None], update.signal_cols.astype(np.int64)), update.signal_values)
    if mode == "sum":
        weights = (weights > 0).astype(np.float64)
    elif mode == "client-mean":
        weights = np.where(weights > 0, holders[None, :], 0.0)
    deltas = np.divide(sums, weights, out=np.zeros_like(sums), where=weights > 0).astype(np.float32)
    return AggregatedRows(rows, deltas, contributors, signal.astype(np.float32))


def needs_row_weights(mode: str) -> bool:
    """Whether the ``fed.aggregation`` rule divides each row by its contributors' summed weight, so that a
    secure upload must carry ``secure-weights`` (the per-row means do; ``sum`` and ``client-mean`` do not)."""
    return mode not in ("sum", "client-mean")


def sum_secure_uploads(uploads: list[SecureUpload]) -> SecureUpload:
    """The element-wise sum of the devices' secure uploads: all that secure aggregation reveals."""
    values = np.sum([upload.values for upload in uploads], axis=0, dtype=np.float64)
    row_weights = [upload.weights for upload in uploads if upload.weights is not None]
    if row_weights and len(row_weights) != len(uploads):
        raise ValueError("secure uploads of one round must all carry row weights or none")
    weights = np.asarray(np.sum(row_weights, axis=0, dtype=np.float64), dtype=np.float32) if row_weights else None
    signals = [upload.signal for upload in uploads if upload.signal is not None]
    signal = np.asarray(np.sum(signals, axis=0, dtype=np.float64), dtype=np.float32) if signals else None
    return SecureUpload(np.asarray(values, dtype=np.float32), weights, signal)


def aggregate_secure_sum(
    total: SecureUpload, item_mask: np.ndarray, covered: np.ndarray | None = None, mode: str = "weighted", devices: int = 1
) -> AggregatedRows:
    """Per-row merges from a summed secure upload over the ``covered`` rows (sorted int64; None = all):
    (sum of weight * delta) / (sum of weights) on every row some device touched for the means, the sum
    itself for ``sum``, the sum over the round's ``devices`` for ``client-mean``; the same result as
    ``aggregate_row_updates`` up to float rounding. Contributors per row are not revealed (reported as 0).

    Without row weights (``sum``, ``client-mean``) the rows merged are those whose sum or regrowth signal is
    non-zero: a touched row whose deltas cancel exactly is left out, which changes nothing under ``avg``."""
    dim = item_mask.shape[1]
    covered = np.arange(item_mask.shape[0], dtype=np.int64) if covered is None else covered
    sums = np.zeros((covered.size, dim), dtype=np.float32)
    sums[item_mask[covered]] = total.values
    if total.weights is None:
        if needs_row_weights(mode):
            raise ValueError(f"fed.aggregation = {mode} needs the secure uploads' row weights")
        nonzero = (sums != 0).any(axis=1)
        if total.signal is not None:
            nonzero |= (total.signal != 0).any(axis=1)
        touched = np.flatnonzero(nonzero)
    else:
        touched = np.flatnonzero(total.weights > 0)
    if mode == "sum":
        divisor = np.ones(touched.size)
    elif mode == "client-mean":
        divisor = np.full(touched.size, float(max(1, devices)))
    else:
        assert total.weights is not None
        divisor = total.weights[touched]
    deltas = (sums[touched].astype(np.float64) / divisor[:, None]).astype(np.float32)
    signal = total.signal[touched] if total.signal is not None else np.zeros((touched.size, dim), dtype=np.float32)
    return AggregatedRows(covered[touched], deltas, np.zeros(touched.size, dtype=np.int64), signal)
