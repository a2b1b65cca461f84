"""Devices evaluated in batches: many MF devices' full rankings as one scoring of stacked user rows (issue 20).

``evaluate_splits_batch`` gives each device the metrics ``device.evaluate_splits`` gives it alone. An MF
device scores every item by the dot product of its user row with the received table, so B devices reading
one table score as one product [B, w] x [w, n_items], and ``metrics.full_ranking_per_user`` ranks them
``eval.batch-users`` at a time (memory O(batch_users * n_items)), with each device's own exclusions masked in
the scores themselves, which fill one reused buffer. The sampled leave-one-out protocol (100 candidates) stays per device.
NeuMF, and anything a device does with its scores afterwards, is evaluated one device at a time
(``protocol.EvaluationJob.batchable``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from fedsparse.config import RunConfig, ranking_cutoffs, uses_sampled_protocol
from fedsparse.eval import metrics
from fedsparse.federation.device import DeviceData, DeviceState, ItemScores, sampled_protocol
from fedsparse.federation.network import read_only_tensor

SPLITS = ("validation", "test")


def evaluate_splits_batch(
    config: RunConfig, states: Sequence[DeviceState], datas: Sequence[DeviceData], item_weights: np.ndarray
) -> list[dict[str, float]]:
    """``evaluate_splits`` of each device (its state and partition, in order) against ``item_weights`` float32
    [n_items, dim], the table every one of them received; user rows of one width w <= dim (ValueError else),
    scored with the table's first w dimensions. Keys as ``evaluate_splits``: ``validation-``/``test-`` metrics,
    splits a device holds no item of left out."""
    if not states:
        return []
    widths = {state.user_row.size for state in states}
    if len(widths) != 1:
        raise ValueError(f"a batch ranks user rows of one width, got widths {sorted(widths)}")
    width = widths.pop()
    n_items = item_weights.shape[0]
    users = torch.from_numpy(np.stack([state.user_row for state in states]).astype(np.float32, copy=False))
    items = read_only_tensor(np.ascontiguousarray(item_weights[:, :width]))
    results: list[dict[str, float]] = [{} for _ in states]
    held_out = {split: [data.validation if split == "validation" else data.test for data in datas] for split in SPLITS}
    excluded = {"validation": [data.train for data in datas],
                "test": [np.union1d(data.train, data.validation) for data in datas]}
    # One buffer for every block's scores: a fresh [b, n_items] each time costs as much in page faults as the product.
    buffer = torch.empty(min(config.eval.batch_users, len(states)), n_items)

    def scores(ids: np.ndarray) -> torch.Tensor:
        return torch.matmul(users[torch.from_numpy(ids)], items.T, out=buffer[: ids.size])

    for split in SPLITS:
        ranked, per_user = metrics.full_ranking_per_user(
            scores, _rows(held_out[split], n_items),
            [_rows(excluded[split], n_items)], ranking_cutoffs(config, n_items), config.eval.batch_users, owned_scores=True,
        )
        for position, device in enumerate(ranked):
            results[device].update({f"{split}-{name}": float(values[position]) for name, values in per_user.items()})
            if uses_sampled_protocol(config) and held_out[split][device].size == 1:
                sampled = sampled_protocol(config, datas[device], _scorer(items, users[device]), n_items,
                                           held_out[split][device], split)
                results[device].update({f"{split}-{name}": value for name, value in sampled.items()})
    return results


def _scorer(items: torch.Tensor, user: torch.Tensor) -> ItemScores:
    """A device's scores of some items (``device.ItemScores``) with its user row float32 [w]."""
    return lambda ids: items[torch.as_tensor(ids)] @ user


def _rows(items: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """One CSR row per device of its ``items`` (sorted int64 ids): float32 [devices, n_items]."""
    lengths = np.fromiter((row.size for row in items), dtype=np.int64, count=len(items))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(items).astype(np.int64) if items else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.ones(indices.size, dtype=np.float32), indices, indptr), shape=(len(items), n_items))


__all__ = ["evaluate_splits_batch"]
