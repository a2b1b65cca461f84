"""Devices held out of training (fed.unseen-users), FedRecon's evaluation on users it never trained on: the
split is seeded and disjoint, held-out devices never join a start or training cohort (read from the
transport's messages), their metrics equal a by-hand reference fit against the server's table, a resume
keeps the split, and bad values stop the run with a clear config error."""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedsparse.cli import main
from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import load_dataset, load_run_data
from fedsparse.federation import protocol
from fedsparse.federation.device import evaluate_splits as protocol_evaluate_splits
from fedsparse.federation.engine import (
    CHECKPOINT,
    UNSEEN_ARRAY,
    CheckpointError,
    check_population,
    read_checkpoint,
    run_federation,
)
from fedsparse.federation.inprocess import InProcessTransport, population_of
from fedsparse.federation.unseen import UNSEEN, split_unseen
from fedsparse.rng import rng_for
from fedsparse.run_files import new_run_dir, read_jsonl

TRAINING_KINDS = ("nmf", "query", "train")  # every kind of message a device gets outside evaluation


class Recording(InProcessTransport):
    """The in-process transport, noting every message it delivers: (kind, round, users, settings)."""

    def __init__(self, config, data) -> None:
        super().__init__(config, data)
        self.sent: list[tuple[str, int, set[int], dict]] = []

    def send(self, kind, server_round, messages, settings):
        self.sent.append((kind, server_round, {int(user) for user in messages}, dict(settings)))
        return super().send(kind, server_round, messages, settings)


def synthetic(tmp_path: Path, **overrides) -> RunConfig:
    return RunConfig.from_flat({
        "results-dir": str(tmp_path / "results"), "num-server-rounds": 2, "data.dataset": "synthetic",
        "data.synthetic-users": 40, "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 8, "model.dim": 8,
        "fed.unseen-users": 0.25, "fed.eval-fraction": 1.0, **overrides,
    })


# --------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------

def test_the_split_is_seeded_disjoint_and_sliced_as_fedrecons():
    users = np.arange(3, 203, 2, dtype=np.int64)  # 100 device ids, not 0..n-1
    config = RunConfig.from_flat({"fed.unseen-users": 0.15})
    seen, unseen = split_unseen(config, users)
    assert np.intersect1d(seen, unseen).size == 0 and np.array_equal(np.union1d(seen, unseen), users)
    assert unseen.size == 100 - int(100 * (1 - 0.15))  # split_tf_datasets: the first int(n * train share) train
    assert np.all(np.diff(seen) > 0) and np.all(np.diff(unseen) > 0)
    again = split_unseen(config, users[::-1].copy())  # the same devices held out, whatever order they come in
    assert np.array_equal(again[1], unseen)
    other = split_unseen(config.with_overrides({"seed": 1}), users)[1]
    assert other.size == unseen.size and not np.array_equal(other, unseen)
    assert split_unseen(RunConfig.from_flat({"fed.unseen-users": 0.001}), users)[1].size == 1  # a share > 0 holds one out
    assert split_unseen(RunConfig(), users)[1].size == 0  # the default holds none out


@pytest.mark.parametrize("value", ["-0.1", "1.0", "1.5"])
def test_a_share_outside_zero_one_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"fed.unseen-users must be in \[0, 1\)"):
        RunConfig.from_flat({"fed.unseen-users": value})


def test_values_that_cannot_run_are_clear_config_errors(tmp_path):
    users = np.arange(3, dtype=np.int64)
    with pytest.raises(ConfigError, match="holds out all 3 devices of this dataset: no device is left to train"):
        split_unseen(RunConfig.from_flat({"fed.unseen-users": 0.7}), users)
    with pytest.raises(ConfigError, match="fed.unseen-users > 0 needs fed.unseen-steps >= 1 or fed.user-steps >= 1"):
        RunConfig.from_flat({"fed.unseen-users": 0.1, "fed.user-steps": 0})
    assert RunConfig.from_flat({"fed.unseen-users": 0.1, "fed.user-steps": 0, "fed.unseen-steps": 3}).fed.unseen_steps == 3
    with pytest.raises(ConfigError, match="fed.unseen-steps must be >= 0"):
        RunConfig.from_flat({"fed.unseen-steps": -1})
    config = synthetic(tmp_path, **{"fed.nmf-init": "central"})  # the oracle factorises the held-out users' data too
    with pytest.raises(ConfigError, match="central NMF oracle"):
        check_population(config, population_of(load_run_data(config), config))


def test_simulate_refuses_a_split_that_leaves_no_training_device_before_any_output(tmp_path, capsys):
    flags = ["simulate", "--dataset", "synthetic", "--data.synthetic-users", "3", "--data.synthetic-items", "30",
             "--fed.unseen-users", "0.9", "--results-dir", str(tmp_path / "results")]
    assert main(flags) == 2
    assert "fed.unseen-users = 0.9 holds out all 3 devices" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------------
# Held-out devices never train: what the transport carried
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("downlink", ["full", "rows"])
def test_held_out_devices_never_join_a_start_or_training_cohort(tmp_path, downlink):
    # every device trains every round and the federated NMF start samples half of them: a held-out device
    # in any of these cohorts would be caught
    config = synthetic(tmp_path, **{"fed.fraction-train": 1.0, "fed.nmf-cohort": 0.5, "fed.downlink": downlink,
                                    "num-server-rounds": 3, "fed.eval-every": 2})
    data = load_run_data(config)
    population = population_of(data, config)
    transport = Recording(config, data)
    run_dir = new_run_dir(config.results_dir, "unseen")
    run_federation(config, population, transport, run_dir)
    unseen = {int(user) for user in population.unseen}
    assert len(unseen) == 10 and population.users.size == 30
    kinds = {kind for kind, *_ in transport.sent}
    assert set(TRAINING_KINDS[:1]) <= kinds and ("query" in kinds) == (downlink == "rows")
    for kind, _, users, _ in transport.sent:
        if kind in TRAINING_KINDS:
            assert not users & unseen, kind
    evaluations = [(server_round, users, settings)
                   for kind, server_round, users, settings in transport.sent if kind == "evaluate"]
    assert [server_round for server_round, *_ in evaluations] == [2, 2, 3, 3]  # each evaluation round: seen, then unseen
    for _, users, settings in evaluations:
        assert users == unseen if settings.get(UNSEEN) else not users & unseen
    first_contact = min(server_round for kind, server_round, users, _ in transport.sent if users & unseen)
    assert first_contact == 2  # nothing reaches a held-out device before its first evaluation
    assert not unseen & set(transport.states)  # and it keeps nothing
    # the ledger: start and training bytes zero for every held-out device, its evaluations counted
    arrays = read_checkpoint(run_dir / CHECKPOINT)
    held = np.isin(arrays["traffic.users"], population.unseen)
    for measure in ("payload", "wire"):
        for phase in ("start", "train"):
            assert not arrays[f"traffic.{measure}.{phase}.down"][held].any()
        assert (arrays[f"traffic.{measure}.evaluate.down"][held] > 0).all()
    assert (arrays["traffic.wire.evaluate.up"][held] > 0).all()
    records = read_jsonl(run_dir / "rounds.jsonl")
    assert "unseen_recall@20" not in records[0] and records[1]["unseen_users"] == 10
    assert records[2]["unseen_evaluated_clients"] == sum(1 for user in unseen if data.test[user].nnz)


def test_under_streaming_only_the_held_out_devices_that_have_joined_are_evaluated(tmp_path):
    config = synthetic(tmp_path, **{"budget.stream-stages": 2, "budget.stream-start": 0.3, "num-server-rounds": 3,
                                    "sparse.policy": "dense", "sparse.density": 1.0, "fed.fraction-train": 1.0})
    data = load_run_data(config)
    population = population_of(data, config)
    transport = Recording(config, data)
    run_dir = new_run_dir(config.results_dir, "stream")
    run_federation(config, population, transport, run_dir)
    unseen = {int(user) for user in population.unseen}
    assert all(not users & unseen for kind, _, users, _ in transport.sent if kind in TRAINING_KINDS)
    held = [users for kind, _, users, settings in transport.sent if kind == "evaluate" and settings.get(UNSEEN)]
    assert all(users <= unseen for users in held) and len(held[0]) < len(held[-1]) == len(unseen)  # they arrive over rounds
    assert [r["unseen_users"] for r in read_jsonl(run_dir / "rounds.jsonl")] == [len(unseen)] * 3


def test_the_default_holds_no_device_out_and_writes_no_unseen_key(tmp_path):
    config = synthetic(tmp_path, **{"fed.unseen-users": 0.0})
    data = load_run_data(config)
    transport = Recording(config, data)
    run_dir = new_run_dir(config.results_dir, "none")
    summary = run_federation(config, population_of(data, config), transport, run_dir)
    assert not any("unseen" in key for record in read_jsonl(run_dir / "rounds.jsonl") for key in record)
    assert not any("unseen" in key for key in summary) and UNSEEN_ARRAY not in read_checkpoint(run_dir / CHECKPOINT)
    assert not any(settings for kind, _, _, settings in transport.sent if kind == "evaluate")


# --------------------------------------------------------------------------------------------------
# Their metrics against a slow reference: the user row fitted by hand against the server's table
# --------------------------------------------------------------------------------------------------

N_USERS, N_ITEMS, PER_USER, N_NEGATIVES = 16, 120, 12, 20


@pytest.fixture
def candidate_run(tmp_path: Path) -> tuple[Path, Path]:
    """A small timestamped ml-100k and its candidate file (latest holdout): (data root, file)."""
    root = tmp_path / "data"
    (root / "ml-100k").mkdir(parents=True)
    rng = np.random.default_rng(7)
    lines = [f"{user}\t{item}\t{rng.integers(1, 6)}\t{880000000 + 1000 * position}"
             for user in range(1, N_USERS + 1)
             for position, item in enumerate(rng.choice(np.arange(1, N_ITEMS + 1), size=PER_USER, replace=False))]
    (root / "ml-100k" / "u.data").write_text("\n".join(lines) + "\n")
    path = tmp_path / "candidates.csv"
    assert main(["data", "candidates", "ml-100k", "--data-dir", str(root), "--out", str(path),
                 "--negatives", str(N_NEGATIVES)]) == 0
    return root, path


def fitted_row(config: RunConfig, data, user: int, table: np.ndarray, steps: int) -> np.ndarray:
    """The held-out device's row, by hand in float64: its fresh start (init_device's draws), then ``steps``
    full-batch steps of the loss's gradient with respect to the row alone (items frozen)."""
    dim = config.model.dim
    rng = rng_for(config.seed, "device-init", user)
    rng.choice(dim, size=dim, replace=False)  # the dense mask's draw: every entry active
    row = rng.normal(0.0, 0.1, dim)
    train = np.sort(data.train[user].indices.astype(np.int64))
    interacted = np.union1d(train, np.union1d(data.validation[user].indices, data.test[user].indices))
    excluded = interacted if config.train.negatives_from == "unrated" else train
    pool = np.setdiff1d(np.arange(data.n_items), excluded)
    draw = rng_for(config.seed, "device-negatives", 0, user).integers(
        0, pool.size, size=(config.fed.local_epochs, train.size, config.train.negatives))
    negatives = pool[draw[0]]  # [n_train, negatives]: the first epoch's, as reconstruction uses
    positive, negative = table[train].astype(np.float64), table[negatives].astype(np.float64)
    m, v = np.zeros(dim), np.zeros(dim)
    for step in range(1, steps + 1):
        s_pos, s_neg = positive @ row, negative @ row
        if config.train.loss == "bpr":  # mean softplus(s_neg - s_pos) over every (positive, negative) pair
            weight = 1 / (1 + np.exp(-(s_neg - s_pos[:, None])))
            gradient = (weight[:, :, None] * (negative - positive[:, None, :])).mean(axis=(0, 1))
        else:  # mean binary cross-entropy over n (1 + negatives) instances
            count = s_pos.size + s_neg.size
            gradient = (-(1 / (1 + np.exp(s_pos)))[:, None] * positive).sum(0) / count
            gradient += ((1 / (1 + np.exp(-s_neg)))[:, :, None] * negative).sum((0, 1)) / count
        gradient += config.train.l2_reg * row  # 0.5 * |row|^2 counted once per positive, divided by their count
        if config.fed.user_optimizer == "sgd":
            row = row - config.fed.local_lr * gradient
            continue
        m = 0.9 * m + 0.1 * gradient
        v = 0.999 * v + 0.001 * gradient**2
        row = row - config.fed.local_lr / (1 - 0.9**step) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**step) + 1e-8)
    return row


def by_hand(config: RunConfig, data, user: int, row: np.ndarray, table: np.ndarray, split: str) -> dict[str, float]:
    """Full-ranking Recall@20 / NDCG@20 and sampled HR@10 / NDCG@10 of one user, rank counted by hand."""
    scores = table.astype(np.float64) @ row
    held = int((data.validation if split == "validation" else data.test)[user].indices[0])
    excluded = set(data.train[user].indices) | (set(data.validation[user].indices) if split == "test" else set())
    ahead = sum(1 for item in range(data.n_items) if item not in excluded and item != held and scores[item] > scores[held])
    negatives = (data.validation_negatives if split == "validation" else data.test_negatives)[user]
    rank = 1 + int((scores[negatives] >= scores[held]).sum())  # ties count against the model
    return {"recall@20": float(ahead < 20), "ndcg@20": 1 / np.log2(ahead + 2) if ahead < 20 else 0.0,
            "sampled_hr@10": float(rank <= 10), "sampled_ndcg@10": 1 / np.log2(rank + 1) if rank <= 10 else 0.0}


@pytest.mark.parametrize("method", [
    {"fed.user-state": "reconstruct", "fed.user-steps": 10, "fed.aggregation": "weighted", "fed.item-lr": 1.0},  # FedRecon
    {"fed.user-steps": 0, "fed.unseen-steps": 7, "fed.aggregation": "sum"},  # FedMF: a stored row, fitted afresh when unseen
    {"train.loss": "bce", "train.negatives-from": "unrated", "train.l2-reg": 0.0, "fed.user-optimizer": "sgd",
     "fed.local-lr": 0.1, "fed.user-steps": 0, "fed.unseen-steps": 5, "fed.evaluate-model": "local",
     "fed.aggregation": "client-mean"},  # PFedRec: seen devices rank with their own models, unseen ones with the server's
], ids=["fedrecon", "fedmf", "pfedrec"])
def test_held_out_metrics_equal_a_fit_by_hand_against_the_servers_table(candidate_run, tmp_path, monkeypatch, method):
    root, path = candidate_run
    rows: dict[int, np.ndarray] = {}  # the row each device ranked with, at its last evaluation

    def evaluate_splits(config, state, data, item_weights, network=None):
        rows[data.user_id] = state.user_row.copy()
        return protocol_evaluate_splits(config, state, data, item_weights, network)

    monkeypatch.setattr(protocol, "evaluate_splits", evaluate_splits)
    config = RunConfig.from_flat({
        "data.data-dir": str(root), "eval.candidates": str(path), "eval.sampled-negatives": N_NEGATIVES,
        "results-dir": str(tmp_path / "results"), "model.dim": 8, "sparse.policy": "dense", "sparse.density": 1.0,
        "train.negatives": 4, "fed.fraction-train": 1.0, "fed.eval-fraction": 1.0, "num-server-rounds": 2,
        "fed.unseen-users": 0.25, **method,
    })
    data = load_run_data(config)
    population = population_of(data, config)
    run_dir = new_run_dir(config.results_dir, "reference")
    summary = run_federation(config, population, InProcessTransport(config, data), run_dir)
    last = read_jsonl(run_dir / "rounds.jsonl")[-1]
    table = read_checkpoint(run_dir / CHECKPOINT)["server.item-weight"]  # the table the last evaluation sent
    steps = config.fed.unseen_steps or config.fed.user_steps
    expected: dict[str, list[float]] = {}
    for user in population.unseen:
        row = fitted_row(config, data, int(user), table, steps)
        np.testing.assert_allclose(rows[int(user)], row, rtol=1e-4, atol=1e-6)  # the device fitted the same row
        for split in ("validation", "test"):
            for name, value in by_hand(config, data, int(user), row, table, split).items():
                expected.setdefault(f"unseen_{split}_{name}", []).append(value)
    assert population.unseen.size == 4 and last["unseen_evaluated_clients"] == 4
    for key, values in expected.items():
        assert last[key] == pytest.approx(np.mean(values), abs=1e-6), key
    assert last["unseen_sampled_hr@10"] == last["unseen_test_sampled_hr@10"]  # the headline keys are the test ones
    # selection reads the seen devices' validation only; the held-out figures are reported beside it
    assert summary["selection"] == "best validation_sampled_hr@10" and summary["unseen_users"] == 4
    best = read_jsonl(run_dir / "rounds.jsonl")[summary["best_validation_round"] - 1]
    assert summary["best_unseen_test_sampled_hr@10"] == best["unseen_test_sampled_hr@10"]
    assert summary["unseen_recall@20"] == last["unseen_recall@20"]


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------

def test_a_resumed_run_keeps_the_split_and_equals_an_uninterrupted_one(tmp_path):
    config = synthetic(tmp_path, **{"fed.fraction-train": 1.0, "num-server-rounds": 4, "sparse.policy": "dense",
                                    "sparse.density": 1.0})
    data = load_dataset(config.data, config.seed)
    whole_dir = new_run_dir(config.results_dir, "whole")
    run_federation(config, population_of(data, config), InProcessTransport(config, data), whole_dir)
    half = config.with_overrides({"num-server-rounds": 2})
    run_dir = new_run_dir(config.results_dir, "resumed")
    transport = Recording(config, data)
    run_federation(half, population_of(data, half), transport, run_dir)
    population = population_of(data, config)
    assert np.array_equal(read_checkpoint(run_dir / CHECKPOINT)[UNSEEN_ARRAY], population.unseen)
    run_federation(config, population, transport, run_dir, resume=True)
    unseen = {int(user) for user in population.unseen}
    assert all(not users & unseen for kind, _, users, _ in transport.sent if kind in TRAINING_KINDS)
    assert any(server_round == 4 and users == unseen for kind, server_round, users, _ in transport.sent if kind == "evaluate")
    resumed, whole = read_jsonl(run_dir / "rounds.jsonl"), read_jsonl(whole_dir / "rounds.jsonl")
    for left, right in zip(resumed, whole, strict=True):
        for key in ("unseen_test_recall@20", "unseen_validation_recall@20", "unseen_evaluated_clients", "recall@20"):
            assert left[key] == pytest.approx(right[key], abs=1e-7), key
    # a federation that would hold out other devices (another seed's split) is refused, naming the checkpoint
    other = replace(population, users=np.union1d(population.users, population.unseen[:1]), unseen=population.unseen[1:])
    with pytest.raises(CheckpointError, match="held out 10 device"):
        run_federation(config.with_overrides({"num-server-rounds": 5}), other, transport, run_dir, resume=True)


def test_simulate_reports_the_held_out_devices_in_its_round_lines_and_summary(tmp_path):
    import subprocess

    flags = ["--dataset", "synthetic", "--data.synthetic-users", "30", "--data.synthetic-items", "30", "--dim", "8",
             "--num-server-rounds", "1", "--fed.nmf-rounds", "1", "--fed.unseen-users", "0.2",
             "--results-dir", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "fedsparse.cli", "simulate", *flags], capture_output=True, text=True,
                            check=True, env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin",
                                             "OMP_NUM_THREADS": "1"})
    assert "unseen Recall@20 " in result.stderr + result.stdout
    assert re.search(r"held out of training \(final\) +6 devices: Recall@20 [0-9.]+$", result.stdout, re.MULTILINE)
