"""Public per-round row subsets for secure aggregation: bytes in proportion to the subset.

Secure aggregation needs every device's vector to have one shape, so a device uploads every row the
round covers. Covering the whole table costs the dense masked table per device; covering a public,
seeded random subset of ``privacy.secure-row-fraction`` of the rows costs that share, and devices
train only on the items of theirs that fall inside it (FedSubAvg-style), or on all of them with
``privacy.secure-train-items = all``. Rows are drawn uniformly, or with ``privacy.secure-row-bias`` b > 0
with probability proportional to (active entries of the row)^b in the round's item mask, which the
server sends every device: rows the NMF start gave more entries are the popular ones, so the covered
rows carry more of the round's training. The subset follows from the seed, the round and the public
mask, so it costs no bytes and reveals nothing about any device.
"""

from __future__ import annotations

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.rng import rng_for


def secure_round_rows(
    config: RunConfig, n_items: int, server_round: int, item_mask: np.ndarray | None = None
) -> np.ndarray | None:
    """Sorted int64 ids of the rows this round covers, or None when it covers every row. ``item_mask`` bool
    [n_items, dim] is the round's (public) mask, needed when ``privacy.secure-row-bias`` > 0."""
    privacy = config.privacy
    if not privacy.secure_aggregation or privacy.secure_row_fraction >= 1.0:
        return None
    count = max(1, int(round(privacy.secure_row_fraction * n_items)))
    rng = rng_for(config.seed, "secure-rows", server_round)
    if privacy.secure_row_bias == 0:
        return np.sort(rng.choice(n_items, size=count, replace=False)).astype(np.int64)
    if item_mask is None or item_mask.shape[0] != n_items:
        raise ValueError("privacy.secure-row-bias > 0 draws the rows from the round's item mask: pass it")
    weights = item_mask.sum(axis=1).astype(np.float64) ** privacy.secure_row_bias  # a row without entries: weight 0
    count = min(count, int(np.count_nonzero(weights)))
    return np.sort(rng.choice(n_items, size=count, replace=False, p=weights / weights.sum())).astype(np.int64)
