"""What the honest-but-curious server records, as plain data the attacks read: decoded uploads of the
watched devices and the secure sums it holds with their cohorts (``fedsparse.federation.observer``
fills them in)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ObservedUpload:
    """One upload as the server sees it: rows int64 [r], deltas float32 [r, dim] (zeros off-mask) and
    the item rows float32 [r, dim] the server held (and sent) before the round."""

    server_round: int
    user: int
    rows: np.ndarray
    deltas: np.ndarray
    item_rows: np.ndarray
    n_items: int


@dataclass(frozen=True)
class ObservedSum:
    """One secure sum as the server holds it: its phase ("start" or "train"), round, the (public) cohort
    of devices summed, int64 [c], and what it says about each item row, float64 [n_items]: the norm of the
    row in the start's sum; in a training sum, the summed weight of the row (devices that touched it) when the
    rule sends row weights, else the norm of the row's summed delta."""

    phase: str
    server_round: int
    users: np.ndarray
    row_mass: np.ndarray
