"""Compact item rows: MF's closed-form steps on active entries agree with the dense forms they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsparse.central.losses import mf_batch_gradients, mf_user_row_gradient
from fedsparse.federation.compact_rows import (
    CompactRows,
    SignalHistory,
    compact_mf_gradients,
    compact_user_row_gradient,
)
from fedsparse.rng import rng_for
from fedsparse.sparse.storage import CompactTable

N_ROWS, WIDTH, BATCH, NEGATIVES = 23, 10, 7, 3
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def random_rows(seed: int = 0, density: float = 0.3) -> tuple[CompactRows, np.ndarray, np.ndarray]:
    """Compact rows read from a compact table (rows 2.. of 30, shuffled), with their dense weights and mask."""
    rng = rng_for(seed, "test-compact-rows")
    mask = rng.random((30, WIDTH)) < density
    mask[5] = False  # an empty row among the touched ones
    weight = (rng.normal(0, 0.5, mask.shape) * mask).astype(np.float32)
    positions = rng.permutation(np.arange(2, 30))[:N_ROWS]
    positions[0] = 5
    rows = CompactRows.from_table(CompactTable.encode(weight, mask), positions)
    return rows, weight[positions], mask[positions]


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = rng_for(seed, "test-compact-batch")
    positives = torch.from_numpy(rng.integers(0, N_ROWS, BATCH))
    negatives = torch.from_numpy(rng.integers(0, N_ROWS, (BATCH, NEGATIVES)))
    is_real = torch.from_numpy(np.arange(BATCH) < BATCH - 2)  # the last two are fake positives
    user = torch.from_numpy(rng.normal(0, 0.5, WIDTH).astype(np.float32))
    return user, positives, negatives, is_real


def test_rows_read_from_a_table_are_its_decoded_rows():
    rows, weight, mask = random_rows()
    np.testing.assert_array_equal(rows.dense(), weight)
    np.testing.assert_array_equal(rows.mask(), mask)
    np.testing.assert_array_equal(rows.mask(slice(3, 9)), mask[3:9])
    assert rows.values.numel() == mask.sum() and rows.entry_rows.dtype == rows.entry_cols.dtype == torch.int32
    np.testing.assert_array_equal(rows.values.numpy(), weight[mask])  # row after row: the upload's order


@pytest.mark.parametrize("loss", ["bpr", "bce"])
@pytest.mark.parametrize("l2_reg", [0.0, 0.01])
@pytest.mark.parametrize("with_bias", [False, True])
def test_batch_gradients_equal_the_dense_closed_form(loss, l2_reg, with_bias):
    rows, weight, mask = random_rows()
    user, positives, negatives, is_real = batch()
    bias = torch.tensor([0.3]) if with_bias else None
    compact = compact_mf_gradients(user, rows, positives, negatives, is_real, loss, l2_reg, bias)
    dense = mf_batch_gradients(user, torch.from_numpy(weight), positives, negatives, is_real, loss, l2_reg, bias)
    torch.testing.assert_close(compact.loss, dense.loss, **TOLERANCE)
    torch.testing.assert_close(compact.user, dense.user, **TOLERANCE)
    if with_bias:
        torch.testing.assert_close(compact.bias, dense.bias, **TOLERANCE)
    else:
        assert compact.bias is None and dense.bias is None
    dense_items = dense.items.numpy()
    np.testing.assert_allclose(compact.values.numpy(), dense_items[mask], **TOLERANCE)
    # every entry's gradient (active or not) is coef_i u_j plus, on active entries, the L2 term
    outer = np.outer(compact.coef.numpy(), user.numpy())
    np.testing.assert_allclose(outer[~mask], dense_items[~mask], **TOLERANCE)


@pytest.mark.parametrize("loss", ["bpr", "bce"])
def test_user_row_gradient_equals_the_dense_closed_form(loss):
    rows, weight, _ = random_rows(1)
    user, positives, negatives, _ = batch(1)
    dense_rows = torch.from_numpy(weight)
    expected = mf_user_row_gradient(user, dense_rows[positives], dense_rows[negatives], loss, 0.02)
    torch.testing.assert_close(compact_user_row_gradient(user, rows, positives, negatives, loss, 0.02), expected,
                               **TOLERANCE)


def test_the_signal_s_top_entries_are_those_of_the_summed_dense_gradients():
    rows, weight, mask = random_rows(2, density=0.6)
    history = SignalHistory([], [])
    summed = np.zeros(weight.shape, dtype=np.float32)
    for step in range(3):
        user, positives, negatives, is_real = batch(10 + step)
        gradients = compact_mf_gradients(user, rows, positives, negatives, is_real, "bpr", 0.0)
        history.record(gradients.coef, user)
        dense = mf_batch_gradients(user, torch.from_numpy(weight), positives, negatives, is_real, "bpr", 0.0)
        summed += dense.items.numpy() * ~mask
    order, sums = history.top_inactive(rows, 4)
    magnitude = np.where(mask, -1.0, np.abs(summed))
    expected = np.argsort(-magnitude, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_allclose(sums, np.take_along_axis(summed, expected, axis=1), **TOLERANCE)
    assert history.nbytes == 3 * (N_ROWS + WIDTH) * 4
