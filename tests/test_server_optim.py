"""The server's step from mean item deltas: FedAvg scaling, and row-sparse Adam checked against torch's Adam."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsparse.config import RunConfig
from fedsparse.federation.server_optim import ServerOptimizer

N_ITEMS, DIM = 6, 4


def fed_config(**overrides):
    return RunConfig.from_flat({"fed.server-optimizer": "adam", "fed.server-lr": 0.05, **overrides}).fed


def test_avg_scales_the_mean_delta_and_keeps_inactive_entries_still():
    optimizer = ServerOptimizer(fed_config(**{"fed.server-optimizer": "avg", "fed.server-lr": 2.0}))
    deltas = np.arange(8, dtype=np.float32).reshape(2, 4)
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(optimizer.step(np.array([1, 4]), deltas, mask, N_ITEMS), 2.0 * deltas * mask)
    assert optimizer.state_arrays() == {}


def test_adam_matches_torch_adam_on_rows_updated_every_round():
    rng = np.random.default_rng(0)
    config = fed_config()
    optimizer = ServerOptimizer(config)
    rows = np.array([0, 2, 5])
    mask = rng.random((rows.size, DIM)) < 0.7
    ours = np.zeros((N_ITEMS, DIM), dtype=np.float32)
    reference = torch.zeros(rows.size, DIM, dtype=torch.float64, requires_grad=True)
    betas = (config.server_beta1, config.server_beta2)
    torch_adam = torch.optim.Adam([reference], lr=config.server_lr, betas=betas, eps=config.server_eps)
    for _ in range(5):
        deltas = rng.normal(scale=0.01, size=(rows.size, DIM)).astype(np.float32)
        ours[rows] += optimizer.step(rows, deltas, mask, N_ITEMS)
        torch_adam.zero_grad()
        reference.grad = -torch.from_numpy((deltas * mask).astype(np.float64))  # a delta is a descent direction
        torch_adam.step()
    np.testing.assert_allclose(ours[rows], (reference.detach().numpy() * mask), rtol=1e-5, atol=1e-7)
    assert np.all(ours[rows][~mask] == 0)


def test_adam_is_lazy_rows_outside_the_round_keep_their_moments_and_step_count():
    optimizer = ServerOptimizer(fed_config())
    full = np.ones((1, DIM), dtype=bool)
    optimizer.step(np.array([1]), np.full((1, DIM), 0.1, np.float32), full, N_ITEMS)
    moments = optimizer.exp_avg[1].copy()
    first_step_of_row_3 = optimizer.step(np.array([3]), np.full((1, DIM), 0.1, np.float32), full, N_ITEMS)
    np.testing.assert_array_equal(optimizer.exp_avg[1], moments)
    assert optimizer.row_steps.tolist() == [0, 1, 0, 1, 0, 0]
    # bias correction by the row's own count: a row's first step is lr * sign(delta), whenever it comes
    np.testing.assert_allclose(first_step_of_row_3, 0.05, rtol=1e-6)


def test_forget_and_state_round_trip():
    optimizer = ServerOptimizer(fed_config())
    optimizer.step(np.array([0, 2]), np.full((2, DIM), 0.3, np.float32), np.ones((2, DIM), bool), N_ITEMS)
    optimizer.forget(np.array([0 * DIM + 1, 2 * DIM + 3]))
    assert optimizer.exp_avg[0, 1] == 0 and optimizer.exp_avg_sq[2, 3] == 0 and optimizer.exp_avg[0, 0] != 0
    restored = ServerOptimizer(fed_config())
    restored.load_state_arrays(optimizer.state_arrays())
    for key, value in optimizer.state_arrays().items():
        np.testing.assert_array_equal(restored.state_arrays()[key], value)


@pytest.mark.parametrize(("key", "value"), [("fed.server-optimizer", "sgd"), ("fed.server-beta1", 1.0), ("fed.server-eps", 0.0)])
def test_bad_server_optimizer_settings_are_rejected(key, value):
    with pytest.raises(Exception, match=key.split("-beta")[0]):
        RunConfig.from_flat({key: value})
