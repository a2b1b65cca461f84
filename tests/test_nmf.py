"""NMF: federated round == central round, monotone objective, both solvers fit, column rebalance,
exact-budget top-k selection with deterministic ties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from fedsparse.rng import rng_for
from fedsparse.sparse.nmf import (
    NMF_EPS,
    apply_item_update,
    item_update_contribution,
    multiplicative_init,
    multiplicative_update,
    nmf_factors,
    nmf_masks,
    nmf_objective,
    rebalance_columns,
    sum_item_contributions,
    top_k_mask,
    user_factor_update,
)


def random_binary(n_users: int, n_items: int, density: float, seed: int) -> sp.csr_matrix:
    rng = rng_for(seed, "test-nmf-matrix")
    dense = rng.random((n_users, n_items)) < density
    dense[0] = False  # one user with no interactions: its factor must go to zero in both versions
    return sp.csr_matrix(dense.astype(np.float32))


def planted(n_users: int, n_items: int, rank: int, seed: int) -> sp.csr_matrix:
    """An exactly rank-`rank` non-negative matrix with sparse factors, stored sparse."""
    rng = rng_for(seed, "test-nmf-planted")
    W = rng.random((n_users, rank)) * (rng.random((n_users, rank)) < 0.3)
    H = rng.random((n_items, rank)) * (rng.random((n_items, rank)) < 0.3)
    return sp.csr_matrix(W @ H.T)


def relative_error(R: sp.csr_matrix, P: np.ndarray, Q: np.ndarray) -> float:
    dense = R.toarray()
    return float(np.linalg.norm(dense - P.astype(np.float64) @ Q.astype(np.float64).T) / np.linalg.norm(dense))


# ---------------------------------------------------------------- multiplicative updates


def test_federated_round_equals_central_round():
    R = random_binary(30, 25, 0.2, seed=1)
    P, Q = multiplicative_init(30, 25, 6, seed=2, mean=R.sum() / R.size)
    for _ in range(3):  # a few rounds, so the comparison is not just at the init
        central_P, central_Q = multiplicative_update(R, P, Q)

        gram_q = Q.T @ Q  # the server broadcasts Q rows and this rank x rank gram
        new_P = np.stack([user_factor_update(R[u].indices, P[u], Q, gram_q) for u in range(R.shape[0])])
        contributions = [item_update_contribution(R[u].indices, new_P[u]) for u in range(R.shape[0])]
        numerator_sum, gram_sum = sum_item_contributions(25, 6, contributions)
        new_Q = apply_item_update(Q, numerator_sum, gram_sum)

        np.testing.assert_allclose(new_P, central_P, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(new_Q, central_Q, rtol=1e-6, atol=1e-12)
        P, Q = central_P, central_Q
    assert np.all(P[0] == 0)


def test_item_contribution_shapes_and_values():
    p_u = np.array([1.0, 2.0, 3.0])
    rows, numerator, gram = item_update_contribution(np.array([4, 7]), p_u)
    assert rows.dtype == np.int64 and rows.tolist() == [4, 7]
    np.testing.assert_array_equal(numerator, [[1, 2, 3], [1, 2, 3]])
    np.testing.assert_array_equal(gram, np.outer(p_u, p_u))
    rows, numerator, gram = item_update_contribution(np.zeros(0, dtype=np.int64), p_u)
    assert rows.shape == (0,) and numerator.shape == (0, 3)


def test_user_update_matches_formula():
    rng = rng_for(0, "test-user-update")
    Q = rng.random((10, 4))
    p_u = rng.random(4)
    items = np.array([1, 5, 6])
    expected = p_u * Q[items].sum(axis=0) / (p_u @ (Q.T @ Q) + NMF_EPS)
    np.testing.assert_allclose(user_factor_update(items, p_u, Q, Q.T @ Q), expected, rtol=1e-12)


def test_objective_non_increasing_over_20_iterations():
    R = random_binary(40, 30, 0.15, seed=3)
    P, Q = multiplicative_init(40, 30, 5, seed=4, mean=R.sum() / R.size)
    losses = [nmf_objective(R, P, Q)]
    for _ in range(20):
        P, Q = multiplicative_update(R, P, Q)
        losses.append(nmf_objective(R, P, Q))
    assert np.all(np.diff(losses) <= 1e-9 * losses[0])
    assert losses[-1] < 0.9 * losses[0]
    dense_loss = np.linalg.norm(R.toarray() - P @ Q.T) ** 2  # the trace form matches the dense one
    assert losses[-1] == pytest.approx(dense_loss, rel=1e-9)


def test_init_is_seeded_and_positive():
    P, Q = multiplicative_init(5, 4, 3, seed=7, mean=0.1)
    P2, Q2 = multiplicative_init(5, 4, 3, seed=7, mean=0.1)
    np.testing.assert_array_equal(P, P2)
    np.testing.assert_array_equal(Q, Q2)
    assert np.all(P > 0) and np.all(Q > 0)
    assert not np.array_equal(P, multiplicative_init(5, 4, 3, seed=8, mean=0.1)[0])


@pytest.mark.parametrize("method, iterations, tolerance", [("sklearn", 200, 0.01), ("multiplicative", 400, 0.01)])
def test_both_methods_fit_a_planted_low_rank_matrix(method, iterations, tolerance):
    R = planted(60, 50, 4, seed=5)
    P, Q = nmf_factors(R, 4, iterations, seed=0, method=method)
    assert P.dtype == np.float32 and Q.dtype == np.float32
    assert P.shape == (60, 4) and Q.shape == (50, 4)
    assert np.all(P >= 0) and np.all(Q >= 0)
    assert relative_error(R, P, Q) < tolerance
    again = nmf_factors(R, 4, iterations, seed=0, method=method)
    np.testing.assert_array_equal(P, again[0])


def test_nmf_factors_rejects_bad_input():
    R = random_binary(6, 5, 0.5, seed=0)
    with pytest.raises(ValueError, match="method"):
        nmf_factors(R, 2, 5, seed=0, method="als")
    with pytest.raises(ValueError, match="rank"):
        nmf_factors(R, 0, 5, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        nmf_factors(-R, 2, 5, seed=0)
    with pytest.raises(TypeError):
        nmf_factors(R.toarray(), 2, 5, seed=0)


# ---------------------------------------------------------------- rebalance


def test_rebalance_keeps_product_and_equalises_column_norms():
    rng = rng_for(0, "test-rebalance")
    P = rng.random((20, 5)) * np.array([1e-3, 1.0, 10.0, 100.0, 1.0])
    Q = rng.random((15, 5)) * np.array([1e3, 1.0, 0.1, 1e-2, 1.0])
    P[:, 4] = 0.0  # a zero column on one side is left alone
    P2, Q2 = rebalance_columns(P, Q)
    np.testing.assert_allclose(P2 @ Q2.T, P @ Q.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(P2[:, :4], axis=0), np.linalg.norm(Q2[:, :4], axis=0), rtol=1e-12)
    np.testing.assert_array_equal(Q2[:, 4], Q[:, 4])
    np.testing.assert_array_equal(P2[:, 4], P[:, 4])
    P32, Q32 = rebalance_columns(P.astype(np.float32), Q.astype(np.float32))
    assert P32.dtype == np.float32 and Q32.dtype == np.float32


# ---------------------------------------------------------------- top-k selection


@pytest.mark.parametrize("select", ["global", "per-row"])
def test_top_k_exact_count_for_many_shapes(select):
    rng = rng_for(0, "test-topk-counts")
    for rows, d in [(1, 1), (1, 7), (5, 1), (7, 3), (13, 8), (4, 64)]:
        scores = rng.random((rows, d)).astype(np.float32)
        scores[rng.random((rows, d)) < 0.3] = 0.0  # many exact ties at zero
        for budget in sorted({0, 1, rows, rows * d // 3, rows * d - 1, rows * d}):
            if budget < 0:
                continue
            for min_per_row in (0, 1, 2):
                if min_per_row * rows > budget:
                    continue
                mask = top_k_mask(scores, budget, select, min_per_row)
                assert mask.dtype == np.bool_ and mask.shape == (rows, d)
                assert int(mask.sum()) == budget
                assert np.all(mask.sum(axis=1) >= min_per_row)


def test_global_takes_the_largest_scores():
    rng = rng_for(1, "test-topk-global")
    scores = rng.random((9, 6))
    mask = top_k_mask(scores, 20)
    assert scores[mask].min() > scores[~mask].max()


def test_ties_go_to_the_lower_flat_index():
    scores = np.array([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    np.testing.assert_array_equal(top_k_mask(scores, 2), [[False, True, True], [False, False, False]])
    np.testing.assert_array_equal(top_k_mask(scores, 3), [[False, True, True], [True, False, False]])
    np.testing.assert_array_equal(top_k_mask(np.zeros((2, 3)), 4), [[True, True, True], [True, False, False]])
    # per-row: quota 1 each (lowest tied column), extra goes to the lower row when the next-best ties
    np.testing.assert_array_equal(top_k_mask(scores, 3, "per-row"), [[False, True, True], [True, False, False]])


def test_min_per_row_gives_every_row_its_own_best_then_global():
    scores = np.array([[9.0, 8.0, 7.0], [0.1, 0.3, 0.2], [5.0, 4.0, 6.0]])
    mask = top_k_mask(scores, 5, "global", min_per_row=1)
    # floors: 9, 0.3, 6; the two left go to the largest remaining scores anywhere (8, 7)
    expected = [[True, True, True], [False, True, False], [False, False, True]]
    np.testing.assert_array_equal(mask, expected)
    assert not top_k_mask(scores, 5, "global")[1].any()  # without the floor row 1 gets nothing


def test_per_row_quota_is_balanced_and_prefers_the_best_next_entries():
    rng = rng_for(2, "test-topk-per-row")
    scores = rng.random((11, 16))
    for budget in (0, 5, 11, 23, 100, 175, 176):
        counts = top_k_mask(scores, budget, "per-row").sum(axis=1)
        assert counts.sum() == budget and counts.max() - counts.min() <= 1
    mask = top_k_mask(scores, 2 * 11 + 4, "per-row")
    order = np.sort(scores, axis=1)[:, ::-1]
    extra_rows = np.flatnonzero(mask.sum(axis=1) == 3)
    assert set(extra_rows) == set(np.argsort(-order[:, 2], kind="stable")[:4])
    for row in range(11):  # each row holds its own best entries
        chosen = scores[row][mask[row]]
        assert chosen.min() >= scores[row][~mask[row]].max()


def test_top_k_is_deterministic_and_validates():
    scores = rng_for(3, "test-topk-det").random((30, 10)).round(1)  # plenty of ties
    for select in ("global", "per-row"):
        np.testing.assert_array_equal(top_k_mask(scores, 77, select, 1), top_k_mask(scores.copy(), 77, select, 1))
    with pytest.raises(ValueError, match="budget"):
        top_k_mask(scores, -1)
    with pytest.raises(ValueError, match="budget"):
        top_k_mask(scores, 301)
    with pytest.raises(ValueError, match="min_per_row"):
        top_k_mask(scores, 29, min_per_row=1)
    with pytest.raises(ValueError, match="select"):
        top_k_mask(scores, 5, "per-column")
    with pytest.raises(ValueError, match="NaN"):
        top_k_mask(np.full((2, 2), np.nan), 1)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("method", ["sklearn", "multiplicative"])
def test_nmf_masks_hold_each_budget(method):
    R = random_binary(50, 40, 0.1, seed=6)
    user_mask, item_mask, P, Q = nmf_masks(
        R, 8, 100, 90, iterations=30, seed=0, method=method, select="global", rescale=True, min_per_row=1
    )
    assert user_mask.shape == (50, 8) and item_mask.shape == (40, 8)
    assert user_mask.sum() == 100 and item_mask.sum() == 90
    assert np.all(user_mask.sum(axis=1) >= 1) and np.all(item_mask.sum(axis=1) >= 1)
    assert P.shape == (50, 8) and Q.shape == (40, 8)
    np.testing.assert_allclose(np.linalg.norm(P, axis=0), np.linalg.norm(Q, axis=0), rtol=1e-4)
    again = nmf_masks(R, 8, 100, 90, iterations=30, seed=0, method=method, select="global", rescale=True, min_per_row=1)
    np.testing.assert_array_equal(user_mask, again[0])
    np.testing.assert_array_equal(item_mask, again[1])


def test_per_row_and_global_selection_from_factors():
    R = random_binary(20, 20, 0.2, seed=7)
    for select, min_per_row in itertools.product(("global", "per-row"), (0, 1)):
        user_mask, item_mask, _, _ = nmf_masks(
            R, 4, 30, 25, iterations=10, seed=1, method="multiplicative", select=select, rescale=False,
            min_per_row=min_per_row,
        )
        assert user_mask.sum() == 30 and item_mask.sum() == 25
