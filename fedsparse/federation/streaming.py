"""Streaming federations: items and users arrive between rounds while the item table's budget stays fixed.

With ``budget.stream-stages = S`` only ``budget.stream-start`` of the items and users exist at round 1;
the rest arrive in S equal stages spread evenly over the rounds (a seeded order: the datasets carry no
usable timestamps). The server's item table keeps the active-entry count K it started with, as SCALL's
fixed memory budget: arriving items get entries that the existing rows give up (``grow_item_table``).
Every function is pure in (config, round), so devices and server agree without messages.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.rng import rng_for
from fedsparse.sparse.embedding_sizes import grown_sizes, prefix_mask, prefix_sizes
from fedsparse.sparse.masks import smallest_active


def stages_reached(config: RunConfig, server_round: int) -> int:
    """Arrival stages that have happened by ``server_round`` (stage s arrives at round 1 + floor(s * R / (S + 1)))."""
    stages, rounds = config.budget.stream_stages, config.num_server_rounds
    return sum(1 for stage in range(1, stages + 1) if 1 + (stage * rounds) // (stages + 1) <= server_round)


def present_share(config: RunConfig, server_round: int) -> float:
    """Share of items and users present at ``server_round`` (1 without streaming)."""
    stages = config.budget.stream_stages
    if stages == 0:
        return 1.0
    start = config.budget.stream_start
    return start + (1.0 - start) * stages_reached(config, server_round) / stages


@functools.lru_cache(maxsize=8)
def _arrival_order(seed: int, purpose: str, size: int) -> np.ndarray:
    """The seeded arrival order of ``size`` ids (read-only; every device and round asks for the same one)."""
    order = rng_for(seed, "stream", purpose).permutation(size)
    order.setflags(write=False)
    return order


def _present(config: RunConfig, ids: np.ndarray, server_round: int, purpose: str) -> np.ndarray:
    """The first ceil(share * n) of ``ids`` in a seeded order, sorted."""
    count = math.ceil(present_share(config, server_round) * ids.size)
    return np.sort(ids[_arrival_order(config.seed, purpose, ids.size)[:count]])


def revealed_items(config: RunConfig, n_items: int, server_round: int) -> np.ndarray | None:
    """Sorted int64 ids of the items that exist at ``server_round``, or None when all do (no streaming)."""
    if config.budget.stream_stages == 0:
        return None
    return _present(config, np.arange(n_items, dtype=np.int64), max(1, server_round), "items")


def arrived_users(config: RunConfig, users: np.ndarray, server_round: int) -> np.ndarray:
    """The devices of ``users`` (sorted int64) that have joined by ``server_round``."""
    if config.budget.stream_stages == 0:
        return users
    return _present(config, np.asarray(users, dtype=np.int64), max(1, server_round), "users")


def grow_item_table(
    weight: np.ndarray,
    mask: np.ndarray,
    present: np.ndarray,
    new_rows: np.ndarray,
    prefix: bool,
    rng: np.random.Generator,
    init_std: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Give ``new_rows`` (empty so far) entries while the table's active count stays exactly mask.sum();
    ``present`` are the rows that existed before (sorted int64), the only ones that give entries up.

    Prefix (size) masks: every present row's size is refitted with ``grown_sizes`` (new rows enter at the
    mean size, old rows shrink in proportion) and the dropped trailing entries are zeroed. Element-wise
    masks: each new row gets the mean active count per present row, in random columns, and as many of
    the old rows' smallest-magnitude active entries are pruned. New entries start at normal(0, init_std).
    """
    weight, mask = weight.copy(), mask.copy()
    dim = mask.shape[1]
    total = int(mask.sum())
    if new_rows.size == 0 or total == 0:
        return weight, mask
    if prefix:
        old_sizes = prefix_sizes(mask[present])
        sizes = grown_sizes(old_sizes, np.full(new_rows.size, old_sizes.mean()), total, dim, min_size=0)
        rows = np.concatenate([present, new_rows])
        new_mask = prefix_mask(sizes, dim)
        mask[rows] = new_mask
    else:
        quota = min(dim, total // (present.size + new_rows.size))
        pruned = smallest_active(weight, mask, quota * new_rows.size)
        mask.ravel()[pruned] = False
        for row in new_rows:
            mask[row, rng.choice(dim, size=quota, replace=False)] = True
    weight *= mask
    grown = np.zeros_like(mask)
    grown[new_rows] = mask[new_rows]
    weight[grown] = rng.normal(0.0, init_std, int(grown.sum())).astype(weight.dtype)
    return weight, mask
