"""The one in-memory interaction type every loader returns and every trainer consumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Interactions:
    """Implicit feedback split into train / validation / test.

    Each split is a binary ``scipy.sparse.csr_matrix`` of shape [n_users, n_items] (rows = users,
    float32 ones, sorted indices, no explicit zeros). Ids are remapped to 0..n-1; ``user_ids[u]`` and
    ``item_ids[i]`` hold the original ids (strings or ints as read). The three splits are disjoint.
    ``repairs`` counts documented repairs applied while loading (e.g. dropped duplicate pairs).

    With a candidate file (``eval.candidates``, see ``candidates.py``) every user holds exactly one
    validation and one test item, and ``validation_negatives`` / ``test_negatives`` (int64
    [n_users, eval.sampled-negatives], remapped item ids) are the fixed negatives each is ranked among;
    otherwise they are None and the sampled protocol draws its own.
    """

    name: str
    train: sp.csr_matrix
    validation: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    repairs: dict[str, int] = field(default_factory=dict)
    validation_negatives: np.ndarray | None = None
    test_negatives: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = (len(self.user_ids), len(self.item_ids))
        for split_name in ("train", "validation", "test"):
            matrix = getattr(self, split_name)
            if not sp.isspmatrix_csr(matrix):
                raise TypeError(f"{self.name}: {split_name} must be a scipy CSR matrix, got {type(matrix).__name__}")
            if matrix.shape != shape:
                raise ValueError(f"{self.name}: {split_name} has shape {matrix.shape}, expected {shape}")
        for name in ("validation_negatives", "test_negatives"):
            negatives = getattr(self, name)
            if negatives is not None and (negatives.ndim != 2 or negatives.shape[0] != self.n_users):
                raise ValueError(f"{self.name}: {name} has shape {negatives.shape}, expected ({self.n_users}, N)")

    @property
    def n_users(self) -> int:
        """Number of users (rows)."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of items (columns)."""
        return len(self.item_ids)

    def checksum(self) -> str:
        """A BLAKE2b digest (hex) of the three splits' sparsity structure (and of the fixed evaluation
        negatives, when a candidate file gave them): equal splits, equal digest."""
        digest = hashlib.blake2b(digest_size=16)
        for matrix in (self.train, self.validation, self.test):
            digest.update(np.asarray(matrix.shape, dtype=np.int64).tobytes())
            digest.update(matrix.indptr.astype(np.int64).tobytes())
            digest.update(matrix.indices.astype(np.int64).tobytes())
        for negatives in (self.validation_negatives, self.test_negatives):  # a candidate file's negatives
            if negatives is not None:
                digest.update(np.ascontiguousarray(negatives, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def counts(self) -> dict[str, int]:
        """Users, items and interaction counts per split (what ``fedsparse data info`` prints)."""
        return {
            "users": self.n_users,
            "items": self.n_items,
            "train": int(self.train.nnz),
            "validation": int(self.validation.nnz),
            "test": int(self.test.nnz),
            "interactions": int(self.train.nnz + self.validation.nnz + self.test.nnz),
        }


def binary_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """A binary CSR [n_users, n_items] with ones at (users[k], items[k]); duplicates collapse to one."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items), dtype=np.float32
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix
