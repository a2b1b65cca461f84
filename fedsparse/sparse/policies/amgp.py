"""``amgp``: Alternate Model Growth and Pruning (Du et al., ICMLA 2021; docs/methods.md#amgp), as reconstructed.

Training is cut into ``sparse.amgp-cycles`` cycles; each trains a structurally pruned table (every row
keeps its leading round(density * dim) dimensions) for ``amgp-sparse-share`` of the cycle, then grows
the pruned dimensions back (from small normal values, since zero user and item columns would get zero
gradients forever) and trains full-size. The last phase is full-size, so a full model exists at the end.
Pruning whole trailing dimensions keeps user and item tables aligned (a pruned dimension is gone from
both dot-product factors); the paper's own choice of structures is not published.
"""

from __future__ import annotations

import math

import numpy as np

from fedsparse.sparse.embedding_sizes import prefix_mask
from fedsparse.sparse.masks import MaskUpdate
from fedsparse.sparse.policies.base import MaskPolicy


class AmgpPolicy(MaskPolicy):
    """Alternating structured pruning (trailing dimensions) and growth, ending full-size."""

    name = "amgp"
    storage_format = "prefix"
    defaults = {
        "drop_fraction": 0.0,
        "drop_fraction_min": 0.0,
        "end_fraction": 1.0,
        "mask_init": "random",
        "grow_score": "random",
        "sparse_grad": "off",
    }

    def pruned_width(self, dim: int) -> int:
        """Dimensions every row keeps in a pruned phase: round(density * dim), at least one."""
        return max(1, min(dim, round(self.settings.density * dim)))

    def phase_starts(self, total_steps: int) -> list[tuple[int, bool]]:
        """(first step, pruned?) of every phase; the phase starting at step 0 is pruned."""
        cycle = total_steps / self.config.amgp_cycles
        starts = []
        for index in range(self.config.amgp_cycles):
            starts.append((int(math.floor(index * cycle)), True))
            starts.append((int(math.floor((index + self.config.amgp_sparse_share) * cycle)), False))
        return starts

    def is_pruned(self, step: int, total_steps: int) -> bool:
        """Whether training after optimiser step ``step`` runs on the pruned table."""
        pruned = True
        for start, phase_pruned in self.phase_starts(total_steps):
            if step >= start:
                pruned = phase_pruned
        return pruned

    def final_budget(self, rows: int, dim: int) -> int:
        """Full size: AMGP ends with the whole table."""
        return rows * dim

    def initial_active(self, rows: int, dim: int) -> int:
        return rows * self.pruned_width(dim)

    def active_target(self, rows: int, dim: int, step: int, total_steps: int) -> int:
        return rows * (self.pruned_width(dim) if self.is_pruned(step, total_steps) else dim)

    def user_prefix_share(self, step: int, total_steps: int) -> float:
        """Devices follow the same structure on their user rows: ``density`` of their leading dimensions
        in a pruned phase, all of them in a full one."""
        return self.settings.density if self.is_pruned(step, total_steps) else 1.0

    def initial_mask(
        self,
        table: str,
        rows: int,
        dim: int,
        rng: np.random.Generator,
        nmf_scores: np.ndarray | None = None,
        popularity: np.ndarray | None = None,
    ) -> np.ndarray:
        return prefix_mask(np.full(rows, self.pruned_width(dim)), dim)

    def is_update_step(self, step: int, total_steps: int) -> bool:
        """At each phase boundary after the start (the phase's first step follows this one)."""
        return self.settings.density < 1.0 and any(start == step and start > 0 for start, _ in self.phase_starts(total_steps))

    def update_mask(
        self, table: str, weight: np.ndarray, mask: np.ndarray, step: int, total_steps: int, rng: np.random.Generator
    ) -> MaskUpdate:
        rows, dim = mask.shape
        target = self.pruned_width(dim) if self.is_pruned(step, total_steps) else dim
        new_mask = prefix_mask(np.full(rows, target), dim)
        flat_old, flat_new = mask.ravel(), new_mask.ravel()
        grown = np.flatnonzero(flat_new & ~flat_old)
        values = rng.normal(0.0, self.config.amgp_grow_std, grown.size).astype(np.float32)
        return MaskUpdate(new_mask, np.flatnonzero(flat_old & ~flat_new), grown, values)
