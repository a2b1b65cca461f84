"""How the server turns a round's per-row mean item deltas into a step on its masked item table.

``avg`` adds ``server-lr`` times the mean delta (FedAvg). ``adam`` treats the mean delta as a
descent direction and applies Adam to it, entry by entry, as FCF does with item gradients and
FedAdam with client deltas: rows that few devices touch, or whose devices disagree in sign, then move
at a comparable, bounded speed. Moments exist only for active entries and only rows in the round
advance (lazy, row-sparse Adam, bias-corrected by each row's own step count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsparse.config import FedConfig


@dataclass
class ServerOptimizer:
    """The server's optimiser state for an item table of shape [n_items, dim] (empty for ``avg``)."""

    config: FedConfig
    exp_avg: np.ndarray | None = None  # float32 [n_items, dim], zero off-mask
    exp_avg_sq: np.ndarray | None = None  # float32 [n_items, dim], zero off-mask
    row_steps: np.ndarray | None = None  # int64 [n_items]: rounds in which each row was updated
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = self.config.server_optimizer

    def step(self, rows: np.ndarray, mean_deltas: np.ndarray, row_mask: np.ndarray, n_items: int) -> np.ndarray:
        """The change float32 [r, dim] to add to ``rows`` (int64 [r], sorted) given their mean deltas [r, dim].

        ``row_mask`` bool [r, dim] is those rows' current mask: inactive entries never move.
        """
        if self.kind == "avg":
            return (self.config.server_lr * mean_deltas * row_mask).astype(np.float32)
        exp_avg, exp_avg_sq, row_steps = self._moments(n_items, mean_deltas.shape[1])
        beta1, beta2 = self.config.server_beta1, self.config.server_beta2
        deltas = mean_deltas * row_mask
        row_steps[rows] += 1
        first = beta1 * exp_avg[rows] + (1.0 - beta1) * deltas
        second = beta2 * exp_avg_sq[rows] + (1.0 - beta2) * deltas**2
        exp_avg[rows], exp_avg_sq[rows] = first, second
        steps = row_steps[rows][:, None].astype(np.float64)
        corrected_first = first / (1.0 - beta1**steps)
        corrected_second = second / (1.0 - beta2**steps)
        change = self.config.server_lr * corrected_first / (np.sqrt(corrected_second) + self.config.server_eps)
        return (change * row_mask).astype(np.float32)

    def _moments(self, n_items: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The moments and row step counts, allocated (zeros) at the first step."""
        if self.exp_avg is None or self.exp_avg_sq is None or self.row_steps is None:
            self.exp_avg = np.zeros((n_items, dim), dtype=np.float32)
            self.exp_avg_sq = np.zeros((n_items, dim), dtype=np.float32)
            self.row_steps = np.zeros(n_items, dtype=np.int64)
        return self.exp_avg, self.exp_avg_sq, self.row_steps

    def forget(self, flat_entries: np.ndarray) -> None:
        """Zero the moments of entries that were pruned or grown (a grown entry starts afresh)."""
        if self.exp_avg is not None and self.exp_avg_sq is not None:
            self.exp_avg.reshape(-1)[flat_entries] = 0.0
            self.exp_avg_sq.reshape(-1)[flat_entries] = 0.0

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The moments and row step counts, to checkpoint (nothing for ``avg`` or before the first step)."""
        if self.exp_avg is None or self.exp_avg_sq is None or self.row_steps is None:
            return {}
        return {"exp-avg": self.exp_avg, "exp-avg-sq": self.exp_avg_sq, "row-steps": self.row_steps}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what ``state_arrays`` returned."""
        if arrays:
            self.exp_avg = np.array(arrays["exp-avg"], dtype=np.float32)
            self.exp_avg_sq = np.array(arrays["exp-avg-sq"], dtype=np.float32)
            self.row_steps = np.array(arrays["row-steps"], dtype=np.int64)
