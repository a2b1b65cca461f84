"""The server side of a round: seeded client sampling, exact item budgets, downloads that decode to the
server's rows, aggregation applied to touched rows only, exploration with the budget kept, and
federated NMF equal to the central multiplicative update."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fedsparse.config import RunConfig
from fedsparse.federation.aggregation import aggregate_row_updates
from fedsparse.federation.device import DeviceData, LocalRound, init_device, local_train
from fedsparse.federation.server_state import Server, clients_per_round, sample_clients, validate_update
from fedsparse.federation.wire import RowsDownload, RowUpdate, row_id_dtype, signal_col_dtype
from fedsparse.rng import rng_for
from fedsparse.sparse.masks import budget

N_ITEMS, DIM = 30, 8


def config(**overrides: object) -> RunConfig:
    flat = {"seed": 1, "model.dim": DIM, "sparse.policy": "static", "sparse.density": 0.25, "num-server-rounds": 10}
    flat.update(overrides)
    return RunConfig.from_flat(flat)


def nmf_scores() -> np.ndarray:
    return np.abs(rng_for(0, "test-server-nmf").normal(size=(N_ITEMS, DIM)))


def random_updates(mask: np.ndarray, n_devices: int, seed: int, signal: bool = False) -> list[RowUpdate]:
    rng = rng_for(seed, "test-server-updates")
    updates = []
    for _ in range(n_devices):
        rows = np.sort(rng.choice(N_ITEMS, size=6, replace=False)).astype(row_id_dtype(N_ITEMS))
        values = rng.normal(size=int(mask[rows].sum())).astype(np.float32)
        extra = ()
        if signal:
            cols = np.stack([rng.choice(DIM, 2, replace=False) for _ in rows]).astype(signal_col_dtype(DIM))
            extra = (rows.copy(), cols, rng.normal(size=cols.shape).astype(np.float32))
        updates.append(RowUpdate(rows, values, float(rng.integers(1, 5)), *extra))
    return updates


# ---------------------------------------------------------------- sampling


def test_sample_clients_deterministic_sorted_distinct() -> None:
    for server_round in range(1, 6):
        chosen = sample_clients(7, server_round, n_clients=50, count=8)
        np.testing.assert_array_equal(chosen, sample_clients(7, server_round, 50, 8))
        assert chosen.size == 8 and np.unique(chosen).size == 8
        assert np.all(np.diff(chosen) > 0)
        assert chosen.min() >= 0 and chosen.max() < 50
    rounds = {tuple(sample_clients(7, r, 50, 8)) for r in range(1, 11)}
    assert len(rounds) == 10  # a new draw each round
    assert not np.array_equal(sample_clients(7, 1, 50, 8), sample_clients(8, 1, 50, 8))
    assert not np.array_equal(sample_clients(7, 1, 50, 8), sample_clients(7, 1, 50, 8, purpose="evaluate"))


def test_sample_clients_count_is_clamped() -> None:
    np.testing.assert_array_equal(sample_clients(0, 1, n_clients=5, count=99), np.arange(5))
    assert sample_clients(0, 1, n_clients=5, count=0).size == 1


def test_clients_per_round() -> None:
    assert clients_per_round(config(**{"fed.clients-per-round": 3}), 10) == 3
    assert clients_per_round(config(**{"fed.clients-per-round": 30}), 10) == 10
    assert clients_per_round(config(**{"fed.fraction-train": 0.25}), 10) == 3  # ceil(2.5)


# ---------------------------------------------------------------- creation and downloads


@pytest.mark.parametrize(
    "policy, density",
    [("dense", 1.0), ("dense", 0.3), ("static", 0.25), ("static", 0.1), ("sparserec", 0.25), ("set", 0.5)],
)
def test_create_honours_exact_item_budget(policy: str, density: float) -> None:
    cfg = config(**{"sparse.policy": policy, "sparse.density": density})
    factor = nmf_scores() if policy == "sparserec" else None
    server = Server.create(cfg, N_ITEMS, factor)
    expected = N_ITEMS * DIM if policy == "dense" else budget(density, N_ITEMS, DIM)
    assert int(server.item_mask.sum()) == expected
    assert server.item_mask.dtype == bool and server.item_weight.dtype == np.float32
    assert server.item_weight.shape == (N_ITEMS, DIM)
    assert np.all(server.item_weight[~server.item_mask] == 0)
    assert np.all(server.item_weight[server.item_mask] != 0)
    again = Server.create(cfg, N_ITEMS, factor)
    np.testing.assert_array_equal(server.item_weight, again.item_weight)


def test_sparserec_initial_mask_follows_nmf_scores() -> None:
    cfg = config(**{"sparse.policy": "sparserec", "sparse.nmf-min-per-row": 0})
    scores = nmf_scores()
    server = Server.create(cfg, N_ITEMS, scores)
    k = budget(0.25, N_ITEMS, DIM)
    threshold = np.sort(scores.ravel())[::-1][k - 1]
    assert np.all(scores[server.item_mask] >= threshold)
    with pytest.raises(ValueError, match="NMF scores"):
        Server.create(cfg, N_ITEMS, None)


@pytest.mark.parametrize("rows", [None, np.array([0, 4, 5, 29], dtype=np.int64)], ids=["full", "rows"])
def test_download_decodes_to_server_rows(rows: np.ndarray | None) -> None:
    server = Server.create(config(), N_ITEMS)
    download = server.download(rows)
    covered = np.arange(N_ITEMS) if rows is None else rows
    for payload in (download, RowsDownload.from_arrays(download.to_arrays(), N_ITEMS, DIM)):
        np.testing.assert_array_equal(payload.rows(N_ITEMS), covered)
        weight, mask = payload.table.decode()
        np.testing.assert_array_equal(weight, server.item_weight[covered])
        np.testing.assert_array_equal(mask, server.item_mask[covered])
    assert ("row-ids" in download.to_arrays()) == (rows is not None)


# ---------------------------------------------------------------- applying a round


@pytest.mark.parametrize("aggregation", ["weighted", "uniform", "sum", "client-mean"])
def test_apply_round_moves_only_touched_rows(aggregation: str) -> None:
    cfg = config(**{"fed.server-lr": 0.5, "fed.aggregation": aggregation})
    server = Server.create(cfg, N_ITEMS)
    assert not server.is_explore_round(1)
    before_weight, before_mask = server.item_weight.copy(), server.item_mask.copy()
    updates = random_updates(server.item_mask, n_devices=3, seed=2)
    merged = aggregate_row_updates(updates, server.item_mask, aggregation)
    record = server.apply_round(1, updates)
    assert record == {"rows_updated": merged.rows.size}
    assert server.round == 1
    np.testing.assert_array_equal(server.item_mask, before_mask)
    untouched = np.setdiff1d(np.arange(N_ITEMS), merged.rows)
    assert untouched.size > 0
    np.testing.assert_array_equal(server.item_weight[untouched], before_weight[untouched])
    np.testing.assert_allclose(server.item_weight[merged.rows], before_weight[merged.rows] + 0.5 * merged.deltas, rtol=1e-6)
    assert np.all(server.item_weight[~server.item_mask] == 0)


def test_apply_round_without_updates_changes_nothing() -> None:
    server = Server.create(config(), N_ITEMS)
    before = server.item_weight.copy()
    assert server.apply_round(1, []) == {"rows_updated": 0}
    np.testing.assert_array_equal(server.item_weight, before)


def test_set_exploration_keeps_budget_and_grows_at_zero() -> None:
    cfg = config(**{"sparse.policy": "set", "fed.explore-every": 1})
    server = Server.create(cfg, N_ITEMS)
    k = int(server.item_mask.sum())
    assert server.is_explore_round(1) and not server.wants_signal(1)  # random growth needs no signal
    old_mask = server.item_mask.copy()
    record = server.apply_round(1, random_updates(server.item_mask, 3, seed=3))
    assert record["pruned"] == record["grown"] > 0
    assert int(server.item_mask.sum()) == k
    grown = server.item_mask & ~old_mask
    assert int(grown.sum()) > 0
    assert np.all(server.item_weight[grown] == 0)
    assert np.all(server.item_weight[~server.item_mask] == 0)


def test_sparserec_exploration_uses_signal_and_keeps_budget() -> None:
    cfg = config(**{"sparse.policy": "sparserec", "fed.explore-every": 1})
    server = Server.create(cfg, N_ITEMS, nmf_scores())
    k = int(server.item_mask.sum())
    assert server.is_explore_round(1) and server.wants_signal(1)
    # one strong regrowth signal on an inactive entry of a touched row: it must be grown
    row = int(np.flatnonzero((~server.item_mask).any(axis=1))[0])
    col = int(np.flatnonzero(~server.item_mask[row])[0])
    rows = np.array([row], dtype=np.int64)
    strong = RowUpdate(
        rows, np.zeros(int(server.item_mask[row].sum()), np.float32), 1.0,
        rows.copy(), np.array([[col]], signal_col_dtype(DIM)), np.array([[-50.0]], np.float32),
    )
    for server_round in (1, 2):
        old_mask = server.item_mask.copy()
        updates = random_updates(server.item_mask, 3, seed=server_round, signal=True)
        if server_round == 1:
            updates.append(strong)
        record = server.apply_round(server_round, updates)
        assert record["grown"] > 0
        assert int(server.item_mask.sum()) == k
        grown = server.item_mask & ~old_mask
        assert np.all(server.item_weight[grown] == 0)
        assert np.all(server.item_weight[~server.item_mask] == 0)
        if server_round == 1:
            assert server.item_mask[row, col]


def test_static_policy_never_explores_nor_asks_for_signal() -> None:
    server = Server.create(config(**{"fed.explore-every": 1}), N_ITEMS)
    assert not any(server.is_explore_round(r) for r in range(1, 11))
    assert not any(server.wants_signal(r) for r in range(1, 11))


def test_one_full_round_with_devices() -> None:
    """download -> local_train -> wire -> validate -> apply: the server's table moves, budget kept."""
    cfg = config(**{"sparse.policy": "sparserec", "fed.explore-every": 1, "fed.downlink": "rows"})
    server = Server.create(cfg, N_ITEMS, nmf_scores())
    k = int(server.item_mask.sum())
    train = sp.random(4, N_ITEMS, density=0.2, format="csr", random_state=0)
    train.data[:] = 1.0
    empty = sp.csr_matrix((4, N_ITEMS))
    updates = []
    for user in range(4):
        data = DeviceData.from_interactions(train, empty, empty, user)
        if data.train.size == 0:
            continue
        result = local_train(cfg, init_device(cfg, user), data, server.download(), N_ITEMS, LocalRound(1, server.wants_signal(1)))
        update, reason = validate_update(server, result.update.to_arrays())
        assert reason is None
        updates.append(update)
    assert updates
    before = server.item_weight.copy()
    server.apply_round(1, updates)
    assert not np.array_equal(before, server.item_weight)
    assert int(server.item_mask.sum()) == k
    assert np.all(server.item_weight[~server.item_mask] == 0)


def test_validate_update_drops_bad_reply_with_reason() -> None:
    server = Server.create(config(), N_ITEMS)
    arrays = random_updates(server.item_mask, 1, seed=0)[0].to_arrays()
    arrays["values"] = arrays["values"].astype(np.float64)
    update, reason = validate_update(server, arrays)
    assert update is None and "'values' must be float32" in reason
