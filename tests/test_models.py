"""Models: pair scores, full-table scores and chunking agree; BPR training learns a planted signal."""

import math

import numpy as np
import pytest
import torch

from fedsparse.central import models
from fedsparse.central.losses import batch_loss, mf_batch_gradients, mf_user_row_gradient
from fedsparse.central.models import MatrixFactorization, NeuMF, build_model
from fedsparse.central.sampling import NegativeSampler
from fedsparse.config import ModelConfig
from fedsparse.data.interactions import binary_csr
from fedsparse.rng import torch_generator_for


@pytest.mark.parametrize("name", ["mf", "neumf"])
def test_score_all_equals_pairwise_scores(name, monkeypatch):
    monkeypatch.setattr(models, "SCORE_CHUNK_ELEMENTS", 64)  # force many item chunks in NeuMF
    model = build_model(ModelConfig(name=name, dim=8, mlp_layers="8,4"), 5, 13, torch.Generator().manual_seed(0))
    users = torch.tensor([0, 3, 4])
    full = model.score_all(users)
    assert full.shape == (3, 13)
    grid_users = users.repeat_interleave(13)
    grid_items = torch.arange(13).repeat(3)
    with torch.no_grad():
        pairwise = model.score(grid_users, grid_items).reshape(3, 13)
        candidates = model.score(users, torch.arange(13).expand(3, -1))
    torch.testing.assert_close(full, pairwise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(candidates, pairwise, rtol=1e-5, atol=1e-6)


def test_mf_score_is_a_dot_product():
    model = MatrixFactorization(2, 3, 4, torch.Generator().manual_seed(1))
    expected = model.user_embedding.weight[1] @ model.item_embedding.weight[2]
    torch.testing.assert_close(model.score(torch.tensor([1]), torch.tensor([2]))[0], expected)


def test_neumf_tables_have_the_documented_shapes():
    model = NeuMF(7, 11, 16, (32, 16, 8))
    assert model.user_embedding.weight.shape == (7, 16)
    assert model.item_mlp_embedding.weight.shape == (11, 16)
    assert model.output.in_features == 16 + 8


def test_same_generator_seed_gives_identical_weights():
    first = MatrixFactorization(4, 6, 3, torch.Generator().manual_seed(5))
    again = MatrixFactorization(4, 6, 3, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first.item_embedding.weight, again.item_embedding.weight)


@pytest.mark.parametrize("name, loss", [("mf", "bpr"), ("neumf", "bce")])
def test_training_ranks_planted_positives_above_negatives(name, loss):
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    # Two communities: even users like items 0..14, odd users like 15..29.
    users, items = [], []
    for user in range(n_users):
        block = np.arange(15) if user % 2 == 0 else np.arange(15, 30)
        chosen = rng.choice(block, 8, replace=False)
        users += [user] * 8
        items += chosen.tolist()
    train = binary_csr(np.array(users), np.array(items), n_users, n_items)
    model = build_model(ModelConfig(name=name, dim=8, mlp_layers="16,8"), n_users, n_items, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    sampler = NegativeSampler(train)
    pair_users, pair_items = np.array(users), np.array(items)
    for _ in range(60):
        negatives = sampler.sample(rng, pair_users, 2)
        batch = (torch.from_numpy(pair_users), torch.from_numpy(pair_items), torch.from_numpy(negatives))
        loss_value = batch_loss(model, *batch, loss, 1e-4)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
    scores = model.score_all(torch.arange(n_users)).numpy()
    in_block = np.where((np.arange(n_users)[:, None] % 2 == 0) == (np.arange(n_items)[None, :] < 15), 1, 0)
    assert scores[in_block == 1].mean() > scores[in_block == 0].mean() + 1.0


def test_bce_is_the_mean_log_loss_over_every_instance():
    """NCF's log loss: every positive and every negative weighs 1 / (b * (1 + n)), checked by hand."""
    model = MatrixFactorization(3, 7, 4, torch_generator_for(0, "test-bce"))
    users, positives = torch.tensor([0, 2]), torch.tensor([1, 5])
    negatives = torch.tensor([[2, 3, 4], [0, 6, 3]])
    user_rows, item_rows = model.user_embedding.weight.detach().double(), model.item_embedding.weight.detach().double()
    terms = []
    for b in range(2):
        score = float(user_rows[users[b]] @ item_rows[positives[b]])
        terms.append(math.log1p(math.exp(-score)))
        for item in negatives[b].tolist():
            terms.append(math.log1p(math.exp(float(user_rows[users[b]] @ item_rows[item]))))
    loss = batch_loss(model, users, positives, negatives, "bce", 0.0)
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_most_popular_scores_items_by_training_count_for_every_user():
    model = models.MostPopular(torch.tensor([3, 0, 7, 1]))
    np.testing.assert_array_equal(model.score_all(torch.tensor([0, 5])).numpy(), [[3, 0, 7, 1], [3, 0, 7, 1]])
    np.testing.assert_array_equal(model.score(torch.tensor([2, 2]), torch.tensor([[2, 1], [0, 3]])).numpy(), [[7, 0], [3, 1]])
    assert not list(model.parameters())


@pytest.mark.parametrize("loss", ["bpr", "bce"])
@pytest.mark.parametrize("l2_reg", [0.0, 1e-3])
def test_closed_form_user_row_gradient_equals_autograd(loss: str, l2_reg: float) -> None:
    """The device's user-row fit uses MF's closed-form gradient; autograd of ``batch_loss`` is the reference."""
    generator = torch.Generator().manual_seed(5)
    model = MatrixFactorization(1, 30, 8, generator)
    positives = torch.randint(0, 30, (7,), generator=generator)
    negatives = torch.randint(0, 30, (7, 3), generator=generator)
    users = torch.zeros(7, dtype=torch.int64)
    batch_loss(model, users, positives, negatives, loss, l2_reg).backward()
    items = model.item_embedding.weight.detach()
    closed = mf_user_row_gradient(model.user_embedding.weight.detach()[0], items[positives], items[negatives], loss, l2_reg)
    assert model.user_embedding.weight.grad is not None
    torch.testing.assert_close(closed, model.user_embedding.weight.grad[0], rtol=1e-5, atol=1e-7)


def _padded_autograd_reference(model: MatrixFactorization, positives: torch.Tensor, negatives: torch.Tensor,
                               is_real: torch.Tensor, loss: str, l2_reg: float) -> torch.Tensor:
    """The device's padded loss by autograd: each part's ``batch_loss`` times its share of the batch, the
    fake part's backward with the user row and bias frozen."""
    total = torch.zeros(())
    head = [p for p in (model.user_embedding.weight, model.user_bias) if p is not None]
    for part in (is_real, ~is_real):
        if not part.any():
            continue
        for parameter in head:
            parameter.requires_grad_(part is is_real)
        users = torch.zeros(int(part.sum()), dtype=torch.int64)
        part_loss = float(part.sum()) / part.numel() * batch_loss(model, users, positives[part], negatives[part], loss, l2_reg)
        part_loss.backward()
        total = total + part_loss.detach()
    return total


@pytest.mark.parametrize("loss", ["bpr", "bce"])
@pytest.mark.parametrize("l2_reg", [0.0, 1e-2])
@pytest.mark.parametrize("fakes", [0, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_closed_form_batch_gradients_equal_the_padded_backward(loss: str, l2_reg: float, fakes: int, with_bias: bool) -> None:
    """The device step's closed form (loss, user row, bias and item-row gradients) against autograd of the
    padded loss, with repeated rows and fake positives that must not reach the user row."""
    generator = torch.Generator().manual_seed(11)
    items = torch.randn(12, 6, generator=generator)
    bias = torch.randn(1, generator=generator) if with_bias else None
    model = MatrixFactorization.from_weights(torch.randn(1, 6, generator=generator), items, bias)
    positives = torch.randint(0, 12, (9,), generator=generator)
    negatives = torch.randint(0, 12, (9, 4), generator=generator)
    is_real = torch.arange(9) < 9 - fakes
    reference_loss = _padded_autograd_reference(model, positives, negatives, is_real, loss, l2_reg)
    closed = mf_batch_gradients(model.user_embedding.weight.detach()[0], items, positives, negatives, is_real, loss, l2_reg,
                                None if bias is None else model.user_bias.detach())
    torch.testing.assert_close(closed.loss, reference_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(closed.user, model.user_embedding.weight.grad[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(closed.items, model.item_embedding.weight.grad, rtol=1e-5, atol=1e-7)
    if with_bias:
        torch.testing.assert_close(closed.bias, model.user_bias.grad, rtol=1e-5, atol=1e-7)
    else:
        assert closed.bias is None


def test_closed_form_batch_gradients_refuse_an_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        mf_batch_gradients(torch.zeros(2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.int64),
                           torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.bool), "mse", 0.0)


def test_closed_form_user_row_gradient_refuses_an_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        mf_user_row_gradient(torch.zeros(2), torch.zeros(1, 2), torch.zeros(1, 1, 2), "mse", 0.0)


def test_mf_from_weights_copies_the_tables_and_trains_them() -> None:
    users, items = torch.randn(2, 4), torch.randn(5, 4)
    model = MatrixFactorization.from_weights(users, items)
    torch.testing.assert_close(model.user_embedding.weight.detach(), users)
    torch.testing.assert_close(model.item_embedding.weight.detach(), items)
    assert model.item_embedding.weight.data_ptr() != items.data_ptr() and model.item_embedding.weight.requires_grad
    assert dict(model.embedding_tables()) == {"user": model.user_embedding, "item": model.item_embedding}
