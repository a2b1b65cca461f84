"""Membership leakage metrics: how well scores over items find a user's training interactions.

An attack scores every item of the catalogue for one user (higher = more likely an interaction) and
names a predicted set. Per user we report precision, recall and F1 of the predicted set, ROC-AUC of
the scores over all items and over the uploaded items only (the IMIA framing: the server already
knows the uploaded set), each next to what a random guess achieves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

METRICS = ("precision", "recall", "f1", "auc", "auc_uploaded")


@dataclass(frozen=True)
class AttackGuess:
    """One attack's output for one upload: float64 [n_items] scores and the predicted item ids int64 [p]."""

    scores: np.ndarray
    predicted: np.ndarray


def membership_metrics(guess: AttackGuess, members: np.ndarray, uploaded: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1, AUC (all items) and AUC among ``uploaded`` rows, for one user.

    ``members`` int64: the user's training items (what an upload can reveal). An AUC is NaN when its
    item set holds only members or only non-members (undefined, left out of averages).
    """
    n_items = guess.scores.size
    is_member = np.zeros(n_items, dtype=bool)
    is_member[members] = True
    hits = int(is_member[guess.predicted].sum())
    precision = hits / guess.predicted.size if guess.predicted.size else 0.0
    recall = hits / members.size if members.size else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": _auc(is_member, guess.scores),
        "auc_uploaded": _auc(is_member[uploaded], guess.scores[uploaded]),
    }


def random_guess_metrics(n_items: int, members: int, predicted: int) -> dict[str, float]:
    """Expected metrics of naming ``predicted`` items uniformly at random (the baseline of every attack)."""
    precision = members / n_items
    recall = predicted / n_items
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "auc": 0.5, "auc_uploaded": 0.5}


def mean_metrics(per_user: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over users, ignoring NaN (undefined AUCs); NaN when no user defines it."""
    result = {}
    for name in METRICS:
        values = np.array([row[name] for row in per_user], dtype=np.float64)
        finite = values[~np.isnan(values)]
        result[name] = float(finite.mean()) if finite.size else float("nan")
    return result


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC with ties counted half; NaN when ``labels`` has a single class."""
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, scores))
