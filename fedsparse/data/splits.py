"""Train / validation / test splits on remapped interaction rows.

Each split labels rows rather than copying them: ``labels: int8 [n_rows]`` holds TRAIN, VALIDATION,
TEST or (provided splits only) DROPPED. ``users``/``items`` are remapped ids (int64 [n_rows], see
``transforms.remap_ids``). Randomness comes only from the ``np.random.Generator`` the caller passes
(``rng_for(seed, "split", dataset_name)``), so a split depends on the seed and the rows, nothing else.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedsparse.config import LOO_TIES
from fedsparse.data.errors import DataFormatError

TRAIN, VALIDATION, TEST = 0, 1, 2
DROPPED = -1  # a provided test row that cannot be evaluated; counted in the repairs


def random_split(users: np.ndarray, test_ratio: float, validation_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Per-user random hold-out: ``test_ratio`` of each user's rows to test, then ``validation_ratio``
    of the remaining rows to validation.

    Counts are ``round(ratio * n)`` (halves up), at least 1 when the ratio is positive, and always
    leave >= 1 row in train, so a user with >= 2 rows gets >= 1 test row and keeps >= 1 train row; a
    user with a single row keeps it in train.

    Parameters
    ----------
    users: int64 [n_rows] remapped user ids.
    test_ratio, validation_ratio: shares in [0, 1).
    rng: the split's generator.

    Returns
    -------
    labels: int8 [n_rows].
    """
    per_user = np.bincount(users)
    n_test = _held_out(per_user, test_ratio)
    n_validation = _held_out(per_user - n_test, validation_ratio)
    rank = _random_rank_within_user(users, rng)
    labels = np.full(len(users), TRAIN, dtype=np.int8)
    labels[rank < (n_test + n_validation)[users]] = VALIDATION
    labels[rank < n_test[users]] = TEST
    return labels


def leave_one_out_split(
    users: np.ndarray, timestamps: np.ndarray, validation: bool, ties: str = "file-last", items: np.ndarray | None = None
) -> np.ndarray:
    """Per user by time: last row to test, second-last to validation (if ``validation``), rest train.

    Equal timestamps need a rule (on ml-100k 415 of 943 users share their latest timestamp), set by
    ``ties`` (``data.loo-ties``):

    - ``file-last`` (default, fedsparse's rule since the first release): among equal timestamps the row
      LATER in the file counts as later, so the last such row is test;
    - ``file-first``: the row EARLIER in the file counts as later, PFedRec's rule (pandas
      ``rank(method="first", ascending=False)`` ranks tied rows in file order);
    - ``item``: the larger item id counts as later, whatever the file order.

    Users with fewer than 3 rows keep every row in train.

    Parameters
    ----------
    users: int64 [n_rows] remapped user ids.
    timestamps: numeric [n_rows].
    validation: whether to hold out the second-last row.
    ties: ``file-last``, ``file-first`` or ``item``.
    items: int64 [n_rows] remapped item ids (sorted like the original ids); needed for ``item``.

    Returns
    -------
    labels: int8 [n_rows].
    """
    n_rows = len(users)
    position = np.arange(n_rows)
    if ties == "file-last":
        tie_key = position
    elif ties == "file-first":
        tie_key = -position
    elif ties == "item":
        if items is None:
            raise ValueError("leave_one_out_split: ties='item' needs the item ids")
        tie_key = np.asarray(items, dtype=np.int64)
    else:
        raise ValueError(f"leave_one_out_split: unknown tie rule {ties!r}; known: {LOO_TIES}")
    order = np.lexsort((tie_key, timestamps, users))  # by user, then time, then the tie key: the last is the latest
    per_user = np.bincount(users)
    end = np.cumsum(per_user)  # one past each user's last position in `order`
    from_end = np.empty(n_rows, dtype=np.int64)
    from_end[order] = end[users[order]] - 1 - np.arange(n_rows)
    eligible = per_user[users] >= 3
    labels = np.full(n_rows, TRAIN, dtype=np.int8)
    labels[eligible & (from_end == 0)] = TEST
    if validation:
        labels[eligible & (from_end == 1)] = VALIDATION
    return labels


def provided_split(
    users: np.ndarray, items: np.ndarray, in_test: np.ndarray, validation_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, int]]:
    """Keep a split given by the files; carve validation from each user's train rows.

    Test rows whose item or user never occurs in train cannot be scored by a model trained on that
    train set, so they are DROPPED and counted (``test_items_unseen_in_train``,
    ``test_users_unseen_in_train``: distinct ids; ``test_pairs_unseen_in_train``: rows). Validation
    takes ``round(validation_ratio * n)`` of a user's n train rows (>= 1 when the ratio is positive,
    always leaving >= 1 in train); it is random, so an item may end up in validation only.

    Parameters
    ----------
    users, items: int64 [n_rows] remapped ids over train and test together.
    in_test: bool [n_rows], True for rows from the provided test file.
    validation_ratio: share in [0, 1).
    rng: the split's generator.

    Returns
    -------
    (labels: int8 [n_rows], repairs)
    """
    in_train = ~in_test
    user_in_train = np.bincount(users[in_train], minlength=users.max(initial=-1) + 1) > 0
    item_in_train = np.bincount(items[in_train], minlength=items.max(initial=-1) + 1) > 0
    unseen_item = in_test & ~item_in_train[items]
    unseen_user = in_test & ~user_in_train[users]
    dropped = unseen_item | unseen_user
    repairs = {
        "test_items_unseen_in_train": len(np.unique(items[unseen_item])),
        "test_users_unseen_in_train": len(np.unique(users[unseen_user])),
        "test_pairs_unseen_in_train": int(dropped.sum()),
    }
    labels = np.where(in_test, TEST, TRAIN).astype(np.int8)
    labels[dropped] = DROPPED
    train_rows = np.flatnonzero(in_train)
    train_users = users[train_rows]
    n_validation = _held_out(np.bincount(train_users), validation_ratio)
    rank = _random_rank_within_user(train_users, rng)
    labels[train_rows[rank < n_validation[train_users]]] = VALIDATION
    return labels, repairs


def check_disjoint(train: pd.DataFrame, test: pd.DataFrame, source: str) -> None:
    """Raise DataFormatError if provided train and test share (user, item) pairs (original ids).

    A shared pair would be both trained on and evaluated; no repair can tell which file is right.
    """
    shared = test[["user", "item"]].merge(train[["user", "item"]].drop_duplicates(), on=["user", "item"])
    if len(shared):
        user, item = shared.iloc[0].tolist()
        problem = f"{len(shared)} (user, item) pairs are in both train and test; first: user {user!r}, item {item!r}"
        raise DataFormatError.at(source, None, problem)


def _held_out(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Rows to hold out per user: round(ratio * count) halves up, >= 1 if ratio > 0, leaving >= 1 row."""
    take = np.floor(ratio * counts + 0.5).astype(np.int64)
    if ratio > 0:
        take = np.maximum(take, 1)
    return np.clip(take, 0, np.maximum(counts - 1, 0))


def _random_rank_within_user(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rank 0..n_u-1 of each row among its user's rows. int64 [n_rows]."""
    n_rows = len(users)
    shuffled = rng.permutation(n_rows)
    order = shuffled[np.argsort(users[shuffled], kind="stable")]  # grouped by user, random within a user
    per_user = np.bincount(users)
    start = np.cumsum(per_user) - per_user
    rank = np.empty(n_rows, dtype=np.int64)
    rank[order] = np.arange(n_rows) - start[users[order]]
    return rank


__all__ = [
    "TRAIN",
    "VALIDATION",
    "TEST",
    "DROPPED",
    "LOO_TIES",
    "random_split",
    "leave_one_out_split",
    "provided_split",
    "check_disjoint",
]
