"""The federated NMF start under secure aggregation: what a device adds to each secure sum, and what the
server computes from the sums alone.

Every start message a device answers is one dense float32 vector ("secure-sum") whose length depends only
on public sizes, so it carries neither the device's item ids nor its user factor p_u; it reaches the
server only inside a secure sum (Flower's SecAgg+, or the exact sum of the in-process engine). Two
methods (``fed.nmf-start``):

``range`` (default, cheap): a randomised range finder on the item co-occurrence A = R_Cᵀ R_C of a public,
seeded cohort C of devices (``fed.nmf-cohort``). Pass 1 sends only a seed: each device draws the public
test matrix Ω [n_items, k] and adds r_uᵀ (r_u Ω) (its rows of A Ω: zero off its items). Each of the
``fed.nmf-power`` further passes sends an orthonormal basis V of the last sum and collects A V. The
server takes the single-pass Nyström eigendecomposition of A from (T, A T) (Halko et al. 2011 §5.5;
Tropp et al. 2017), i.e. the truncated SVD R_C ≈ U Σ Wᵀ without U, and builds NNDSVD-style
non-negative item factors Q_j = sqrt(σ_j) · (w_j)₊ (the sign with the larger part). Devices later
fit their own p_u from the item rows they download anyway (``project_user_factor``).

``mu``: Lee-Seung multiplicative updates, ``fed.nmf-rounds`` of them; each device keeps p_u and adds
[r_uᵀ p_u (dense [n_items, rank], zero off its items), p_u p_uᵀ] to the sum. With the whole federation
as cohort and exact sums this is central multiplicative NMF (tests/test_secure_start.py).
"""

from __future__ import annotations

import math

import numpy as np

from fedsparse.rng import rng_for
from fedsparse.sparse.nmf import NMF_EPS

MIN_SECURE_COHORT = 5  # SecAgg+'s reconstruction threshold (server/secagg.py): fewer devices cannot run it
START_VALUE_BOUND = 8.0  # public scale: a device's start vector divided by it stays inside SecAgg+'s ±4 clipping range
SECURE_SUM = "secure-sum"  # the one array of every start reply
RELATIVE_EIGEN_FLOOR = 1e-4  # eigenvalues of RᵀR below this share of the largest are treated as zero


class StartRefused(RuntimeError):
    """The secure start cannot run (a cohort below SecAgg+'s threshold, or an unusable sum): the run
    stops here rather than fall back to any plaintext upload."""


def sketch_matrix(seed: int, n_items: int, width: int) -> np.ndarray:
    """The public test matrix Ω float32 [n_items, width] of the range finder, N(0, 1/n_items) entries
    drawn from ``rng_for(seed, "nmf-sketch")``: devices and server rebuild it from the seed alone."""
    rng = rng_for(seed, "nmf-sketch")
    return (rng.standard_normal((n_items, width)) / math.sqrt(n_items)).astype(np.float32)


def range_contribution(items: np.ndarray, test: np.ndarray) -> np.ndarray:
    """A device's term of A T = Σ_u r_uᵀ (r_u T): float32 [n_items * k], the row r_u T on its items, zero elsewhere."""
    items = np.asarray(items, dtype=np.int64)
    vector = np.zeros(test.shape, dtype=np.float32)
    vector[items] = test[items].astype(np.float64).sum(axis=0)
    return vector.reshape(-1)


def mu_contribution(items: np.ndarray, p_u: np.ndarray, n_items: int) -> np.ndarray:
    """A device's term of one multiplicative round: [r_uᵀ p_u (dense [n_items, rank]), p_u p_uᵀ] float32, flat."""
    numerator = np.zeros((n_items, p_u.size), dtype=np.float32)
    numerator[np.asarray(items, dtype=np.int64)] = p_u
    return np.concatenate([numerator.reshape(-1), np.outer(p_u, p_u).astype(np.float32).reshape(-1)])


def check_start_vector(vector: np.ndarray, length: int) -> str | None:
    """Why a start vector cannot enter the secure sum (length, dtype, non-finite or out of the public
    range), or None. Devices check their own vector before it is masked; the in-process server checks each."""
    vector = np.asarray(vector)
    if vector.dtype != np.float32 or vector.shape != (length,):
        return f"expected float32 [{length}], got {vector.dtype} {list(vector.shape)}"
    if not np.isfinite(vector).all():
        return "non-finite values"
    limit = 4.0 * START_VALUE_BOUND  # SECAGG_CLIPPING_RANGE after division by START_VALUE_BOUND
    if vector.size and float(np.abs(vector).max()) > limit:
        return f"a value beyond the public bound ±{limit:g} (SecAgg+ would clip it)"
    return None


def cohort_size(fraction: float, devices: int) -> int:
    """Devices in the start: ceil(fraction * devices), at least SecAgg+'s threshold; raises StartRefused below it."""
    if devices < MIN_SECURE_COHORT:
        raise StartRefused(f"the secure start needs at least {MIN_SECURE_COHORT} devices (SecAgg+'s threshold), "
                           f"the federation has {devices}")
    return min(devices, max(MIN_SECURE_COHORT, math.ceil(fraction * devices)))


def orthonormal_basis(sample: np.ndarray) -> np.ndarray:
    """Q of the thin QR of ``sample`` [n, k] (float64): the next pass's test matrix."""
    basis, _ = np.linalg.qr(np.asarray(sample, dtype=np.float64))
    return basis


def nystrom_svd(test: np.ndarray, sample: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Right singular vectors W [n, rank] and singular values σ [rank] of R from A T = RᵀR T (A PSD).

    Stabilised single-pass Nyström (Tropp et al. 2017, Alg. 3): shift by ν, A ≈ Y_ν (Tᵀ Y_ν)⁻¹ Y_νᵀ,
    eigenvalues λ = s² − ν, σ = sqrt(λ). Directions of Tᵀ Y_ν with eigenvalues below its precision are
    dropped (a cohort whose co-occurrence has lower rank than k); missing columns come back as zero.
    """
    test = np.asarray(test, dtype=np.float64)
    sample = np.asarray(sample, dtype=np.float64)
    n, width = sample.shape
    nu = np.sqrt(n) * np.finfo(np.float64).eps * max(np.linalg.norm(sample), 1e-300)
    shifted = sample + nu * test
    core = test.T @ shifted
    core = (core + core.T) / 2
    values, vectors = np.linalg.eigh(core)
    keep = values > values.max() * 1e-10 if values.max() > 0 else np.zeros_like(values, dtype=bool)
    inv_root = vectors[:, keep] / np.sqrt(values[keep])
    left, singular, _ = np.linalg.svd(shifted @ inv_root, full_matrices=False)
    eigen = np.clip(singular**2 - nu, 0.0, None)
    # Directions at the noise level (a cohort of lower rank than k, or SecAgg+'s rounding) are arbitrary: drop them.
    eigen[eigen < RELATIVE_EIGEN_FLOOR * eigen.max(initial=0.0)] = 0.0
    W = np.zeros((n, rank))
    sigma = np.zeros(rank)
    take = min(rank, eigen.size)
    W[:, :take], sigma[:take] = left[:, :take], np.sqrt(eigen[:take])
    return W, sigma


def svd_item_factor(W: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The signed item factor of a truncated SVD, Q = W Σ^½ float64 [n, rank]: with P = U Σ^½ the two sides have
    equal column norms, and the masks take the entries of largest magnitude."""
    return np.asarray(W) * np.sqrt(np.asarray(sigma))[None, :]


def nndsvd_item_factor(W: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """NNDSVD-style item factor from R's right singular vectors: Q_j = sqrt(σ_j) · (±w_j)₊, float64 [n, rank].

    NNDSVD (Boutsidis & Gallopoulos 2008) keeps, per component, the sign whose parts of u_j and w_j have
    the larger norm product; with only w_j known the sign with the larger item part is kept, and the
    balanced split sqrt(σ_j) gives P and Q the same column scale (what ``rebalance_columns`` targets).
    """
    positive, negative = np.clip(W, 0.0, None), np.clip(-W, 0.0, None)
    take_negative = np.linalg.norm(negative, axis=0) > np.linalg.norm(positive, axis=0)
    parts = np.where(take_negative[None, :], negative, positive)
    return parts * np.sqrt(np.asarray(sigma))[None, :]


def balance_columns(item_factor: np.ndarray, W: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Q with columns rescaled so that ||Q_j|| = ||P_j||, P the least-squares user factor R Q (QᵀQ)⁻¹ (float64).

    The server never sees P, but PᵀP = (QᵀQ)⁻¹ Qᵀ A Q (QᵀQ)⁻¹ needs only A = RᵀR ≈ W Σ² Wᵀ, which the
    start estimated: the same balance as ``rebalance_columns`` gives the central factors.
    """
    Q = np.asarray(item_factor, dtype=np.float64)
    gram_inv = np.linalg.pinv(Q.T @ Q)
    projected = (W.T @ Q) * np.asarray(sigma)[:, None]  # Σ Wᵀ Q, so QᵀAQ = projectedᵀ projected
    user_gram = gram_inv @ (projected.T @ projected) @ gram_inv
    user_norm = np.sqrt(np.clip(np.diag(user_gram), 0.0, None))
    item_norm = np.linalg.norm(Q, axis=0)
    scale = np.ones_like(item_norm)
    ok = (user_norm > 0) & (item_norm > 0)
    scale[ok] = np.sqrt(item_norm[ok] / user_norm[ok])
    return Q / scale


PROJECT_ITERATIONS = 50  # multiplicative NNLS steps a device takes to fit its p_u (rank x rank work each)


def project_user_factor(
    item_rows: np.ndarray, gram: np.ndarray, iterations: int = PROJECT_ITERATIONS, signed: bool = False
) -> np.ndarray:
    """A device's NMF user factor: the non-negative least-squares fit of r_u ≈ p_u Qᵀ, from the (masked) item
    rows it downloaded anyway and the public gram QᵀQ of the masked table.

    ``iterations`` multiplicative steps p ← p ⊙ (r_u Q) / (p QᵀQ + NMF_EPS) from p = 1 (the user step of
    ``fedsparse.sparse.nmf``, with Q fixed). ``item_rows`` float [m, w]: the rows of its training items;
    ``gram`` [dim, dim]. Returns float64 [w], >= 0 (zeros for a device with no item). ``signed``: the
    unconstrained least-squares fit (r_u Q)(QᵀQ)⁺ instead, for a signed (SVD) item table.
    """
    rows = np.asarray(item_rows, dtype=np.float64)
    width = rows.shape[1]
    numerator = rows.sum(axis=0)
    gram = np.asarray(gram, dtype=np.float64)[:width, :width]
    if signed:
        return numerator @ np.linalg.pinv(gram)
    # A column the gram says is empty (or a negative sum: rows grown since the gram was sent) carries no
    # usable information for a non-negative fit: its entry stays 0 rather than dividing by nothing.
    live = np.diag(gram) > NMF_EPS
    numerator = np.where(live, np.clip(numerator, 0.0, None), 0.0)
    p_u = np.where(live, 1.0, 0.0) if rows.shape[0] else np.zeros(width)
    for _ in range(iterations):
        p_u = user_factor_update_from_sums(p_u, numerator, gram)
    return p_u


LIVE_COLUMN = 1e-6  # a column of PᵀP whose diagonal is below this share of the largest holds only noise
ITEM_ITERATIONS = 100  # multiplicative steps the server takes on Q per refinement round (P fixed: no bytes)


def solve_item_factor(
    item_factor: np.ndarray, numerator: np.ndarray, gram: np.ndarray, iterations: int = ITEM_ITERATIONS
) -> np.ndarray:
    """The non-negative least-squares item factor for the summed Rᵀ P [n, rank] and PᵀP [rank, rank]:
    ``iterations`` multiplicative steps from Q (an alternating-NNLS outer step, not MU's single step).

    With the devices' p_u fitted by NNLS too, one refinement round is one round of alternating non-negative
    least squares, which converges in far fewer rounds than one multiplicative step per round.
    """
    Q = np.asarray(item_factor, dtype=np.float64)
    # SecAgg+'s rounding leaves tiny signed noise where the sums are zero. Rᵀ P and PᵀP of non-negative
    # factors are non-negative, so negative noise is clipped; a column no device's p_u uses (its diagonal at
    # the noise level) keeps its values instead of dividing by noise.
    gram = np.clip(np.asarray(gram, dtype=np.float64), 0.0, None)
    live = np.diag(gram) > LIVE_COLUMN * float(np.diag(gram).max(initial=0.0))
    numerator = np.clip(np.asarray(numerator, dtype=np.float64), 0.0, None)
    solved = Q[:, live]
    for _ in range(iterations):
        solved = solved * numerator[:, live] / (solved @ gram[np.ix_(live, live)] + NMF_EPS)
    Q = Q.copy()
    Q[:, live] = solved
    return Q


def user_factor_update_from_sums(p_u: np.ndarray, numerator: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """p ⊙ (r_u Q) / (p QᵀQ + NMF_EPS) with r_u Q already summed."""
    return p_u * numerator / (p_u @ gram + NMF_EPS)
