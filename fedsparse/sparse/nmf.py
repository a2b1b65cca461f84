"""Non-negative matrix factorisation of the interactions and the masks SparseRec derives from it.

SparseRec initialises its embedding mask from an NMF R ≈ P Qᵀ (docs/methods.md#sparserec, fix (a)): P [n_users, rank]
and Q [n_items, rank] have the shapes of the user and item tables, so their largest entries mark the
active ones. Two solvers: scikit-learn's coordinate descent (fast reference) and our own Lee-Seung
multiplicative updates, written as per-user / per-item pieces so that one federated round (devices
update their own p_u, the server updates Q from summed contributions) is the same arithmetic as
one central iteration (tests/test_nmf.py checks this).

Order of one multiplicative iteration, used by the central and the federated versions alike:
users first from the current Q, then items from the new P::

    P ← P ⊙ (R Q)  / (P (QᵀQ) + NMF_EPS)
    Q ← Q ⊙ (Rᵀ P) / (Q (PᵀP) + NMF_EPS)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp

from fedsparse.rng import rng_for
from fedsparse.sparse.masks import largest

NMF_EPS = 1e-10  # added to every multiplicative-update denominator (central and federated alike)
NMF_METHODS = ("sklearn", "multiplicative")
SELECT_RULES = ("global", "per-row")


# ---------------------------------------------------------------- factorisation


def nmf_factors(
    interactions: sp.spmatrix,
    rank: int,
    iterations: int,
    seed: int,
    method: str = "sklearn",
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative factors P, Q with R ≈ P Qᵀ, computed on the sparse matrix (R is never densified).

    The factors rank the entries of the user and item tables for SparseRec's NMF mask.

    Parameters
    ----------
    interactions
        Non-negative sparse matrix R [n_users, n_items] (binary CSR in fedsparse).
    rank
        Number of latent columns, the embedding ``dim`` of the tables the factors score.
    iterations
        "sklearn": ``max_iter``; "multiplicative": exactly this many update iterations.
    seed
        "sklearn": ``random_state`` (used by the randomized SVD of the NNDSVDa init);
        "multiplicative": the init stream ``rng_for(seed, "nmf-init")``.
    method
        "sklearn": ``sklearn.decomposition.NMF(n_components=rank, init="nndsvda", max_iter=iterations,
        random_state=seed)`` (coordinate descent, Frobenius loss, default ``tol=1e-4``, so it may stop
        before ``iterations``). Its ConvergenceWarning when ``max_iter`` is reached is suppressed:
        a mask only needs a ranking, not a converged factorisation.
        NNDSVDa needs ``rank <= min(n_users, n_items)``.
        "multiplicative": ``multiplicative_init`` then ``iterations`` calls of
        ``multiplicative_update`` in float64 (Lee-Seung, Frobenius loss; non-increasing objective).

    Returns
    -------
    P : float32 [n_users, rank], >= 0
    Q : float32 [n_items, rank], >= 0
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if method not in NMF_METHODS:
        raise ValueError(f"method must be one of {NMF_METHODS}, got {method!r}")
    R = _as_nonnegative_csr(interactions)
    n_users, n_items = R.shape
    if method == "sklearn":
        from sklearn.decomposition import NMF
        from sklearn.exceptions import ConvergenceWarning

        if rank > min(n_users, n_items):
            raise ValueError(f"method 'sklearn' (init nndsvda) needs rank <= min(n_users, n_items), got {rank}")
        model = NMF(n_components=rank, init="nndsvda", max_iter=iterations, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            P = model.fit_transform(R.astype(np.float32))
        Q = model.components_.T
    else:
        R = R.astype(np.float64)
        mean = float(R.sum()) / max(n_users * n_items, 1)
        P, Q = multiplicative_init(n_users, n_items, rank, seed, mean)
        for _ in range(iterations):
            P, Q = multiplicative_update(R, P, Q)
    return np.ascontiguousarray(P, dtype=np.float32), np.ascontiguousarray(Q, dtype=np.float32)


def multiplicative_init(
    n_users: int, n_items: int, rank: int, seed: int, mean: float
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded non-negative start for the multiplicative updates (scikit-learn's ``init="random"`` scale).

    Entries are sqrt(mean / rank) · |N(0, 1)| from ``rng_for(seed, "nmf-init")``, P drawn before Q,
    so P Qᵀ has about the magnitude of R. ``mean`` = R.sum() / (n_users · n_items); in a federation
    the server needs only the interaction count for it, and a device's row is P[u] of this draw.

    Returns
    -------
    P : float64 [n_users, rank], Q : float64 [n_items, rank]; entries > 0 almost surely.
    """
    if mean < 0 or not np.isfinite(mean):
        raise ValueError(f"mean must be finite and >= 0, got {mean}")
    rng = rng_for(seed, "nmf-init")
    scale = np.sqrt(mean / rank) if mean > 0 else 1.0 / np.sqrt(rank)
    P = scale * np.abs(rng.standard_normal((n_users, rank)))
    Q = scale * np.abs(rng.standard_normal((n_items, rank)))
    return P, Q


def multiplicative_update(R: sp.spmatrix, P: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One central Lee-Seung iteration: users from the current Q, then items from the new P.

    The federated round (``user_factor_update`` on every device, then ``item_update_contribution``
    summed by ``sum_item_contributions`` and applied with ``apply_item_update``) computes the same
    thing for a binary R.

    Parameters
    ----------
    R : sparse [n_users, n_items], >= 0
    P : [n_users, rank], >= 0
    Q : [n_items, rank], >= 0

    Returns
    -------
    P, Q : new factors, same shapes (float64 when R, P or Q is).
    """
    P = _multiplicative_rule(P, R @ Q, Q.T @ Q)
    Q = apply_item_update(Q, R.T @ P, P.T @ P)
    return P, Q


def nmf_objective(R: sp.spmatrix, P: np.ndarray, Q: np.ndarray) -> float:
    """The Frobenius objective ||R - P Qᵀ||²_F without forming P Qᵀ (float64).

    ||R||² - 2 tr(Pᵀ R Q) + tr((PᵀP)(QᵀQ)); what the multiplicative updates never increase.
    """
    R = sp.csr_matrix(R, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    cross = float(np.sum(P * (R @ Q)))
    return float(R.data @ R.data) - 2.0 * cross + float(np.sum((P.T @ P) * (Q.T @ Q)))


# ---------------------------------------------------------------- federated decomposition of one round


def user_factor_update(r_u_items: np.ndarray, p_u: np.ndarray, Q: np.ndarray, gram_q: np.ndarray) -> np.ndarray:
    """A device's step of one multiplicative round: p_u ⊙ (r_u Q) / (p_u QᵀQ + NMF_EPS).

    Runs on the device that holds r_u; it reads only Q[r_u_items] and the server's gram_q = QᵀQ,
    so a device needs its own item rows plus a rank × rank matrix, never all of Q.

    Parameters
    ----------
    r_u_items : int64 [m]
        The user's interacted items; r_u is binary (1 on these items, 0 elsewhere).
    p_u : [rank], >= 0
    Q : [n_items, rank], >= 0 (the current item factors, before this round's item update)
    gram_q : [rank, rank], QᵀQ

    Returns
    -------
    new p_u : [rank]; all zeros when m = 0 (as in the central update).
    """
    items = np.asarray(r_u_items, dtype=np.int64)
    numerator = Q[items].sum(axis=0)
    return _multiplicative_rule(p_u, numerator, gram_q)


def item_update_contribution(
    r_u_items: np.ndarray, p_u: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a device sends for the item step: the nonzero rows of r_uᵀ p_u, and p_u p_uᵀ.

    Call it with the p_u returned by ``user_factor_update`` of the same round (items follow users).
    For a binary r_u every numerator row equals p_u; rows are kept explicit so the payload is an
    ordinary sparse row update. Note the rows are the user's item ids (docs/methods.md#the-row-id-leak).

    Returns
    -------
    rows : int64 [m], the items (copy of r_u_items)
    numerator : [m, rank], row k = p_u
    gram : [rank, rank], outer(p_u, p_u)
    """
    rows = np.array(r_u_items, dtype=np.int64, copy=True).reshape(-1)
    p_u = np.asarray(p_u)
    numerator = np.repeat(p_u[None, :], rows.size, axis=0)
    return rows, numerator, np.outer(p_u, p_u)


def sum_item_contributions(
    n_items: int, rank: int, contributions: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Server side: sum device contributions into Rᵀ P [n_items, rank] and PᵀP [rank, rank] (float64).

    Each contribution is ``item_update_contribution``'s (rows, numerator, gram). Items that no
    contribution names get a zero numerator, hence a zero Q row, as in the central update.
    """
    numerator_sum = np.zeros((n_items, rank), dtype=np.float64)
    gram_sum = np.zeros((rank, rank), dtype=np.float64)
    for rows, numerator, gram in contributions:
        np.add.at(numerator_sum, np.asarray(rows, dtype=np.int64), numerator)
        gram_sum += gram
    return numerator_sum, gram_sum


def apply_item_update(Q: np.ndarray, numerator_sum: np.ndarray, gram_sum: np.ndarray) -> np.ndarray:
    """The server's step of one multiplicative round: Q ⊙ (Rᵀ P) / (Q (PᵀP) + NMF_EPS).

    Parameters
    ----------
    Q : [n_items, rank], >= 0
    numerator_sum : [n_items, rank], Rᵀ P with the new P (dense; see ``sum_item_contributions``)
    gram_sum : [rank, rank], PᵀP with the new P

    Returns
    -------
    new Q : [n_items, rank]
    """
    return _multiplicative_rule(Q, numerator_sum, gram_sum)


def _multiplicative_rule(factor: np.ndarray, numerator: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """factor ⊙ numerator / (factor · gram + NMF_EPS): the one Lee-Seung rule every update uses."""
    return factor * numerator / (factor @ gram + NMF_EPS)


# ---------------------------------------------------------------- scale and selection


def rebalance_columns(P: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale latent column j by c_j = sqrt(||Q_j|| / ||P_j||): P_j · c_j, Q_j / c_j.

    NMF is scale-ambiguous ((P D, Q D⁻¹) gives the same P Qᵀ), so entry magnitudes compared across
    columns are arbitrary until the columns are balanced; afterwards ||P_j|| = ||Q_j|| =
    sqrt(||P_j|| ||Q_j||) and P Qᵀ is unchanged. Columns with a zero norm on either side are left as
    they are. Norms are computed in float64; the outputs keep the input dtypes.

    Returns
    -------
    P : [n_users, rank], Q : [n_items, rank] (new arrays)
    """
    P = np.asarray(P)
    Q = np.asarray(Q)
    if P.ndim != 2 or Q.ndim != 2 or P.shape[1] != Q.shape[1]:
        raise ValueError(f"P and Q must be 2-D with the same number of columns, got {P.shape} and {Q.shape}")
    p_norm = np.linalg.norm(P.astype(np.float64), axis=0)
    q_norm = np.linalg.norm(Q.astype(np.float64), axis=0)
    scale = np.ones_like(p_norm)
    ok = (p_norm > 0) & (q_norm > 0)
    scale[ok] = np.sqrt(q_norm[ok] / p_norm[ok])
    return (P * scale).astype(P.dtype, copy=False), (Q / scale).astype(Q.dtype, copy=False)


def top_k_mask(scores: np.ndarray, budget: int, select: str = "global", min_per_row: int = 0) -> np.ndarray:
    """A mask with exactly ``budget`` True entries at the highest scores, ties broken deterministically.

    The exact-budget rule of every policy (docs/methods.md#exact-budget): nnz(mask) == budget, same input → same mask.
    Order: higher score first, then lower flat (row-major) index; among rows, lower row index.

    Parameters
    ----------
    scores : [rows, d] finite floats (>= 0 for NMF factors; any order works); NaN raises.
    budget : number of True entries, 0 <= budget <= rows · d.
    select
        "global": the ``budget`` largest scores of the whole table.
        "per-row": each row gets a quota q = budget // rows of its own best entries; the remaining
        budget - q · rows entries go, one each, to the rows whose (q+1)-th best score is largest
        (ties: lower row index). Row counts therefore differ by at most one.
    min_per_row
        "global" only: first each row's own ``min_per_row`` best entries, then the remaining budget by
        the global rule over the entries not yet taken. "per-row" already gives every row
        q >= min_per_row when min_per_row · rows <= budget.

    Returns
    -------
    mask : bool [rows, d]

    Raises
    ------
    ValueError
        budget < 0 or > rows · d; min_per_row < 0 or min_per_row · rows > budget (which covers
        min_per_row > d); unknown ``select``; scores not 2-D or containing NaN.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [rows, d], got shape {scores.shape}")
    rows, d = scores.shape
    budget = int(budget)
    min_per_row = int(min_per_row)
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    if budget < 0 or budget > rows * d:
        raise ValueError(f"budget must be in [0, rows * d = {rows * d}], got {budget}")
    if min_per_row < 0:
        raise ValueError(f"min_per_row must be >= 0, got {min_per_row}")
    if min_per_row * rows > budget:
        raise ValueError(f"min_per_row * rows = {min_per_row * rows} exceeds the budget {budget}")
    values = scores.astype(np.float64, copy=False)
    if np.isnan(values).any():
        raise ValueError("scores contain NaN")
    mask = np.zeros((rows, d), dtype=bool)
    if budget == 0:
        return mask
    row_ids = np.arange(rows)
    if select == "per-row":
        quota, extra = divmod(budget, rows)
        order = _row_order(values, quota + (1 if extra else 0))
        mask[row_ids[:, None], order[:, :quota]] = True
        if extra:
            # quota < d here, since quota == d would mean budget == rows * d and extra == 0
            next_best = values[row_ids, order[:, quota]]
            winners = largest(next_best, extra)
            mask[winners, order[winners, quota]] = True
        return mask
    if min_per_row > 0:
        mask[row_ids[:, None], _row_order(values, min_per_row)] = True
    flat = values.reshape(-1)
    free = np.flatnonzero(~mask.reshape(-1))  # ascending, so ties still go to the lower flat index
    chosen = free[largest(flat[free], budget - min_per_row * rows)]
    mask.reshape(-1)[chosen] = True
    return mask


def _row_order(values: np.ndarray, width: int) -> np.ndarray:
    """int [rows, width]: each row's column indices, best score first, ties by lower column (stable)."""
    return np.argsort(-values, axis=1, kind="stable")[:, :width]


def nmf_masks(
    interactions: sp.spmatrix,
    dim: int,
    user_budget: int,
    item_budget: int,
    *,
    iterations: int,
    seed: int,
    method: str = "sklearn",
    select: str = "global",
    rescale: bool = True,
    min_per_row: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SparseRec's NMF mask initialisation: factorise R, optionally rebalance, top-k each table.

    Each table is selected within its own budget (a per-side quota); a joint top-K over [P; Q] is
    ``top_k_mask(np.vstack([P, Q]), K)`` on the returned factors.

    Parameters
    ----------
    interactions : sparse [n_users, n_items]
    dim : the embedding dim, used as the NMF rank
    user_budget, item_budget : exact active entries of the user and item tables
    iterations, seed, method : see ``nmf_factors``
    select, min_per_row : see ``top_k_mask`` (applied to each table)
    rescale : apply ``rebalance_columns`` before selecting

    Returns
    -------
    user_mask : bool [n_users, dim], exactly user_budget True
    item_mask : bool [n_items, dim], exactly item_budget True
    P : float32 [n_users, dim], Q : float32 [n_items, dim] (rebalanced when ``rescale``)
    """
    P, Q = nmf_factors(interactions, dim, iterations, seed, method)
    if rescale:
        P, Q = rebalance_columns(P, Q)
    user_mask = top_k_mask(P, user_budget, select, min_per_row)
    item_mask = top_k_mask(Q, item_budget, select, min_per_row)
    return user_mask, item_mask, P, Q


def _as_nonnegative_csr(interactions: sp.spmatrix) -> sp.csr_matrix:
    """The interactions as CSR; rejects dense input, non-finite and negative values."""
    if not sp.issparse(interactions):
        raise TypeError(f"interactions must be a scipy sparse matrix, got {type(interactions).__name__}")
    R = sp.csr_matrix(interactions)
    if R.nnz and (not np.all(np.isfinite(R.data)) or R.data.min() < 0):
        raise ValueError("interactions must be finite and non-negative")
    return R
