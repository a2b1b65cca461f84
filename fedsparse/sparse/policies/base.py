"""The mask-policy protocol shared by every dynamic sparse training method.

A policy owns, per embedding table: the initial mask, the statistics it keeps between mask updates
(gradient accumulators), the update schedule, and the prune/grow rule. It works on numpy arrays only,
so the same object drives the centralised trainer and the federated server (which feeds it
aggregated signals instead of per-step gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedsparse.config import AUTO, SparseConfig
from fedsparse.sparse.masks import (
    MaskUpdate,
    budget,
    cosine_drop_fraction,
    prune_and_grow,
    prune_and_grow_within_rows,
    random_mask,
)
from fedsparse.sparse.nmf import top_k_mask


@dataclass(frozen=True)
class PolicySettings:
    """A policy's knobs after "auto" values are replaced by the policy's defaults."""

    density: float
    update_every: int
    drop_fraction: float
    drop_fraction_min: float
    end_fraction: float
    mask_init: str
    grow_score: str
    ema_decay: float
    regrow_pruned: bool
    sparse_grad: bool
    nmf_select: str
    nmf_min_per_row: int


class MaskPolicy:
    """Base class: exact-budget masks, cosine-annealed prune/grow every ``update_every`` steps.

    Subclasses set ``name`` and ``defaults`` and may override ``initial_mask``, ``grow_scores`` and
    ``active_target``. Tables are identified by name ("user", "item", ...), arrays are [rows, dim].
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, object]] = {}
    storage_format: ClassVar[str] = "auto"  # CompactTable layout of its tables ("prefix" for size masks)

    def __init__(self, config: SparseConfig) -> None:
        self.config = config
        self.settings = self.resolve(config)
        self._accumulators: dict[str, np.ndarray] = {}
        self._last_gradient: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def resolve(cls, config: SparseConfig) -> PolicySettings:
        """Fill "auto" (or -1) knobs of ``config`` with this policy's defaults."""
        def pick(key: str, value: Any, auto: Any) -> Any:
            return cls.defaults[key] if value == auto else value

        return PolicySettings(
            density=1.0 if cls.defaults.get("force_dense") else config.density,
            update_every=config.update_every,
            drop_fraction=float(pick("drop_fraction", config.drop_fraction, AUTO)),
            drop_fraction_min=float(pick("drop_fraction_min", config.drop_fraction_min, AUTO)),
            end_fraction=float(pick("end_fraction", config.end_fraction, AUTO)),
            mask_init=str(pick("mask_init", config.mask_init, "auto")),
            grow_score=str(pick("grow_score", config.grow_score, "auto")),
            ema_decay=config.ema_decay,
            regrow_pruned=config.regrow_pruned,
            sparse_grad=(pick("sparse_grad", config.sparse_grad, "auto") == "on"),
            nmf_select=config.nmf_select,
            nmf_min_per_row=config.nmf_min_per_row,
        )

    # --- budgets and schedule -------------------------------------------------------------------

    def final_budget(self, rows: int, dim: int) -> int:
        """Active entries K of a [rows, dim] table at the end of training."""
        return budget(self.settings.density, rows, dim)

    def active_target(self, rows: int, dim: int, step: int, total_steps: int) -> int:
        """Active entries the table must hold after ``step``; constant K except for pruning schedules."""
        return self.final_budget(rows, dim)

    def initial_active(self, rows: int, dim: int) -> int:
        """Active entries of the initial mask; K except for schedules that start dense."""
        return self.final_budget(rows, dim)

    def end_step(self, total_steps: int) -> int:
        """First step at which the mask stops changing."""
        return int(math.floor(self.settings.end_fraction * total_steps))

    def is_update_step(self, step: int, total_steps: int) -> bool:
        """Whether the mask is updated after optimiser step ``step`` (1-based)."""
        return (
            self.settings.density < 1.0
            and self.settings.drop_fraction > 0.0
            and step % self.settings.update_every == 0
            and step < self.end_step(total_steps)
        )

    def swap_fraction(self, step: int, total_steps: int) -> float:
        """rho_t, the cosine-annealed share of active entries swapped at ``step``."""
        return cosine_drop_fraction(
            step, self.end_step(total_steps), self.settings.drop_fraction, self.settings.drop_fraction_min
        )

    def swap_count(self, active: int, step: int, total_steps: int) -> int:
        """Entries pruned and regrown at ``step``: ceil(rho_t * K)."""
        return int(math.ceil(self.swap_fraction(step, total_steps) * active))

    def user_prefix_share(self, step: int, total_steps: int) -> float:
        """Share of its leading dimensions every device's user row keeps after ``step``, for structured
        policies (AMGP); 0 = the device manages its own user mask."""
        return 0.0

    # --- masks ----------------------------------------------------------------------------------

    def initial_mask(
        self,
        table: str,
        rows: int,
        dim: int,
        rng: np.random.Generator,
        nmf_scores: np.ndarray | None = None,
        popularity: np.ndarray | None = None,
    ) -> np.ndarray:
        """bool [rows, dim] with exactly the initial budget; random unless the policy uses NMF scores.

        ``popularity`` float [rows] (training interactions per row) is read by the size policies only.
        """
        active = self.initial_active(rows, dim)
        if self.settings.mask_init == "nmf":
            if nmf_scores is None:
                raise ValueError(f"policy {self.name!r} needs NMF scores for table {table!r}")
            # A row quota the budget cannot cover (density * dim < 1) falls back to what it can.
            min_per_row = min(self.settings.nmf_min_per_row, active // max(1, rows))
            return top_k_mask(nmf_scores, active, self.settings.nmf_select, min_per_row)
        return random_mask(rng, rows, dim, active)

    # --- gradient statistics ----------------------------------------------------------------------

    @property
    def uses_gradients(self) -> bool:
        """Whether growth reads gradients (so the trainer must hand them over each step)."""
        explores = self.settings.density < 1.0 and self.settings.drop_fraction > 0.0
        return explores and self.settings.grow_score in ("last-batch", "signed-sum", "abs-sum", "ema")

    def observe_gradient(self, table: str, rows: np.ndarray, gradient: np.ndarray, shape: tuple[int, int]) -> None:
        """Record one step's gradient w.r.t. the masked weights: rows int64 [r] (unique), gradient [r, dim].

        Gradients of inactive entries are the growth signal (the mask does not block them: weights are
        stored pre-masked and used directly in the forward pass, as DSL does).
        """
        mode = self.settings.grow_score
        if mode == "last-batch":
            self._last_gradient[table] = (rows, gradient)
            return
        if mode not in ("signed-sum", "abs-sum", "ema"):
            return
        accumulator = self._accumulators.get(table)
        if accumulator is None:
            accumulator = self._accumulators[table] = np.zeros(shape, dtype=np.float32)
        if mode == "signed-sum":
            accumulator[rows] += gradient
        elif mode == "abs-sum":
            accumulator[rows] += np.abs(gradient)
        else:
            # Exponential moving average over steps: every row decays, touched rows take in the new value.
            accumulator *= self.settings.ema_decay
            accumulator[rows] += (1.0 - self.settings.ema_decay) * gradient

    def grow_scores(self, table: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Scores float [rows, dim] of candidates for growth (larger grows first)."""
        mode = self.settings.grow_score
        if mode == "random":
            return rng.random(shape)
        scores = np.zeros(shape, dtype=np.float32)
        if mode == "last-batch" and table in self._last_gradient:
            rows, gradient = self._last_gradient[table]
            scores[rows] = gradient
        elif table in self._accumulators:
            scores = self._accumulators[table]
        return np.abs(scores)

    def reset_statistics(self, table: str) -> None:
        """Forget accumulated gradients after a mask update (SparseRec resets G)."""
        if table in self._accumulators:
            self._accumulators[table][:] = 0.0
        self._last_gradient.pop(table, None)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The accumulated statistics by table, to checkpoint (last-batch gradients are not kept)."""
        return {f"accumulator.{table}": array for table, array in self._accumulators.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what ``state_arrays`` returned."""
        for key, array in arrays.items():
            if key.startswith("accumulator."):
                self._accumulators[key.removeprefix("accumulator.")] = np.array(array, dtype=np.float32)

    def statistics_nbytes(self) -> int:
        """Bytes held by gradient accumulators (part of the training memory figures)."""
        last = sum(rows.nbytes + grad.nbytes for rows, grad in self._last_gradient.values())
        return last + sum(array.nbytes for array in self._accumulators.values())

    # --- the update -------------------------------------------------------------------------------

    def update_mask(
        self,
        table: str,
        weight: np.ndarray,
        mask: np.ndarray,
        step: int,
        total_steps: int,
        rng: np.random.Generator,
    ) -> MaskUpdate:
        """Prune ceil(rho_t * K) smallest-magnitude active entries and grow as many by ``grow_scores``.

        With an NMF mask selected ``per-row``, the swap happens inside each row (ceil(rho_t * K_r) per
        row), so every row keeps the quota it started with and a device's upload per row stays fixed.
        """
        scores = self.grow_scores(table, mask.shape, rng)
        if self.settings.mask_init == "nmf" and self.settings.nmf_select == "per-row":
            fraction = self.swap_fraction(step, total_steps)
            update = prune_and_grow_within_rows(weight, mask, scores, fraction, self.settings.regrow_pruned)
        else:
            swap = self.swap_count(int(mask.sum()), step, total_steps)
            update = prune_and_grow(weight, mask, scores, swap, self.settings.regrow_pruned)
        self.reset_statistics(table)
        return update
