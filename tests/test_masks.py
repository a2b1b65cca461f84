"""Exact-budget mask primitives: selection with deterministic ties, schedules, prune/grow."""

import math

import numpy as np
import pytest

from fedsparse.sparse.masks import (
    budget,
    cosine_drop_fraction,
    largest,
    prune_and_grow,
    prune_and_grow_within_rows,
    random_mask,
    smallest,
    smallest_active,
)


@pytest.mark.parametrize("density, rows, dim", [(0.05, 100, 64), (0.2, 7, 3), (1.0, 5, 4), (0.5, 1, 1), (1e-6, 10, 10)])
def test_budget_is_rounded_and_never_zero(density, rows, dim):
    assert budget(density, rows, dim) == min(rows * dim, max(1, round(density * rows * dim)))


def test_budget_rejects_densities_outside_the_unit_interval():
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density"):
            budget(density, 3, 3)


def test_random_mask_has_exactly_the_requested_count():
    rng = np.random.default_rng(0)
    for active in (0, 1, 17, 60):
        assert random_mask(rng, 6, 10, active).sum() == active


def test_selection_breaks_ties_by_lower_index_and_matches_a_full_sort():
    values = np.array([3.0, 1.0, 1.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(smallest(values, 3), [1, 2, 5])
    np.testing.assert_array_equal(largest(values, 2), [0, 3])
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 5, size=500).astype(float)
    for count in (0, 1, 37, 250, 500):
        reference = np.sort(np.argsort(coarse, kind="stable")[:count])
        np.testing.assert_array_equal(smallest(coarse, count), reference)


def test_cosine_schedule_endpoints_and_midpoint():
    assert cosine_drop_fraction(0, 100, 0.5, 0.005) == pytest.approx(0.5)
    assert cosine_drop_fraction(50, 100, 0.5, 0.005) == pytest.approx(0.2525)
    assert cosine_drop_fraction(75, 100, 0.5, 0.005) == pytest.approx(0.005 + 0.495 * (1 + math.cos(0.75 * math.pi)) / 2)
    assert cosine_drop_fraction(100, 100, 0.5, 0.005) == 0.0
    assert cosine_drop_fraction(10, 0, 0.5, 0.0) == 0.0


def test_prune_and_grow_keeps_the_count_and_swaps_the_right_entries():
    magnitude = np.array([[0.9, 0.1, 0.0], [0.5, 0.0, 0.2]])
    mask = np.array([[True, True, False], [True, False, True]])
    score = np.array([[0.0, 0.0, 5.0], [0.0, 7.0, 0.0]])
    update = prune_and_grow(magnitude, mask, score, 2)
    assert update.mask.sum() == mask.sum()
    np.testing.assert_array_equal(update.pruned, [1, 5])  # |0.1| and |0.2|
    np.testing.assert_array_equal(update.grown, [2, 4])  # scores 5 and 7
    np.testing.assert_array_equal(smallest_active(magnitude, mask, 1), [1])


def test_regrowing_pruned_entries_can_be_forbidden():
    magnitude = np.array([[0.1, 0.9, 0.0, 0.0]])
    mask = np.array([[True, True, False, False]])
    score = np.array([[9.0, 0.0, 1.0, 0.5]])  # the pruned entry has the best score
    allowed = prune_and_grow(magnitude, mask, score, 1, regrow_pruned=True)
    forbidden = prune_and_grow(magnitude, mask, score, 1, regrow_pruned=False)
    np.testing.assert_array_equal(allowed.grown, [0])
    np.testing.assert_array_equal(forbidden.grown, [2])
    assert forbidden.mask.sum() == allowed.mask.sum() == 2


def slow_within_rows(magnitude, mask, score, fraction, regrow_pruned):
    """Row by row with Python sorts: the reference for prune_and_grow_within_rows."""
    new = mask.copy()
    pruned, grown = [], []
    dim = mask.shape[1]
    for r in range(mask.shape[0]):
        active = [c for c in range(dim) if mask[r, c]]
        count = math.ceil(fraction * len(active))
        if not regrow_pruned:
            count = min(count, dim - len(active))
        drop = sorted(active, key=lambda c: (abs(magnitude[r, c]), c))[:count]
        for c in drop:
            new[r, c] = False
        pool = [c for c in range(dim) if (not new[r, c]) if regrow_pruned or not mask[r, c]]
        grow = sorted(pool, key=lambda c: (-score[r, c], c))[:count]
        for c in grow:
            new[r, c] = True
        pruned += [r * dim + c for c in drop]
        grown += [r * dim + c for c in grow]
    return new, sorted(pruned), sorted(grown)


@pytest.mark.parametrize("regrow_pruned", [True, False])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_prune_and_grow_within_rows_matches_the_slow_reference_and_keeps_row_counts(fraction, regrow_pruned):
    rng = np.random.default_rng(5)
    mask = rng.random((30, 8)) < 0.4
    mask[0] = True  # a full row: nothing to grow into unless pruned entries may come back
    mask[1] = False  # an empty row
    magnitude = rng.normal(size=mask.shape).round(1)  # rounded: ties must break by column
    score = rng.normal(size=mask.shape).round(1)
    update = prune_and_grow_within_rows(magnitude, mask, score, fraction, regrow_pruned)
    expected_mask, expected_pruned, expected_grown = slow_within_rows(magnitude, mask, score, fraction, regrow_pruned)
    np.testing.assert_array_equal(update.mask, expected_mask)
    np.testing.assert_array_equal(update.pruned, expected_pruned)
    np.testing.assert_array_equal(update.grown, expected_grown)
    np.testing.assert_array_equal(update.mask.sum(axis=1), mask.sum(axis=1))


def test_prune_and_grow_within_rows_rejects_shape_mismatch():
    mask = np.ones((3, 4), dtype=bool)
    with pytest.raises(ValueError, match="shapes differ"):
        prune_and_grow_within_rows(np.zeros((3, 5)), mask, np.zeros((3, 4)), 0.5)
