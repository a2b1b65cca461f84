"""Embedding-size allocations meet their budget exactly, stay prefix-form, and survive new rows."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsparse.sparse.bet import BetSettings, bet_search, group_mean_sizes
from fedsparse.sparse.embedding_sizes import (
    fit_sizes,
    frequency_sizes,
    grown_sizes,
    popularity_groups,
    power_law_exponent,
    power_law_probabilities,
    prefix_mask,
    prefix_sizes,
    sampled_sizes,
)
from fedsparse.sparse.masks import budget
from fedsparse.sparse.storage import CompactTable, compact_nbytes
from tests.test_policies import STEPS, make_training, run_steps


@settings(max_examples=300, deadline=None)
@given(
    raw=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=60),
    dim=st.integers(1, 70),
    fill=st.floats(0.0, 1.0),
    min_size=st.integers(0, 3),
)
def test_fit_sizes_meets_the_budget_exactly_within_bounds(raw, dim, fill, min_size):
    min_size = min(min_size, dim)
    rows = len(raw)
    total = rows * min_size + int(round(fill * rows * (dim - min_size)))
    sizes = fit_sizes(np.array(raw), total, dim, min_size)
    assert sizes.sum() == total
    assert sizes.min() >= min_size and sizes.max() <= dim


def test_fit_sizes_follows_the_scores_and_rejects_impossible_budgets():
    sizes = fit_sizes(np.array([1.0, 2.0, 4.0, 8.0]), 20, 8)
    assert list(sizes) == sorted(sizes) and sizes.sum() == 20 and sizes[-1] == 8
    with pytest.raises(ValueError, match="cannot give"):
        fit_sizes(np.ones(3), 25, 8)
    with pytest.raises(ValueError, match="finite"):
        fit_sizes(np.array([1.0, np.nan]), 4, 8)


def test_prefix_sizes_round_trip_and_reject_non_prefix_rows():
    sizes = np.array([0, 3, 8, 1])
    mask = prefix_mask(sizes, 8)
    assert np.array_equal(prefix_sizes(mask), sizes)
    mask[1, 5] = True
    with pytest.raises(ValueError, match="row 1"):
        prefix_sizes(mask)


def test_power_law_is_fitted_to_the_mean_and_sampled_sizes_meet_the_budget():
    dim = 64
    for mean in (2.0, 12.8, 40.0):
        probabilities = power_law_probabilities(power_law_exponent(mean, dim), dim)
        assert float(np.arange(1, dim + 1) @ probabilities) == pytest.approx(mean, rel=1e-6)
    popularity = np.random.default_rng(0).zipf(1.5, 5000).astype(float)
    total = budget(0.2, popularity.size, dim)
    sizes = sampled_sizes(np.random.default_rng(1), popularity, total, dim)
    assert sizes.sum() == total and sizes.min() >= 1
    popular = popularity >= np.quantile(popularity, 0.9)
    assert sizes[popular].mean() > sizes[~popular].mean()


def test_frequency_sizes_grow_with_popularity():
    popularity = np.array([0, 1, 10, 100, 1000], dtype=float)
    sizes = frequency_sizes(popularity, 40, 16, exponent=0.5)
    assert sizes.sum() == 40 and np.all(np.diff(sizes) >= 0) and sizes[-1] > sizes[0]


def test_new_rows_keep_the_budget_and_shrink_the_old_rows():
    old = frequency_sizes(np.arange(100, dtype=float), 1600, 64, exponent=0.5)
    grown = grown_sizes(old, np.full(50, old.mean()), 1600, 64)
    assert grown.sum() == 1600 and grown.size == 150
    assert grown[:100].sum() < old.sum()
    assert np.all(np.diff(grown[:100]) >= -1)  # old rows keep their order up to rounding


def test_popularity_groups_have_equal_counts_most_popular_first():
    groups = popularity_groups(np.array([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 2.0, 8.0]), 4)
    assert np.array_equal(np.bincount(groups), [2, 2, 2, 2])
    assert groups[2] == 0 and groups[5] == 3


def test_prefix_storage_round_trips_with_one_count_per_row():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 33, 50)
    mask = prefix_mask(sizes, 32)
    weight = (rng.normal(size=(50, 32)) * mask).astype(np.float32)
    table = CompactTable.encode(weight, mask, "prefix")
    assert table.nbytes == 50 + 4 * int(sizes.sum()) == compact_nbytes(50, 32, int(sizes.sum()), "prefix")
    again = CompactTable.from_arrays(table.to_arrays(), 50, 32)
    decoded, decoded_mask = again.decode()
    assert np.array_equal(decoded_mask, mask) and np.array_equal(decoded, weight)
    one_more = table.row_sizes.copy()
    one_more[np.argmin(one_more)] += 1
    with pytest.raises(ValueError, match="row_sizes sum"):
        CompactTable.from_arrays({**table.to_arrays(), "row_sizes": one_more}, 50, 32)
    with pytest.raises(ValueError, match="exceed dim"):
        CompactTable.from_arrays({**table.to_arrays(), "row_sizes": np.full(50, 33, dtype=np.uint8)}, 50, 32)
    with pytest.raises(ValueError, match="not a prefix"):
        CompactTable.encode(weight, ~mask, "prefix")


@pytest.mark.parametrize("name", ["size-frequency", "size-scall", "size-bet", "size-ciess"])
def test_size_policies_keep_prefix_masks_with_the_exact_budget_through_training(name):
    training, train, _ = make_training(name, density=0.3)
    sizes_seen = []

    def check(step):
        for table, mask in training.masks.items():
            sizes = prefix_sizes(mask.numpy())
            assert sizes.sum() == budget(0.3, *mask.shape), (table, step)
            sizes_seen.append(tuple(sizes))

    check(0)
    run_steps(training, train, STEPS, check)
    if name == "size-ciess":
        assert len(set(sizes_seen)) > 2, "CIESS never moved a size: the refinement is not running"
    degree = np.bincount(train.indices, minlength=train.shape[1])
    item_sizes = prefix_sizes(training.masks["item"].numpy())
    if name in ("size-frequency", "size-scall"):
        assert np.corrcoef(degree, item_sizes)[0, 1] > 0.3


def test_amgp_alternates_and_ends_full_size_with_nonzero_regrowth():
    training, train, _ = make_training("amgp", density=0.25, **{"sparse.amgp-cycles": 2, "sparse.amgp-sparse-share": 0.5})
    widths = []

    def check(step):
        mask = training.masks["item"].numpy()
        widths.append(int(prefix_sizes(mask).max()))
        if step in (6, 18):  # the first steps of the two full-size phases
            grown = mask[:, 2:]
            assert (training.tables["item"].weight.detach().numpy()[:, 2:][grown] != 0).mean() > 0.99

    run_steps(training, train, STEPS, check)
    assert widths[0] == 2 and widths[-1] == 8
    assert widths[5] == 8 and widths[11] == 2 and widths[17] == 8  # full, pruned, full
    assert training.accounting.mask_updates == 3


def test_bet_search_finds_the_best_allocation_of_a_known_fitness_and_meets_the_budget():
    rng = np.random.default_rng(0)
    popularity = rng.zipf(1.6, 400).astype(float)
    groups = popularity_groups(popularity, 4)
    total, dim = budget(0.25, 400, 32), 32
    target = group_mean_sizes(np.array([8.0, 4.0, 2.0, 1.0]), groups, total, dim, 1)

    def fitness(candidate):
        return -float(np.sum((group_mean_sizes(candidate, groups, total, dim, 1) - target) ** 2))

    result = bet_search(fitness, popularity, total, dim, 4, rng, BetSettings(initial_measured=8, search_rounds=3))
    uniform = fitness(np.ones(4))
    assert result.best_score > uniform / 3  # three times closer to the optimum than the uniform start
    assert fit_sizes(result.best[groups], total, dim).sum() == total
    assert len(result.measured) == 1 + 8 + 3 * 2
