"""Sparse backward and masked Adam checked against slow dense references."""

import numpy as np
import pytest
import torch

from fedsparse.central.losses import batch_loss
from fedsparse.central.models import build_model
from fedsparse.config import ModelConfig
from fedsparse.sparse.masked_training import MaskedAdam
from fedsparse.sparse.row_gradients import RowEmbedding, gradient_nbytes, row_gradient, select_gradient_rows


def toy_batch(n_users=20, n_items=50, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    users = torch.from_numpy(rng.integers(0, n_users, batch))
    positives = torch.from_numpy(rng.integers(0, n_items, batch))
    negatives = torch.from_numpy(rng.integers(0, n_items, (batch, 3)))
    return users, positives, negatives


def gradients(sparse, trainable_rows=None, name="mf", n_items=50):
    model = build_model(ModelConfig(name=name, dim=8, mlp_layers="8,4"), 20, n_items, torch.Generator().manual_seed(0))
    for table in model.embedding_tables().values():
        table.sparse = sparse
    if trainable_rows is not None:
        model.item_embedding.trainable_rows = trainable_rows
    batch_loss(model, *toy_batch(n_items=n_items), "bpr", 1e-3).backward()
    return {name: table.weight.grad for name, table in model.embedding_tables().items()}


@pytest.mark.parametrize("name", ["mf", "neumf"])
def test_sparse_gradient_equals_dense_gradient_on_touched_rows(name):
    dense, sparse = gradients(False, name=name), gradients(True, name=name)
    for table in dense:
        assert sparse[table].is_sparse and not dense[table].is_sparse
        rows, values = row_gradient(sparse[table])
        torch.testing.assert_close(values, dense[table][rows], rtol=1e-5, atol=1e-7)
        untouched = torch.ones(dense[table].shape[0], dtype=torch.bool)
        untouched[rows] = False
        assert (dense[table][untouched] == 0).all()


def test_restricted_rows_get_exactly_their_dense_gradient_and_others_none():
    trainable = torch.zeros(50, dtype=torch.bool)
    trainable[::3] = True
    dense = gradients(False)["item"]
    restricted = gradients(True, trainable)["item"]
    rows, values = row_gradient(restricted)
    assert trainable[rows].all()
    torch.testing.assert_close(values, dense[rows], rtol=1e-5, atol=1e-7)
    touched = dense.abs().sum(1) > 0
    np.testing.assert_array_equal(np.sort(rows.numpy()), np.flatnonzero((touched & trainable).numpy()))


def test_gradient_memory_is_counted_from_the_tensors_autograd_produced():
    dense, sparse = gradients(False, n_items=5000), gradients(True, n_items=5000)
    assert gradient_nbytes(dense["item"]) == 5000 * 8 * 4
    # At most one value row (8 float32) and one int64 index per item lookup: 16 positives + 48
    # negatives, looked up twice (score and L2 term); far below the dense table-sized gradient.
    assert 0 < gradient_nbytes(sparse["item"]) <= 128 * (8 * 4 + 8)
    assert gradient_nbytes(sparse["item"]) * 10 < gradient_nbytes(dense["item"])


def test_masked_adam_equals_torch_adam_when_everything_is_active():
    torch.manual_seed(0)
    start = torch.randn(6, 4)
    reference = torch.nn.Parameter(start.clone())
    torch_adam = torch.optim.Adam([reference], lr=0.01)
    ours = start.clone()
    masked = MaskedAdam(ours, torch.ones(6, 4, dtype=torch.bool), lr=0.01)
    for _ in range(5):
        gradient = torch.randn(6, 4)
        reference.grad = gradient.clone()
        torch_adam.step()
        masked.step(gradient)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-6, atol=1e-7)


def test_row_step_matches_dense_step_on_rows_with_gradient():
    torch.manual_seed(1)
    mask = torch.rand(8, 5) < 0.6
    start = torch.randn(8, 5) * mask
    rows = torch.tensor([1, 4, 6])
    gradient_rows = torch.randn(3, 5)
    full = torch.zeros(8, 5)
    full[rows] = gradient_rows
    dense_weight, row_weight = start.clone(), start.clone()
    MaskedAdam(dense_weight, mask, 0.1).step(full)
    MaskedAdam(row_weight, mask, 0.1).step(gradient_rows, rows)
    torch.testing.assert_close(row_weight, dense_weight)
    assert (row_weight[~mask] == 0).all()


def test_gradient_row_selection_respects_the_budget_and_prefers_important_rows():
    rng = np.random.default_rng(0)
    batch = np.arange(100).repeat(2)
    assert select_gradient_rows(batch, 10, "batch", rng).size == 100
    degree = np.where(np.arange(100) < 10, 1000.0, 1.0)
    counts = np.zeros(100)
    for _ in range(200):
        chosen = select_gradient_rows(batch, 10, "degree", rng, degree=degree)
        assert chosen.size == 10 and np.isin(chosen, batch).all() and np.all(np.diff(chosen) > 0)
        counts[chosen] += 1
    assert counts[:10].sum() > 0.8 * counts.sum()
    same = [select_gradient_rows(batch, 10, "uniform", np.random.default_rng(5)) for _ in range(2)]
    np.testing.assert_array_equal(*same)


def test_row_embedding_without_restriction_is_a_plain_embedding():
    table = RowEmbedding(5, 3)
    indices = torch.tensor([[0, 4], [2, 2]])
    torch.testing.assert_close(table(indices), table.weight[indices])
