"""The server side of a federated round as plain calls, shared by the Flower ServerApp and the
in-process engine: seeded sampling, downloads, reply validation, per-row aggregation, item-mask
exploration, the central NMF oracle, per-round records and checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from fedsparse.config import RunConfig
from fedsparse.federation.aggregation import AggregatedRows, aggregate_secure_sum, needs_row_weights, sum_secure_uploads
from fedsparse.federation.network import initial_network, network_shapes, weighted_network_mean
from fedsparse.federation.robust import robust_aggregate, too_large
from fedsparse.federation.server_optim import ServerOptimizer
from fedsparse.federation.streaming import grow_item_table, revealed_items
from fedsparse.federation.wire import (
    NetworkWeights,
    PayloadError,
    RowsDownload,
    RowUpdate,
    SecureUpload,
    split_network,
    wire_row_ids,
)
from fedsparse.privacy.secure_rows import secure_round_rows
from fedsparse.rng import rng_for
from fedsparse.sparse.nmf import nmf_factors, rebalance_columns
from fedsparse.sparse.policies import MaskPolicy, build_policy
from fedsparse.sparse.storage import CompactTable

ITEM_TABLE = "item"


def sample_clients(seed: int, server_round: int, n_clients: int, count: int, purpose: str = "train") -> np.ndarray:
    """``count`` distinct client ids (sorted) for a round, from a stream keyed by (seed, purpose, round).

    Flower's own node sampling uses the unseeded global ``random``; this is what both engines use.
    """
    count = min(max(1, count), n_clients)
    return np.sort(rng_for(seed, "sample", purpose, server_round).choice(n_clients, size=count, replace=False))


def clients_per_round(config: RunConfig, n_clients: int) -> int:
    """Devices trained per round: ``fed.clients-per-round`` or ceil(fraction * n_clients)."""
    if config.fed.clients_per_round:
        return min(config.fed.clients_per_round, n_clients)
    return max(1, math.ceil(config.fed.fraction_train * n_clients))


def is_evaluation_round(config: RunConfig, server_round: int) -> bool:
    """Whether ``server_round`` is evaluated: every ``fed.eval-every`` rounds and the last one."""
    return server_round % config.fed.eval_every == 0 or server_round == config.num_server_rounds


def policy_for_rounds(config: RunConfig) -> MaskPolicy:
    """The item-table policy with its schedule counted in rounds (update every ``fed.explore-every``)."""
    return build_policy(replace(config.sparse, update_every=config.fed.explore_every))


@dataclass
class Server:
    """The server's state: the masked item table, the policy's statistics, the round and the totals."""

    config: RunConfig
    item_weight: np.ndarray  # float32 [n_items, dim], zero off-mask
    item_mask: np.ndarray  # bool [n_items, dim]
    policy: MaskPolicy
    optimizer: ServerOptimizer  # how mean deltas become a step (``fed.server-optimizer``)
    round: int = 0
    network: NetworkWeights | None = None  # NeuMF's shared network (FedNCF); None for MF
    # (round, rows) of the last ``secure_rows`` answer: every reply of a round is decoded against the same rows
    _covered: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls, config: RunConfig, n_items: int, item_factor: np.ndarray | None = None, item_popularity: np.ndarray | None = None
    ) -> Server:
        """A fresh server: item rows masked by the policy's initial mask (NMF scores |item_factor|, or item
        popularity for the size policies, if given).

        Values are normal(0, ``fed.item-init-std``), or the NMF item factor itself when ``sparse.nmf-values = factors``.
        Rows are ``model.row_width`` wide (NeuMF: GMF | MLP), and a NeuMF server also holds the shared network
        (``network.initial_network``).
        """
        dim = config.model.row_width
        policy = policy_for_rounds(config)
        rng = rng_for(config.seed, "server-init")
        present = revealed_items(config, n_items, 1)
        present = np.arange(n_items) if present is None else present  # streaming: only the items of round 1
        mask = np.zeros((n_items, dim), dtype=bool)
        mask[present] = policy.initial_mask(
            ITEM_TABLE, present.size, dim, rng,
            # the entries of largest magnitude: a signed (SVD) start ranks like a non-negative one
            None if item_factor is None else np.abs(item_factor[present]),
            None if item_popularity is None else item_popularity[present],
        )
        values = rng.normal(0.0, config.fed.item_init_std, (n_items, dim))
        if item_factor is not None and config.sparse.nmf_values == "factors":
            values = item_factor
        return cls(config, (values * mask).astype(np.float32), mask, policy, ServerOptimizer(config.fed),
                   network=initial_network(config))

    @classmethod
    def restore(cls, config: RunConfig, arrays: dict[str, np.ndarray]) -> Server:
        """Rebuild a server from ``state_arrays`` output (a checkpoint); ValueError when the shared network
        the config needs is missing or misshapen."""
        policy = policy_for_rounds(config)
        policy.load_state_arrays({k.removeprefix("policy."): v for k, v in arrays.items() if k.startswith("policy.")})
        optimizer = ServerOptimizer(config.fed)
        optimizer.load_state_arrays({k.removeprefix("optimizer."): v for k, v in arrays.items() if k.startswith("optimizer.")})
        return cls(
            config,
            np.array(arrays["item-weight"], dtype=np.float32),
            np.array(arrays["item-mask"], dtype=bool),
            policy,
            optimizer,
            int(arrays["round"][0]),
            _restored_network(config, arrays),
        )

    @property
    def n_items(self) -> int:
        return self.item_weight.shape[0]

    def download(self, rows: np.ndarray | None = None, width: int | None = None) -> RowsDownload:
        """The masked item rows for a device: every row (``rows`` None) or the given sorted ids, cut to
        their first ``width`` dimensions for a device that holds no more (None = all)."""
        width = self.item_weight.shape[1] if width is None else width
        weight, mask = self.item_weight[:, :width], self.item_mask[:, :width]
        layout = self.policy.storage_format
        if rows is None:
            return RowsDownload(None, CompactTable.encode(weight, mask, layout))
        return RowsDownload(wire_row_ids(rows, self.n_items), CompactTable.encode(weight[rows], mask[rows], layout))

    def reveal(self, server_round: int) -> int:
        """Streaming: give the items arriving at ``server_round`` their entries, the budget unchanged
        (``grow_item_table``); returns how many arrived (0 without streaming)."""
        before, now = (revealed_items(self.config, self.n_items, server_round - 1),
                       revealed_items(self.config, self.n_items, server_round))
        if now is None or before is None or server_round <= 1:
            return 0
        new_rows = np.setdiff1d(now, before, assume_unique=True)
        if new_rows.size:
            old_mask = self.item_mask
            self.item_weight, self.item_mask = grow_item_table(
                self.item_weight, self.item_mask, before, new_rows, self.policy.storage_format == "prefix",
                rng_for(self.config.seed, "stream-grow", server_round), self.config.fed.item_init_std,
            )
            self.optimizer.forget(np.flatnonzero((old_mask != self.item_mask).ravel()))
        return int(new_rows.size)

    def is_explore_round(self, server_round: int) -> bool:
        """Whether the item mask is updated after this round's aggregation."""
        return self.policy.is_update_step(server_round, self.config.num_server_rounds)

    def wants_signal(self, server_round: int) -> bool:
        """Whether devices send a regrowth signal this round: at exploration rounds, or every round for an
        accumulating policy when ``fed.signal-every-round``; never for random growth or a fixed mask."""
        grow = self.policy.settings.grow_score
        if self.config.fed.signal_topk == 0 or grow == "random" or self.policy.settings.drop_fraction == 0:
            return False
        every_round = self.config.fed.signal_every_round and grow != "last-batch"
        return every_round or self.is_explore_round(server_round)

    def user_swap_fraction(self, server_round: int) -> float:
        """Share of each device's active user entries to prune and regrow this round (0 = keep the mask).

        Devices explore their own user row with the item table's schedule, from their own gradients.
        """
        if not self.is_explore_round(server_round):
            return 0.0
        return self.policy.swap_fraction(server_round, self.config.num_server_rounds)

    def train_settings(self, server_round: int) -> dict[str, float | bool]:
        """The scalars every training device receives this round."""
        settings: dict[str, float | bool] = {
            "send-signal": self.wants_signal(server_round), "user-swap-fraction": self.user_swap_fraction(server_round),
        }
        evaluate_model = self.config.fed.evaluate_model
        if evaluate_model == "local-last" or (evaluate_model == "local" and is_evaluation_round(self.config, server_round)):
            settings["evaluate"] = True  # local-last: every round, since a device's last personal model is what counts
        share = self.policy.user_prefix_share(server_round - 1, self.config.num_server_rounds)  # the phase this round trains in
        return {**settings, "user-prefix-share": share} if share else settings

    def decode_reply(self, arrays: dict[str, np.ndarray], width: int | None = None) -> RowUpdate:
        """Validate one device's upload against the current item mask cut to the device's ``width``
        (None = all dimensions) and, in a NeuMF federation, the shared network's shapes; raises PayloadError."""
        dim = self.item_weight.shape[1]
        width = dim if width is None else width
        # the mask is a view: the device's columns only
        update = RowUpdate.from_arrays(arrays, self.item_mask[:, :width], network_shapes(self.config))
        return update if width == dim else replace(update, width=width)

    def secure_rows(self) -> np.ndarray:
        """Sorted int64 rows the coming round's secure uploads cover (all rows, or the public subset), drawn once
        per round (a biased draw reads the item mask, which changes only when a round is applied)."""
        if self._covered is None or self._covered[0] != self.round:
            rows = secure_round_rows(self.config, self.n_items, self.round + 1, self.item_mask)
            self._covered = (self.round, np.arange(self.n_items, dtype=np.int64) if rows is None else rows)
        return self._covered[1]

    def decode_secure_reply(self, arrays: dict[str, np.ndarray]) -> SecureUpload:
        """Validate one device's secure-aggregation upload against the covered rows' mask; raises PayloadError."""
        covered_mask = self.item_mask[self.secure_rows()]
        return SecureUpload.from_arrays(arrays, covered_mask, needs_row_weights(self.config.fed.aggregation))

    def apply_round(self, server_round: int, updates: list[RowUpdate]) -> dict[str, Any]:
        """Aggregate the round's accepted updates (with the ``robust.*`` defences), apply them, explore
        the mask if scheduled; a NeuMF server also adds the network deltas' example-weighted mean (FedAvg)."""
        mean = weighted_network_mean(updates)
        if self.network is not None and mean is not None:
            self.network = NetworkWeights({name: (array + mean.arrays[name]).astype(np.float32)
                                           for name, array in self.network.arrays.items()})
        return self.apply_merged(
            server_round, robust_aggregate(updates, self.item_mask, self.config.robust, self.config.fed.aggregation))

    def apply_secure_round(self, server_round: int, uploads: list[SecureUpload]) -> dict[str, Any]:
        """The same from secure uploads, of which only the sum is used (all SecAgg reveals)."""
        if not uploads:
            return self.apply_round(server_round, [])
        return self.apply_secure_sum(server_round, sum_secure_uploads(uploads), len(uploads))

    def apply_secure_sum(self, server_round: int, total: SecureUpload, devices: int) -> dict[str, Any]:
        """Apply the round from the validated sum of its ``devices`` secure uploads (what a SecAgg+ protocol reveals)."""
        merged = aggregate_secure_sum(total, self.item_mask, self.secure_rows(), self.config.fed.aggregation, devices)
        return self.apply_merged(server_round, merged)

    def apply_merged(self, server_round: int, merged: AggregatedRows) -> dict[str, Any]:
        """Apply per-row mean deltas (and the regrowth signal), then explore the mask if scheduled."""
        if merged.rows.size:
            rows = merged.rows
            self.item_weight[rows] += self.optimizer.step(rows, merged.deltas, self.item_mask[rows], self.n_items)
            if self.wants_signal(server_round):
                self.policy.observe_gradient(ITEM_TABLE, rows, merged.signal, self.item_mask.shape)
        explored = {}
        if self.is_explore_round(server_round):
            update = self.policy.update_mask(
                ITEM_TABLE, self.item_weight, self.item_mask, server_round, self.config.num_server_rounds,
                rng_for(self.config.seed, "server-explore", server_round),
            )
            self.item_mask = update.mask
            changed = np.concatenate([update.pruned, update.grown])
            self.item_weight.reshape(-1)[changed] = 0.0
            if update.grown_values is not None:
                self.item_weight.reshape(-1)[update.grown] = update.grown_values
            self.optimizer.forget(changed)
            explored = {"pruned": int(update.pruned.size), "grown": int(update.grown.size)}
        self.round = server_round
        return {"rows_updated": int(merged.rows.size), **explored}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to resume: table, mask, round and the policy's accumulators."""
        arrays = {"item-weight": self.item_weight, "item-mask": self.item_mask, "round": np.asarray([self.round])}
        arrays.update({f"policy.{key}": value for key, value in self.policy.state_arrays().items()})
        arrays.update({f"optimizer.{key}": value for key, value in self.optimizer.state_arrays().items()})
        if self.network is not None:
            arrays.update(self.network.to_arrays())
        return arrays


def _restored_network(config: RunConfig, arrays: dict[str, np.ndarray]) -> NetworkWeights | None:
    """The shared network among checkpoint ``arrays`` (``network.*``), checked against the config's shapes;
    None for MF. ValueError naming the problem (a checkpoint of another model, or damaged)."""
    network, _ = split_network(arrays)
    shapes = network_shapes(config)
    if shapes is None:
        if network:
            raise ValueError(f"the checkpoint holds a shared network ({', '.join(sorted(network))}) but model.name = "
                             f"{config.model.name} has none")
        return None
    try:
        return NetworkWeights.from_arrays({key: np.asarray(value) for key, value in network.items()}, shapes)
    except PayloadError as exc:
        raise ValueError(f"the checkpoint's shared network does not fit model.* of this run: {exc}") from exc


def validate_update(
    server: Server, arrays: dict[str, np.ndarray], secure: bool = False, width: int | None = None
) -> tuple[RowUpdate | SecureUpload | None, str | None]:
    """(update, None) when a reply is well-formed (a ``SecureUpload`` when ``secure``), else (None, the
    reason it was dropped); ``width`` is the sending device's (None = all dimensions). Real SecAgg+ can
    only check the sum; the simulation checks each device."""
    try:
        if secure:
            return server.decode_secure_reply(arrays), None
        update = server.decode_reply(arrays, width)
    except PayloadError as exc:
        return None, str(exc)
    reason = too_large(update, server.config.robust)
    return (None, reason) if reason else (update, None)


# --- federated NMF ------------------------------------------------------------------------------


def central_nmf_item_factor(config: RunConfig, train: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Oracle NMF on the full matrix (scikit-learn): (P, Q) after the optional column rebalance."""
    users, items = nmf_factors(train, config.model.dim, config.sparse.nmf_iterations, config.seed, config.sparse.nmf_method)
    return rebalance_columns(users, items) if config.sparse.nmf_rescale else (users, items)
