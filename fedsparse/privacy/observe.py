"""The honest-but-curious server's record: every accepted upload of the watched devices, decoded."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsparse.aggregation import scatter_active
from fedsparse.federation import Server
from fedsparse.wire import RowUpdate


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


@dataclass
class UploadLog:
    """Keeps the uploads of ``users`` (all users when None), at most ``per_user`` each (the earliest),
    and counts every device's accepted uploads (for privacy accounting) and their value norms."""

    users: set[int] | None = None
    per_user: int = 1
    uploads: dict[int, list[ObservedUpload]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    value_norms: list[float] = field(default_factory=list)  # L2 norm of each upload's delta values

    def observe(self, server_round: int, user: int, update: RowUpdate, server: Server) -> None:
        """Record one accepted upload (the engine's ``UploadObserver``)."""
        self.counts[user] = self.counts.get(user, 0) + 1
        self.value_norms.append(float(np.linalg.norm(update.values)))
        if self.users is not None and user not in self.users:
            return
        kept = self.uploads.setdefault(user, [])
        if len(kept) >= self.per_user:
            return
        rows = update.row_ids.astype(np.int64)
        deltas = scatter_active(update.values, update.carried_mask(server.item_mask))
        kept.append(ObservedUpload(server_round, user, rows, deltas, server.item_weight[rows].copy(), server.n_items))

    def all(self) -> list[ObservedUpload]:
        """Every recorded upload, ordered by user then round."""
        return [upload for user in sorted(self.uploads) for upload in self.uploads[user]]
