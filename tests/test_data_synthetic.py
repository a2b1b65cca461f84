"""Synthetic generator: determinism, shape, power-law popularity, cluster structure."""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from fedsparse.data.synthetic import generate_synthetic


def n_components(table, n_users, n_items) -> int:
    """Connected components of the user-item bipartite graph (isolated items count one each)."""
    ones = np.ones(len(table), dtype=np.float32)
    matrix = sp.csr_matrix((ones, (table["user"], table["item"] + n_users)), shape=(n_users + n_items,) * 2)
    return connected_components(matrix, directed=False)[0]


def test_small_is_seeded_unique_and_in_range():
    table = generate_synthetic(500, 200, 10, np.random.default_rng(3))
    again = generate_synthetic(500, 200, 10, np.random.default_rng(3))
    other = generate_synthetic(500, 200, 10, np.random.default_rng(4))
    assert table.equals(again) and not table.equals(other)
    assert table["user"].dtype == np.int64 and table["item"].dtype == np.int64
    assert not table.duplicated().any()
    assert table["user"].between(0, 499).all() and table["item"].between(0, 199).all()
    assert table["user"].nunique() == 500  # every user has at least one interaction
    keys = table["user"].to_numpy() * 200 + table["item"].to_numpy()
    assert (np.diff(keys) > 0).all()  # sorted by (user, item)


def test_clusters_shape_the_graph():
    # With full affinity every user only sees their cluster's items: one component per cluster.
    table = generate_synthetic(2000, 400, 15, np.random.default_rng(0), n_clusters=4, cluster_affinity=1.0)
    never_drawn = 400 - table["item"].nunique()
    assert n_components(table, 2000, 400) == 4 + never_drawn  # each never-drawn item is alone
    mixed = generate_synthetic(2000, 400, 15, np.random.default_rng(0), n_clusters=4, cluster_affinity=0.5)
    assert n_components(mixed, 2000, 400) == 1 + (400 - mixed["item"].nunique())


def test_100k_users_power_law_and_mean_activity():
    start = time.perf_counter()
    table = generate_synthetic(100_000, 10_000, 20, np.random.default_rng(0))
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert table["user"].nunique() == 100_000
    assert 0.9 * 2_000_000 < len(table) <= 2_000_000 * 1.05  # mean of ~20 distinct items per user
    popularity = np.sort(np.bincount(table["item"], minlength=10_000))[::-1]
    assert popularity[:1000].sum() > 0.5 * popularity.sum()  # top 10% of items hold a majority
    activity = np.bincount(table["user"])
    assert activity.min() >= 1 and activity.max() > 3 * 20  # heavy-tailed activity, not all equal
