"""Negative sampling never returns an excluded item and stays uniform over the rest."""

import numpy as np
import scipy.sparse as sp

from fedsparse.central.sampling import NegativeSampler, negative_exclusions, nth_outside, training_pairs
from fedsparse.data.interactions import binary_csr


def random_interactions(rng, n_users=50, n_items=30, density=0.5):
    dense = rng.random((n_users, n_items)) < density
    dense[:, 0] = False  # every user keeps at least one negative
    return sp.csr_matrix(dense.astype(np.float32))


def test_negatives_are_never_interacted():
    rng = np.random.default_rng(0)
    interacted = random_interactions(rng)
    sampler = NegativeSampler(interacted)
    users = np.repeat(np.arange(50), 20)
    negatives = sampler.sample(np.random.default_rng(1), users, 5)
    assert negatives.shape == (1000, 5)
    dense = interacted.toarray().astype(bool)
    assert not dense[users[:, None], negatives].any()


def test_nearly_full_users_fall_back_to_exact_complement():
    interacted = np.ones((3, 200), dtype=np.float32)
    interacted[:, 123] = 0  # only one negative per user exists
    sampler = NegativeSampler(sp.csr_matrix(interacted))
    negatives = sampler.sample(np.random.default_rng(0), np.array([0, 1, 2]), 4)
    assert (negatives == 123).all()


def test_negatives_are_uniform_over_the_complement():
    interacted = binary_csr(np.array([0, 0]), np.array([1, 2]), 1, 5)
    sampler = NegativeSampler(interacted)
    draws = sampler.sample(np.random.default_rng(3), np.zeros(20000, dtype=np.int64), 1).ravel()
    counts = np.bincount(draws, minlength=5)
    assert counts[1] == counts[2] == 0
    np.testing.assert_allclose(counts[[0, 3, 4]] / 20000, 1 / 3, atol=0.02)


def test_same_generator_seed_gives_same_negatives():
    interacted = random_interactions(np.random.default_rng(0))
    sampler = NegativeSampler(interacted)
    users = np.arange(50)
    first = sampler.sample(np.random.default_rng(9), users, 3)
    again = sampler.sample(np.random.default_rng(9), users, 3)
    np.testing.assert_array_equal(first, again)


def test_training_pairs_list_every_nonzero_in_csr_order():
    matrix = binary_csr(np.array([2, 0, 2]), np.array([1, 3, 0]), 3, 4)
    users, items = training_pairs(matrix)
    np.testing.assert_array_equal(users, [0, 2, 2])
    np.testing.assert_array_equal(items, [3, 0, 1])


def test_negative_exclusions_follow_the_rule():
    """The central trainer's pool: under the default a held-out item can be drawn, under ``unrated`` never."""
    train = binary_csr(np.array([0, 0]), np.array([0, 1]), 1, 6)
    validation = binary_csr(np.array([0]), np.array([2]), 1, 6)
    test = binary_csr(np.array([0]), np.array([3]), 1, 6)
    users = np.zeros(4000, dtype=np.int64)
    sampler = NegativeSampler(negative_exclusions(train, validation, test, "non-train"))
    default = sampler.sample(np.random.default_rng(0), users, 1)
    np.testing.assert_array_equal(np.unique(default), [2, 3, 4, 5])
    unrated = NegativeSampler(negative_exclusions(train, validation, test, "unrated")).sample(np.random.default_rng(0), users, 1)
    np.testing.assert_array_equal(np.unique(unrated), [4, 5])


def test_nth_outside_indexes_the_complement_without_building_it():
    rng = np.random.default_rng(3)
    for n_items, excluded_count in [(1, 0), (7, 3), (50, 0), (50, 49), (500, 120)]:
        excluded = np.sort(rng.choice(n_items, size=excluded_count, replace=False)).astype(np.int64)
        complement = np.setdiff1d(np.arange(n_items), excluded)
        positions = rng.integers(0, complement.size, size=(3, 4))
        np.testing.assert_array_equal(nth_outside(positions, excluded), complement[positions])
        np.testing.assert_array_equal(nth_outside(np.arange(complement.size), excluded), complement)
