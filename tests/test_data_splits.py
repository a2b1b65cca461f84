"""Splits: per-user guarantees, seeded determinism, leave-one-out order, provided-split repairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsparse.data import DataFormatError
from fedsparse.data.splits import (
    DROPPED,
    TEST,
    TRAIN,
    VALIDATION,
    check_disjoint,
    leave_one_out_split,
    provided_split,
    random_split,
)


def toy_users(rng: np.random.Generator, n_users: int = 300) -> np.ndarray:
    """Users with 1..40 rows each, rows shuffled (users are not contiguous)."""
    per_user = rng.integers(1, 41, size=n_users)
    per_user[:5] = [1, 2, 3, 4, 5]
    return rng.permutation(np.repeat(np.arange(n_users), per_user))


def per_user_counts(users: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray:
    return np.bincount(users[labels == label], minlength=users.max() + 1)


def test_random_split_per_user_guarantees():
    users = toy_users(np.random.default_rng(0))
    labels = random_split(users, 0.2, 0.1, np.random.default_rng(1))
    assert labels.dtype == np.int8 and set(np.unique(labels)) == {TRAIN, VALIDATION, TEST}
    total = np.bincount(users)
    train, validation, test = (per_user_counts(users, labels, lab) for lab in (TRAIN, VALIDATION, TEST))
    assert np.array_equal(train + validation + test, total)
    assert (train >= 1).all()
    assert (test[total >= 2] >= 1).all()
    assert (train[total == 1] == 1).all()
    n_test = np.floor(0.2 * total + 0.5)
    big = total >= 10
    assert np.array_equal(test[big], n_test[big])
    assert np.array_equal(validation[big], np.floor(0.1 * (total - n_test) + 0.5)[big])


def test_random_split_seeded_determinism():
    users = toy_users(np.random.default_rng(0))
    first = random_split(users, 0.2, 0.1, np.random.default_rng(7))
    again = random_split(users, 0.2, 0.1, np.random.default_rng(7))
    other = random_split(users, 0.2, 0.1, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_random_split_without_validation():
    users = toy_users(np.random.default_rng(3))
    labels = random_split(users, 0.3, 0.0, np.random.default_rng(0))
    assert not (labels == VALIDATION).any()


def test_random_split_is_roughly_uniform_within_a_user():
    # One user with 10 rows, 2 to test: each row should be picked ~20% of the time.
    users = np.zeros(10, dtype=np.int64)
    rng = np.random.default_rng(0)
    hits = sum((random_split(users, 0.2, 0.0, rng) == TEST).astype(int) for _ in range(2000))
    assert hits.sum() == 4000
    assert np.all(np.abs(hits / 2000 - 0.2) < 0.04)


def test_leave_one_out_picks_the_last_timestamps():
    users = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    times = np.array([40, 10, 30, 20, 5, 7, 6, 1, 2, 9])
    labels = leave_one_out_split(users, times, validation=True)
    assert labels.tolist() == [TEST, TRAIN, VALIDATION, TRAIN, TRAIN, TEST, VALIDATION, TRAIN, TRAIN, TRAIN]


def test_leave_one_out_ties_follow_file_order_and_validation_off():
    users = np.array([0, 0, 0, 0])
    times = np.array([5, 5, 5, 1])
    assert leave_one_out_split(users, times, validation=True).tolist() == [TRAIN, VALIDATION, TEST, TRAIN]
    assert leave_one_out_split(users, times, validation=False).tolist() == [TRAIN, TRAIN, TEST, TRAIN]


def test_leave_one_out_tie_rules():
    """Rows: items 5, 3, 7 share the latest timestamp, item 1 is older."""
    users = np.array([0, 0, 0, 0])
    times = np.array([9, 9, 9, 1])
    items = np.array([5, 3, 7, 1])
    assert leave_one_out_split(users, times, True, "file-last", items).tolist() == [TRAIN, VALIDATION, TEST, TRAIN]
    assert leave_one_out_split(users, times, True, "file-first", items).tolist() == [TEST, VALIDATION, TRAIN, TRAIN]
    assert leave_one_out_split(users, times, True, "item", items).tolist() == [VALIDATION, TRAIN, TEST, TRAIN]
    with pytest.raises(ValueError, match="unknown tie rule"):
        leave_one_out_split(users, times, True, "latest", items)


@pytest.mark.parametrize("ties", ["file-first", "item"])
def test_leave_one_out_tie_rules_against_per_user_reference(ties):
    """file-first is pandas' rank(method="first", ascending=False) (PFedRec): earlier rows rank as later."""
    rng = np.random.default_rng(6)
    users = toy_users(rng, 40)
    times = rng.integers(0, 10, size=len(users))
    items = rng.integers(0, 1000, size=len(users))
    labels = leave_one_out_split(users, times, True, ties, items)
    for user in range(40):
        rows = np.flatnonzero(users == user)
        ordered = sorted(rows, key=lambda r: (-times[r], r) if ties == "file-first" else (-times[r], -items[r], r))
        expected = np.full(len(rows), TRAIN)
        if len(rows) >= 3 and not (ties == "item" and len({(times[r], items[r]) for r in ordered[:3]}) < 3):
            expected[[list(rows).index(ordered[0]), list(rows).index(ordered[1])]] = [TEST, VALIDATION]
            assert labels[rows].tolist() == expected.tolist()


def test_leave_one_out_against_per_user_reference():
    rng = np.random.default_rng(5)
    users = toy_users(rng, 50)
    times = rng.integers(0, 20, size=len(users))  # many ties
    labels = leave_one_out_split(users, times, validation=True)
    for user in range(50):
        rows = np.flatnonzero(users == user)
        ordered = sorted(rows, key=lambda r: (times[r], r))
        expected = np.full(len(rows), TRAIN)
        if len(rows) >= 3:
            expected[[list(rows).index(ordered[-1]), list(rows).index(ordered[-2])]] = [TEST, VALIDATION]
        assert labels[rows].tolist() == expected.tolist()


def test_provided_split_drops_and_counts_test_rows_unseen_in_train():
    # rows 0-6 come from the train file, rows 7-10 from the test file
    users = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 2])
    items = np.array([0, 1, 2, 0, 1, 2, 3, 4, 3, 5, 0])
    in_test = np.array([False] * 7 + [True] * 4)
    # item 4 and 5 never occur in train, user 2 never occurs in train
    labels, repairs = provided_split(users, items, in_test, 0.0, np.random.default_rng(0))
    assert repairs == {
        "test_items_unseen_in_train": 2,
        "test_users_unseen_in_train": 1,
        "test_pairs_unseen_in_train": 3,
    }
    assert labels.tolist() == [TRAIN] * 7 + [DROPPED, TEST, DROPPED, DROPPED]


def test_provided_split_carves_validation_from_train_only():
    rng = np.random.default_rng(2)
    users = toy_users(rng)
    items = rng.integers(0, 50, size=len(users))
    in_test = rng.random(len(users)) < 0.2
    labels, _ = provided_split(users, items, in_test, 0.25, np.random.default_rng(9))
    assert not (labels[in_test] == VALIDATION).any() and not (labels[~in_test] == TEST).any()
    train_total = np.bincount(users[~in_test], minlength=users.max() + 1)
    train = per_user_counts(users, labels, TRAIN)
    validation = per_user_counts(users, labels, VALIDATION)
    assert np.array_equal(train + validation, train_total)
    assert (train[train_total >= 1] >= 1).all()
    assert (validation[train_total >= 2] >= 1).all()
    again, _ = provided_split(users, items, in_test, 0.25, np.random.default_rng(9))
    assert np.array_equal(labels, again)


def test_check_disjoint_names_count_and_first_pair():
    train = pd.DataFrame({"user": [1, 1, 2, 3], "item": [10, 11, 10, 12]})
    test = pd.DataFrame({"user": [3, 2, 1, 2], "item": [13, 10, 11, 14]})
    with pytest.raises(DataFormatError, match=r"^train\.txt \+ test\.txt: 2 \(user, item\) pairs .* user 2, item 10"):
        check_disjoint(train, test, "train.txt + test.txt")
    check_disjoint(train, test.iloc[[0, 3]], "ok")
