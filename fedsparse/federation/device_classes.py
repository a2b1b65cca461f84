"""Heterogeneous devices: each device's class sets how many leading embedding dimensions it can hold.

With ``budget.device-widths = "16,32,64"`` a device of width w keeps a user row of w dimensions and
downloads, trains and uploads only the first w dimensions of each item row (a prefix of the server's
row), so its memory and traffic follow its budget. The class is drawn once per device from
``budget.device-shares`` with a stream keyed by the seed and the user id, so the server and the device
agree on it without a message (a real device would report its class when it registers).
"""

from __future__ import annotations

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.rng import rng_for


def device_width(config: RunConfig, user_id: int) -> int:
    """Leading dimensions device ``user_id`` holds: its class's width, or the whole row (``model.row_width``:
    ``model.dim``, or NeuMF's GMF and MLP embeddings side by side) for homogeneous devices."""
    widths = config.budget.widths
    if not widths:
        return config.model.row_width
    choice = rng_for(config.seed, "device-class", user_id).choice(len(widths), p=np.asarray(config.budget.shares))
    return int(widths[choice])

