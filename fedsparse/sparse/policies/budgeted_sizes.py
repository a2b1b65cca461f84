"""Embedding-size policies: each row keeps its leading s_r dimensions, sum_r s_r = K exactly (docs/methods.md#embedding-sizes).

``size-frequency`` sizes rows by popularity; ``size-scall`` draws sizes from a power law fitted to the
budget (SCALL); ``size-bet`` applies a table-level allocation per popularity group found by the BET-style
search of fedsparse/sparse/bet.py; ``size-ciess`` refines continuous sizes during training (CIESS, with the RL
actor replaced by a gradient-versus-magnitude rule and a random walk: see ``SizeCiessPolicy``).
"""

from __future__ import annotations

import numpy as np

from fedsparse.config import SparseConfig
from fedsparse.sparse.embedding_sizes import (
    fit_sizes,
    frequency_sizes,
    popularity_groups,
    prefix_mask,
    prefix_sizes,
    sampled_sizes,
)
from fedsparse.sparse.masks import MaskUpdate, cosine_drop_fraction
from fedsparse.sparse.policies.base import MaskPolicy

RANK_TIE_EPSILON = 1e-12  # added before taking logs of pressures that may be exactly zero


class SizePolicy(MaskPolicy):
    """Base of the size policies: prefix masks meeting the budget exactly, fixed after initialisation."""

    storage_format = "prefix"
    defaults = {
        "drop_fraction": 0.0,
        "drop_fraction_min": 0.0,
        "end_fraction": 1.0,
        "mask_init": "random",
        "grow_score": "random",
        "sparse_grad": "off",
    }

    def min_size(self, rows: int, dim: int) -> int:
        """``sparse.size-min``, lowered when the budget cannot give every row that many dimensions."""
        return min(self.config.size_min, dim, self.final_budget(rows, dim) // max(1, rows))

    def allocate(self, table: str, popularity: np.ndarray, total: int, dim: int, rng: np.random.Generator) -> np.ndarray:
        """int64 [rows] sizes summing to ``total``; each policy's allocation rule."""
        raise NotImplementedError

    def initial_mask(
        self,
        table: str,
        rows: int,
        dim: int,
        rng: np.random.Generator,
        nmf_scores: np.ndarray | None = None,
        popularity: np.ndarray | None = None,
    ) -> np.ndarray:
        """The prefix mask of ``allocate``'s sizes; rows without a known popularity count as equally popular."""
        popularity = np.zeros(rows) if popularity is None else np.asarray(popularity, dtype=np.float64)
        if popularity.shape != (rows,):
            raise ValueError(f"popularity of table {table!r} must have shape ({rows},), got {popularity.shape}")
        return prefix_mask(self.allocate(table, popularity, self.initial_active(rows, dim), dim, rng), dim)

    def is_update_step(self, step: int, total_steps: int) -> bool:
        """Sizes chosen once stay (CIESS overrides this)."""
        return False


class SizeFrequencyPolicy(SizePolicy):
    """Sizes proportional to (popularity + 1) ** ``sparse.size-exponent``: frequent rows get more dimensions."""

    name = "size-frequency"

    def allocate(self, table: str, popularity: np.ndarray, total: int, dim: int, rng: np.random.Generator) -> np.ndarray:
        return frequency_sizes(popularity, total, dim, self.config.size_exponent, self.min_size(popularity.size, dim))


class SizeScallPolicy(SizePolicy):
    """SCALL-style: sizes drawn from a power law whose mean meets the budget, larger draws to popular rows,
    then repaired so the drawn total equals the budget exactly."""

    name = "size-scall"

    def allocate(self, table: str, popularity: np.ndarray, total: int, dim: int, rng: np.random.Generator) -> np.ndarray:
        return sampled_sizes(rng, popularity, total, dim, self.min_size(popularity.size, dim))


class SizeBetPolicy(SizePolicy):
    """BET-style table-level allocation: one relative size per popularity group (``sparse.group-sizes``, as the
    search in fedsparse/sparse/bet.py returns it), scaled to meet the budget exactly."""

    name = "size-bet"

    def allocate(self, table: str, popularity: np.ndarray, total: int, dim: int, rng: np.random.Generator) -> np.ndarray:
        per_group = np.array([float(v) for v in self.config.group_sizes.split(",") if v.strip()])
        if per_group.size != self.config.size_groups:
            raise ValueError(
                f"size-bet needs sparse.group-sizes with {self.config.size_groups} values, got {self.config.group_sizes!r}"
            )
        groups = popularity_groups(popularity, per_group.size)
        return fit_sizes(per_group[groups], total, dim, self.min_size(popularity.size, dim))


class SizeCiessPolicy(SizePolicy):
    """CIESS-style continuous sizes refined during training, simplified for 2 CPU cores.

    CIESS trains an actor-critic that moves each row's continuous size. Here the actor is a fixed rule
    and the exploration is kept: at every update, rows are ranked by growth pressure (|gradient|
    accumulated on the first inactive dimension) and by prune pressure (|weight| of the last active
    one); c_r moves by ``ciess-step * dim * rho_t * (rank difference in [-1, 1])`` plus a normal random
    walk of std ``ciess-noise * dim * rho_t / rho_0``, and ``fit_sizes`` turns c into integer sizes with
    the budget exact. Starts from the frequency allocation.
    """

    name = "size-ciess"
    defaults = {**SizePolicy.defaults, "drop_fraction": 1.0, "end_fraction": 0.8, "grow_score": "abs-sum"}

    def __init__(self, config: SparseConfig) -> None:
        super().__init__(config)
        self._continuous: dict[str, np.ndarray] = {}

    def allocate(self, table: str, popularity: np.ndarray, total: int, dim: int, rng: np.random.Generator) -> np.ndarray:
        sizes = frequency_sizes(popularity, total, dim, self.config.size_exponent, self.min_size(popularity.size, dim))
        self._continuous[table] = sizes.astype(np.float64)
        return sizes

    def is_update_step(self, step: int, total_steps: int) -> bool:
        return step % self.settings.update_every == 0 and step < self.end_step(total_steps)

    def swap_fraction(self, step: int, total_steps: int) -> float:
        """rho_t: the cosine-annealed scale of the size moves (1 at the start, 0 at ``end_fraction``)."""
        return cosine_drop_fraction(step, self.end_step(total_steps), self.settings.drop_fraction, 0.0)

    def update_mask(
        self, table: str, weight: np.ndarray, mask: np.ndarray, step: int, total_steps: int, rng: np.random.Generator
    ) -> MaskUpdate:
        rows, dim = mask.shape
        sizes = prefix_sizes(mask)
        continuous = self._continuous.get(table, sizes.astype(np.float64))
        scores = self.grow_scores(table, mask.shape, rng)
        index = np.arange(rows)
        grow = np.where(sizes < dim, scores[index, np.minimum(sizes, dim - 1)], 0.0)
        prune = np.where(sizes > 0, np.abs(weight[index, np.maximum(sizes - 1, 0)]), np.inf)
        pressure = _rank_share(np.log(grow + RANK_TIE_EPSILON)) - _rank_share(np.log(prune + RANK_TIE_EPSILON))
        rho = self.swap_fraction(step, total_steps)
        noise = self.config.ciess_noise * dim * rho / max(self.settings.drop_fraction, RANK_TIE_EPSILON)
        continuous = np.clip(continuous + self.config.ciess_step * dim * rho * pressure + rng.normal(0.0, noise, rows), 0.0, dim)
        self._continuous[table] = continuous
        new_sizes = fit_sizes(continuous, int(sizes.sum()), dim, self.min_size(rows, dim))
        new_mask = prefix_mask(new_sizes, dim)
        self.reset_statistics(table)
        flat_old, flat_new = mask.ravel(), new_mask.ravel()
        return MaskUpdate(new_mask, np.flatnonzero(flat_old & ~flat_new), np.flatnonzero(flat_new & ~flat_old))

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**super().state_arrays(), **{f"continuous.{t}": c for t, c in self._continuous.items()}}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        for key, array in arrays.items():
            if key.startswith("continuous."):
                self._continuous[key.removeprefix("continuous.")] = np.array(array, dtype=np.float64)


def _rank_share(values: np.ndarray) -> np.ndarray:
    """Each value's rank as a share in [0, 1] (0 = smallest; ties by position)."""
    order = np.argsort(values, kind="stable")
    share = np.empty(values.size, dtype=np.float64)
    share[order] = np.arange(values.size) / max(1, values.size - 1)
    return share
