"""``magnitude``: gradual magnitude pruning (Zhu & Gupta 2017) from dense to the target density.

The active count follows the cubic schedule K_t = K + (N - K) * (1 - t / T_end)^3 (N = rows * dim),
pruning the smallest-magnitude entries at every update step and never growing; from the first update
at or after T_end (75 % of training by default) it holds exactly K.
"""

import math

import numpy as np

from fedsparse.sparse.masks import MaskUpdate, smallest_active
from fedsparse.sparse.policies.base import MaskPolicy


class MagnitudePolicy(MaskPolicy):
    """Prune-only baseline: dense at the start, exactly K at the end."""

    name = "magnitude"
    defaults = {
        "drop_fraction": 1.0,  # unused: the cubic schedule sets how many entries go
        "drop_fraction_min": 0.0,
        "end_fraction": 0.75,
        "mask_init": "random",
        "grow_score": "random",
        "sparse_grad": "off",
    }

    def swap_fraction(self, step: int, total_steps: int) -> float:
        """Never swaps: the cubic schedule prunes and nothing grows back."""
        return 0.0

    def initial_active(self, rows: int, dim: int) -> int:
        return rows * dim

    def active_target(self, rows: int, dim: int, step: int, total_steps: int) -> int:
        final = self.final_budget(rows, dim)
        end = self.end_step(total_steps)
        progress = 1.0 if end <= 0 else min(1.0, step / end)
        return final + int(math.floor((rows * dim - final) * (1.0 - progress) ** 3))

    def is_update_step(self, step: int, total_steps: int) -> bool:
        every = self.settings.update_every
        return self.settings.density < 1.0 and step % every == 0 and step - every < self.end_step(total_steps)

    def update_mask(
        self, table: str, weight: np.ndarray, mask: np.ndarray, step: int, total_steps: int, rng: np.random.Generator
    ) -> MaskUpdate:
        target = self.active_target(mask.shape[0], mask.shape[1], step, total_steps)
        pruned = smallest_active(weight, mask, int(mask.sum()) - target)
        new_mask = mask.copy().ravel()
        new_mask[pruned] = False
        return MaskUpdate(new_mask.reshape(mask.shape), pruned, np.empty(0, dtype=np.int64))
