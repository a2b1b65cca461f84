"""Table-to-table steps between reading and splitting: deduplication, implicit feedback, k-core, remapping.

Tables are the readers' DataFrames (``user``, ``item`` [, ``rating``] [, ``timestamp``]). Each step
returns a new table with a fresh RangeIndex and keeps the survivors' original row order, which the
leave-one-out split uses to break timestamp ties.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from fedsparse.config import ConfigError


class RemappedIds(NamedTuple):
    """Contiguous ids for a table's rows and the original id behind each one."""

    users: np.ndarray  # int64 [n_rows], in 0..n_users-1
    items: np.ndarray  # int64 [n_rows], in 0..n_items-1
    user_ids: np.ndarray  # [n_users] original user ids, sorted
    item_ids: np.ndarray  # [n_items] original item ids, sorted


def drop_duplicate_pairs(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep one row per (user, item) pair and count the rows dropped (a repair, never silent).

    With a ``timestamp`` column the latest row is kept (equal timestamps: the later row in the file),
    so the rating a threshold sees is the user's latest opinion; without one the first row is kept.

    Returns
    -------
    (table without duplicate pairs, number of rows dropped)
    """
    if "timestamp" in table:
        order = np.argsort(table["timestamp"].to_numpy(), kind="stable")
        duplicated = np.empty(len(table), dtype=bool)
        duplicated[order] = table.iloc[order].duplicated(["user", "item"], keep="last").to_numpy()
    else:
        duplicated = table.duplicated(["user", "item"], keep="first").to_numpy()
    return table[~duplicated].reset_index(drop=True), int(duplicated.sum())


def to_implicit(table: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Implicit feedback: keep rows with ``rating >= threshold`` when ``threshold > 0``, else every row.

    Raises ConfigError when a positive threshold meets a table without ratings, rather than
    pretending every interaction passed.
    """
    if threshold <= 0:
        return table
    if "rating" not in table:
        raise ConfigError(f"data.rating-threshold is {threshold}, but this dataset's files have no ratings")
    return table[table["rating"].to_numpy() >= threshold].reset_index(drop=True)


def k_core(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iterative k-core: drop users and items with fewer than ``k`` rows until none is left (k <= 1: no-op).

    Dropping a user can push an item under ``k`` and vice versa, so the filter repeats until a pass
    removes nothing; the result is the largest sub-table in which every user and item has >= k rows.
    """
    if k <= 1:
        return table
    users = pd.factorize(table["user"])[0]
    items = pd.factorize(table["item"])[0]
    keep = np.ones(len(table), dtype=bool)
    while True:
        user_degree = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        item_degree = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        still = keep & (user_degree[users] >= k) & (item_degree[items] >= k)
        if still.sum() == keep.sum():
            return table[keep].reset_index(drop=True)
        keep = still


def remap_ids(table: pd.DataFrame) -> RemappedIds:
    """Map the table's original user and item ids to 0..n-1, in sorted order of the original ids."""
    users, user_ids = pd.factorize(table["user"], sort=True)
    items, item_ids = pd.factorize(table["item"], sort=True)
    return RemappedIds(
        users=users.astype(np.int64, copy=False),
        items=items.astype(np.int64, copy=False),
        user_ids=np.asarray(user_ids),
        item_ids=np.asarray(item_ids),
    )


__all__ = ["RemappedIds", "drop_duplicate_pairs", "to_implicit", "k_core", "remap_ids"]
