"""``dsl``: DSL as its official code behaves (Wang et al., WSDM 2024; docs/methods.md#dsl).

rho_0 = 0.5 cosine-annealed to rho_min = 0.005 until the end of training, growth by |gradient| of the
firing step's batch only, dense backward. One deliberate difference: the mask is exact-budget random
instead of DSL's Bernoulli(density) draw, so every policy holds exactly K entries.
"""

from fedsparse.sparse.policies.base import MaskPolicy


class DslPolicy(MaskPolicy):
    """Dynamic Sparse Learning for recommendation."""

    name = "dsl"
    defaults = {
        "drop_fraction": 0.5,
        "drop_fraction_min": 0.005,
        "end_fraction": 1.0,
        "mask_init": "random",
        "grow_score": "last-batch",
        "sparse_grad": "off",
    }
