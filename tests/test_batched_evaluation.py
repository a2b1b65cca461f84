"""Devices evaluated in batches (``fedsparse.federation.batched_evaluation``, ``dispatch.serve_evaluate_batch``):
each device gets the metrics, reply and kept state it gets when evaluated alone, a shared table is decoded
once, and what cannot be batched (unseen and reconstructing devices, a poisoned run's exposure, a failed
device) is evaluated alone in its place."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedsparse.config import RunConfig
from fedsparse.federation.batched_evaluation import evaluate_splits_batch
from fedsparse.federation.device import DeviceData, evaluate_splits, init_device
from fedsparse.federation.dispatch import DeviceCall, serve, serve_all, serve_evaluate_batch
from fedsparse.federation.messages import EVALUATE, EvaluateRequest
from fedsparse.federation.unseen import UNSEEN
from fedsparse.federation.wire import RowsDownload
from fedsparse.rng import rng_for
from fedsparse.sparse.storage import CompactTable

N_ITEMS, DIM = 80, 8
BASE = {"seed": 3, "model.dim": DIM, "eval.k": 20}


def config(**overrides: Any) -> RunConfig:
    return RunConfig.from_flat({**BASE, **overrides})


def partitions(count: int, sampled: bool) -> list[DeviceData]:
    """``count`` devices with ragged training sets; some without a validation item, one without a test item;
    under ``sampled`` each held-out split is a single item with fixed candidate negatives for some devices."""
    rng = rng_for(0, "test-batched-evaluation")
    result = []
    for user in range(count):
        items = np.sort(rng.choice(N_ITEMS, size=3 + user % 11, replace=False))
        validation = items[:0] if user % 4 == 3 else items[:1]
        test = items[:0] if user == 5 else items[1:2] if sampled else items[1:3]
        train = np.setdiff1d(items, np.union1d(validation, test))
        negatives = None
        if sampled and user % 2:
            pool = np.setdiff1d(np.arange(N_ITEMS), items)
            negatives = np.sort(rng.choice(pool, size=10, replace=False))
        result.append(DeviceData(user, train, validation, test, items, negatives, negatives))
    return result


def table(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = rng_for(seed, "test-batched-evaluation-table")
    mask = rng.random((N_ITEMS, DIM)) < 0.4
    return (rng.normal(0, 0.3, (N_ITEMS, DIM)) * mask).astype(np.float32), mask


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("batch_users", [1, 7, 1024])
def test_a_batch_ranks_every_device_as_it_ranks_alone(sampled: bool, batch_users: int) -> None:
    cfg = config(**{"eval.batch-users": batch_users, "eval.sampled-negatives": 10, **({"data.split": "loo"} if sampled else {})})
    weights, _ = table()
    datas = partitions(23, sampled)
    states = [init_device(cfg, data.user_id) for data in datas]
    batched = evaluate_splits_batch(cfg, states, datas, weights)
    for state, data, mine in zip(states, datas, batched, strict=True):
        alone = evaluate_splits(cfg, state, data, weights)
        assert list(mine) == list(alone)  # the same metrics in the same order (splits without items left out)
        assert mine == pytest.approx(alone, abs=1e-9)
    assert "validation-recall@20" not in batched[3] and "test-recall@20" not in batched[5]
    assert any(name.startswith("test-sampled_hr@10") for name in batched[0]) == sampled


def test_a_batch_ranks_one_width_only() -> None:
    cfg = config()
    narrow = init_device(cfg, 0)
    narrow.user_row = narrow.user_row[:4]
    with pytest.raises(ValueError, match=r"one width, got widths \[4, 8\]"):
        evaluate_splits_batch(cfg, [narrow, init_device(cfg, 1)], partitions(2, False), table()[0])


SERVED: dict[str, dict[str, Any]] = {
    "plain": {},
    "reconstruct": {"fed.user-state": "reconstruct"},
    "poisoned": {"poison.target-item": 7, "poison.fraction": 0.2},
}


@pytest.mark.parametrize("name", SERVED)
@pytest.mark.parametrize("unseen", [False, True])
def test_served_as_a_batch_the_replies_and_states_are_the_loop_s_and_the_table_is_decoded_once(
    name: str, unseen: bool, monkeypatch: Any
) -> None:
    cfg = config(**SERVED[name])
    weights, mask = table()
    shared = RowsDownload(None, CompactTable.encode(weights, mask))
    message = EvaluateRequest(shared).to_arrays()
    own_copy = {key: value.copy() for key, value in message.items()}  # equal arrays, other objects: decoded apart
    datas = partitions(12, False)
    calls = []
    for data in datas:
        state = {} if data.user_id % 3 == 0 else init_device(cfg, data.user_id).to_arrays()  # some never trained
        calls.append((DeviceCall(cfg, data, state, N_ITEMS, 4, {UNSEEN: True} if unseen else {}),
                      own_copy if data.user_id == 4 else message))
    calls[6] = (calls[6][0], {**message, "table.values": message["table.values"][:-1]})  # a malformed message
    decodes = []
    original = CompactTable.decode
    monkeypatch.setattr(CompactTable, "decode", lambda self: decodes.append(1) or original(self))
    batched = serve_evaluate_batch(calls)
    assert len(decodes) == 2  # the shared table once, the device's own copy once
    alone = [serve(EVALUATE, call, arrays) for call, arrays in calls]
    assert batched[6].reply is None and str(batched[6].failure) == str(alone[6].failure) and "item rows" in str(alone[6].failure)
    for mine, reference in zip(batched, alone, strict=True):
        if reference.reply is None:
            continue
        assert mine.reply is not None
        assert mine.reply.metrics == pytest.approx(reference.reply.metrics, abs=1e-9)
        assert list(mine.reply.metrics) == list(reference.reply.metrics)
        assert mine.reply.state.keys() == reference.reply.state.keys()
        for key, value in reference.reply.state.items():
            np.testing.assert_allclose(mine.reply.state[key], value, rtol=1e-6, err_msg=key)
    if name == "poisoned":
        assert any("exposure@10" in outcome.reply.metrics for outcome in batched if outcome.reply is not None)


def test_serve_all_batches_evaluation_only_when_asked(monkeypatch: Any) -> None:
    cfg = config()
    weights, mask = table()
    message = EvaluateRequest(RowsDownload(None, CompactTable.encode(weights, mask))).to_arrays()
    calls = [(DeviceCall(cfg, data, {}, N_ITEMS, 1), message) for data in partitions(5, False)]
    decodes = []
    original = CompactTable.decode
    monkeypatch.setattr(CompactTable, "decode", lambda self: decodes.append(1) or original(self))
    serve_all(EVALUATE, calls, device_batch=1)
    assert len(decodes) == 5
    serve_all(EVALUATE, calls, device_batch=2)
    assert len(decodes) == 5 + 3  # batches of 2, 2 and 1
