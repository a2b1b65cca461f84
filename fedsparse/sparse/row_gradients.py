"""Sparse backward: only a selected subset of embedding rows receives gradients.

``RowEmbedding`` is an ``nn.Embedding`` whose lookups can be restricted to trainable rows: rows outside
the set are read from a detached copy, so autograd never builds gradient entries for them. With
``sparse=True`` the gradient is a row-sparse tensor of the looked-up rows only, so gradient memory
scales with the rows a step touches, not with the table.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GRAD_ROW_RULES = ("batch", "degree", "norm", "uniform")


class RowEmbedding(nn.Embedding):
    """nn.Embedding with an optional per-step set of trainable rows (``trainable_rows``: bool [rows])."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trainable_rows: torch.Tensor | None = None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.trainable_rows is None:
            return F.embedding(indices, self.weight, sparse=self.sparse)
        selected = self.trainable_rows[indices]
        frozen = F.embedding(indices, self.weight.detach())
        positions = selected.nonzero(as_tuple=True)
        trainable = F.embedding(indices[positions], self.weight, sparse=self.sparse)
        return frozen.index_put(positions, trainable)


def select_gradient_rows(
    batch_rows: np.ndarray,
    max_rows: int,
    rule: str,
    rng: np.random.Generator,
    degree: np.ndarray | None = None,
    row_norm: np.ndarray | None = None,
) -> np.ndarray:
    """Rows (sorted int64) that receive gradients this step, at most ``max_rows`` of the batch's rows.

    ``rule``: "batch" keeps every batch row (``max_rows`` ignored); "degree", "norm" and "uniform" sample
    ``max_rows`` of them without replacement with probability proportional to training degree, to the
    masked row norm, or uniformly (Efraimidis-Spirakis keys, so the draw is one vectorised step).
    """
    rows = np.unique(np.asarray(batch_rows, dtype=np.int64))
    if rule == "batch" or max_rows <= 0 or rows.size <= max_rows:
        return rows
    if rule == "degree":
        weights = np.asarray(degree, dtype=np.float64)[rows] + 1.0
    elif rule == "norm":
        weights = np.asarray(row_norm, dtype=np.float64)[rows] + 1e-12
    elif rule == "uniform":
        weights = np.ones(rows.size)
    else:
        raise ValueError(f"unknown gradient-row rule {rule!r}; known: {GRAD_ROW_RULES}")
    keys = np.log(rng.random(rows.size)) / weights
    return np.sort(rows[np.argsort(-keys, kind="stable")[:max_rows]])


def gradient_nbytes(gradient: torch.Tensor | None) -> int:
    """Bytes of a gradient tensor as autograd produced it (values + indices when sparse)."""
    if gradient is None:
        return 0
    if gradient.is_sparse:
        return gradient._values().nbytes + gradient._indices().nbytes
    return gradient.nbytes


def row_gradient(gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows int64 [r], values [r, dim]) of a dense or row-sparse embedding gradient, rows unique and sorted.

    A dense gradient is returned for its rows with any non-zero entry (MF batches touch few rows).
    """
    if gradient.is_sparse:
        gradient = gradient.coalesce()
        return gradient.indices()[0], gradient.values()
    rows = gradient.abs().sum(dim=1).nonzero(as_tuple=True)[0]
    return rows, gradient[rows]
