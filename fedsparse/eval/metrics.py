"""Top-K recommendation metrics for the two evaluation protocols of docs/methods.md#evaluation-protocols.

Full ranking (section 4.1): score every item, exclude the user's known items, take the top K, and
report Recall/NDCG/HR/Precision@K averaged over users with at least one held-out item. Sampled
(section 4.3): rank the held-out item among itself and N sampled never-interacted negatives, and
report HR/NDCG@K. The per-user metric functions are pure; the ``*_per_user`` functions return
per-user values so a federated simulator can pool users across clients before averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
import torch

SparseRows: TypeAlias = sp.csr_matrix | sp.csr_array
Exclude: TypeAlias = SparseRows | Sequence[SparseRows]
ScoreFn = Callable[[np.ndarray], torch.Tensor]
CandidateScoreFn = Callable[[np.ndarray, np.ndarray], torch.Tensor]

# Users per chunk when drawing evaluation negatives in bulk; fixed so the draws do not depend on config.
_NEGATIVE_CHUNK_USERS = 4096

SAMPLED_PROTOCOL_K = 10  # HR@10 / NDCG@10 of the leave-one-out + sampled-negatives protocol


def selection_key(sampled: bool, k: int) -> str:
    """The validation metric that picks the best epoch or round: sampled HR@10 under the sampled protocol
    (as PFedRec and the FedRec papers report), else full-ranking Recall@``k``."""
    return f"sampled_hr@{SAMPLED_PROTOCOL_K}" if sampled else f"recall@{k}"


def improves(score: float, best: float, sampled: bool) -> bool:
    """Whether a validation ``score`` replaces the ``best`` so far. Under the sampled protocol a tie goes
    to the later epoch or round (PFedRec's ``>=``); under full ranking the earlier one is kept."""
    return score >= best if sampled else score > best

# --------------------------------------------------------------------------------------------------
# Per-user metrics on a hits matrix
# --------------------------------------------------------------------------------------------------


def _check_hits(hits: np.ndarray, n_relevant: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (hits[:, :k] as float64, n_relevant as int64); raise ValueError otherwise."""
    hits = np.asarray(hits)
    n_relevant = np.asarray(n_relevant)
    if hits.ndim != 2:
        raise ValueError(f"hits must be 2-D [n_users, k], got shape {hits.shape}")
    if n_relevant.shape != (hits.shape[0],):
        raise ValueError(f"n_relevant must have shape ({hits.shape[0]},), got {n_relevant.shape}")
    k = hits.shape[1] if k is None else int(k)
    if not 1 <= k <= hits.shape[1]:
        raise ValueError(f"k must be in [1, {hits.shape[1]}] (the width of hits), got {k}")
    if not np.isin(hits, (0, 1)).all():
        raise ValueError("hits must contain only 0/1 (or False/True)")
    n_relevant = n_relevant.astype(np.int64)
    empty = np.flatnonzero(n_relevant <= 0)
    if empty.size:
        raise ValueError(
            f"n_relevant must be >= 1 for every user (row {empty[0]} has {n_relevant[empty[0]]}); "
            "callers must exclude users without relevant items"
        )
    hits = hits[:, :k].astype(np.float64)
    too_many = np.flatnonzero(hits.sum(axis=1) > n_relevant)
    if too_many.size:
        raise ValueError(f"row {too_many[0]} has more hits than relevant items ({n_relevant[too_many[0]]})")
    return hits, n_relevant


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-user Recall@K: relevant items in the top K over the user's relevant items.

    Parameters
    ----------
    hits : bool or 0/1 array [n_users, width]
        ``hits[u, j]`` is 1 when the j-th ranked item (0-based) of user u is relevant.
    n_relevant : int array [n_users]
        Relevant (held-out) items per user; must be >= 1.
    k : int, optional
        Cut-off, at most ``width``; the first k columns of ``hits`` are used. Defaults to ``width``.

    Returns
    -------
    float64 array [n_users]
    """
    hits, n_relevant = _check_hits(hits, n_relevant, k)
    return hits.sum(axis=1) / n_relevant


def precision_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-user Precision@K: relevant items in the top K over K.

    Parameters and return as ``recall_at_k``; ``n_relevant`` is only validated (>= 1).
    """
    hits, _ = _check_hits(hits, n_relevant, k)
    return hits.sum(axis=1) / hits.shape[1]


def hit_rate_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-user HR@K: 1.0 when at least one relevant item is in the top K, else 0.0.

    Parameters and return as ``recall_at_k``; ``n_relevant`` is only validated (>= 1).
    """
    hits, _ = _check_hits(hits, n_relevant, k)
    return (hits.sum(axis=1) > 0).astype(np.float64)


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-user NDCG@K with binary gains: DCG of the top K over the ideal DCG.

    DCG = sum_j hits[u, j] / log2(j + 2) over 0-based positions j < K; the ideal DCG puts
    ``min(K, n_relevant[u])`` hits in the first positions (docs/methods.md#full-ranking).

    Parameters and return as ``recall_at_k``.
    """
    hits, n_relevant = _check_hits(hits, n_relevant, k)
    discounts = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2, dtype=np.float64))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, hits.shape[1]) - 1]
    return (hits @ discounts) / ideal


# --------------------------------------------------------------------------------------------------
# Full ranking
# --------------------------------------------------------------------------------------------------


def _canonical_csr(matrix: SparseRows, name: str) -> sp.csr_matrix:
    """A CSR copy with summed duplicates, no stored zeros and sorted indices; raise if not sparse."""
    if not sp.issparse(matrix):
        raise TypeError(f"{name} must be a scipy sparse matrix, got {type(matrix).__name__}")
    matrix = sp.csr_matrix(matrix, copy=True)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


def _as_list(exclude: Exclude) -> list[SparseRows]:
    return [exclude] if sp.issparse(exclude) else list(exclude)


def _contains(rows: sp.csr_matrix, columns: np.ndarray) -> np.ndarray:
    """bool [b, m]: whether ``rows`` (csr [b, n]) stores an entry at (i, columns[i, j])."""
    n_cols = rows.shape[1]
    row_of = np.repeat(np.arange(rows.shape[0], dtype=np.int64), np.diff(rows.indptr))
    stored = np.sort(row_of * n_cols + rows.indices.astype(np.int64))
    keys = np.arange(columns.shape[0], dtype=np.int64)[:, None] * n_cols + columns.astype(np.int64)
    if stored.size == 0:
        return np.zeros(columns.shape, dtype=bool)
    position = np.minimum(np.searchsorted(stored, keys), stored.size - 1)
    return stored[position] == keys


def _normalise_ks(k: int | Sequence[int]) -> list[int]:
    ks = sorted({int(x) for x in ([k] if isinstance(k, int | np.integer) else k)})
    if not ks or ks[0] < 1:
        raise ValueError(f"every k must be >= 1, got {k!r}")
    return ks


def topk_items(scores: torch.Tensor, exclude: Exclude, k: int, in_place: bool = False) -> torch.Tensor:
    """The k best items per row after excluding known items, with a deterministic tie rule.

    Excluded entries are set to -inf (on a copy, unless ``in_place``: then in ``scores`` itself, which saves
    a copy of [b, n_items] when the caller owns them), then the top k are
    ordered by score descending and, among equal scores, by **lower item id first**, both for which
    items enter the list and for their order. ``torch.topk`` alone does not guarantee this (on CPU it
    returns tied items in arbitrary order), so its selection is re-ordered canonically, and rows where
    the k-th score ties with the best item left out fall back to a stable full sort (O(n_items log n_items)
    per such row; with float scores from a trained model they are rare). If a row has fewer
    than k non-excluded items, the list is padded with excluded items (lowest ids first).

    Parameters
    ----------
    scores : float tensor [b, n_items]
        Higher is better. NaN is rejected.
    exclude : scipy CSR [b, n_items] or a list of them
        Stored entries are excluded; several matrices are OR-ed (e.g. train and validation).
    k : int
        List length, 1 <= k <= n_items.

    Returns
    -------
    int64 [b, k]
        Item ids, best first.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [b, n_items], got shape {tuple(scores.shape)}")
    b, n_items = scores.shape
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be in [1, n_items={n_items}], got {k}")
    scores = scores.detach()
    rows, cols = [], []
    for matrix in _as_list(exclude):
        if not sp.issparse(matrix) or matrix.shape != (b, n_items):
            shape = getattr(matrix, "shape", type(matrix).__name__)
            raise ValueError(f"exclude must be sparse with shape {(b, n_items)}, got {shape}")
        coo = sp.coo_matrix(matrix)
        rows.append(coo.row.astype(np.int64))
        cols.append(coo.col.astype(np.int64))
    index = tuple(torch.from_numpy(np.concatenate(part)).to(scores.device) for part in (rows, cols))
    minus_infinity = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    masked = scores.index_put_(index, minus_infinity) if in_place else scores.index_put(index, minus_infinity)

    # One extra item shows whether the selection is ambiguous: an item left out ties with the k-th.
    values, items = torch.topk(masked, min(k + 1, n_items), dim=1)
    if torch.isnan(values[:, 0]).any():  # topk ranks NaN above every number
        raise ValueError("scores contain NaN")
    ambiguous = (values[:, k] == values[:, k - 1]) if k < n_items else torch.zeros(b, dtype=torch.bool, device=scores.device)
    # Canonical order inside the selection: ascending ids, then a stable sort by descending score.
    items, _ = torch.sort(items[:, :k], dim=1)
    order = torch.sort(torch.gather(masked, 1, items), dim=1, descending=True, stable=True).indices
    items = torch.gather(items, 1, order)
    if ambiguous.any():
        tied_rows = ambiguous.nonzero().squeeze(1)
        items[tied_rows] = _top_with_ties(masked[tied_rows], values[tied_rows, k - 1], k)
    return items


def _top_with_ties(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """The k best items of rows whose k-th score ``kth`` [b] ties with an item left out, as a stable full sort
    (descending score, lower id first) would give them, in O(n_items) per row: every item above the k-th
    score, then the lowest ids among those equal to it until k. ``scores`` float [b, n_items], no NaN."""
    above = scores > kth[:, None]
    equal = scores == kth[:, None]
    wanted = k - above.sum(dim=1, keepdim=True)
    chosen = above | (equal & (torch.cumsum(equal, dim=1) <= wanted))
    items = chosen.nonzero()[:, 1].view(-1, k)  # row-major: each row's k ids, ascending
    order = torch.sort(torch.gather(scores, 1, items), dim=1, descending=True, stable=True).indices
    return torch.gather(items, 1, order)


def full_ranking_per_user(
    score_fn: ScoreFn,
    test: SparseRows,
    exclude: Exclude,
    k: int | Sequence[int],
    batch_users: int,
    owned_scores: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-user full-ranking metrics (docs/methods.md#full-ranking) for every user with at least one test item.

    Every item is scored; the user's excluded items (train, plus validation when evaluating test)
    are masked out; the top ``max(k)`` list is computed once with ``topk_items`` and cut at each k.
    Users are scored ``batch_users`` at a time, so memory is O(batch_users * n_items) and the results
    do not depend on ``batch_users``.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(user_ids: int64 [b]) -> float tensor [b, n_items]``; called under ``torch.no_grad``.
    test : scipy CSR [n_users, n_items]
        Held-out relevant items. Must not overlap ``exclude`` (an excluded relevant item can never be
        retrieved, which silently deflates recall), else ValueError.
    exclude : scipy CSR [n_users, n_items] or a list of them
        Items never recommended to the user.
    k : int or list of int
        Cut-offs; each must be <= n_items.
    batch_users : int
        Users scored at once.
    owned_scores : bool
        ``score_fn`` returns tensors nobody else holds: excluded items are masked in them, not in a copy.

    Returns
    -------
    user_ids : int64 [n_evaluated]
        Evaluated users (those with >= 1 test item), ascending.
    per_user : dict[str, float64 [n_evaluated]]
        ``recall@K``, ``ndcg@K``, ``hr@K``, ``precision@K`` for every requested K.
    """
    test = _canonical_csr(test, "test")
    n_users, n_items = test.shape
    excludes = [_canonical_csr(matrix, "exclude") for matrix in _as_list(exclude)]
    for matrix in excludes:
        if matrix.shape != test.shape:
            raise ValueError(f"exclude has shape {matrix.shape}, test has {test.shape}")
        overlap = test.multiply(matrix).tocsr()
        overlap.eliminate_zeros()
        if overlap.nnz:
            user = int(np.flatnonzero(np.diff(overlap.indptr))[0])
            raise ValueError(f"user {user} has test items that are also excluded; the splits must be disjoint")
    ks = _normalise_ks(k)
    if ks[-1] > n_items:
        raise ValueError(f"k={ks[-1]} exceeds n_items={n_items}")
    if batch_users < 1:
        raise ValueError(f"batch_users must be >= 1, got {batch_users}")

    n_relevant = np.diff(test.indptr).astype(np.int64)
    user_ids = np.flatnonzero(n_relevant > 0).astype(np.int64)
    hit_blocks = []
    for start in range(0, len(user_ids), batch_users):
        batch = user_ids[start : start + batch_users]
        with torch.no_grad():
            scores = score_fn(batch)
        if tuple(scores.shape) != (len(batch), n_items):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {(len(batch), n_items)}")
        top = topk_items(scores, [matrix[batch] for matrix in excludes], ks[-1], in_place=owned_scores).cpu().numpy()
        hit_blocks.append(_contains(test[batch], top))
    hits = np.concatenate(hit_blocks) if hit_blocks else np.zeros((0, ks[-1]), dtype=bool)
    relevant = n_relevant[user_ids]
    per_user: dict[str, np.ndarray] = {}
    for cut in ks:
        per_user[f"recall@{cut}"] = recall_at_k(hits, relevant, cut)
        per_user[f"ndcg@{cut}"] = ndcg_at_k(hits, relevant, cut)
        per_user[f"hr@{cut}"] = hit_rate_at_k(hits, relevant, cut)
        per_user[f"precision@{cut}"] = precision_at_k(hits, relevant, cut)
    return user_ids, per_user


def average_per_user(per_user: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean of each per-user metric, plus ``users_evaluated``; every user weighs the same.

    Raise ValueError when no user was evaluated (a mean over no users is undefined).
    """
    sizes = {len(values) for values in per_user.values()}
    if len(sizes) != 1:
        raise ValueError(f"per-user arrays must have one common length, got {sorted(sizes)}")
    (n_users,) = sizes
    if n_users == 0:
        raise ValueError("no user was evaluated (no user has a held-out item)")
    summary: dict[str, float] = {name: float(np.mean(values)) for name, values in per_user.items()}
    summary["users_evaluated"] = n_users
    return summary


def full_ranking_metrics(
    score_fn: ScoreFn,
    test: SparseRows,
    exclude: Exclude,
    k: int | Sequence[int],
    batch_users: int,
) -> dict[str, float]:
    """Full-ranking metrics averaged over users with >= 1 test item (see ``full_ranking_per_user``).

    Returns
    -------
    dict
        ``recall@K``, ``ndcg@K``, ``hr@K``, ``precision@K`` per requested K, and ``users_evaluated`` (int).
    """
    _, per_user = full_ranking_per_user(score_fn, test, exclude, k, batch_users)
    return average_per_user(per_user)


# --------------------------------------------------------------------------------------------------
# Sampled protocol: leave-one-out + N negatives
# --------------------------------------------------------------------------------------------------


def sample_eval_negatives(
    rng: np.random.Generator, interacted: SparseRows, users: np.ndarray, n_negatives: int
) -> np.ndarray:
    """Draw, per user, distinct evaluation negatives among the items the user never interacted with.

    ``interacted`` must hold ALL of the user's interactions (train + validation + test), so a negative
    can never be a positive or the held-out item (docs/methods.md#pitfalls). Each row is a uniform random subset
    of the user's non-interacted items, in random order. Draws are made in bulk by rejection (uniform
    items, dropping interacted items and repeats); users left short, e.g. because they interacted with
    most items, are drawn exactly one by one. The result depends on ``rng`` and on the whole ``users``
    array, not only on each user.

    Parameters
    ----------
    rng : np.random.Generator
    interacted : scipy CSR [n_users, n_items]
    users : int array [u]
        Users to draw for (repeats allowed).
    n_negatives : int
        Negatives per user, >= 1.

    Returns
    -------
    int64 array [u, n_negatives]

    Raises
    ------
    ValueError
        Naming the first user with fewer than ``n_negatives`` non-interacted items.
    """
    interacted = _canonical_csr(interacted, "interacted")
    n_users, n_items = interacted.shape
    users = np.asarray(users, dtype=np.int64)
    if users.ndim != 1 or (users.size and (users.min() < 0 or users.max() >= n_users)):
        raise ValueError(f"users must be a 1-D array of ids in [0, {n_users})")
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
    available = n_items - np.diff(interacted.indptr)[users]
    short = np.flatnonzero(available < n_negatives)
    if short.size:
        user = users[short[0]]
        raise ValueError(
            f"user {user} has only {available[short[0]]} non-interacted items, {n_negatives} negatives requested"
        )

    negatives = np.empty((len(users), n_negatives), dtype=np.int64)
    n_draws = 4 * n_negatives + 32
    for start in range(0, len(users), _NEGATIVE_CHUNK_USERS):
        chunk = users[start : start + _NEGATIVE_CHUNK_USERS]
        draws = rng.integers(0, n_items, size=(len(chunk), n_draws), dtype=np.int64)
        # Keep the first occurrence of each item in draw order: a stable sort puts it first among equals.
        order = np.argsort(draws, axis=1, kind="stable")
        sorted_draws = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros(draws.shape, dtype=bool)
        np.put_along_axis(repeat, order[:, 1:], sorted_draws[:, 1:] == sorted_draws[:, :-1], axis=1)
        valid = ~repeat & ~_contains(interacted[chunk], draws)
        keep = valid & (np.cumsum(valid, axis=1) <= n_negatives)
        enough = keep.sum(axis=1) == n_negatives
        negatives[start : start + len(chunk)][enough] = draws[enough][keep[enough]].reshape(-1, n_negatives)
        for row in np.flatnonzero(~enough):
            user = chunk[row]
            seen = interacted.indices[interacted.indptr[user] : interacted.indptr[user + 1]]
            pool = np.setdiff1d(np.arange(n_items, dtype=np.int64), seen, assume_unique=True)
            negatives[start + row] = rng.choice(pool, size=n_negatives, replace=False)
    return negatives


def sampled_per_user(
    score_fn_candidates: CandidateScoreFn,
    held_out: SparseRows,
    negatives: np.ndarray,
    users: np.ndarray,
    k: int | Sequence[int] = 10,
    batch_users: int = 1024,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-user HR@K and NDCG@K of the held-out item ranked among itself and its negatives
    (docs/methods.md#leave-one-out-with-sampled-negatives).

    Ties are broken **pessimistically**: rank = 1 + (number of negatives scoring >= the held-out item),
    so a constant scorer gets HR = 0 instead of a result that depends on where the held-out item sits
    among the candidates. HR@K = 1[rank <= K]; NDCG@K = 1[rank <= K] / log2(rank + 1).

    Parameters
    ----------
    score_fn_candidates : callable
        ``score_fn_candidates(user_ids: int64 [b], items: int64 [b, c]) -> float tensor [b, c]``, called
        under ``torch.no_grad``; column 0 of ``items`` is the held-out item, columns 1.. the negatives.
    held_out : scipy CSR [n_users, n_items]
        The held-out item per user. Users in ``users`` with no held-out item are skipped; more than
        one is a ValueError.
    negatives : int array [len(users), N]
        Row i holds user ``users[i]``'s negatives (``sample_eval_negatives``); containing the held-out
        item is a ValueError.
    users : int array [len(users)]
        Users to evaluate.
    k : int or list of int
        Cut-offs.
    batch_users : int
        Users scored at once.

    Returns
    -------
    user_ids : int64 [n_evaluated]
        Evaluated users, in the order of ``users``.
    per_user : dict[str, float64 [n_evaluated]]
        ``hr@K`` and ``ndcg@K`` for every requested K.
    """
    held_out = _canonical_csr(held_out, "held_out")
    n_users, n_items = held_out.shape
    users = np.asarray(users, dtype=np.int64)
    negatives = np.asarray(negatives)
    if users.ndim != 1 or (users.size and (users.min() < 0 or users.max() >= n_users)):
        raise ValueError(f"users must be a 1-D array of ids in [0, {n_users})")
    if negatives.ndim != 2 or negatives.shape[0] != len(users) or negatives.shape[1] < 1:
        raise ValueError(f"negatives must have shape ({len(users)}, N >= 1), got {negatives.shape}")
    if negatives.size and (negatives.min() < 0 or negatives.max() >= n_items):
        raise ValueError(f"negatives must be item ids in [0, {n_items})")
    ks = _normalise_ks(k)
    if batch_users < 1:
        raise ValueError(f"batch_users must be >= 1, got {batch_users}")
    counts = np.diff(held_out.indptr)[users]
    several = np.flatnonzero(counts > 1)
    if several.size:
        raise ValueError(f"user {users[several[0]]} has {counts[several[0]]} held-out items, expected exactly one")
    evaluated = np.flatnonzero(counts == 1)
    user_ids = users[evaluated]
    positives = held_out.indices[held_out.indptr[user_ids]].astype(np.int64)
    negatives = negatives[evaluated].astype(np.int64)
    leaked = np.flatnonzero((negatives == positives[:, None]).any(axis=1))
    if leaked.size:
        raise ValueError(f"the negatives of user {user_ids[leaked[0]]} contain their held-out item")

    candidates = np.concatenate([positives[:, None], negatives], axis=1)
    ranks = np.empty(len(user_ids), dtype=np.int64)
    for start in range(0, len(user_ids), batch_users):
        batch = slice(start, start + batch_users)
        with torch.no_grad():
            scores = score_fn_candidates(user_ids[batch], candidates[batch])
        if tuple(scores.shape) != candidates[batch].shape:
            expected = candidates[batch].shape
            raise ValueError(f"score_fn_candidates returned shape {tuple(scores.shape)}, expected {expected}")
        scores = scores.detach().cpu()
        if torch.isnan(scores).any():
            raise ValueError("scores contain NaN")
        ranks[batch] = 1 + (scores[:, 1:] >= scores[:, :1]).sum(dim=1).numpy()

    ones = np.ones(len(user_ids), dtype=np.int64)
    per_user: dict[str, np.ndarray] = {}
    for cut in ks:
        # A one-relevant-item hits matrix: rank r <= K puts the only hit at position r - 1.
        hits = np.zeros((len(user_ids), cut), dtype=bool)
        inside = ranks <= cut
        hits[np.flatnonzero(inside), ranks[inside] - 1] = True
        per_user[f"hr@{cut}"] = hit_rate_at_k(hits, ones)
        per_user[f"ndcg@{cut}"] = ndcg_at_k(hits, ones)
    return user_ids, per_user


def sampled_metrics(
    score_fn_candidates: CandidateScoreFn,
    held_out: SparseRows,
    negatives: np.ndarray,
    users: np.ndarray,
    k: int | Sequence[int] = 10,
    batch_users: int = 1024,
) -> dict[str, float]:
    """Sampled-protocol HR@K / NDCG@K averaged over evaluated users (see ``sampled_per_user``).

    Returns
    -------
    dict
        ``hr@K``, ``ndcg@K`` per requested K, and ``users_evaluated`` (int).
    """
    _, per_user = sampled_per_user(score_fn_candidates, held_out, negatives, users, k, batch_users)
    return average_per_user(per_user)


__all__ = [
    "recall_at_k",
    "precision_at_k",
    "hit_rate_at_k",
    "ndcg_at_k",
    "topk_items",
    "full_ranking_per_user",
    "full_ranking_metrics",
    "average_per_user",
    "sample_eval_negatives",
    "sampled_per_user",
    "sampled_metrics",
    "SAMPLED_PROTOCOL_K",
    "selection_key",
    "improves",
]
