"""Mask policies by name: one file per method, one protocol (``MaskPolicy``)."""

from fedsparse.config import SparseConfig
from fedsparse.sparse.policies.amgp import AmgpPolicy
from fedsparse.sparse.policies.base import MaskPolicy, PolicySettings
from fedsparse.sparse.policies.budgeted_sizes import SizeBetPolicy, SizeCiessPolicy, SizeFrequencyPolicy, SizeScallPolicy
from fedsparse.sparse.policies.dense import DensePolicy
from fedsparse.sparse.policies.dsl import DslPolicy
from fedsparse.sparse.policies.magnitude import MagnitudePolicy
from fedsparse.sparse.policies.rigl import RiglPolicy
from fedsparse.sparse.policies.set import SetPolicy
from fedsparse.sparse.policies.sparserec import SparseRecPolicy
from fedsparse.sparse.policies.static import StaticPolicy

POLICIES: dict[str, type[MaskPolicy]] = {
    policy.name: policy
    for policy in (
        DensePolicy, StaticPolicy, MagnitudePolicy, SetPolicy, RiglPolicy, DslPolicy, SparseRecPolicy,
        SizeFrequencyPolicy, SizeScallPolicy, SizeBetPolicy, SizeCiessPolicy, AmgpPolicy,
    )
}


def build_policy(config: SparseConfig) -> MaskPolicy:
    """The policy named by ``config.policy``, with its "auto" knobs resolved."""
    if config.policy not in POLICIES:
        raise ValueError(f"unknown sparse policy {config.policy!r}; known: {', '.join(POLICIES)}")
    return POLICIES[config.policy](config)


__all__ = ["POLICIES", "MaskPolicy", "PolicySettings", "build_policy"]
