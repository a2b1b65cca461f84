"""``set``: prune by magnitude, grow uniformly at random (Mocanu et al. 2018).

Uses RigL's cosine schedule (rho_0 = 0.3 annealed to 0, exploring for the first 75 % of training),
as the RigL paper's SET baseline does, rather than SET's constant per-epoch fraction.
"""

from fedsparse.sparse.policies.base import MaskPolicy


class SetPolicy(MaskPolicy):
    """Sparse Evolutionary Training: random regrowth needs no gradient."""

    name = "set"
    defaults = {
        "drop_fraction": 0.3,
        "drop_fraction_min": 0.0,
        "end_fraction": 0.75,
        "mask_init": "random",
        "grow_score": "random",
        "sparse_grad": "off",
    }
