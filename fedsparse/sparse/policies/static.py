"""``static``: a uniformly random exact mask fixed for all of training (no exploration)."""

from fedsparse.sparse.policies.base import MaskPolicy


class StaticPolicy(MaskPolicy):
    """Static sparse training: DSL's ``--fix`` baseline, with an exact budget."""

    name = "static"
    defaults = {
        "drop_fraction": 0.0,
        "drop_fraction_min": 0.0,
        "end_fraction": 0.0,
        "mask_init": "random",
        "grow_score": "random",
        "sparse_grad": "off",
    }
