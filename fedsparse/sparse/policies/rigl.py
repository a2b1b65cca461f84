"""``rigl``: prune by magnitude, grow by |gradient| of the current batch (Evci et al., ICML 2020).

Defaults of the official code: drop fraction 0.3 cosine-annealed to 0, mask updates stop at 75 % of
training, grown weights start at zero, dense backward.
"""

from fedsparse.sparse.policies.base import MaskPolicy


class RiglPolicy(MaskPolicy):
    """Rigging the Lottery on embedding tables."""

    name = "rigl"
    defaults = {
        "drop_fraction": 0.3,
        "drop_fraction_min": 0.0,
        "end_fraction": 0.75,
        "mask_init": "random",
        "grow_score": "last-batch",
        "sparse_grad": "off",
    }
