"""Ranking losses on a model's pair scores, shared by the centralised and on-device trainers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsparse.central.models import EmbeddingRecommender


def batch_loss(
    model: EmbeddingRecommender,
    users: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    loss: str,
    l2_reg: float,
) -> torch.Tensor:
    """Mean loss of a batch plus ``l2_reg`` times the batch embedding L2 (LightGCN's ``decay``).

    users, positives: int64 [b]; negatives: int64 [b, n]. ``loss`` is "bpr" (softplus of the score
    margin, each positive against each of its negatives) or "bce" (NCF's log loss: the mean binary
    cross-entropy over all b * (1 + n) instances, positives labelled 1 and negatives 0, as NCF and
    PFedRec train).
    """
    positive_scores = model.score(users, positives)
    negative_scores = model.score(users, negatives)
    if loss == "bpr":
        data_loss = F.softplus(negative_scores - positive_scores[:, None]).mean()
    elif loss == "bce":
        total = F.binary_cross_entropy_with_logits(positive_scores, torch.ones_like(positive_scores), reduction="sum")
        total = total + F.binary_cross_entropy_with_logits(negative_scores, torch.zeros_like(negative_scores), reduction="sum")
        data_loss = total / (positive_scores.numel() + negative_scores.numel())
    else:
        raise ValueError(f"unknown loss {loss!r}; known: bpr, bce")
    return data_loss + l2_reg * model.batch_l2(users, positives, negatives.reshape(-1))


def mf_user_row_gradient(
    user_row: torch.Tensor, positive_rows: torch.Tensor, negative_rows: torch.Tensor, loss: str, l2_reg: float
) -> torch.Tensor:
    """Gradient of ``batch_loss`` of MF for one user with respect to that user's row, items held fixed.

    user_row float32 [w]; positive_rows [b, w]; negative_rows [b, n, w] (the batch's item rows). Closed
    form, no autograd: what a device needs to fit its own row against frozen items, many times cheaper
    than a backward through the embedding tables. Returns float32 [w].
    """
    positive_scores = positive_rows @ user_row
    negative_scores = negative_rows @ user_row
    if loss == "bpr":
        weights = torch.sigmoid(negative_scores - positive_scores[:, None])  # d softplus(margin) / d margin, [b, n]
        gradient = torch.einsum("bn,bnw->w", weights, negative_rows) - weights.sum(1) @ positive_rows
        gradient = gradient / weights.numel()
    elif loss == "bce":
        positive_weights = torch.sigmoid(positive_scores) - 1.0
        negative_weights = torch.sigmoid(negative_scores)
        gradient = positive_weights @ positive_rows + torch.einsum("bn,bnw->w", negative_weights, negative_rows)
        gradient = gradient / (positive_scores.numel() + negative_scores.numel())
    else:
        raise ValueError(f"unknown loss {loss!r}; known: bpr, bce")
    return gradient + l2_reg * user_row  # batch_l2 counts the row once per example, divided by the batch size
