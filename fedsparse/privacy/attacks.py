"""Membership attacks of an honest-but-curious server on one observed upload.

- ``row_id_guess``: the uploaded rows are the user's items (exact against positives-only uploads).
- ``ValueAttack``: per uploaded row, features of its delta against the item row the server sent and
  against the upload's dominant direction (one local round moves every row along +-u, the private
  user row); a logistic regression trained on a shadow set of uploads with known labels scores them.
- ``imia_guess``: IMIA-style (Yuan et al., WWW 2023): the server fits its own user row under a guessed
  labelling, re-runs the device's BPR step for each row as a positive and as a negative, relabels each
  row by the closer hypothesis, and breaks the labelling's sign symmetry by popularity.
- ``differencing_guess``: under secure aggregation the server holds only per-round cohort sums, with
  public cohorts; consecutive rounds share devices, so the difference between the rounds a device
  joined and the rounds it did not isolates its rows: score = mean row mass with it - mean without it.
Rows outside the upload score below every uploaded row: the server knows the device did not touch them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedsparse.privacy.leakage import AttackGuess
from fedsparse.privacy.observe import ObservedSum, ObservedUpload

UNTOUCHED_SCORE = -1e9  # score of every row the upload does not carry
_TINY = 1e-12


def row_id_guess(upload: ObservedUpload) -> AttackGuess:
    """Score 1 for each uploaded row, 0 elsewhere; predict the uploaded rows."""
    scores = np.zeros(upload.n_items)
    scores[upload.rows] = 1.0
    return AttackGuess(scores, upload.rows.copy())


def _guess_from_row_scores(upload: ObservedUpload, row_scores: np.ndarray, threshold: float) -> AttackGuess:
    """Place per-uploaded-row scores into the catalogue; predict the rows scoring above ``threshold``."""
    scores = np.full(upload.n_items, UNTOUCHED_SCORE)
    scores[upload.rows] = row_scores
    return AttackGuess(scores, upload.rows[row_scores > threshold])


def dominant_direction(deltas: np.ndarray) -> np.ndarray:
    """Unit float64 [dim]: the top right singular vector of the upload's deltas [r, dim] (sign arbitrary)."""
    _, _, vt = np.linalg.svd(deltas.astype(np.float64), full_matrices=False)
    return vt[0]


def row_features(upload: ObservedUpload) -> np.ndarray:
    """float64 [r, 6] per uploaded row, each invariant to the sign of the dominant direction u:
    (delta.u)(item.u) / norms, cos(delta, item), log delta norm relative to the upload's median, log
    item norm, the share of active entries where delta and item agree in sign, |delta.u| / delta norm."""
    deltas = upload.deltas.astype(np.float64)
    items = upload.item_rows.astype(np.float64)
    direction = dominant_direction(deltas)
    delta_norm = np.linalg.norm(deltas, axis=1) + _TINY
    item_norm = np.linalg.norm(items, axis=1) + _TINY
    along = deltas @ direction
    aligned = along * (items @ direction) / (delta_norm * item_norm)
    cosine = (deltas * items).sum(axis=1) / (delta_norm * item_norm)
    active = deltas != 0
    agree = ((np.sign(deltas) == np.sign(items)) & active).sum(axis=1) / np.maximum(active.sum(axis=1), 1)
    return np.column_stack([
        aligned,
        cosine,
        np.log(delta_norm / np.median(delta_norm)),
        np.log(item_norm),
        agree,
        np.abs(along) / delta_norm,
    ])


@dataclass
class ValueAttack:
    """Logistic regression on ``row_features``, trained on shadow uploads whose members are known."""

    seed: int = 0

    def fit(self, uploads: list[ObservedUpload], members: list[np.ndarray]) -> ValueAttack:
        """Learn from shadow uploads (the attacker's own simulated devices, labels known)."""
        features = np.vstack([row_features(upload) for upload in uploads])
        labels = np.concatenate([np.isin(upload.rows, member) for upload, member in zip(uploads, members, strict=True)])
        if labels.all() or not labels.any():
            raise ValueError("the shadow uploads need both member and non-member rows to train the value attack")
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=self.seed))
        self.model.fit(features, labels)
        return self

    def guess(self, upload: ObservedUpload) -> AttackGuess:
        """Member probability of each uploaded row; predict those above 1/2."""
        probability = self.model.predict_proba(row_features(upload))[:, 1]
        return _guess_from_row_scores(upload, probability, 0.5)


def imia_guess(
    upload: ObservedUpload,
    rng: np.random.Generator,
    item_optimizer: str = "sgd",
    l2_reg: float = 0.0,
    rounds: int = 5,
    fit_steps: int = 50,
    fit_lr: float = 0.1,
) -> AttackGuess:
    """IMIA-style inference on one upload; a row's score is (distance as a negative) - (distance as a positive).

    Two labellings seed the search (rows on either side of the upload's dominant direction). Each of
    ``rounds`` re-fits a fresh user row (``fit_steps`` of gradient descent on the BPR loss of the current
    labelling, item rows frozen at what the server sent), simulates one local step's delta for every row
    as a positive and as a negative, and relabels each row by the closer simulation (in direction).
    Flipping every label and the user row explains the directions equally well; the labelling whose
    positives have the longer item rows wins (a user's items are more popular than uniformly drawn
    negatives or fakes, and popular items' rows grow longer in training). The simulated step follows the
    protocol, which the server knows: ``item_optimizer`` (sgd, or adam's first step: the sign of the
    gradient) on the BPR term plus ``l2_reg`` times the item row.
    """
    items = upload.item_rows.astype(np.float64)
    deltas = upload.deltas.astype(np.float64)
    mask = upload.deltas != 0
    side = deltas @ dominant_direction(deltas)
    item_norm = np.linalg.norm(items, axis=1)
    best_scores, best_gap = np.zeros(items.shape[0]), -np.inf
    for positive in (side > 0, side < 0):
        for _ in range(rounds):
            user = _fit_user_row(items, positive, rng, fit_steps, fit_lr)
            s = items @ user
            negative_mean = s[~positive].mean() if (~positive).any() else s.mean()
            positive_mean = s[positive].mean() if positive.any() else s.mean()
            step = (items, mask, l2_reg, item_optimizer)
            simulated_positive = _simulated_delta(user, _sigmoid(negative_mean - s), +1, *step)
            simulated_negative = _simulated_delta(user, _sigmoid(s - positive_mean), -1, *step)
            scores = _distance(deltas, simulated_negative) - _distance(deltas, simulated_positive)
            positive = scores > 0
        norm_gap = _mean(item_norm[positive]) - _mean(item_norm[~positive])
        if norm_gap > best_gap:
            best_scores, best_gap = scores, norm_gap
    return _guess_from_row_scores(upload, best_scores, 0.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise."""
    return 1.0 / (1.0 + np.exp(-x))


def _fit_user_row(items: np.ndarray, positive: np.ndarray, rng: np.random.Generator, steps: int, lr: float) -> np.ndarray:
    """A re-initialised user row fitted by gradient descent on the mean BPR loss softplus(s_neg - s_pos)
    over all labelled pairs (left at its initial value when one label is empty)."""
    user = rng.normal(0.0, 0.1, size=(items.shape[1],))
    if positive.all() or not positive.any():
        return user
    pos, neg = items[positive], items[~positive]
    for _ in range(steps):
        margin = (pos @ user)[:, None] - (neg @ user)[None, :]
        weight = _sigmoid(-margin)
        user += lr * (weight.sum(axis=1) @ pos - weight.sum(axis=0) @ neg) / weight.size
    return user


def _simulated_delta(
    user: np.ndarray, pull: np.ndarray, sign: int, items: np.ndarray, mask: np.ndarray, l2_reg: float, optimizer: str
) -> np.ndarray:
    """One local step's delta per row [r, dim] on the active entries, up to scale: minus the gradient
    -sign * pull_r * user + l2_reg * item_r (sgd), or minus its sign (adam's first step)."""
    gradient = -sign * pull[:, None] * user[None, :] + l2_reg * items
    step = np.sign(gradient) if optimizer == "adam" else gradient
    return -step * mask


def _mean(values: np.ndarray) -> float:
    """Mean of ``values``, 0 when empty."""
    return float(values.mean()) if values.size else 0.0


def _distance(observed: np.ndarray, simulated: np.ndarray) -> np.ndarray:
    """1 - cosine per row (the scale of a step depends on the device's optimiser and learning rate)."""
    dot = (observed * simulated).sum(axis=1)
    norms = np.linalg.norm(observed, axis=1) * np.linalg.norm(simulated, axis=1) + _TINY
    return 1.0 - dot / norms


def differencing_guess(sums: list[ObservedSum], user: int, predicted: int, sign: int = 1) -> AttackGuess | None:
    """Score each item by its mean row mass over the sums ``user`` joined minus the mean over those it did
    not (consecutive cohorts overlap: the difference isolates the user's rows), times ``sign`` (-1 when the
    attacker learnt that members carry less mass, ``evaluate.sum_attack``); predict the ``predicted`` best.
    None when the user joined no sum. A single sum (or a user in every sum) leaves only the cohort's own
    mass: the membership the aggregate alone reveals."""
    joined = [item.row_mass for item in sums if user in set(item.users.tolist())]
    if not joined:
        return None
    others = [item.row_mass for item in sums if user not in set(item.users.tolist())]
    scores = sign * (np.mean(joined, axis=0) - (np.mean(others, axis=0) if others else 0.0))
    order = np.argsort(-scores, kind="stable")[: max(0, predicted)]
    return AttackGuess(scores.astype(np.float64), np.sort(order).astype(np.int64))
