"""Metrics: closed-form cases, a slow per-user reference for full ranking, and the sampled protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedsparse.data.interactions import binary_csr
from fedsparse.eval.metrics import (
    average_per_user,
    full_ranking_metrics,
    full_ranking_per_user,
    hit_rate_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    sample_eval_negatives,
    sampled_metrics,
    sampled_per_user,
    topk_items,
)
from fedsparse.rng import rng_for

# ---------------------------------------------------------------- closed-form per-user metrics


def test_ndcg_single_hit_at_rank_two():
    hits = np.array([[0, 1, 0]])
    assert ndcg_at_k(hits, n_relevant=np.array([1]), k=3) == pytest.approx(1 / np.log2(3))


def test_two_of_three_relevant_in_top_five():
    hits = np.array([[1, 0, 1, 0, 0]])
    n_relevant = np.array([3])
    assert recall_at_k(hits, n_relevant) == pytest.approx(2 / 3)
    assert precision_at_k(hits, n_relevant) == pytest.approx(2 / 5)
    assert hit_rate_at_k(hits, n_relevant) == pytest.approx(1.0)
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(hits, n_relevant) == pytest.approx((1 + 1 / np.log2(4)) / ideal)


def test_ideal_dcg_is_truncated_at_k_when_more_items_are_relevant():
    hits = np.array([[1, 1, 1], [1, 1, 0]])
    # Five relevant items but only three positions: a full top-3 is perfect.
    two_of_three = (1 + 1 / np.log2(3)) / (1 + 1 / np.log2(3) + 1 / np.log2(4))
    assert ndcg_at_k(hits, np.array([5, 5]), k=3) == pytest.approx([1.0, two_of_three])
    # Two relevant items, both ranked first: perfect, the ideal has two positions only.
    assert ndcg_at_k(hits[1:], np.array([2]), k=3) == pytest.approx(1.0)


def test_metrics_are_per_user_float64_and_k_cuts_columns():
    hits = np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=bool)
    n_relevant = np.array([1, 2, 4])
    for metric in (recall_at_k, precision_at_k, hit_rate_at_k, ndcg_at_k):
        values = metric(hits, n_relevant, k=2)
        assert values.dtype == np.float64 and values.shape == (3,)
    np.testing.assert_allclose(recall_at_k(hits, n_relevant, k=2), [0.0, 0.5, 0.0])
    np.testing.assert_allclose(recall_at_k(hits, n_relevant, k=3), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(hit_rate_at_k(hits, n_relevant, k=2), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(precision_at_k(hits, n_relevant, k=2), [0.0, 0.5, 0.0])


@pytest.mark.parametrize("metric", [recall_at_k, precision_at_k, hit_rate_at_k, ndcg_at_k])
def test_metrics_reject_users_without_relevant_items_and_bad_k(metric):
    hits = np.array([[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="n_relevant"):
        metric(hits, np.array([1, 0]))
    with pytest.raises(ValueError, match="k must be"):
        metric(hits, np.array([1, 1]), k=3)
    with pytest.raises(ValueError, match="more hits"):
        metric(np.array([[1, 1]]), np.array([1]))


# ---------------------------------------------------------------- top-k and its tie rule


def test_topk_ties_go_to_lower_item_id_and_excluded_items_never_appear():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 3.0]])
    none = sp.csr_matrix((1, 7))
    assert topk_items(scores, none, 3).tolist() == [[1, 2, 4]]
    assert topk_items(scores, none, 6).tolist() == [[1, 2, 4, 5, 6, 3]]
    exclude = binary_csr(np.array([0]), np.array([2]), 1, 7)
    assert topk_items(scores, exclude, 3).tolist() == [[1, 4, 5]]
    # A list of matrices is OR-ed.
    other = binary_csr(np.array([0]), np.array([1]), 1, 7)
    assert topk_items(scores, [exclude, other], 3).tolist() == [[4, 5, 6]]
    assert scores.tolist() == [[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 3.0]], "scores must not be modified"


def test_topk_constant_scores_return_lowest_ids_in_order():
    scores = torch.zeros(3, 5000)
    exclude = binary_csr(np.array([1, 1]), np.array([0, 2]), 3, 5000)
    top = topk_items(scores, exclude, 4).tolist()
    assert top == [[0, 1, 2, 3], [1, 3, 4, 5], [0, 1, 2, 3]]


def test_topk_matches_sort_by_score_then_id_on_heavy_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(40, 300)).astype(np.float32)
    exclude = sp.csr_matrix(rng.random((40, 300)) < 0.3)
    top = topk_items(torch.from_numpy(scores), exclude, 25).numpy()
    dense = exclude.toarray()
    for u in range(40):
        allowed = [i for i in range(300) if not dense[u, i]]
        expected = sorted(allowed, key=lambda i: (-scores[u, i], i))[:25]
        assert top[u].tolist() == expected


def test_topk_pads_rows_with_too_few_allowed_items_as_a_stable_sort_does():
    """Rows with fewer than k allowed items take the excluded ones, lowest ids first (ties at -inf), and rows
    tied at the k-th score give what a stable full sort gives, mixed in one batch."""
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.integers(0, 4, size=(30, 200)).astype(np.float32))
    exclude = sp.csr_matrix(rng.random((30, 200)) < np.where(np.arange(30) % 3 == 0, 0.95, 0.2)[:, None])
    top = topk_items(scores, exclude, 25)
    masked = np.where(exclude.toarray(), -np.inf, scores.numpy())
    expected = torch.sort(torch.from_numpy(masked), dim=1, descending=True, stable=True).indices[:, :25]
    assert torch.equal(top, expected)


def test_topk_in_place_masks_the_callers_scores_and_ranks_the_same():
    rng = np.random.default_rng(2)
    scores = torch.from_numpy(rng.normal(size=(6, 50)).astype(np.float32))
    exclude = sp.csr_matrix(rng.random((6, 50)) < 0.3)
    copy = scores.clone()
    assert torch.equal(topk_items(copy, exclude, 10, in_place=True), topk_items(scores, exclude, 10))
    assert torch.equal(torch.isinf(copy), torch.from_numpy(exclude.toarray())) and not torch.isinf(scores).any()


def test_topk_rejects_nan_scores_but_not_excluded_nan():
    scores = torch.tensor([[0.1, float("nan"), 0.3, 0.2]])
    with pytest.raises(ValueError, match="NaN"):
        topk_items(scores, sp.csr_matrix((1, 4)), 2)
    assert topk_items(scores, binary_csr(np.array([0]), np.array([1]), 1, 4), 2).tolist() == [[2, 3]]


# ---------------------------------------------------------------- full ranking vs a slow reference


def reference_full_ranking(scores: np.ndarray, test: sp.csr_matrix, excludes: list[sp.csr_matrix], ks: list[int]):
    """Obvious and slow: per user, sort non-excluded items by (score desc, id asc) and count hits."""
    results: dict[str, list[float]] = {}
    users = []
    excluded = sum(m.toarray() for m in excludes) > 0
    for u in range(test.shape[0]):
        relevant = set(test[u].indices.tolist())
        if not relevant:
            continue
        users.append(u)
        ranked = sorted((i for i in range(scores.shape[1]) if not excluded[u, i]), key=lambda i: (-scores[u, i], i))
        for k in ks:
            top = ranked[:k]
            n_hits = sum(i in relevant for i in top)
            dcg = sum(1 / math.log2(pos + 2) for pos, i in enumerate(top) if i in relevant)
            idcg = sum(1 / math.log2(pos + 2) for pos in range(min(k, len(relevant))))
            results.setdefault(f"recall@{k}", []).append(n_hits / len(relevant))
            results.setdefault(f"ndcg@{k}", []).append(dcg / idcg)
            results.setdefault(f"hr@{k}", []).append(float(n_hits > 0))
            results.setdefault(f"precision@{k}", []).append(n_hits / k)
    return np.array(users), {name: np.array(values) for name, values in results.items()}


def random_split(rng: np.random.Generator, n_users: int, n_items: int):
    """Disjoint train / validation / test with some users lacking test items."""
    split = rng.choice(4, size=(n_users, n_items), p=[0.8, 0.1, 0.04, 0.06])
    split[: n_users // 5][split[: n_users // 5] == 3] = 0  # the first fifth has no test item
    train, validation, test = (sp.csr_matrix((split == s).astype(np.float32)) for s in (1, 2, 3))
    return train, validation, test


def table_scorer(scores: np.ndarray, calls: list[np.ndarray] | None = None):
    def score_fn(user_ids: np.ndarray) -> torch.Tensor:
        assert user_ids.dtype == np.int64
        if calls is not None:
            calls.append(user_ids.copy())
        return torch.from_numpy(scores[user_ids])

    return score_fn


def test_full_ranking_matches_reference_for_every_batch_size():
    rng = np.random.default_rng(1)
    n_users, n_items = 60, 80
    train, validation, test = random_split(rng, n_users, n_items)
    # Coarse scores so ties are frequent and the tie rule is exercised end to end.
    scores = rng.integers(0, 8, size=(n_users, n_items)).astype(np.float32)
    ks = [1, 5, 20]
    ref_users, ref = reference_full_ranking(scores, test, [train, validation], ks)
    assert 0 < len(ref_users) < n_users
    outputs = []
    for batch_users in (1, 7, 64):
        users, per_user = full_ranking_per_user(table_scorer(scores), test, [train, validation], ks, batch_users)
        np.testing.assert_array_equal(users, ref_users)
        assert set(per_user) == set(ref)
        for name in ref:
            np.testing.assert_allclose(per_user[name], ref[name], rtol=1e-12, atol=0)
        outputs.append(per_user)
    for other in outputs[1:]:
        for name in ref:
            np.testing.assert_array_equal(other[name], outputs[0][name])
    summary = full_ranking_metrics(table_scorer(scores), test, [train, validation], ks, batch_users=16)
    assert summary["users_evaluated"] == len(ref_users)
    for name in ref:
        assert summary[name] == pytest.approx(ref[name].mean())


def test_exclusion_removes_training_items_the_model_ranks_first():
    rng = np.random.default_rng(2)
    n_users, n_items = 30, 50
    train, validation, test = random_split(rng, n_users, n_items)
    # Train items score highest, then test items, then the rest: after exclusion the ranking is perfect.
    scores = (10 * train.toarray() + 5 * test.toarray() + rng.random((n_users, n_items))).astype(np.float32)
    k = 3
    summary = full_ranking_metrics(table_scorer(scores), test, [train, validation], k, batch_users=8)
    n_test = np.diff(test.indptr)[np.diff(test.indptr) > 0]
    assert summary["ndcg@3"] == pytest.approx(1.0)
    assert summary["hr@3"] == pytest.approx(1.0)
    assert summary["recall@3"] == pytest.approx(np.mean(np.minimum(n_test, k) / n_test))
    unmasked = full_ranking_metrics(table_scorer(scores), test, sp.csr_matrix(test.shape), k, batch_users=8)
    assert unmasked["hr@3"] < 0.5


def test_users_without_test_items_are_never_scored():
    rng = np.random.default_rng(3)
    train, validation, test = random_split(rng, 25, 40)
    calls: list[np.ndarray] = []
    scores = rng.random((25, 40)).astype(np.float32)
    users, _ = full_ranking_per_user(table_scorer(scores, calls), test, train, [5, 10], batch_users=4)
    scored = np.concatenate(calls)
    np.testing.assert_array_equal(scored, np.flatnonzero(np.diff(test.indptr)))
    np.testing.assert_array_equal(users, scored)
    assert max(len(c) for c in calls) <= 4
    assert not set(scored) & set(range(5)), "the first fifth has no test items"


def test_full_ranking_rejects_test_items_that_are_excluded_and_empty_evaluations():
    test = binary_csr(np.array([0, 1]), np.array([2, 3]), 2, 5)
    train = binary_csr(np.array([1]), np.array([3]), 2, 5)
    scorer = table_scorer(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="user 1"):
        full_ranking_metrics(scorer, test, train, 2, batch_users=2)
    with pytest.raises(ValueError, match="no user"):
        full_ranking_metrics(scorer, sp.csr_matrix((2, 5)), train, 2, batch_users=2)


def test_average_per_user_weighs_users_equally():
    summary = average_per_user({"hr@10": np.array([1.0, 0.0, 0.0, 1.0]), "ndcg@10": np.array([1.0, 0.0, 0.0, 0.5])})
    assert summary == {"hr@10": 0.5, "ndcg@10": 0.375, "users_evaluated": 4}


# ---------------------------------------------------------------- sampled protocol


def loo_data(rng: np.random.Generator, n_users: int, n_items: int, per_user: int):
    """Each user interacts with ``per_user`` items; the last one is held out."""
    items = np.stack([rng.choice(n_items, size=per_user, replace=False) for _ in range(n_users)])
    users = np.repeat(np.arange(n_users), per_user)
    interacted = binary_csr(users, items.ravel(), n_users, n_items)
    held_out = binary_csr(np.arange(n_users), items[:, -1], n_users, n_items)
    return interacted, held_out


def test_negatives_are_distinct_never_interacted_and_seeded():
    rng = np.random.default_rng(4)
    n_users, n_items = 200, 150
    interacted, _ = loo_data(rng, n_users, n_items, per_user=30)
    # One user interacted with 105 of 150 items: 192 bulk draws leave ~32 valid, so the exact per-user
    # fallback must serve them.
    dense = interacted.toarray()
    dense[7] = 0
    dense[7, :105] = 1
    interacted = sp.csr_matrix(dense)
    users = np.arange(n_users)
    negatives = sample_eval_negatives(rng_for(0, "eval-negatives"), interacted, users, 40)
    assert negatives.shape == (n_users, 40) and negatives.dtype == np.int64
    for u in users:
        assert len(set(negatives[u].tolist())) == 40
        assert not dense[u, negatives[u]].any()
    again = sample_eval_negatives(rng_for(0, "eval-negatives"), interacted, users, 40)
    np.testing.assert_array_equal(negatives, again)
    other = sample_eval_negatives(rng_for(1, "eval-negatives"), interacted, users, 40)
    assert not np.array_equal(negatives, other)


def test_negatives_are_uniform_over_non_interacted_items():
    interacted = binary_csr(np.zeros(5, dtype=np.int64), np.arange(5), 1, 20)
    negatives = sample_eval_negatives(np.random.default_rng(5), interacted, np.zeros(6000, dtype=np.int64), 3)
    counts = np.bincount(negatives.ravel(), minlength=20)
    assert counts[:5].sum() == 0
    expected = 6000 * 3 / 15
    assert np.all(np.abs(counts[5:] - expected) < 0.1 * expected)


def test_negatives_raise_naming_a_user_with_too_few_candidates():
    interacted = binary_csr(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 2]), 2, 5)
    with pytest.raises(ValueError, match="user 1"):
        sample_eval_negatives(np.random.default_rng(0), interacted, np.array([0, 1]), 3)


def candidate_scorer(table: np.ndarray):
    def score(user_ids: np.ndarray, items: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(table[user_ids[:, None], items])

    return score


def sampled_setup(n_users: int = 300, n_items: int = 400, n_negatives: int = 99):
    rng = np.random.default_rng(6)
    interacted, held_out = loo_data(rng, n_users, n_items, per_user=10)
    users = np.arange(n_users)
    negatives = sample_eval_negatives(rng, interacted, users, n_negatives)
    return held_out, negatives, users


def test_constant_scorer_gets_zero_hit_rate_with_pessimistic_ties():
    held_out, negatives, users = sampled_setup()
    constant = candidate_scorer(np.zeros(held_out.shape, dtype=np.float32))
    summary = sampled_metrics(constant, held_out, negatives, users)
    assert summary == {"hr@10": 0.0, "ndcg@10": 0.0, "users_evaluated": 300}


def test_perfect_scorer_gets_one():
    held_out, negatives, users = sampled_setup()
    perfect = candidate_scorer(held_out.toarray())
    assert sampled_metrics(perfect, held_out, negatives, users, k=[1, 10]) == {
        "hr@1": 1.0, "ndcg@1": 1.0, "hr@10": 1.0, "ndcg@10": 1.0, "users_evaluated": 300,
    }


def test_rank_counts_negatives_scoring_at_least_the_positive():
    held_out = binary_csr(np.array([0]), np.array([0]), 1, 8)
    negatives = np.array([[1, 2, 3, 4, 5]])
    table = np.array([[0.5, 0.9, 0.5, 0.1, 0.7, 0.2, 0.0, 0.0]], dtype=np.float32)
    # Beaten by items 1 and 4, tied with item 2: rank 4.
    _, per_user = sampled_per_user(candidate_scorer(table), held_out, negatives, np.array([0]), k=[3, 10])
    assert per_user["hr@3"].tolist() == [0.0]
    assert per_user["hr@10"].tolist() == [1.0]
    assert per_user["ndcg@10"] == pytest.approx(1 / np.log2(5))


def test_random_scorer_hit_rate_is_k_over_candidates():
    n_users, n_negatives = 4000, 99
    held_out, negatives, users = sampled_setup(n_users=n_users, n_items=500, n_negatives=n_negatives)
    table = np.random.default_rng(7).random(held_out.shape).astype(np.float32)
    summary = sampled_metrics(candidate_scorer(table), held_out, negatives, users, batch_users=512)
    # Binomial standard error at p = 0.1 over 4000 users is ~0.005.
    assert summary["hr@10"] == pytest.approx(10 / (1 + n_negatives), abs=0.02)
    assert summary["users_evaluated"] == n_users


def test_sampled_results_do_not_depend_on_batch_size():
    held_out, negatives, users = sampled_setup()
    table = np.random.default_rng(8).integers(0, 20, size=held_out.shape).astype(np.float32)
    results = [sampled_per_user(candidate_scorer(table), held_out, negatives, users, 10, b)[1] for b in (1, 33, 300)]
    for other in results[1:]:
        for name in results[0]:
            np.testing.assert_array_equal(other[name], results[0][name])


def test_sampled_skips_users_without_a_held_out_item_and_rejects_bad_input():
    held_out = binary_csr(np.array([0, 2, 2]), np.array([1, 3, 4]), 3, 10)
    negatives = np.array([[5, 6], [5, 6], [5, 6]])
    scorer = candidate_scorer(np.zeros((3, 10), dtype=np.float32))
    users, _ = sampled_per_user(scorer, held_out[:2], negatives[:2], np.array([0, 1]))
    assert users.tolist() == [0]
    with pytest.raises(ValueError, match="user 2"):
        sampled_metrics(scorer, held_out, negatives, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="held-out item"):
        sampled_metrics(scorer, held_out[:1], np.array([[5, 1]]), np.array([0]))
