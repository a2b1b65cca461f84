"""Heterogeneous devices: each class holds a prefix of the item rows, the server checks uploads against that
prefix and averages every entry over the devices that hold it; size policies run on the server table."""

import json

import numpy as np
import pytest

from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.aggregation import aggregate_row_updates
from fedsparse.federation.device import DeviceData, LocalRound, init_device, local_train
from fedsparse.federation.device_classes import device_width
from fedsparse.federation.engine import run_federation
from fedsparse.federation.inprocess import InProcessTransport, population_of, run_inprocess
from fedsparse.federation.server_state import Server, validate_update
from fedsparse.federation.streaming import grow_item_table, present_share, revealed_items
from fedsparse.federation.wire import RowUpdate, row_id_dtype
from fedsparse.run_files import new_run_dir, read_jsonl
from fedsparse.sparse.embedding_sizes import prefix_mask, prefix_sizes, width_mask
from tests.test_engine import small_config

N_ITEMS, DIM = 30, 8


def config(**overrides):
    flat = {"seed": 1, "model.dim": DIM, "sparse.policy": "static", "sparse.density": 0.5,
            "budget.device-widths": "2,4,8", "budget.device-shares": "0.3,0.3,0.4", **overrides}
    return RunConfig.from_flat(flat)


def test_device_classes_follow_the_shares_and_agree_between_calls():
    cfg = config()
    widths = np.array([device_width(cfg, user) for user in range(3000)])
    assert set(widths) == {2, 4, 8}
    assert np.mean(widths == 8) == pytest.approx(0.4, abs=0.03)
    assert all(device_width(cfg, user) == widths[user] for user in range(50))
    assert device_width(RunConfig.from_flat({"model.dim": DIM}), 7) == DIM


@pytest.mark.parametrize("overrides, key", [
    ({"budget.device-widths": "2,4,16"}, "budget.device-widths"),
    ({"budget.device-shares": "0.5,0.5"}, "budget.device-shares"),
    ({"budget.device-shares": "0.5,0.4,0.3"}, "budget.device-shares"),
    ({"robust.aggregator": "median"}, "budget.device-widths"),
])
def test_bad_device_classes_are_refused_by_name(overrides, key):
    with pytest.raises(ConfigError, match=key):
        config(**overrides)


def test_prefix_aligned_aggregation_averages_each_entry_over_its_holders():
    mask = np.ones((N_ITEMS, DIM), dtype=bool)
    rows = np.array([3, 5], dtype=row_id_dtype(N_ITEMS))
    narrow = RowUpdate(rows, np.full(2 * 2, 1.0, dtype=np.float32), 1.0, width=2)
    wide = RowUpdate(rows, np.full(2 * DIM, 4.0, dtype=np.float32), 3.0, width=DIM)
    merged = aggregate_row_updates([narrow, wide], mask, "weighted")
    expected = np.full((2, DIM), 4.0)
    expected[:, :2] = (1.0 * 1 + 4.0 * 3) / 4  # both devices hold the first two dimensions
    np.testing.assert_allclose(merged.deltas, expected, rtol=1e-6)


def test_server_checks_an_upload_against_the_device_prefix():
    cfg = config()
    server = Server.create(cfg, N_ITEMS)
    rows = np.array([1, 4, 9], dtype=row_id_dtype(N_ITEMS))
    narrow = int(width_mask(server.item_mask, 2)[rows.astype(np.int64)].sum())
    arrays = {"row-ids": rows, "values": np.zeros(narrow, dtype=np.float32), "weight": np.ones(1, dtype=np.float32)}
    update, reason = validate_update(server, arrays, width=2)
    assert reason is None and update.width == 2
    full = {**arrays, "values": np.zeros(int(server.item_mask[rows.astype(np.int64)].sum()), dtype=np.float32)}
    update, reason = validate_update(server, full, width=2)
    assert update is None and "values" in reason  # a narrow device cannot send full-width rows


def test_a_narrow_device_downloads_trains_and_uploads_only_its_prefix():
    cfg = config(**{"budget.device-widths": "3", "budget.device-shares": "1"})
    server = Server.create(cfg, N_ITEMS)
    data = DeviceData(0, np.array([2, 7, 11]), np.zeros(0, dtype=np.int64), np.array([20]), np.array([2, 7, 11, 20]))
    state = init_device(cfg, 0)
    assert state.user_row.shape == (3,) and state.user_mask.sum() == round(0.5 * 3)
    download = server.download(None, 3)
    assert download.table.dim == 3
    result = local_train(cfg, state, data, download, N_ITEMS, LocalRound(1, send_signal=True))
    update, reason = validate_update(server, result.update.to_arrays(), width=3)
    assert reason is None
    assert int(update.signal_cols.max()) < 3
    before = server.item_weight.copy()
    server.apply_round(1, [update])
    assert np.array_equal(server.item_weight[:, 3:], before[:, 3:])  # nobody held the trailing dimensions
    assert not np.array_equal(server.item_weight[:, :3], before[:, :3])


def test_heterogeneous_federation_reports_accuracy_and_memory_per_class(tmp_path):
    cfg = small_config(tmp_path, **{"budget.device-widths": "2,4,8", "fed.fraction-train": 1.0, "fed.eval-fraction": 1.0,
                                    "num-server-rounds": 2})
    run_dir, summary = run_inprocess(cfg, load_dataset(cfg.data, cfg.seed))
    last = read_jsonl(run_dir / "rounds.jsonl")[-1]
    memory = [last[f"device_memory_bytes_mean_w{w}"] for w in (2, 4, 8)]
    uploads = [last[f"upload_bytes_mean_w{w}"] for w in (2, 4, 8)]
    assert memory == sorted(memory) and memory[0] < memory[-1]
    assert uploads == sorted(uploads) and uploads[0] < uploads[-1]
    assert all(f"recall@20_w{w}" in last for w in (2, 4, 8))
    assert json.loads((run_dir / "summary.json").read_text())["recall@20"] == summary["recall@20"]


@pytest.mark.parametrize("policy", ["size-frequency", "size-scall"])
def test_size_policies_keep_the_server_item_table_prefix_form_with_the_exact_budget(tmp_path, policy):
    cfg = small_config(tmp_path, **{"sparse.policy": policy, "budget.device-widths": "4,8"})
    data = load_dataset(cfg.data, cfg.seed)
    popularity = np.bincount(data.train.indices, minlength=data.n_items).astype(float)
    server = Server.create(cfg, data.n_items, None, popularity)
    sizes = prefix_sizes(server.item_mask)
    assert sizes.sum() == round(0.25 * data.n_items * 8)
    assert np.corrcoef(popularity, sizes)[0, 1] > 0.3
    assert server.download(None, 4).table.format == "prefix"
    run_dir, _ = run_inprocess(cfg, data)
    assert (run_dir / "summary.json").exists()


# ---------------------------------------------------------------- streaming


def test_arrivals_are_staged_over_the_rounds_and_only_grow():
    cfg = RunConfig.from_flat({"num-server-rounds": 9, "budget.stream-stages": 2, "budget.stream-start": 0.4})
    shares = [present_share(cfg, r) for r in range(1, 10)]
    assert shares[0] == 0.4 and shares[-1] == 1.0 and shares == sorted(shares)
    assert len(set(shares)) == 3
    items = [revealed_items(cfg, 100, r) for r in (1, 5, 9)]
    assert [i.size for i in items] == [40, 70, 100]
    assert np.isin(items[0], items[1]).all() and np.isin(items[1], items[2]).all()
    assert revealed_items(RunConfig(), 100, 1) is None


@pytest.mark.parametrize("prefix", [True, False])
def test_growing_the_item_table_keeps_the_budget_exactly(prefix):
    rng = np.random.default_rng(0)
    present, new_rows = np.arange(0, 60), np.arange(60, 90)
    mask = np.zeros((100, DIM), dtype=bool)
    if prefix:
        mask[present] = prefix_mask(rng.integers(1, DIM + 1, 60), DIM)
    else:
        mask[present] = rng.random((60, DIM)) < 0.3
    weight = (rng.normal(size=mask.shape) * mask).astype(np.float32)
    grown_weight, grown_mask = grow_item_table(weight, mask, present, new_rows, prefix, rng, 0.1)
    assert grown_mask.sum() == mask.sum()
    assert grown_mask[new_rows].any(axis=1).all() and not grown_mask[90:].any()
    assert (grown_weight[~grown_mask] == 0).all() and (grown_weight[new_rows][grown_mask[new_rows]] != 0).all()
    if prefix:
        prefix_sizes(grown_mask)  # still prefix-form
    else:
        kept = grown_mask[present] & mask[present]
        assert np.array_equal(grown_weight[present][kept], weight[present][kept])


@pytest.mark.parametrize("policy", ["sparserec", "size-frequency"])
def test_a_streaming_federation_keeps_the_item_budget_while_items_and_users_arrive(tmp_path, policy):
    cfg = small_config(tmp_path, **{"sparse.policy": policy, "num-server-rounds": 6, "budget.stream-stages": 2,
                                    "fed.fraction-train": 1.0, "fed.explore-every": 2})
    run_dir, _ = run_inprocess(cfg, load_dataset(cfg.data, cfg.seed))
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert {r["item_active_entries"] for r in rounds} == {rounds[0]["item_active_entries"]}
    assert sum(r["arrived_items"] for r in rounds) > 0
    present = [r["present_users"] for r in rounds]
    assert present == sorted(present) and present[0] < present[-1]
    assert all(r["dropped_updates"] == 0 and r["failed_clients"] == 0 for r in rounds)


def test_amgp_federation_alternates_item_and_user_widths_and_ends_full_size(tmp_path):
    cfg = small_config(tmp_path, **{"sparse.policy": "amgp", "num-server-rounds": 4, "fed.fraction-train": 1.0,
                                    "sparse.amgp-cycles": 1, "sparse.amgp-sparse-share": 0.5})
    data = load_dataset(cfg.data, cfg.seed)
    transport = InProcessTransport(cfg, data)
    run_dir = new_run_dir(cfg.results_dir, "amgp")
    summary = run_federation(cfg, population_of(data, cfg), transport, run_dir, data.train)
    assert summary["item_active_entries"] == data.n_items * 8  # full-size at the end
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [r.get("grown", 0) for r in rounds] == [0, data.n_items * 6, 0, 0]  # grown back after round 2
    masks = [state["user-mask"] for state in transport.states.values()]
    assert masks and all(mask.all() for mask in masks)  # user rows full-size too
