"""Ranking losses on a model's pair scores, shared by the centralised and on-device trainers."""

from __future__ import annotations

from dataclasses import dataclass

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


def _weighted_row_sum(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum_{b,n} weights[b, n] * rows[b, n, :] -> [w], as one matrix-vector product (einsum's dispatch costs
    more than the product at a device's sizes)."""
    return weights.reshape(-1) @ rows.reshape(-1, rows.shape[-1])


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
        gradient = _weighted_row_sum(weights, negative_rows) - weights.sum(1) @ positive_rows
        gradient = gradient / weights.numel()
    elif loss == "bce":
        positive_weights = torch.sigmoid(positive_scores) - 1.0
        negative_weights = torch.sigmoid(negative_scores)
        gradient = positive_weights @ positive_rows + _weighted_row_sum(negative_weights, negative_rows)
        gradient = gradient / (positive_scores.numel() + negative_scores.numel())
    else:
        raise ValueError(f"unknown loss {loss!r}; known: bpr, bce")
    return gradient + l2_reg * user_row  # batch_l2 counts the row once per example, divided by the batch size


def score_weights(
    positive_scores: torch.Tensor, negative_scores: torch.Tensor, loss: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's mean loss and its derivative with respect to each score: (loss, positive weights [b], negative
    weights [b, n]) for positive_scores [b] and negative_scores [b, n], the loss a sum over the batch's pairs
    (``bpr``) or instances (``bce``) over their count."""
    batch = positive_scores.numel()
    if loss == "bpr":  # every part's mean over its b_p * n pairs, times b_p / b: a sum over b * n
        margins = negative_scores - positive_scores[:, None]
        negative_weights = torch.sigmoid(margins) / (batch * margins.shape[1])
        return F.softplus(margins).sum() / (batch * margins.shape[1]), -negative_weights.sum(1), negative_weights
    if loss == "bce":
        instances = batch * (1 + negative_scores.shape[1])
        data_loss = (F.softplus(-positive_scores).sum() + F.softplus(negative_scores).sum()) / instances
        return data_loss, (torch.sigmoid(positive_scores) - 1.0) / instances, torch.sigmoid(negative_scores) / instances
    raise ValueError(f"unknown loss {loss!r}; known: bpr, bce")


@dataclass(frozen=True)
class MfBatchGradients:
    """One device batch of MF in closed form: the loss and its gradients with respect to the user row
    (float32 [w]), the user's score bias (float32 [1], None without one) and the local item rows
    (float32 [r, w], zero on rows the batch did not use)."""

    loss: torch.Tensor
    user: torch.Tensor
    bias: torch.Tensor | None
    items: torch.Tensor


def mf_batch_gradients(
    user_row: torch.Tensor,
    item_rows: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    is_real: torch.Tensor,
    loss: str,
    l2_reg: float,
    user_bias: torch.Tensor | None = None,
) -> MfBatchGradients:
    """What a device's backward of its padded batch loss gives for MF, without autograd.

    The padded loss is each part's ``batch_loss`` (real positives ``is_real``, bool [b], and fake ones)
    weighted by its share of the batch; fake positives reach the item rows only, never the user row or
    its bias. user_row float32 [w]; item_rows float32 [r, w]; positives int64 [b] and negatives int64
    [b, n]: rows of ``item_rows``; user_bias float32 [1] or None. Held to autograd in tests/test_models.py.
    """
    batch = positives.numel()
    bias = 0.0 if user_bias is None else user_bias
    positive_rows, negative_rows = item_rows[positives], item_rows[negatives]
    positive_scores = positive_rows @ user_row + bias
    negative_scores = negative_rows @ user_row + bias
    data_loss, positive_weights, negative_weights = score_weights(positive_scores, negative_scores, loss)
    real = is_real.to(positive_weights.dtype)
    real_positive, real_negative = positive_weights * real, negative_weights * real[:, None]
    user = real_positive @ positive_rows + _weighted_row_sum(real_negative, negative_rows)
    user = user + l2_reg * (real.sum() / batch) * user_row
    used = torch.cat([positives, negatives.reshape(-1)])
    weights = torch.cat([positive_weights, negative_weights.reshape(-1)])
    items = torch.zeros_like(item_rows)
    items.index_add_(0, used, weights[:, None] * user_row[None, :])
    loss_value = data_loss
    if l2_reg:  # batch_l2: each use of a row counts once, the user row once per example, over the batch size
        uses = torch.bincount(used, minlength=item_rows.shape[0]).to(item_rows.dtype)
        items += (l2_reg / batch) * uses[:, None] * item_rows
        loss_value = loss_value + l2_reg * 0.5 * (batch * user_row.pow(2).sum() + item_rows[used].pow(2).sum()) / batch
    bias_gradient = None if user_bias is None else (real_positive.sum() + real_negative.sum()).reshape(1)
    return MfBatchGradients(loss_value, user, bias_gradient, items)
