"""``dense``: every entry active (density 1), no mask updates; the 100 % reference inside the framework."""

from fedsparse.sparse.policies.base import MaskPolicy


class DensePolicy(MaskPolicy):
    """All entries trainable; the dense backward and the plain Adam update."""

    name = "dense"
    defaults = {
        "force_dense": True,
        "drop_fraction": 0.0,
        "drop_fraction_min": 0.0,
        "end_fraction": 0.0,
        "mask_init": "random",
        "grow_score": "random",
        "sparse_grad": "off",
    }
