"""Devices in batches (``fedsparse.federation.batched``): a batch of devices gives each the round the
per-device loop gives it (uploads, new private states, losses and metrics, within float tolerance), in
several configurations, through the message handlers and in a whole in-process federation; what is not
batched trains one device at a time and says so."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.batched import batching_unsupported, local_train_batch
from fedsparse.federation.device import DeviceData, DeviceRound, LocalResult, LocalRound, init_device, local_train
from fedsparse.federation.dispatch import DeviceCall, serve, serve_train_batch
from fedsparse.federation.faults import DeviceError
from fedsparse.federation.inprocess import InProcessTransport, run_inprocess
from fedsparse.federation.messages import TRAIN, QueryReply, QueryRequest
from fedsparse.federation.protocol import handle_query
from fedsparse.federation.wire import RowsDownload, RowUpdate
from fedsparse.rng import rng_for
from fedsparse.sparse.storage import CompactTable

N_ITEMS, DIM = 60, 8
ITEM_COUNTS = (1, 3, 5, 8, 13, 21)  # one device per count: ragged rows and, with local batches, ragged steps

BASE = {"seed": 5, "model.dim": DIM, "train.negatives": 3, "fed.local-epochs": 2, "fed.user-steps": 3}
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "sparserec": {},
    "dense": {"sparse.policy": "dense"},
    "padding": {"privacy.padding-ratio": 0.5, "train.l2-reg": 0.05},  # fakes reach the l2 of the items only
    "pfedrec-like": {"train.loss": "bce", "fed.user-bias": True, "fed.step-order": "head-first",
                     "fed.local-batch-size": 5, "fed.user-optimizer": "sgd", "fed.user-density": 1.0, "fed.user-steps": 0,
                     "train.negatives-from": "unrated"},
    "rows-downlink": {"fed.downlink": "rows", "fed.local-batch-size": 4},
    "adam-items": {"fed.item-optimizer": "adam", "fed.local-batch-size": 3},
    "reconstruct": {"fed.user-state": "reconstruct"},
    "uplink-table": {"fed.uplink": "table", "fed.aggregation": "client-mean"},
}


def config(**overrides: Any) -> RunConfig:
    return RunConfig.from_flat({**BASE, **overrides})


def devices(cfg: RunConfig, server_round: int = 2, local_round: LocalRound | None = None) -> list[DeviceRound]:
    """One device per ``ITEM_COUNTS`` entry, each with its own items, a state some rounds old (Adam moments and
    step counts that differ per device) and its download (the whole masked table, or only its rows)."""
    rng = rng_for(0, "test-batched")
    mask = rng.random((N_ITEMS, DIM)) < (1.0 if cfg.sparse.policy == "dense" else 0.4)
    table = (rng.normal(0, 0.1, (N_ITEMS, DIM)) * mask).astype(np.float32)
    result = []
    for user, count in enumerate(ITEM_COUNTS):
        items = np.sort(rng.choice(N_ITEMS, size=count + 2, replace=False))
        data = DeviceData(user, items[:count], items[count : count + 1], items[count + 1 :], items)
        state = init_device(cfg, user)
        state.exp_avg[:] = rng.normal(0, 0.01, DIM).astype(np.float32) * state.user_mask
        state.exp_avg_sq[:] = rng.random(DIM).astype(np.float32) * 1e-3 * state.user_mask
        state.steps = 3 * user
        download = RowsDownload(None, CompactTable.encode(table, mask))
        if cfg.fed.downlink == "rows":
            reply = handle_query(cfg, data, QueryRequest().to_arrays(), N_ITEMS, server_round)
            assert isinstance(reply.message, QueryReply)
            rows = reply.message.row_ids.astype(np.int64)
            download = RowsDownload(rows, CompactTable.encode(table[rows], mask[rows]))
        result.append(DeviceRound(state, data, download, local_round or LocalRound(server_round, True, 0.25, False)))
    return result


def assert_same_result(batched: LocalResult, alone: LocalResult) -> None:
    """Row ids, signal columns, masks and step counts exactly; values within float tolerance. Memory is each
    of a batch is what the device alone holds (its MF rows by their active entries), not the batch's dense stack."""
    tolerance = {"rtol": 1e-4, "atol": 1e-6}
    np.testing.assert_array_equal(batched.update.row_ids, alone.update.row_ids)
    np.testing.assert_allclose(batched.update.values, alone.update.values, **tolerance)
    assert batched.update.weight == alone.update.weight
    for name in ("signal_rows", "signal_cols"):
        np.testing.assert_array_equal(getattr(batched.update, name), getattr(alone.update, name))
    if alone.update.signal_values is not None:
        np.testing.assert_allclose(batched.update.signal_values, alone.update.signal_values, **tolerance)
    new, old = batched.state.to_arrays(), alone.state.to_arrays()
    assert new.keys() == old.keys()
    for key in new:
        np.testing.assert_allclose(new[key], old[key], err_msg=key, **tolerance)
    np.testing.assert_array_equal(batched.state.user_mask, alone.state.user_mask)
    assert batched.state.steps == alone.state.steps
    assert batched.loss == pytest.approx(alone.loss, rel=1e-5)
    assert 0 < alone.memory_bytes == batched.memory_bytes
    assert (batched.evaluation is None) == (alone.evaluation is None)
    for name, value in (alone.evaluation or {}).items():
        assert batched.evaluation is not None and batched.evaluation[name] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_a_batch_gives_every_device_its_own_round(name: str) -> None:
    cfg = config(**CONFIGURATIONS[name])
    assert batching_unsupported(cfg) is None
    rounds = devices(cfg)
    batched = local_train_batch(cfg, rounds, N_ITEMS)
    assert len(batched) == len(rounds)
    for device, result in zip(rounds, batched, strict=True):
        alone = local_train(cfg, device.state, device.data, device.download, N_ITEMS, device.local_round)
        assert isinstance(result, LocalResult)
        assert_same_result(result, alone)


def test_personal_evaluation_and_failed_devices_in_a_batch() -> None:
    """``fed.evaluate-model = local`` metrics match; a device that cannot train fails alone, in its place."""
    cfg = config(**{"fed.evaluate-model": "local"})
    rounds = devices(cfg, local_round=LocalRound(2, False, 0.0, True))
    rounds[2] = replace(rounds[2], data=replace(rounds[2].data, train=np.zeros(0, dtype=np.int64)))
    batched = local_train_batch(cfg, rounds, N_ITEMS)
    assert isinstance(batched[2], DeviceError) and "no training interactions" in str(batched[2])
    for index, (device, result) in enumerate(zip(rounds, batched, strict=True)):
        if index == 2:
            continue
        alone = local_train(cfg, device.state, device.data, device.download, N_ITEMS, device.local_round)
        assert isinstance(result, LocalResult) and result.evaluation
        assert_same_result(result, alone)


SERVED = {
    "ldp-and-crashes": {"privacy.padding-ratio": 0.5, "privacy.ldp": "gaussian", "privacy.noise-multiplier": 0.0,
                        "faults.failure-rate": 0.3, "faults.failure-mode": "crash"},
    "secure-aggregation": {"privacy.secure-aggregation": True, "privacy.secure-row-fraction": 0.2},
    "secure-all-items": {"privacy.secure-aggregation": True, "privacy.secure-row-fraction": 0.2,
                         "privacy.secure-train-items": "all", "privacy.secure-row-bias": 1.0},
}


@pytest.mark.parametrize("name", SERVED)
def test_served_as_a_batch_the_replies_states_and_failures_are_the_loop_s(name: str) -> None:
    """Through the message handlers (decode, fault injection, local DP, secure uploads, devices with nothing
    in the round's rows): the same replies, metrics, kept states and failed devices (an injected crash loses
    its state) as ``serve`` one by one."""
    cfg = config(**SERVED[name])
    rounds = devices(cfg)
    calls = [(DeviceCall(cfg, device.data, device.state.to_arrays(), N_ITEMS, 2, {"send-signal": True}),
              device.download.to_arrays()) for device in rounds]
    batched = serve_train_batch(calls)
    alone = [serve(TRAIN, call, message) for call, message in calls]
    trained = [outcome.reply.metrics["loss"] > 0 for outcome in alone if outcome.reply is not None]
    assert any(trained) and (not all(trained) or name != "secure-aggregation")  # some had nothing in the round's rows
    assert any(outcome.lost_state for outcome in alone) or not cfg.faults.failure_rate
    for mine, reference in zip(batched, alone, strict=True):
        assert (mine.lost_state, str(mine.failure)) == (reference.lost_state, str(reference.failure))
        if reference.reply is None:
            assert mine.reply is None
            continue
        assert mine.reply is not None
        assert mine.reply.metrics.keys() == reference.reply.metrics.keys()
        for name, value in reference.reply.metrics.items():
            assert mine.reply.metrics[name] == pytest.approx(value, rel=1e-5), name
        arrays, expected = mine.reply.message.to_arrays(), reference.reply.message.to_arrays()
        assert arrays.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(arrays[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
        for key in reference.reply.state:
            np.testing.assert_allclose(mine.reply.state[key], reference.reply.state[key], rtol=1e-4, atol=1e-6)


def small_federation(tmp_path: Any, **overrides: Any) -> RunConfig:
    """Two rounds of a small synthetic federation, every device trained and evaluated each round."""
    return RunConfig.from_flat({
        "results-dir": str(tmp_path), "num-server-rounds": 2, "data.dataset": "synthetic", "data.synthetic-users": 40,
        "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 8, "model.dim": 8, "sparse.policy": "sparserec",
        "sparse.density": 0.25, "fed.fraction-train": 1.0, "fed.explore-every": 1, "fed.nmf-rounds": 2,
        "fed.eval-fraction": 1.0, "fed.local-batch-size": 3, **overrides,
    })


class Uploads:
    """Every accepted upload of a run, by (round, user): what the server saw."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], RowUpdate] = {}

    def observe(self, server_round: int, user: int, update: RowUpdate, server: Any) -> None:
        self.seen[(server_round, user)] = update


def test_a_federation_gives_the_same_uploads_and_summary_with_devices_in_batches(tmp_path: Any) -> None:
    """A whole in-process run (exploration every round, so signals too): batches of 16 (the last one smaller)
    against one device at a time."""
    reference_config = small_federation(tmp_path)
    data = load_dataset(reference_config.data, reference_config.seed)
    runs = []
    for device_batch in (0, 16):
        uploads = Uploads()
        _, summary = run_inprocess(small_federation(tmp_path, **{"fed.device-batch": device_batch}), data, observer=uploads)
        runs.append((uploads.seen, summary))
    (reference_uploads, reference), (batched_uploads, batched) = runs
    assert batched_uploads.keys() == reference_uploads.keys() and len(reference_uploads) == 2 * 40
    for key, expected in reference_uploads.items():
        np.testing.assert_array_equal(batched_uploads[key].row_ids, expected.row_ids)
        np.testing.assert_allclose(batched_uploads[key].values, expected.values, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(batched_uploads[key].signal_cols, expected.signal_cols)
    for name in ("recall@20", "ndcg@20", "total_upload_bytes", "total_download_bytes", "item_active_entries"):
        assert batched[name] == pytest.approx(reference[name], rel=1e-6), name


def test_what_is_not_batched_trains_one_device_at_a_time_and_says_why(tmp_path: Any, caplog: Any) -> None:
    neumf = small_federation(tmp_path, **{"model.name": "neumf", "fed.device-batch": 8})
    assert batching_unsupported(neumf) is not None and "neumf" in str(batching_unsupported(neumf))
    with caplog.at_level(logging.INFO, logger="fedsparse"):
        transport = InProcessTransport(neumf, load_dataset(neumf.data, neumf.seed))
    assert transport.device_batch == 1
    assert "fed.device-batch = 8: devices train one at a time instead, as model.name = neumf" in caplog.text
    with pytest.raises(ValueError, match="cannot train in batches"):
        local_train_batch(neumf, [], N_ITEMS)
    widths = config(**{"budget.device-widths": "4,8", "fed.device-batch": 8})
    assert "budget.device-widths" in str(batching_unsupported(widths))
    with caplog.at_level(logging.INFO, logger="fedsparse"):
        assert InProcessTransport(config(**{"fed.device-batch": 8}), load_dataset(neumf.data, neumf.seed)).device_batch == 8
    assert caplog.text.count("one at a time") == 1


@pytest.mark.parametrize("bad", [-1, -16])
def test_a_negative_device_batch_is_refused(bad: int) -> None:
    with pytest.raises(ConfigError, match="fed.device-batch must be >= 0"):
        config(**{"fed.device-batch": bad})


NODE_CONFIG = {**BASE, "data.dataset": "synthetic", "data.synthetic-users": 30, "data.synthetic-items": N_ITEMS,
               "fed.clients-per-node": 3}
NODE_USERS = (6, 7, 8)  # the devices partition 2 hosts


def serve_on_a_node(monkeypatch: Any, route: str, settings: dict[str, Any]) -> list[tuple[Any, Any]]:
    """The ClientApp's ``route`` ("train" or "evaluate") on a supernode hosting ``NODE_USERS``, each sent one seeded
    masked table (whole), one at a time and then batched: [(reply content, node state)] for each."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Context, RecordDict

    import clients.app as client_app
    from clients.records import to_record

    monkeypatch.setattr(client_app, "Message", lambda reply, reply_to: reply)  # the reply's content, unsent
    n_items = load_dataset(RunConfig.from_flat(NODE_CONFIG).data, 5).n_items
    rng = rng_for(1, "test-batched-node", route)
    mask = rng.random((n_items, DIM)) < 0.4
    download = RowsDownload(None, CompactTable.encode((rng.normal(0, 0.1, mask.shape) * mask).astype(np.float32), mask))
    served = []
    for device_batch in (0, 3):
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 2}, state=RecordDict(),
                          run_config={**NODE_CONFIG, "fed.device-batch": device_batch})
        content = RecordDict({"settings": ConfigRecord({"server-round": 1, **settings}),
                              **{f"arrays.{user}": to_record(download.to_arrays()) for user in NODE_USERS}})
        served.append((getattr(client_app, route)(SimpleNamespace(content=content), context), context.state))
    return served


def test_a_supernode_hosting_several_devices_batches_them_too(monkeypatch: Any) -> None:
    """The ClientApp with ``fed.clients-per-node = 3``: the same replies and kept states with its devices'
    steps batched as one at a time."""
    (alone, alone_state), (batched, batched_state) = serve_on_a_node(monkeypatch, "train", {"send-signal": True})
    assert sorted(batched.keys()) == sorted(alone.keys()) and "arrays.8" in alone
    for key in alone.array_records:
        for name, value in alone[key].items():
            np.testing.assert_allclose(batched[key][name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    for key in alone.metric_records:
        for name, value in alone[key].items():
            assert batched[key][name] == pytest.approx(value, rel=1e-5)
    assert sorted(batched_state.keys()) == sorted(alone_state.keys()) == ["device.6", "device.7", "device.8"]
    for key in alone_state.array_records:
        for name, value in alone_state[key].items():
            np.testing.assert_allclose(batched_state[key][name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6)


def test_a_supernode_hosting_several_devices_ranks_them_together_with_the_same_metrics(monkeypatch: Any) -> None:
    """The ClientApp's evaluation route with ``fed.clients-per-node = 3``: the same metrics with its devices'
    rankings batched as one at a time (an evaluation message is a whole table with no row ids, as sent)."""
    (alone, _), (batched, _) = serve_on_a_node(monkeypatch, "evaluate", {})
    assert sorted(alone.metric_records) == sorted(batched.metric_records) and "metrics.8" in alone
    for key in alone.metric_records:
        assert dict(batched[key]) == pytest.approx(dict(alone[key]), abs=1e-9), key
        assert "test-recall@20" in dict(alone[key]) or "validation-recall@20" in dict(alone[key])
