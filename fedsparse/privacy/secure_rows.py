"""Public per-round row subsets for secure aggregation: bytes in proportion to the subset.

Secure aggregation needs every device's vector to have one shape, so a device uploads every row the
round covers. Covering the whole table costs the dense masked table per device; covering a public,
seeded random subset of ``privacy.secure-row-fraction`` of the rows costs that fraction, and devices
train only on the items of theirs that fall inside it (FedSubAvg-style). The subset follows from the
seed and the round, so it costs no bytes and reveals nothing about any device.
"""

from __future__ import annotations

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.rng import rng_for


def secure_round_rows(config: RunConfig, n_items: int, server_round: int) -> np.ndarray | None:
    """Sorted int64 ids of the rows this round covers, or None when it covers every row."""
    fraction = config.privacy.secure_row_fraction
    if not config.privacy.secure_aggregation or fraction >= 1.0:
        return None
    count = max(1, int(round(fraction * n_items)))
    return np.sort(rng_for(config.seed, "secure-rows", server_round).choice(n_items, size=count, replace=False)).astype(np.int64)
