"""``sparserec``: SparseRec (Qu et al., arXiv 2411.12205) as reconstructed in docs/methods.md#sparserec.

DSL plus three fixes: (a) the mask starts from the top entries of an NMF of the training interactions,
(b) growth ranks inactive entries by gradients accumulated over every step since the last update
(signed sum by default; reset after each update), (c) a sparse backward in which only the batch's rows
(optionally capped by ``sparse.grad-row-budget``) receive gradients. Each choice is a flag; the defaults
were picked by the ablation in benchmarks/results.
"""

from fedsparse.sparse.policies.base import MaskPolicy


class SparseRecPolicy(MaskPolicy):
    """NMF-initialised, accumulated-gradient regrowth, sparse backward."""

    name = "sparserec"
    defaults = {
        "drop_fraction": 0.5,
        "drop_fraction_min": 0.005,
        "end_fraction": 1.0,
        "mask_init": "nmf",
        "grow_score": "signed-sum",
        "sparse_grad": "on",
    }
