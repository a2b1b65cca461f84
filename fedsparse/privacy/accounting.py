"""(epsilon, delta) of the devices' local DP, from Google's dp-accounting library (PLD accountant).

Local DP here: each upload's values are clipped to norm C (L2 for Gaussian, L1 for Laplace) and noised
with scale ``noise_multiplier * C``. Any two clipped uploads differ by at most 2C (the local model's
"replace" neighbours), so one upload is a mechanism with noise / sensitivity = noise_multiplier / 2.
A device that uploads in k rounds composes k of them. The row ids are not covered: they stay visible
unless padding or secure aggregation hides them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dp_accounting

MECHANISMS = ("gaussian", "laplace")
REPLACE_SENSITIVITY = 2.0  # in units of the clipping norm


def upload_event(mechanism: str, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The DP event of one clipped and noised upload."""
    import dp_accounting  # imported when an epsilon is asked for: it takes seconds, and most runs never need it

    ratio = noise_multiplier / REPLACE_SENSITIVITY
    if mechanism == "gaussian":
        return dp_accounting.GaussianDpEvent(ratio)
    if mechanism == "laplace":
        return dp_accounting.LaplaceDpEvent(ratio)
    raise ValueError(f"unknown local-DP mechanism {mechanism!r}; known: {', '.join(MECHANISMS)}")


def ldp_epsilon(mechanism: str, noise_multiplier: float, uploads: int, delta: float) -> float:
    """Epsilon at ``delta`` of a device after ``uploads`` noised uploads (0 uploads: 0; no noise: inf)."""
    if uploads <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting import pld

    accountant = pld.PLDAccountant()
    accountant.compose(upload_event(mechanism, noise_multiplier), uploads)
    return float(accountant.get_epsilon(delta))
