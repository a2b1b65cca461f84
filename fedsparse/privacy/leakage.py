"""Membership leakage metrics: how well scores over items find a user's training interactions.

An attack scores every item of the catalogue for one user (higher = more likely an interaction) and
names a predicted set. Per user we report precision, recall and F1 of the predicted set, ROC-AUC of
the scores over all items and over the uploaded items only (the IMIA framing: the server already
knows the uploaded set), each next to what a random guess achieves, and the popularity-matched AUC:
members against non-members of the same popularity stratum only. A user's items are far more popular than
the catalogue's average, so ranking by popularity alone, which says nothing of the user, scores a high
plain AUC (0.85 on ml-1m); within a stratum it scores about 0.5, and what remains is what the attack
learnt of this device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

METRICS = ("precision", "recall", "f1", "auc", "auc_uploaded", "auc_matched")
POPULARITY_STRATA = 200  # equal-size strata of the catalogue by training popularity (ml-1m: about 19 items each)
MIN_ITEMS_PER_STRATUM = 5  # a smaller catalogue gets fewer strata, so each can hold members and non-members


@dataclass(frozen=True)
class AttackGuess:
    """One attack's output for one upload: float64 [n_items] scores and the predicted item ids int64 [p]."""

    scores: np.ndarray
    predicted: np.ndarray


def popularity_strata(item_counts: np.ndarray, strata: int = POPULARITY_STRATA) -> np.ndarray:
    """int64 [n_items]: each item's stratum, 0 (least popular) up, by rank of ``item_counts`` [n_items]
    (interactions per item; equal counts ordered by item id), in ``strata`` strata of equal size, fewer when
    the catalogue has under ``MIN_ITEMS_PER_STRATUM`` items for each."""
    if strata < 1:
        raise ValueError(f"popularity strata must be at least 1, got {strata}")
    n_items = max(item_counts.size, 1)
    count = max(1, min(strata, n_items // MIN_ITEMS_PER_STRATUM))
    order = np.argsort(item_counts, kind="stable")
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return ranks * count // n_items


def membership_metrics(
    guess: AttackGuess, members: np.ndarray, uploaded: np.ndarray, strata: np.ndarray | None = None
) -> dict[str, float]:
    """Precision, recall, F1, AUC (all items), AUC among ``uploaded`` rows and the popularity-matched AUC
    (``matched_auc`` over ``strata``, from ``popularity_strata``; NaN without strata), for one user.

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
        "auc_matched": matched_auc(is_member, guess.scores, strata) if strata is not None else float("nan"),
    }


def matched_auc(labels: np.ndarray, scores: np.ndarray, strata: np.ndarray) -> float:
    """ROC-AUC over the member/non-member pairs that share a stratum, ties counted half: the pooled
    Mann-Whitney statistic of bool ``labels`` [n] under float ``scores`` [n] within int ``strata`` [n].
    Any score that is a function of the stratum alone scores 0.5; NaN when no stratum holds both classes."""
    order = np.lexsort((scores, strata))
    sorted_strata, sorted_scores = strata[order], scores[order]
    position = np.arange(order.size) - np.searchsorted(sorted_strata, sorted_strata, side="left") + 1.0
    new_tie = np.r_[True, (sorted_strata[1:] != sorted_strata[:-1]) | (sorted_scores[1:] != sorted_scores[:-1])]
    tie = np.cumsum(new_tie) - 1
    rank = (np.bincount(tie, weights=position) / np.bincount(tie))[tie]  # 1-based rank within the stratum
    member = labels[order]
    size = np.bincount(sorted_strata)
    positives = np.bincount(sorted_strata[member], minlength=size.size).astype(np.float64)
    negatives = size - positives
    rank_sums = np.bincount(sorted_strata[member], weights=rank[member], minlength=size.size)
    both = (positives > 0) & (negatives > 0)
    pairs = float((positives * negatives)[both].sum())
    if pairs == 0:
        return float("nan")
    wins = (rank_sums - positives * (positives + 1) / 2)[both].sum()
    return float(wins / pairs)


def random_guess_metrics(n_items: int, members: int, predicted: int) -> dict[str, float]:
    """Expected metrics of naming ``predicted`` items uniformly at random (the baseline of every attack)."""
    precision = members / n_items
    recall = predicted / n_items
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "auc": 0.5, "auc_uploaded": 0.5, "auc_matched": 0.5}


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
