"""A device's touched item rows held by their active entries only, and MF's closed-form steps on them.

A masked MF row i scores ``sum_j v_ij u_j`` over its active columns; its gradient is ``coef_i * u`` (the
loss's weight summed over the examples that use row i), of which the optimiser applies only the active
entries. So a device needs, per round, the K active values (float32), their rows and columns (int32) and
K-sized copies (as downloaded, gradient, optimiser state): memory in K = density * r * w, not in r * w.
The regrowth signal (the gradient summed over steps on inactive entries) is ``sum_t coef_t (x) u_t``: the
device keeps each step's coef [r] and user row [w] and forms only the top-k entries of each row at the end.
The arithmetic is ``mf_batch_gradients`` / ``mf_user_row_gradient`` on the same rows, summed in another
order (tests/test_compact_rows.py holds them to the dense forms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsparse.central.losses import score_weights
from fedsparse.sparse.storage import CompactTable

SIGNAL_CHUNK_ROWS = 1024  # rows whose dense signal is formed at once when picking each row's top-k


@dataclass
class CompactRows:
    """r item rows of width w by their K active entries, row after row with columns ascending (the wire
    order of their values): ``values`` float32 [K], ``entry_rows`` / ``entry_cols`` int32 [K]."""

    values: torch.Tensor
    entry_rows: torch.Tensor
    entry_cols: torch.Tensor
    n_rows: int
    width: int

    @classmethod
    def from_table(cls, table: CompactTable, positions: np.ndarray) -> CompactRows:
        """Rows ``positions`` of a compact table, read entry by entry (never decoded to dense rows)."""
        values, counts, cols = table.row_entries(positions)
        rows = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
        return cls(torch.from_numpy(values), torch.from_numpy(rows), torch.from_numpy(cols),
                   int(counts.size), table.dim)

    def row_dots(self, vector: torch.Tensor) -> torch.Tensor:
        """Every row's dot product with ``vector`` float32 [w]: float32 [r]."""
        return torch.zeros(self.n_rows).index_add_(0, self.entry_rows, self.values * vector[self.entry_cols])

    def weighted_sum(self, row_weights: torch.Tensor) -> torch.Tensor:
        """sum_i row_weights[i] * row_i, float32 [w] (``row_weights`` float32 [r])."""
        return torch.zeros(self.width).index_add_(0, self.entry_cols, self.values * row_weights[self.entry_rows])

    def row_sq_norms(self) -> torch.Tensor:
        """||row_i||^2 per row, float32 [r]."""
        return torch.zeros(self.n_rows).index_add_(0, self.entry_rows, self.values * self.values)

    def mask(self, rows: slice | None = None) -> np.ndarray:
        """The rows' mask bool [r, w] (or of the rows in ``rows``), for the few steps that need it dense."""
        start, stop = (0, self.n_rows) if rows is None else (rows.start, rows.stop)
        local = self.entry_rows.numpy()
        chosen = (local >= start) & (local < stop)
        mask = np.zeros((stop - start, self.width), dtype=bool)
        mask[local[chosen] - start, self.entry_cols.numpy()[chosen]] = True
        return mask

    def dense(self, values: torch.Tensor | None = None) -> np.ndarray:
        """The rows float32 [r, w] with ``values`` (default: this object's) on their entries, zero elsewhere."""
        rows = np.zeros((self.n_rows, self.width), dtype=np.float32)
        rows[self.entry_rows.numpy(), self.entry_cols.numpy()] = (self.values if values is None else values).numpy()
        return rows

    @property
    def index_nbytes(self) -> int:
        """Bytes of the entries' rows and columns."""
        return int(self.entry_rows.nbytes + self.entry_cols.nbytes)


@dataclass(frozen=True)
class CompactGradients:
    """One batch's loss and gradients: user row float32 [w], score bias float32 [1] (None without one), the
    active entries float32 [K], and ``coef`` float32 [r], with which every item entry's gradient is coef_i u_j."""

    loss: torch.Tensor
    user: torch.Tensor
    bias: torch.Tensor | None
    values: torch.Tensor
    coef: torch.Tensor


def compact_mf_gradients(
    user_row: torch.Tensor, rows: CompactRows, positives: torch.Tensor, negatives: torch.Tensor, is_real: torch.Tensor,
    loss: str, l2_reg: float, user_bias: torch.Tensor | None = None,
) -> CompactGradients:
    """``mf_batch_gradients`` on compact rows: the padded batch loss (fake positives reach the item rows only)
    and its gradients. positives int64 [b], negatives int64 [b, n]: local rows; is_real bool [b]."""
    batch = positives.numel()
    bias = 0.0 if user_bias is None else user_bias
    dots = rows.row_dots(user_row)
    positive_scores, negative_scores = dots[positives] + bias, dots[negatives] + bias
    data_loss, positive_weights, negative_weights = score_weights(positive_scores, negative_scores, loss)
    real = is_real.to(positive_weights.dtype)
    real_positive, real_negative = positive_weights * real, negative_weights * real[:, None]
    flat_negatives = negatives.reshape(-1)
    user_coef = torch.zeros(rows.n_rows).index_add_(0, positives, real_positive).index_add_(
        0, flat_negatives, real_negative.reshape(-1))
    user = rows.weighted_sum(user_coef) + l2_reg * (real.sum() / batch) * user_row
    used = torch.cat([positives, flat_negatives])
    coef = torch.zeros(rows.n_rows).index_add_(0, used, torch.cat([positive_weights, negative_weights.reshape(-1)]))
    values = coef[rows.entry_rows] * user_row[rows.entry_cols]
    loss_value = data_loss
    if l2_reg:  # batch_l2: each use of a row counts once, the user row once per example, over the batch size
        uses = torch.bincount(used, minlength=rows.n_rows).to(rows.values.dtype)
        values = values + (l2_reg / batch) * uses[rows.entry_rows] * rows.values
        loss_value = loss_value + l2_reg * 0.5 * (batch * user_row.pow(2).sum() + rows.row_sq_norms()[used].sum()) / batch
    bias_gradient = None if user_bias is None else (real_positive.sum() + real_negative.sum()).reshape(1)
    return CompactGradients(loss_value, user, bias_gradient, values, coef)


def compact_user_row_gradient(
    user_row: torch.Tensor, rows: CompactRows, positives: torch.Tensor, negatives: torch.Tensor, loss: str, l2_reg: float
) -> torch.Tensor:
    """``mf_user_row_gradient`` on compact rows: the user row's gradient with the items fixed, float32 [w]."""
    dots = rows.row_dots(user_row)
    positive_scores, negative_scores = dots[positives], dots[negatives]
    flat_negatives = negatives.reshape(-1)
    if loss == "bpr":
        weights = torch.sigmoid(negative_scores - positive_scores[:, None])
        coef = torch.zeros(rows.n_rows).index_add_(0, flat_negatives, weights.reshape(-1)).index_add_(
            0, positives, -weights.sum(1))
        gradient = rows.weighted_sum(coef) / weights.numel()
    elif loss == "bce":
        coef = torch.zeros(rows.n_rows).index_add_(0, positives, torch.sigmoid(positive_scores) - 1.0).index_add_(
            0, flat_negatives, torch.sigmoid(negative_scores).reshape(-1))
        gradient = rows.weighted_sum(coef) / (positive_scores.numel() + negative_scores.numel())
    else:
        raise ValueError(f"unknown loss {loss!r}; known: bpr, bce")
    return gradient + l2_reg * user_row


def compact_working_nbytes(entries: int, n_rows: int, width: int, item_adam: bool, signal_steps: int) -> int:
    """Bytes a device holds training r = ``n_rows`` rows of width w by their K = ``entries`` active entries
    (``CompactTrainedRows.working_nbytes``), for a simulator that trained them another way: the entries as
    trained and one step's gradient (float32 [K] each), their rows and columns (int32 [K] each), Adam's two
    moments (float32 [K] each, under Adam) and each of ``signal_steps`` recorded steps' coef float32 [r] and
    user row float32 [w]."""
    value, index = np.dtype(np.float32).itemsize, np.dtype(np.int32).itemsize
    per_entry = 2 * value + 2 * index + (2 * value if item_adam else 0)
    return int(entries * per_entry + signal_steps * (n_rows + width) * value)


@dataclass
class SignalHistory:
    """The factors of the item rows' accumulated gradient: each recorded step's coef [r] and user row [w]."""

    coefs: list[torch.Tensor]
    users: list[torch.Tensor]

    def record(self, coef: torch.Tensor, user_row: torch.Tensor) -> None:
        self.coefs.append(coef)
        self.users.append(user_row.clone())

    @property
    def nbytes(self) -> int:
        return int(sum(coef.nbytes for coef in self.coefs) + sum(user.nbytes for user in self.users))

    def top_inactive(self, rows: CompactRows, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the k entries with the largest |accumulated gradient| among its inactive ones (active entries
        rank after every inactive one and report 0, as ``device._top_signal`` ranks a dense signal): columns
        int64 [r, k] and signed sums float32 [r, k], formed ``SIGNAL_CHUNK_ROWS`` rows at a time."""
        k = min(k, rows.width)
        coefs, users = torch.stack(self.coefs, 1), torch.stack(self.users)  # [r, T], [T, w]
        order = np.zeros((rows.n_rows, k), dtype=np.int64)
        sums = np.zeros((rows.n_rows, k), dtype=np.float32)
        for start in range(0, rows.n_rows, SIGNAL_CHUNK_ROWS):
            chunk = slice(start, min(start + SIGNAL_CHUNK_ROWS, rows.n_rows))
            signal = (coefs[chunk] @ users).numpy()
            mask = rows.mask(chunk)
            signal[mask] = 0.0
            magnitude = np.where(mask, -1.0, np.abs(signal))
            order[chunk] = np.argsort(-magnitude, axis=1, kind="stable")[:, :k]
            sums[chunk] = np.take_along_axis(signal, order[chunk], axis=1)
        return order, sums
