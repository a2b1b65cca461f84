"""Negative sampling for implicit feedback: uniform items outside a per-user excluded set.

Which set is excluded is ``train.negatives-from`` (``negative_exclusions``): the user's training items
(default: a held-out item may be drawn, as in RecBole and LightGCN, since training cannot know it) or
every rated item (``unrated``, PFedRec's rule).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

MAX_BULK_ROUNDS = 32  # bulk rejection rounds before the exact per-user fallback


def nth_outside(positions: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """The items at ``positions`` (int64, any shape) of the sorted complement of ``excluded`` (sorted distinct int64
    ids): ``np.setdiff1d(np.arange(n_items), excluded)[positions]`` without building the complement, so a
    device's draws cost memory in what it excludes and draws, not in the catalogue's size."""
    shifted = np.asarray(excluded, dtype=np.int64) - np.arange(len(excluded), dtype=np.int64)  # candidates before each
    return positions + np.searchsorted(shifted, positions, side="right")


class NegativeSampler:
    """Draws uniform negatives per user, rejecting the user's interacted items.

    ``interacted``: binary CSR [n_users, n_items] of everything the user must never get as a negative.
    """

    def __init__(self, interacted: sp.csr_matrix) -> None:
        interacted = interacted.tocsr()
        self.n_users, self.n_items = interacted.shape
        counts = np.diff(interacted.indptr)
        if np.any(counts >= self.n_items):
            user = int(np.flatnonzero(counts >= self.n_items)[0])
            raise ValueError(f"user {user} interacted with every item: no negative exists")
        users = np.repeat(np.arange(self.n_users, dtype=np.int64), counts)
        self._keys = np.unique(users * self.n_items + interacted.indices.astype(np.int64))
        self._interacted = interacted

    def is_interacted(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Boolean array, same shape as ``items``: whether (user, item) is an interaction."""
        keys = np.asarray(users, dtype=np.int64) * self.n_items + np.asarray(items, dtype=np.int64)
        position = np.searchsorted(self._keys, keys)
        position = np.minimum(position, len(self._keys) - 1) if len(self._keys) else position
        return (self._keys[position] == keys) if len(self._keys) else np.zeros(keys.shape, dtype=bool)

    def sample(self, rng: np.random.Generator, users: np.ndarray, n_negatives: int) -> np.ndarray:
        """Negatives int64 [len(users), n_negatives], uniform over each user's non-interacted items.

        Draws may repeat within a row (sampling with replacement, as BPR samplers do).
        """
        users = np.asarray(users, dtype=np.int64)
        row_users = np.repeat(users[:, None], n_negatives, axis=1)
        negatives = rng.integers(0, self.n_items, size=row_users.shape, dtype=np.int64)
        rejected = self.is_interacted(row_users, negatives)
        for _ in range(MAX_BULK_ROUNDS):
            if not rejected.any():
                return negatives
            negatives[rejected] = rng.integers(0, self.n_items, size=int(rejected.sum()), dtype=np.int64)
            rejected = self.is_interacted(row_users, negatives)
        # Users with almost every item interacted: draw exactly from their complement.
        for row, col in zip(*np.nonzero(rejected), strict=True):
            user = row_users[row, col]
            seen = self._interacted.indices[self._interacted.indptr[user] : self._interacted.indptr[user + 1]]
            negatives[row, col] = rng.choice(np.setdiff1d(np.arange(self.n_items), seen))
        return negatives


def negative_exclusions(train: sp.csr_matrix, validation: sp.csr_matrix, test: sp.csr_matrix,
                        negatives_from: str) -> sp.csr_matrix:
    """The binary CSR [n_users, n_items] of items a user's training negatives avoid under ``negatives_from``."""
    excluded = train if negatives_from == "non-train" else train + validation + test
    return excluded.tocsr()


def training_pairs(train: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """All (user, item) training pairs as int64 arrays [nnz], in CSR order."""
    train = train.tocsr()
    users = np.repeat(np.arange(train.shape[0], dtype=np.int64), np.diff(train.indptr))
    return users, train.indices.astype(np.int64)
