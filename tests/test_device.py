"""One device's local round: its data slice, its negatives, the sparse upload, its persistent state,
the regrowth signal (checked against a hand-written BPR gradient), learning, and evaluation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedsparse.config import ConfigError, RunConfig
from fedsparse.federation.aggregation import scatter_active
from fedsparse.federation.device import (
    DeviceData,
    DeviceState,
    LocalRound,
    evaluate_device,
    evaluate_splits,
    explore_user_row,
    init_device,
    local_batches,
    local_train,
    reconstruct_user_row,
    round_negatives,
    rows_needed,
)
from fedsparse.federation.protocol import handle_evaluate, handle_train
from fedsparse.federation.wire import RowsDownload, RowUpdate, signal_col_dtype
from fedsparse.rng import rng_for
from fedsparse.sparse.masks import budget
from fedsparse.sparse.storage import CompactTable

N_USERS, N_ITEMS, DIM = 4, 40, 8
USER = 2


def config(**overrides: object) -> RunConfig:
    flat = {
        "seed": 3,
        "model.dim": DIM,
        "sparse.policy": "static",
        "sparse.density": 0.5,
        "fed.local-epochs": 2,
        "fed.local-lr": 0.05,
        "train.negatives": 2,
        "fed.signal-topk": 4,
        "fed.user-steps": 0,  # the hand-written references below step user and items jointly from the start
    }
    flat.update(overrides)
    return RunConfig.from_flat(flat)


def csr(rows: dict[int, list[int]]) -> sp.csr_matrix:
    """A binary [N_USERS, N_ITEMS] matrix with the given items per user, indices deliberately unsorted."""
    indptr, indices = [0], []
    for user in range(N_USERS):
        indices += rows.get(user, [])
        indptr.append(len(indices))
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(N_USERS, N_ITEMS))


TRAIN = csr({0: [1, 2], 1: [5], USER: [17, 3, 30, 8, 11], 3: [0, 39]})
VALIDATION = csr({USER: [21, 4], 3: [7]})
TEST = csr({USER: [25], 0: [9]})


def user_data() -> DeviceData:
    return DeviceData.from_interactions(TRAIN, VALIDATION, TEST, USER)


def item_table(seed: int = 0, density: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A masked item table float32 [N_ITEMS, DIM] and its mask (row 0 empty, row 17 full)."""
    rng = rng_for(seed, "test-device-items")
    mask = rng.random((N_ITEMS, DIM)) < density
    mask[0] = False
    mask[17] = True
    weight = (rng.normal(0, 0.1, (N_ITEMS, DIM)) * mask).astype(np.float32)
    return weight, mask


def full_download(weight: np.ndarray, mask: np.ndarray) -> RowsDownload:
    return RowsDownload(None, CompactTable.encode(weight, mask))


def rows_download(weight: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> RowsDownload:
    return RowsDownload(rows, CompactTable.encode(weight[rows], mask[rows]))


# ---------------------------------------------------------------- data slice and negatives


def test_from_interactions_slices_one_user() -> None:
    data = user_data()
    assert data.user_id == USER
    np.testing.assert_array_equal(data.train, [3, 8, 11, 17, 30])
    np.testing.assert_array_equal(data.validation, [4, 21])
    np.testing.assert_array_equal(data.test, [25])
    np.testing.assert_array_equal(data.interacted, [3, 4, 8, 11, 17, 21, 25, 30])
    for array in (data.train, data.validation, data.test, data.interacted):
        assert array.dtype == np.int64
    for user in range(N_USERS):
        other = DeviceData.from_interactions(TRAIN, VALIDATION, TEST, user)
        np.testing.assert_array_equal(other.train, np.flatnonzero(TRAIN.toarray()[user]))
        np.testing.assert_array_equal(other.test, np.flatnonzero(TEST.toarray()[user]))
    empty = DeviceData.from_interactions(TRAIN, VALIDATION, TEST, 1)
    assert empty.validation.size == 0 and empty.test.size == 0 and empty.validation.dtype == np.int64


def test_round_negatives_default_pool_is_every_non_training_item() -> None:
    """``non-train`` (the default): a held-out item is a possible negative, a training item never is."""
    cfg = config(**{"fed.local-epochs": 3, "train.negatives": 50})
    assert cfg.train.negatives_from == "non-train"
    data = user_data()
    negatives = round_negatives(cfg, data, N_ITEMS, server_round=1)
    assert negatives.shape == (3, data.train.size, 50) and negatives.dtype == np.int64
    assert not np.isin(negatives, data.train).any()
    assert negatives.min() >= 0 and negatives.max() < N_ITEMS
    # with 750 draws over 35 candidates, every candidate shows up, validation and test items included
    np.testing.assert_array_equal(np.unique(negatives), np.setdiff1d(np.arange(N_ITEMS), data.train))
    assert np.isin(data.test, negatives).all() and np.isin(data.validation, negatives).all()


def test_round_negatives_unrated_never_draws_a_held_out_item() -> None:
    cfg = config(**{"fed.local-epochs": 3, "train.negatives": 50, "train.negatives-from": "unrated"})
    data = user_data()
    negatives = round_negatives(cfg, data, N_ITEMS, server_round=1)
    assert not np.isin(negatives, data.interacted).any()  # train, validation and test items alike
    np.testing.assert_array_equal(np.unique(negatives), np.setdiff1d(np.arange(N_ITEMS), data.interacted))


def test_round_negatives_deterministic_and_keyed_by_round_and_user() -> None:
    cfg = config(**{"train.negatives": 5})
    data = user_data()
    first = round_negatives(cfg, data, N_ITEMS, 4)
    np.testing.assert_array_equal(first, round_negatives(cfg, data, N_ITEMS, 4))
    assert not np.array_equal(first, round_negatives(cfg, data, N_ITEMS, 5))
    assert not np.array_equal(first, round_negatives(config(**{"train.negatives": 5, "seed": 4}), data, N_ITEMS, 4))
    same_items_other_user = DeviceData(0, data.train, data.validation, data.test, data.interacted)
    assert not np.array_equal(first, round_negatives(cfg, same_items_other_user, N_ITEMS, 4))


def test_round_negatives_none_available() -> None:
    everything = np.arange(N_ITEMS, dtype=np.int64)
    data = DeviceData(0, everything[:10], everything[10:], np.empty(0, np.int64), everything)
    with pytest.raises(ValueError, match="no item is left"):
        round_negatives(config(**{"train.negatives-from": "unrated"}), data, N_ITEMS, 1)
    only_training = DeviceData(0, everything, np.empty(0, np.int64), np.empty(0, np.int64), everything)
    with pytest.raises(ValueError, match="no item is left"):
        round_negatives(config(), only_training, N_ITEMS, 1)


# ---------------------------------------------------------------- init


@pytest.mark.parametrize("policy, density, active", [("dense", 1.0, DIM), ("static", 0.25, 2), ("static", 0.5, 4)])
def test_init_device_exact_user_budget(policy: str, density: float, active: int) -> None:
    cfg = config(**{"sparse.policy": policy, "sparse.density": density})
    state = init_device(cfg, USER)
    assert state.user_mask.sum() == active == budget(density, 1, DIM)
    assert np.all(state.user_row[~state.user_mask] == 0) and np.all(state.user_row[state.user_mask] != 0)
    assert state.user_row.dtype == np.float32 and state.steps == 0
    again = init_device(cfg, USER)
    np.testing.assert_array_equal(state.user_row, again.user_row)


@pytest.mark.parametrize("user_density, active", [(1.0, DIM), (0.25, 2), (-1.0, 4)])
def test_user_density_sets_the_user_row_budget_apart_from_the_item_table(user_density: float, active: int) -> None:
    cfg = config(**{"sparse.density": 0.5, "fed.user-density": user_density})  # -1: the item table's 0.5
    state = init_device(cfg, USER)
    assert state.user_mask.sum() == active


def test_a_fully_active_user_row_survives_exploration_unchanged() -> None:
    state = init_device(config(**{"fed.user-density": 1.0}), USER)
    before = state.user_row.copy()
    explore_user_row(config(), state, np.ones(DIM), 0.5, server_round=1, user_id=USER)
    assert state.user_mask.all()
    np.testing.assert_array_equal(state.user_row, before)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.5])
def test_user_density_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="fed.user-density"):
        config(**{"fed.user-density": bad})


def test_init_device_from_nmf_factor_keeps_its_largest_entries() -> None:
    factor = np.array([0.1, 5.0, 0.2, 3.0, 0.0, 4.0, 0.3, 0.05])
    state = init_device(config(**{"sparse.density": 0.375}), USER, factor)  # 3 of 8
    np.testing.assert_array_equal(np.flatnonzero(state.user_mask), [1, 3, 5])


def test_device_state_round_trip() -> None:
    state = init_device(config(), USER)
    state.steps = 7
    back = DeviceState.from_arrays(state.to_arrays())
    np.testing.assert_array_equal(back.user_row, state.user_row)
    np.testing.assert_array_equal(back.user_mask, state.user_mask)
    assert back.steps == 7
    assert state.nbytes == sum(a.nbytes for a in state.to_arrays().values())


# ---------------------------------------------------------------- the local round


def train_once(cfg: RunConfig, state: DeviceState | None = None, server_round: int = 1, send_signal: bool = False, table=None):
    weight, mask = table if table is not None else item_table()
    data = user_data()
    state = init_device(cfg, USER) if state is None else state
    result = local_train(cfg, state, data, full_download(weight, mask), N_ITEMS, LocalRound(server_round, send_signal))
    return result, weight, mask


def test_update_covers_exactly_positives_and_negatives() -> None:
    cfg = config()
    result, weight, mask = train_once(cfg)
    data = user_data()
    update = result.update
    expected_rows = np.union1d(data.train, round_negatives(cfg, data, N_ITEMS, 1).ravel())
    np.testing.assert_array_equal(update.row_ids, expected_rows)
    np.testing.assert_array_equal(update.row_ids, rows_needed(data, round_negatives(cfg, data, N_ITEMS, 1)))
    assert update.values.dtype == np.float32 and update.row_ids.dtype == np.uint16  # 40 items: 2-byte ids
    assert update.values.size == int(mask[update.row_ids].sum())  # K_r of the touched rows
    assert update.weight == float(data.train.size)
    assert update.signal_rows is None
    # the server's own validation accepts it
    decoded = RowUpdate.from_arrays(update.to_arrays(), mask)
    np.testing.assert_array_equal(decoded.values, update.values)
    deltas = scatter_active(update.values, mask[update.row_ids])
    assert np.all(deltas[~mask[update.row_ids]] == 0)
    assert np.abs(update.values).max() > 0  # something was learned
    assert np.isfinite(result.loss) and result.memory_bytes > 0


def test_rows_download_gives_the_same_update_as_full_download() -> None:
    cfg = config()
    data = user_data()
    weight, mask = item_table()
    state = init_device(cfg, USER)
    full = local_train(cfg, state, data, full_download(weight, mask), N_ITEMS, LocalRound(2, True))
    rows = rows_needed(data, round_negatives(cfg, data, N_ITEMS, 2))
    partial = local_train(cfg, state, data, rows_download(weight, mask, rows), N_ITEMS, LocalRound(2, True))
    for name in ("row_ids", "values", "signal_rows", "signal_cols", "signal_values"):
        np.testing.assert_array_equal(getattr(full.update, name), getattr(partial.update, name))
    np.testing.assert_array_equal(full.state.user_row, partial.state.user_row)


def test_local_train_is_deterministic() -> None:
    cfg = config()
    a, _, _ = train_once(cfg, send_signal=True)
    b, _, _ = train_once(cfg, send_signal=True)
    np.testing.assert_array_equal(a.update.values, b.update.values)
    np.testing.assert_array_equal(a.update.signal_values, b.update.signal_values)
    np.testing.assert_array_equal(a.state.user_row, b.state.user_row)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_local_batches_cover_every_positive_once_per_epoch(batch_size: int) -> None:
    cfg = config(**{"fed.local-batch-size": batch_size, "fed.local-epochs": 3})
    data = user_data()
    batches = local_batches(cfg, data, 4)
    assert len(batches) == 3 * -(-data.train.size // batch_size)
    for epoch in range(3):
        positions = np.concatenate([b.numpy() for e, b in batches if e == epoch])
        np.testing.assert_array_equal(np.sort(positions), np.arange(data.train.size))
        assert all(b.numel() <= batch_size for e, b in batches if e == epoch)
    assert [b.tolist() for _, b in batches] != [b.tolist() for _, b in local_batches(cfg, data, 5)]


def test_local_batch_at_least_the_local_set_is_the_full_batch_step() -> None:
    full, _, _ = train_once(config(), send_signal=True)
    large, _, _ = train_once(config(**{"fed.local-batch-size": 100}), send_signal=True)
    np.testing.assert_array_equal(full.update.values, large.update.values)
    np.testing.assert_array_equal(full.state.user_row, large.state.user_row)
    assert full.state.steps == 2


def test_local_mini_batches_take_more_steps_and_still_learn() -> None:
    cfg = config(**{"fed.local-batch-size": 2})
    small, _, _ = train_once(cfg, send_signal=True)
    assert small.state.steps == 2 * 3
    assert np.isfinite(small.loss) and np.all(np.isfinite(small.update.values))


def test_user_steps_fit_the_private_row_first_and_lower_the_joint_loss() -> None:
    plain, _, _ = train_once(config(**{"fed.local-epochs": 1}))
    fitted, _, _ = train_once(config(**{"fed.local-epochs": 1, "fed.user-steps": 20}))
    assert fitted.loss < plain.loss
    assert fitted.state.steps == plain.state.steps + 20  # the user row's Adam counts the extra steps
    assert np.all(fitted.state.user_row[~fitted.state.user_mask] == 0)
    np.testing.assert_array_equal(fitted.update.row_ids, plain.update.row_ids)
    assert not np.array_equal(fitted.update.values, plain.update.values)


def test_download_missing_a_needed_row_raises() -> None:
    cfg = config()
    data = user_data()
    weight, mask = item_table()
    rows = rows_needed(data, round_negatives(cfg, data, N_ITEMS, 1))
    lacking = np.delete(rows, 1)
    with pytest.raises(ValueError, match="lacks rows"):
        local_train(cfg, init_device(cfg, USER), data, rows_download(weight, mask, lacking), N_ITEMS, LocalRound(1, False))


def test_no_training_items_raises() -> None:
    data = DeviceData(1, np.empty(0, np.int64), np.empty(0, np.int64), np.array([3]), np.array([3]))
    weight, mask = item_table()
    with pytest.raises(ValueError, match="no training interactions"):
        local_train(config(), init_device(config(), 1), data, full_download(weight, mask), N_ITEMS, LocalRound(1, False))


def test_user_row_masked_and_state_persists_across_rounds() -> None:
    cfg = config(**{"sparse.density": 0.25, "fed.local-lr": 0.01})
    epochs, lr = cfg.fed.local_epochs, cfg.fed.local_lr
    start = init_device(cfg, USER)
    first, _, _ = train_once(cfg, start, server_round=1)
    state = first.state
    assert state.steps == epochs
    np.testing.assert_array_equal(state.user_mask, start.user_mask)
    for array in (state.user_row, state.exp_avg, state.exp_avg_sq):
        assert np.all(array[~state.user_mask] == 0)
    assert not np.array_equal(state.user_row, start.user_row)
    assert np.any(state.exp_avg_sq > 0)

    second, _, _ = train_once(cfg, state, server_round=2)
    assert second.state.steps == 2 * epochs
    assert np.all(second.state.user_row[~state.user_mask] == 0)
    # Adam moves an entry by about lr per step: round 2 starts where round 1 ended
    assert np.abs(second.state.user_row - state.user_row).max() <= 4 * lr * epochs
    # and from the given state's row, moments and step count, not from a fresh one
    planted = DeviceState(np.where(state.user_mask, 5.0, 0.0).astype(np.float32), state.user_mask.copy(),
                          state.exp_avg.copy(), state.exp_avg_sq.copy(), state.steps)
    from_planted, _, _ = train_once(cfg, planted, server_round=2)
    assert np.abs(from_planted.state.user_row[state.user_mask] - 5.0).max() <= 4 * lr * epochs
    zeros = np.zeros(DIM, np.float32)
    fresh_moments = DeviceState(state.user_row.copy(), state.user_mask.copy(), zeros, zeros.copy(), 0)
    restarted, _, _ = train_once(cfg, fresh_moments, server_round=2)
    assert not np.allclose(restarted.state.user_row, second.state.user_row)


def test_input_state_is_not_mutated() -> None:
    cfg = config()
    state = init_device(cfg, USER)
    before = {k: v.copy() for k, v in state.to_arrays().items()}
    train_once(cfg, state)
    for key, value in state.to_arrays().items():
        np.testing.assert_array_equal(value, before[key])


def full_bpr(user_row: np.ndarray, items: np.ndarray, data: DeviceData) -> float:
    """Mean softplus(s_neg - s_pos) over every (train positive, non-training item) pair: the default pool."""
    scores = items.astype(np.float64) @ user_row.astype(np.float64)
    negatives = np.setdiff1d(np.arange(N_ITEMS), data.train)
    margins = scores[negatives][None, :] - scores[data.train][:, None]
    return float(np.logaddexp(0.0, margins).mean())


@pytest.mark.parametrize("policy, density", [("dense", 1.0), ("static", 0.5)])
def test_bpr_loss_decreases_when_the_server_applies_updates(policy: str, density: float) -> None:
    cfg = config(**{"sparse.policy": policy, "sparse.density": density, "fed.local-lr": 0.05, "train.negatives": 4,
                    "fed.item-lr": 1.0})  # one device alone: a large step per example shows the item side learning
    data = user_data()
    weight, mask = item_table(density=density)
    if policy == "dense":
        mask[:] = True
        weight = rng_for(9, "dense-items").normal(0, 0.1, (N_ITEMS, DIM)).astype(np.float32)
    state = init_device(cfg, USER)
    before = full_bpr(state.user_row, weight, data)
    losses = []
    for server_round in range(1, 7):
        result = local_train(cfg, state, data, full_download(weight, mask), N_ITEMS, LocalRound(server_round, False))
        update = result.update
        rows = update.row_ids
        block = weight[rows]
        block[mask[rows]] += update.values  # the server's apply, one device, server lr 1
        weight[rows] = block
        state = result.state
        losses.append(result.loss)
        assert np.all(weight[~mask] == 0)
    after = full_bpr(state.user_row, weight, data)
    assert after < before - 0.05, (before, after)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- regrowth signal


def reference_signal(
    cfg: RunConfig, state: DeviceState, data: DeviceData, weight: np.ndarray, mask: np.ndarray, server_round: int
):
    """The BPR gradient of one epoch w.r.t. the inactive item entries, written out by hand.

    loss = mean_{(p, n)} softplus(s_n - s_p) + l2 term; the l2 term has zero gradient at inactive
    entries (their weights are zero), so d/dq_i = u * sum over pairs of (+σ if i = n, -σ if i = p) / pairs.
    """
    negatives = round_negatives(cfg, data, N_ITEMS, server_round)[0]  # [n_train, negatives]
    user = state.user_row.astype(np.float64)
    scores = weight.astype(np.float64) @ user
    sigma = 1.0 / (1.0 + np.exp(-(scores[negatives] - scores[data.train][:, None])))
    coefficient = np.zeros(N_ITEMS)
    np.add.at(coefficient, negatives.ravel(), sigma.ravel())
    np.add.at(coefficient, np.repeat(data.train, negatives.shape[1]), -sigma.ravel())
    gradient = np.outer(coefficient, user) / sigma.size
    return np.where(mask, 0.0, gradient)


@pytest.mark.parametrize("user_density", [0.25, 1.0])
def test_signal_is_topk_of_inactive_accumulated_gradient(user_density: float) -> None:
    topk = 3
    cfg = config(**{"fed.local-epochs": 1, "fed.signal-topk": topk, "sparse.density": 0.5})
    data = user_data()
    weight, mask = item_table(seed=1, density=0.5)
    state = init_device(config(**{"sparse.density": user_density}), USER)
    result = local_train(cfg, state, data, full_download(weight, mask), N_ITEMS, LocalRound(1, True))
    update = result.update
    rows = update.row_ids
    np.testing.assert_array_equal(update.signal_rows, rows)
    assert update.signal_cols.shape == update.signal_values.shape == (rows.size, topk)
    assert update.signal_cols.dtype == signal_col_dtype(DIM) and update.signal_values.dtype == np.float32
    RowUpdate.from_arrays(update.to_arrays(), mask)  # the server accepts it

    expected = reference_signal(cfg, state, data, weight, mask, 1)[rows]
    row_masks = mask[rows]
    for i in range(rows.size):
        cols = update.signal_cols[i].astype(np.int64)
        assert np.unique(cols).size == topk
        inactive = np.flatnonzero(~row_masks[i])
        if inactive.size >= topk:
            # a row with at least k inactive entries reports inactive entries only
            assert not row_masks[i, cols].any(), (rows[i], cols, row_masks[i])
        else:
            assert set(inactive) <= set(cols.tolist())
        np.testing.assert_allclose(update.signal_values[i], expected[i, cols], rtol=1e-4, atol=1e-7)
        best = np.sort(np.abs(expected[i, inactive]))[::-1][:topk]
        got = np.abs(update.signal_values[i])[: best.size]
        np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-7)
        assert np.all(np.diff(np.abs(update.signal_values[i])) <= 1e-9)  # largest first


def one_local_epoch(cfg: RunConfig):
    """(result, item table, mask, negatives [n_train, negatives], starting user row float64) of one epoch."""
    data = user_data()
    weight, mask = item_table()
    state = init_device(cfg, USER)
    result = local_train(cfg, state, data, full_download(weight, mask), N_ITEMS, LocalRound(1, False))
    return result, weight, mask, round_negatives(cfg, data, N_ITEMS, 1)[0], state.user_row.astype(np.float64)


def test_loss_matches_hand_written_bpr_for_one_epoch() -> None:
    cfg = config(**{"fed.local-epochs": 1})
    data = user_data()
    result, weight, _, negatives, user = one_local_epoch(cfg)
    scores = weight.astype(np.float64) @ user
    bpr = np.logaddexp(0.0, scores[negatives] - scores[data.train][:, None]).mean()
    items = weight.astype(np.float64)
    squares = data.train.size * user @ user + (items[data.train] ** 2).sum() + (items[negatives.ravel()] ** 2).sum()
    l2 = 0.5 * squares / data.train.size
    assert result.loss == pytest.approx(bpr + cfg.train.l2_reg * l2, rel=1e-5)


def test_sgd_item_update_is_the_hand_written_summed_bpr_gradient_step() -> None:
    cfg = config(**{"fed.local-epochs": 1, "fed.item-optimizer": "sgd", "fed.item-lr": 0.3, "train.l2-reg": 0.0})
    data = user_data()
    result, weight, mask, negatives, user = one_local_epoch(cfg)
    items = weight.astype(np.float64)
    gradient = np.zeros_like(items)  # of the summed BPR loss over the device's positives
    n_negatives = negatives.shape[1]
    for position, positive in enumerate(data.train):
        for negative in negatives[position]:
            pull = 1.0 / (1.0 + np.exp(items[positive] @ user - items[negative] @ user)) / n_negatives
            gradient[positive] -= pull * user
            gradient[negative] += pull * user
    expected = items - 0.3 * gradient * mask
    touched = result.update.row_ids.astype(np.int64)
    np.testing.assert_allclose(
        result.update.values, (expected[touched] - items[touched])[mask[touched]], rtol=1e-4, atol=1e-6
    )


def test_dense_table_signal_has_no_inactive_entry_to_report() -> None:
    cfg = config(**{"sparse.policy": "dense", "sparse.density": 1.0, "fed.signal-topk": 2})
    weight, _ = item_table()
    mask = np.ones((N_ITEMS, DIM), dtype=bool)
    result, _, _ = train_once(cfg, send_signal=True, table=(rng_for(0, "d").normal(0, 0.1, mask.shape).astype(np.float32), mask))
    assert result.update.signal_cols.shape[1] == 2
    assert np.all(result.update.signal_values == 0)


# ---------------------------------------------------------------- evaluation


def test_evaluate_device_none_without_held_out_items() -> None:
    cfg = config()
    weight, _ = item_table()
    no_test = DeviceData.from_interactions(TRAIN, VALIDATION, TEST, 1)  # user 1: train only
    assert evaluate_device(cfg, init_device(cfg, 1), no_test, weight, "test") is None
    assert evaluate_device(cfg, init_device(cfg, 1), no_test, weight, "validation") is None
    only_validation = DeviceData.from_interactions(TRAIN, VALIDATION, TEST, 3)
    assert evaluate_device(cfg, init_device(cfg, 3), only_validation, weight, "test") is None
    assert evaluate_device(cfg, init_device(cfg, 3), only_validation, weight, "validation") is not None


@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluate_device_sensible_values(split: str) -> None:
    cfg = config()
    weight, _ = item_table()
    metrics = evaluate_device(cfg, init_device(cfg, USER), user_data(), weight, split)
    assert {"recall@10", "recall@20", "ndcg@20", "hr@20"} <= set(metrics)
    for name, value in metrics.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, name
    assert metrics["recall@10"] <= metrics["recall@20"]


def test_leave_one_out_devices_also_report_the_sampled_protocol() -> None:
    cfg = config(**{"data.split": "loo", "eval.sampled-negatives": 20})
    data = user_data()  # one test item (25): the protocol applies; two validation items: it does not
    mask = np.zeros(DIM, dtype=bool)
    mask[0] = True
    state = DeviceState(mask.astype(np.float32), mask, np.zeros(DIM, np.float32), np.zeros(DIM, np.float32))
    items = np.zeros((N_ITEMS, DIM), dtype=np.float32)
    items[:, 0] = np.linspace(0.0, 1.0, N_ITEMS, dtype=np.float32)  # higher item id scores higher
    test = evaluate_device(cfg, state, data, items, "test")
    assert "sampled_hr@10" not in evaluate_device(cfg, state, data, items, "validation")
    # the slow reference: rank = 1 + negatives scoring >= the held-out item, negatives from the device's stream
    candidates = np.setdiff1d(np.arange(N_ITEMS), data.interacted)
    negatives = rng_for(cfg.seed, "device-eval-negatives", "test", USER).choice(candidates, size=20, replace=False)
    assert not np.isin(negatives, data.interacted).any()
    rank = 1 + int((items[negatives, 0] >= items[25, 0]).sum())
    assert test["sampled_hr@10"] == float(rank <= 10)
    assert test["sampled_ndcg@10"] == pytest.approx((rank <= 10) / np.log2(rank + 1))
    assert 0 < rank <= 21


def test_evaluate_device_planted_perfect_table() -> None:
    """Held-out items score 1, everything else 0; training (and validation) items score highest but are
    excluded from the ranking, so a perfect table gives recall 1 and ndcg 1."""
    cfg = config()
    data = user_data()
    mask = np.zeros(DIM, dtype=bool)
    mask[0] = True
    state = DeviceState(mask.astype(np.float32), mask, np.zeros(DIM, np.float32), np.zeros(DIM, np.float32))
    items = np.zeros((N_ITEMS, DIM), dtype=np.float32)
    items[data.train, 0] = 3.0
    items[data.validation, 0] = 2.0
    items[data.test, 0] = 1.0
    test_metrics = evaluate_device(cfg, state, data, items, "test")
    assert test_metrics["recall@10"] == pytest.approx(1.0)
    assert test_metrics["ndcg@10"] == pytest.approx(1.0)
    validation_metrics = evaluate_device(cfg, state, data, items, "validation")
    assert validation_metrics["recall@10"] == pytest.approx(1.0)
    assert validation_metrics["ndcg@10"] == pytest.approx(1.0)
    # the reverse table ranks the held-out items last
    worst = evaluate_device(cfg, state, data, -items + np.where(items == 0, 0.5, 0.0).astype(np.float32), "test")
    assert worst["recall@10"] == 0.0


def test_user_row_exploration_keeps_the_budget_and_starts_grown_entries_at_zero():
    from fedsparse.federation.device import DeviceState, explore_user_row

    config = RunConfig.from_flat({"model.dim": 8, "sparse.policy": "sparserec", "sparse.density": 0.5})
    mask = np.array([True, True, True, True, False, False, False, False])
    row = np.array([0.9, 0.01, 0.5, 0.02, 0, 0, 0, 0], dtype=np.float32)
    state = DeviceState(row.copy(), mask.copy(), np.ones(8, np.float32) * mask, np.ones(8, np.float32) * mask)
    signal = np.array([0, 0, 0, 0, 0.1, 3.0, 0.2, 2.0], dtype=np.float32)
    explore_user_row(config, state, signal, 0.5, server_round=1, user_id=0)
    assert state.user_mask.sum() == 4
    np.testing.assert_array_equal(np.flatnonzero(state.user_mask), [0, 2, 5, 7])  # 0.01, 0.02 out; 3.0, 2.0 in
    assert state.user_row[5] == state.user_row[7] == 0.0 and state.user_row[1] == state.user_row[3] == 0.0
    assert state.exp_avg[[1, 3, 5, 7]].sum() == 0.0 and state.exp_avg[[0, 2]].sum() == 2.0


# ---------------------------------------------------------------- user optimiser and personal evaluation


def test_user_sgd_steps_the_row_by_the_mean_loss_gradient_and_keeps_no_moments() -> None:
    """``fed.user-optimizer = sgd``: one full-batch step moves the user row by -lr * gradient of the
    mean loss (computed here with torch on the same rows), and the stored Adam moments stay untouched."""
    cfg = config(**{"sparse.policy": "dense", "sparse.density": 1.0, "fed.local-epochs": 1, "fed.user-optimizer": "sgd",
                    "fed.local-lr": 0.3, "train.l2-reg": 0.0})
    data = user_data()
    weight = rng_for(9, "dense-items").normal(0, 0.1, (N_ITEMS, DIM)).astype(np.float32)
    state = init_device(cfg, USER)
    result = local_train(cfg, state, data, full_download(weight, np.ones_like(weight, dtype=bool)), N_ITEMS, LocalRound(1, False))
    negatives = torch.from_numpy(round_negatives(cfg, data, N_ITEMS, 1)[0])
    user = torch.from_numpy(state.user_row.copy()).requires_grad_(True)
    items = torch.from_numpy(weight)
    margin = items[negatives] @ user - (items[torch.from_numpy(data.train)] @ user)[:, None]
    torch.nn.functional.softplus(margin).mean().backward()
    np.testing.assert_allclose(result.state.user_row, state.user_row - 0.3 * user.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.state.exp_avg, state.exp_avg)
    assert result.state.steps == state.steps


def test_personal_evaluation_ranks_with_the_device_s_own_trained_rows() -> None:
    """``evaluate``: the metrics equal ``evaluate_splits`` on the downloaded table with the device's trained rows."""
    cfg = config(**{"sparse.policy": "dense", "sparse.density": 1.0, "data.split": "loo"})
    data = user_data()
    weight = rng_for(9, "dense-items").normal(0, 0.1, (N_ITEMS, DIM)).astype(np.float32)
    full = np.ones_like(weight, dtype=bool)
    state = init_device(cfg, USER)
    result = local_train(cfg, state, data, full_download(weight, full), N_ITEMS, LocalRound(1, False, evaluate=True))
    personal = weight.copy()
    rows = result.update.row_ids.astype(np.int64)
    personal[rows] += result.update.values.reshape(rows.size, DIM)
    expected = evaluate_splits(cfg, result.state, data, personal)
    assert result.evaluation.keys() == expected.keys() and "test-recall@20" in expected
    for key, value in expected.items():
        assert result.evaluation[key] == pytest.approx(value, abs=1e-6)
    assert local_train(cfg, state, data, full_download(weight, full), N_ITEMS, LocalRound(1, False)).evaluation is None
    with pytest.raises(ValueError, match="full item table"):
        local_train(cfg, state, data, rows_download(weight, full, rows), N_ITEMS, LocalRound(1, False, evaluate=True))


def test_reconstruct_fits_the_user_row_then_trains_items_only() -> None:
    """FedRecon: the joint steps leave the freshly fitted user row alone (more of them move only the items),
    and the device stores no user row between rounds."""
    flat = {"sparse.policy": "dense", "sparse.density": 1.0, "fed.user-state": "reconstruct", "fed.user-steps": 3}
    weight = rng_for(9, "dense-items").normal(0, 0.1, (N_ITEMS, DIM)).astype(np.float32)
    download = full_download(weight, np.ones_like(weight, dtype=bool))
    data = user_data()
    results = [local_train(config(**flat, **{"fed.local-epochs": epochs}), init_device(config(**flat), USER), data, download,
                           N_ITEMS, LocalRound(1, False)) for epochs in (1, 4)]
    np.testing.assert_array_equal(results[0].state.user_row, results[1].state.user_row)
    assert not np.array_equal(results[0].update.values, results[1].update.values)
    assert not np.array_equal(results[0].state.user_row, init_device(config(**flat), USER).user_row)  # it was fitted
    cfg = config(**flat)
    message = {**download.to_arrays()}
    reply = handle_train(cfg, {}, data, message, N_ITEMS, 1, {"send-signal": False})
    assert "user-row" not in reply.state
    evaluated = handle_evaluate(cfg, {"user-row": np.full(DIM, 9.0, np.float32)}, data, message, N_ITEMS)
    fitted = reconstruct_user_row(cfg, init_device(cfg, USER), data, weight)
    assert evaluated.metrics == evaluate_splits(cfg, fitted, data, weight)  # the stored row plays no part
    nothing = reconstruct_user_row(cfg, init_device(cfg, USER), replace(data, train=data.train[:0]), weight)
    np.testing.assert_array_equal(nothing.user_row, init_device(cfg, USER).user_row)  # no positives: no fit, no NaN
    with pytest.raises(ConfigError, match="user-steps"):
        config(**{"fed.user-state": "reconstruct"})


# ---------------------------------------------------------------- PFedRec's head: bias and step order


def pfedrec_head(**overrides: object) -> RunConfig:
    """PFedRec's device rules on the test data: dense, BCE, SGD head with a bias, items stepped after it."""
    return config(**{
        "sparse.policy": "dense", "sparse.density": 1.0, "train.loss": "bce", "fed.user-optimizer": "sgd",
        "fed.local-lr": 0.1, "fed.item-optimizer": "sgd", "fed.item-lr": 0.7, "fed.local-epochs": 2,
        "fed.local-batch-size": 2, "fed.user-bias": True, "fed.step-order": "head-first", **overrides,
    })


def test_head_first_with_bias_equals_pfedrecs_two_steps_per_batch() -> None:
    """Reference: PFedRec's ``fed_train_single_batch`` in plain autograd: step the head (row and bias) on the
    batch's mean log loss, recompute the loss, step the items (per-example rate times the batch's positives)."""
    cfg = pfedrec_head()
    data = user_data()
    weight, mask = item_table(density=1.0)
    mask[:] = True
    state = init_device(cfg, USER)
    assert state.user_bias is not None and state.user_bias.shape == (1,)
    result = local_train(cfg, state, data, full_download(weight, mask), N_ITEMS, LocalRound(server_round=1))

    negatives = round_negatives(cfg, data, N_ITEMS, 1)
    user = torch.tensor(state.user_row, dtype=torch.float64)
    bias = torch.zeros(1, dtype=torch.float64)
    items = torch.tensor(weight, dtype=torch.float64)

    def mean_log_loss(user: torch.Tensor, bias: torch.Tensor, items: torch.Tensor, positives, negative_ids) -> torch.Tensor:
        scores = torch.cat([items[positives] @ user + bias, (items[negative_ids] @ user + bias).reshape(-1)])
        labels = torch.cat([torch.ones(positives.numel()), torch.zeros(negative_ids.numel())]).double()
        return torch.nn.functional.binary_cross_entropy_with_logits(scores, labels)

    for epoch, batch in local_batches(cfg, data, 1):
        positives = torch.from_numpy(data.train[batch.numpy()])
        negative_ids = torch.from_numpy(negatives[epoch][batch.numpy()])
        user.requires_grad_(True)
        bias.requires_grad_(True)
        head_loss = mean_log_loss(user, bias, items, positives, negative_ids)
        user_gradient, bias_gradient = torch.autograd.grad(head_loss, [user, bias])
        user, bias = (user - 0.1 * user_gradient).detach(), (bias - 0.1 * bias_gradient).detach()
        items.requires_grad_(True)
        (item_gradient,) = torch.autograd.grad(mean_log_loss(user, bias, items, positives, negative_ids), [items])
        items = (items - 0.7 * batch.numel() * item_gradient).detach()

    np.testing.assert_allclose(result.state.user_row, user.numpy(), atol=1e-5)
    np.testing.assert_allclose(result.state.user_bias, bias.numpy(), atol=1e-5)
    touched = np.asarray(result.update.row_ids, dtype=np.int64)
    np.testing.assert_allclose(result.update.values, (items.numpy() - weight)[touched].reshape(-1), atol=1e-4)
    assert DeviceState.from_arrays(result.state.to_arrays()).user_bias == pytest.approx(result.state.user_bias)


def test_step_order_changes_the_item_step() -> None:
    data = user_data()
    weight, mask = item_table(density=1.0)
    mask[:] = True
    results = {
        order: local_train(cfg := pfedrec_head(**{"fed.step-order": order}), init_device(cfg, USER), data,
                           full_download(weight, mask), N_ITEMS, LocalRound(server_round=1))
        for order in ("joint", "head-first")
    }
    assert not np.allclose(results["joint"].update.values, results["head-first"].update.values)


@pytest.mark.parametrize("overrides", [
    {"fed.user-optimizer": "adam"}, {"fed.user-steps": 2}, {"model.name": "neumf"},
])
def test_user_bias_outside_pfedrecs_head_is_refused(overrides: dict) -> None:
    with pytest.raises(ConfigError, match="fed.user-bias"):
        pfedrec_head(**overrides)


def test_unknown_step_order_is_refused() -> None:
    with pytest.raises(ConfigError, match="fed.step-order"):
        pfedrec_head(**{"fed.step-order": "items-first"})


def test_shared_uniform_head_is_one_pytorch_linear_draw_for_every_device() -> None:
    """PFedRec hands every client the global ``Linear(dim, 1)`` at round 0: one row and bias for all users,
    uniform in ±1/sqrt(dim); the default gives each device its own normal(0, 0.1) row and a zero bias."""
    shared = pfedrec_head(**{"fed.user-init": "shared-uniform"})
    first, second = init_device(shared, 0), init_device(shared, 3)
    np.testing.assert_array_equal(first.user_row, second.user_row)
    np.testing.assert_array_equal(first.user_bias, second.user_bias)
    bound = 1.0 / np.sqrt(DIM)
    values = np.concatenate([first.user_row, first.user_bias])
    assert np.all(np.abs(values) <= bound) and np.all(values != 0.0)
    reseeded = pfedrec_head(**{"fed.user-init": "shared-uniform", "seed": 1})
    assert not np.array_equal(init_device(reseeded, 0).user_row, first.user_row)

    own = pfedrec_head()
    assert not np.array_equal(init_device(own, 0).user_row, init_device(own, 3).user_row)
    assert init_device(own, 0).user_bias.tolist() == [0.0]


def test_unknown_user_init_is_refused() -> None:
    with pytest.raises(ConfigError, match="fed.user-init"):
        pfedrec_head(**{"fed.user-init": "xavier"})


# ---------------------------------------------------------------- secure aggregation over a public row subset


def test_secure_all_items_trains_as_without_it_and_sends_the_covered_rows_alone() -> None:
    """``privacy.secure-train-items = all``: the round trains exactly as an undefended one (same user row kept)
    and the secure vector holds that round's deltas at the covered rows alone (a dense reference); under
    ``covered`` only the covered items train, so the user row learns something else."""
    from fedsparse.federation.wire import SecureUpload
    from fedsparse.privacy.secure_rows import secure_round_rows

    weight, mask = item_table()
    message = full_download(weight, mask).to_arrays()
    data = user_data()
    settings = {"send-signal": False}
    plain = handle_train(config(**{"fed.downlink": "full"}), {}, data, message, N_ITEMS, 1, settings)
    secure_flat = {"fed.downlink": "full", "privacy.secure-aggregation": True, "privacy.secure-row-fraction": 0.3}
    cfg = config(**secure_flat, **{"privacy.secure-train-items": "all"})
    covered = secure_round_rows(cfg, N_ITEMS, 1)
    assert 0 < np.intersect1d(covered, data.train).size < data.train.size  # the round covers some of its items
    secure = handle_train(cfg, {}, data, message, N_ITEMS, 1, settings)
    np.testing.assert_array_equal(secure.state["user-row"], plain.state["user-row"])
    assert isinstance(plain.message, RowUpdate) and isinstance(secure.message, SecureUpload)
    dense = np.zeros((N_ITEMS, DIM), dtype=np.float32)
    rows = plain.message.row_ids.astype(np.int64)
    dense[rows] = scatter_active(plain.message.values, mask[rows])
    outside = np.setdiff1d(rows, covered)
    assert np.abs(dense[outside]).sum() > 0  # deltas the secure vector must leave out
    np.testing.assert_array_equal(secure.message.values, dense[covered][mask[covered]])
    assert secure.message.weights is None  # the default sum rule sends no row weights
    covered_only = handle_train(config(**secure_flat), {}, data, message, N_ITEMS, 1, settings)
    assert not np.allclose(covered_only.state["user-row"], plain.state["user-row"])
    assert covered_only.message.values.size == secure.message.values.size  # the same rows go up either way
    signalled = [handle_train(c, {}, data, message, N_ITEMS, 1, {"send-signal": True}).message
                 for c in (config(**{"fed.downlink": "full"}), cfg)]
    dense_signal = np.zeros((N_ITEMS, DIM), dtype=np.float32)
    signal_rows = signalled[0].signal_rows.astype(np.int64)
    np.add.at(dense_signal, (signal_rows[:, None], signalled[0].signal_cols.astype(np.int64)), signalled[0].signal_values)
    assert np.abs(dense_signal[np.setdiff1d(signal_rows, covered)]).sum() > 0
    np.testing.assert_array_equal(signalled[1].signal, dense_signal[covered])
    kept = plain.message.restricted(mask, covered)
    assert np.isin(kept.row_ids, covered).all() and kept.values.size == int(mask[kept.row_ids.astype(np.int64)].sum())
    with pytest.raises(ConfigError, match="secure-train-items"):
        config(**secure_flat, **{"privacy.secure-train-items": "some"})
