"""Training steps for masked embedding tables: masked Adam, gradient hooks, mask updates, accounting.

``SparseEmbeddingTraining`` wires a model's embedding tables to a mask policy. Per step it (optionally)
restricts which rows get gradients, runs backward, hands the gradient w.r.t. the masked weights to the
policy (its growth signal), applies a masked Adam update so inactive entries stay exactly zero (weights
and moments), and at the policy's update steps prunes and grows with the exact budget kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from fedsparse.config import RunConfig
from fedsparse.rng import rng_for
from fedsparse.sparse.nmf import nmf_factors, rebalance_columns
from fedsparse.sparse.policies import MaskPolicy, build_policy
from fedsparse.sparse.row_gradients import RowEmbedding, gradient_nbytes, row_gradient, select_gradient_rows
from fedsparse.sparse.storage import CompactTable

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class MaskedAdam:
    """Adam for one embedding table whose inactive entries stay exactly zero, moments included.

    The dense step reproduces ``torch.optim.Adam`` (no weight decay) on ``grad * mask``; the row step
    updates only the given rows (lazy Adam, one global step count as ``torch.optim.SparseAdam``).
    Moments of pruned or grown entries are reset, so a pruned entry cannot be revived by momentum.
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, lr: float) -> None:
        self.weight = weight
        self.mask = mask
        self.lr = lr
        self.exp_avg = torch.zeros_like(weight)
        self.exp_avg_sq = torch.zeros_like(weight)
        self.steps = 0
        self.mask_changed()

    def mask_changed(self) -> None:
        """Refresh the float copy of ``mask`` (multiplying by a bool tensor converts it every step)."""
        self._float_mask = self.mask.to(self.weight.dtype)

    def step(self, gradient: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Apply one update: ``gradient`` [rows, dim] for ``rows`` (int64 [r]), or the full table if None.

        ``gradient`` is consumed (masked in place). Inactive entries get a zero gradient and have zero
        moments, so their update is exactly zero and the weights stay zero without re-masking.
        """
        beta1, beta2 = ADAM_BETAS
        self.steps += 1
        step_size = self.lr / (1.0 - beta1**self.steps)
        bias_correction2_sqrt = (1.0 - beta2**self.steps) ** 0.5
        if rows is None:
            gradient.mul_(self._float_mask)
            self.exp_avg.lerp_(gradient, 1.0 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
            denominator = self.exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(ADAM_EPS)
            self.weight.addcdiv_(self.exp_avg, denominator, value=-step_size)
            return
        gradient = gradient * self._float_mask[rows]
        exp_avg = self.exp_avg[rows].lerp_(gradient, 1.0 - beta1)
        exp_avg_sq = self.exp_avg_sq[rows].mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
        self.exp_avg[rows] = exp_avg
        self.exp_avg_sq[rows] = exp_avg_sq
        denominator = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(ADAM_EPS)
        self.weight[rows] = self.weight[rows].addcdiv_(exp_avg, denominator, value=-step_size)

    def reset_entries(self, flat_indices: np.ndarray) -> None:
        """Zero the moments of the given flat (row-major) entries."""
        index = torch.from_numpy(np.asarray(flat_indices, dtype=np.int64))
        self.exp_avg.view(-1)[index] = 0.0
        self.exp_avg_sq.view(-1)[index] = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the optimiser state (two moments; a deployment would keep them for active entries only)."""
        return self.exp_avg.nbytes + self.exp_avg_sq.nbytes + self._float_mask.nbytes


class MaskedSGD:
    """Plain SGD on a masked table: ``weight -= lr * scale * gradient * mask``; no state to revive pruned entries.

    ``scale`` turns a mean loss's gradient into a summed one (pass the batch size), so ``lr`` is a step
    per example, as in classic MF-SGD, and a row's update grows with the gradient's magnitude instead
    of Adam's first step (lr * sign(gradient) for every entry, whatever its size).
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, lr: float) -> None:
        self.weight = weight
        self.lr = lr
        self._float_mask = mask.to(weight.dtype)

    def step(self, gradient: torch.Tensor, scale: float = 1.0) -> None:
        """Apply one update with ``gradient`` [rows, dim] (consumed: masked in place)."""
        self.weight.add_(gradient.mul_(self._float_mask), alpha=-self.lr * scale)

    @property
    def nbytes(self) -> int:
        """Bytes of the float mask copy (SGD keeps no moments)."""
        return self._float_mask.nbytes


@dataclass
class StepAccounting:
    """Measured per-run figures of the sparse machinery."""

    peak_grad_bytes: int = 0  # largest sum over tables of the gradient tensors one backward produced
    mask_updates: int = 0
    entries_swapped: int = 0
    mask_update_seconds: float = 0.0
    mask_init_seconds: float = 0.0  # NMF factorisation before the first epoch (not in seconds per epoch)


class TableModel(Protocol):
    """A model whose embedding tables the sparse core masks (``central.models.EmbeddingRecommender``)."""

    def embedding_tables(self) -> dict[str, RowEmbedding]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


class SparseEmbeddingTraining:
    """Drives one model's embedding tables under a mask policy; other parameters use plain Adam."""

    def __init__(
        self,
        model: TableModel,
        config: RunConfig,
        train: sp.csr_matrix,
        total_steps: int,
        policy: MaskPolicy | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.policy = policy or build_policy(config.sparse)
        self.total_steps = max(1, total_steps)
        self.step_count = 0
        self.accounting = StepAccounting()
        self.tables: dict[str, RowEmbedding] = model.embedding_tables()
        self.masks: dict[str, torch.Tensor] = {}
        self.optimizers: dict[str, MaskedAdam] = {}
        self.degree = {
            "user": np.asarray(np.diff(train.tocsr().indptr), dtype=np.float64),
            "item": np.bincount(train.tocsr().indices, minlength=train.shape[1]).astype(np.float64),
        }
        # Density 1 with a dense backward is plain dense training: torch's Adam on every parameter, so
        # the dense reference pays for no mask arithmetic it does not need.
        self.unmasked = self.policy.settings.density >= 1.0 and not self.policy.settings.sparse_grad
        started = time.perf_counter()
        nmf_scores = self._nmf_scores(train) if self.policy.settings.mask_init == "nmf" and not self.unmasked else {}
        self.accounting.mask_init_seconds = time.perf_counter() - started
        for name, table in self.tables.items():
            table.sparse = self.policy.settings.sparse_grad
            rows, dim = table.weight.shape
            kind = "user" if name.startswith("user") else "item"
            mask = self.policy.initial_mask(
                name, rows, dim, rng_for(config.seed, "mask-init", name), nmf_scores.get(name), self.degree[kind]
            )
            self.masks[name] = torch.from_numpy(mask)
            with torch.no_grad():
                if config.sparse.nmf_values == "factors" and name in nmf_scores:
                    table.weight.copy_(torch.from_numpy(nmf_scores[name].astype(np.float32)))
                table.weight.mul_(self.masks[name])
            if not self.unmasked:
                self.optimizers[name] = MaskedAdam(table.weight.data, self.masks[name], config.train.lr)
        table_parameters = {id(table.weight) for table in self.tables.values()}
        others = [p for p in model.parameters() if self.unmasked or id(p) not in table_parameters]
        self.dense_optimizer = torch.optim.Adam(others, lr=config.train.lr) if others else None

    def _nmf_scores(self, train: sp.csr_matrix) -> dict[str, np.ndarray]:
        """NMF factor magnitudes per table, user rows from P and item rows from Q (rank = table dim)."""
        scores: dict[str, np.ndarray] = {}
        sparse = self.config.sparse
        for dim in sorted({table.weight.shape[1] for table in self.tables.values()}):
            users, items = nmf_factors(train, dim, sparse.nmf_iterations, self.config.seed, sparse.nmf_method)
            if sparse.nmf_rescale:
                users, items = rebalance_columns(users, items)
            for name, table in self.tables.items():
                if table.weight.shape[1] == dim:
                    scores[name] = users if name.startswith("user") else items
        return scores

    def _row_budget(self, name: str) -> int:
        """Most rows of table ``name`` allowed a gradient per step (0 = no cap)."""
        factor = self.config.sparse.grad_row_budget
        if factor <= 0:
            return 0
        rows, dim = self.tables[name].weight.shape
        return max(1, int(factor * self.policy.final_budget(rows, dim) / dim))

    def begin_step(self, users: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> None:
        """Choose which rows receive gradients this step (only when a row budget is set)."""
        for name, table in self.tables.items():
            budget = self._row_budget(name)
            if not budget or not self.policy.settings.sparse_grad:
                table.trainable_rows = None
                continue
            kind = "user" if name.startswith("user") else "item"
            batch_rows = users if kind == "user" else items
            norms = (table.weight.detach().norm(dim=1).numpy() if self.config.sparse.grad_rows == "norm" else None)
            rows = select_gradient_rows(batch_rows, budget, self.config.sparse.grad_rows, rng, self.degree[kind], norms)
            trainable = torch.zeros(table.weight.shape[0], dtype=torch.bool)
            trainable[torch.from_numpy(rows)] = True
            table.trainable_rows = trainable

    def step(self, loss: torch.Tensor) -> None:
        """Backward ``loss``, feed the policy, apply masked updates, and update masks when scheduled."""
        for table in self.tables.values():
            table.weight.grad = None
        if self.dense_optimizer is not None:
            self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_bytes = 0
        for name, table in self.tables.items():
            gradient = table.weight.grad
            grad_bytes += gradient_nbytes(gradient)
            if gradient is None or self.unmasked:
                continue
            if gradient.is_sparse or self.policy.uses_gradients:
                rows, values = row_gradient(gradient)
                self.policy.observe_gradient(name, rows.numpy(), values.numpy(), (table.weight.shape[0], table.weight.shape[1]))
            if gradient.is_sparse:
                self.optimizers[name].step(values, rows)
            else:
                self.optimizers[name].step(gradient)
            table.weight.grad = None
        self.accounting.peak_grad_bytes = max(self.accounting.peak_grad_bytes, grad_bytes)
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
        self.step_count += 1
        if self.policy.is_update_step(self.step_count, self.total_steps):
            self.update_masks()

    def update_masks(self) -> None:
        """Run the policy's prune/grow on every table; pruned and grown entries restart at zero."""
        started = time.perf_counter()
        rng = rng_for(self.config.seed, "mask-update", self.step_count)
        for name, table in self.tables.items():
            weight = table.weight.data
            update = self.policy.update_mask(
                name, weight.numpy(), self.masks[name].numpy(), self.step_count, self.total_steps, rng
            )
            changed = np.concatenate([update.pruned, update.grown])
            self.masks[name].copy_(torch.from_numpy(update.mask))
            weight.view(-1)[torch.from_numpy(changed)] = 0.0
            if update.grown_values is not None:
                weight.view(-1)[torch.from_numpy(update.grown)] = torch.from_numpy(update.grown_values)
            self.optimizers[name].reset_entries(changed)
            self.optimizers[name].mask_changed()
            self.accounting.entries_swapped += int(update.grown.size)
        self.accounting.mask_updates += 1
        self.accounting.mask_update_seconds += time.perf_counter() - started

    def active_entries(self) -> dict[str, int]:
        """Active entries per table (what the exact budget promises)."""
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    def stored_model_bytes(self) -> int:
        """Bytes to store the model: each table in its compact format (or dense if smaller), plus the rest."""
        total = 0
        for name, table in self.tables.items():
            weight = table.weight.detach().numpy()
            dense = weight.nbytes
            compact = CompactTable.encode(weight, self.masks[name].numpy(), self.policy.storage_format).nbytes
            total += min(dense, compact)
        table_parameters = {id(table.weight) for table in self.tables.values()}
        total += sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in table_parameters)
        return total

    def state_nbytes(self) -> int:
        """Bytes of optimiser moments and policy statistics (training-time memory besides the model)."""
        if self.unmasked:
            moments = self.dense_optimizer.state.values() if self.dense_optimizer is not None else []
            return sum(
                int(tensor.nbytes) for state in moments for tensor in state.values() if isinstance(tensor, torch.Tensor)
            )
        return sum(opt.nbytes for opt in self.optimizers.values()) + self.policy.statistics_nbytes()
