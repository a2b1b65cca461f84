"""Deduplication, implicit conversion, k-core (against a slow reference) and id remapping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsparse.config import ConfigError
from fedsparse.data.transforms import drop_duplicate_pairs, k_core, remap_ids, to_implicit


def test_duplicates_without_timestamps_keep_first_and_are_counted():
    table = pd.DataFrame({"user": [1, 2, 1, 1, 2], "item": [5, 5, 5, 6, 5], "rating": [1.0, 2.0, 3.0, 4.0, 5.0]})
    kept, dropped = drop_duplicate_pairs(table)
    assert dropped == 2
    assert kept.values.tolist() == [[1, 5, 1.0], [2, 5, 2.0], [1, 6, 4.0]]
    assert list(kept.index) == [0, 1, 2]


def test_duplicates_with_timestamps_keep_latest_then_later_row():
    table = pd.DataFrame(
        {
            "user": [1, 1, 1, 2, 2],
            "item": [5, 5, 5, 7, 7],
            "rating": [1.0, 2.0, 3.0, 4.0, 5.0],
            "timestamp": [30, 10, 20, 8, 8],
        }
    )
    kept, dropped = drop_duplicate_pairs(table)
    assert dropped == 3
    # user 1 keeps its latest (t=30, first row); user 2's tie goes to the later row; file order kept
    assert kept["rating"].tolist() == [1.0, 5.0]


def test_no_duplicates_counts_zero():
    table = pd.DataFrame({"user": [1, 2], "item": [1, 1]})
    kept, dropped = drop_duplicate_pairs(table)
    assert dropped == 0 and len(kept) == 2


def test_to_implicit_threshold():
    table = pd.DataFrame({"user": [1, 1, 2, 2], "item": [1, 2, 1, 2], "rating": [5.0, 3.0, 4.0, 3.5]})
    assert len(to_implicit(table, 0.0)) == 4
    assert to_implicit(table, 4.0)["rating"].tolist() == [5.0, 4.0]
    with pytest.raises(ConfigError, match="no ratings"):
        to_implicit(table.drop(columns="rating"), 4.0)
    assert len(to_implicit(table.drop(columns="rating"), 0.0)) == 4


def slow_k_core(pairs: set[tuple[int, int]], k: int) -> set[tuple[int, int]]:
    """Obvious reference: remove one under-k user or item at a time until none is left."""
    pairs = set(pairs)
    while True:
        users = pd.Series([u for u, _ in pairs]).value_counts()
        items = pd.Series([i for _, i in pairs]).value_counts()
        weak_users = set(users[users < k].index)
        weak_items = set(items[items < k].index)
        if not pairs or (not weak_users and not weak_items):
            return pairs
        pairs = {(u, i) for u, i in pairs if u not in weak_users and i not in weak_items}


def test_k_core_cascades_to_a_fixed_point():
    # At k=2 user 3 (only item 9) goes first; that leaves item 9 with one user, so it goes next,
    # which leaves user 2 with one item, so user 2 goes last: three passes.
    table = pd.DataFrame({"user": [0, 0, 1, 1, 2, 2, 3], "item": [5, 6, 5, 6, 5, 9, 9]})
    core = k_core(table, 2)
    assert sorted(map(tuple, core[["user", "item"]].values.tolist())) == [(0, 5), (0, 6), (1, 5), (1, 6)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_k_core_matches_slow_reference_and_is_stable(k):
    rng = np.random.default_rng(k)
    users = rng.integers(0, 60, size=600)
    items = (rng.pareto(1.0, size=600) * 5).astype(np.int64) % 80
    table = pd.DataFrame({"user": users, "item": items}).drop_duplicates(ignore_index=True)
    core = k_core(table, k)
    got = set(map(tuple, core[["user", "item"]].values.tolist()))
    assert got == slow_k_core(set(map(tuple, table.values.tolist())), k)
    assert len(got) < len(table)  # the filter did something
    assert core["user"].value_counts().min() >= k and core["item"].value_counts().min() >= k
    assert len(k_core(core, k)) == len(core)  # fixed point


def test_k_core_off_for_k_at_most_one():
    table = pd.DataFrame({"user": [0, 1], "item": [0, 1]})
    assert len(k_core(table, 0)) == 2 and len(k_core(table, 1)) == 2


def test_remap_ids_sorted_contiguous_and_reversible():
    table = pd.DataFrame({"user": ["u9", "u1", "u9", "u5"], "item": [30, 10, 20, 30]})
    ids = remap_ids(table)
    assert ids.user_ids.tolist() == ["u1", "u5", "u9"] and ids.item_ids.tolist() == [10, 20, 30]
    assert ids.users.dtype == np.int64 and ids.items.dtype == np.int64
    assert ids.users.tolist() == [2, 0, 2, 1] and ids.items.tolist() == [2, 0, 1, 2]
    assert ids.user_ids[ids.users].tolist() == table["user"].tolist()
    assert ids.item_ids[ids.items].tolist() == table["item"].tolist()
