"""Candidate files (eval.candidates): writer -> reader, every bad input named by file and line, and the
central trainer and the in-process federation ranking exactly the file's candidates; best-round
selection by validation HR@10 under the sampled protocol."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedsparse.central.train as train_module
from fedsparse.central.models import build_model
from fedsparse.central.train import evaluate_sampled, train_centralised
from fedsparse.cli import main
from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import DataFormatError, load_dataset, load_run_data
from fedsparse.experiments.flower_run import run_config_overrides
from fedsparse.federation.device import DeviceData, DeviceState, evaluate_device
from fedsparse.federation.engine import Reply, evaluate_round, run_federation, start_run
from fedsparse.federation.inprocess import InProcessTransport, population_of, run_inprocess
from fedsparse.rng import torch_generator_for
from fedsparse.run_files import read_jsonl

N_NEGATIVES = 20  # > 10, so HR@10 depends on which negatives are ranked
N_USERS, N_ITEMS, PER_USER = 12, 80, 9


def udata_text(seed: int = 0) -> str:
    """A u.data (original ids from 1, items 1..N_ITEMS) whose timestamps tie often, latest ones included."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, N_USERS + 1):
        for item in rng.choice(np.arange(1, N_ITEMS + 1), size=PER_USER, replace=False):
            lines.append(f"{user}\t{item}\t{rng.integers(1, 6)}\t{880000000 + 1000 * int(rng.integers(0, 3))}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    directory = tmp_path / "data" / "ml-100k"
    directory.mkdir(parents=True)
    (directory / "u.data").write_text(udata_text())
    return tmp_path / "data"


def write_file(data_root: Path, out: Path, *extra: str) -> Path:
    code = main(["data", "candidates", "ml-100k", "--data-dir", str(data_root), "--out", str(out),
                 "--negatives", str(N_NEGATIVES), *extra])
    assert code == 0
    return out


def run_config(data_root: Path, candidates: Path | str, **overrides) -> RunConfig:
    return RunConfig.from_flat({
        "data.data-dir": str(data_root), "eval.candidates": str(candidates), "eval.sampled-negatives": N_NEGATIVES,
        "results-dir": str(data_root.parent / "results"), **overrides,
    })


def file_rows(path: Path) -> dict[int, dict[str, object]]:
    """The file read independently of fedsparse: original ids per user."""
    with open(path, newline="") as stream:
        return {int(row["user"]): {"val": int(row["val_item"]), "test": int(row["test_item"]),
                                   "val_negatives": [int(v) for v in row["val_negatives"].split()],
                                   "test_negatives": [int(v) for v in row["test_negatives"].split()]}
                for row in csv.DictReader(stream)}


def test_writer_then_reader_round_trip(data_root, tmp_path):
    path = write_file(data_root, tmp_path / "candidates.csv")
    rows = file_rows(path)
    config = run_config(data_root, path)
    data = load_run_data(config)
    loo = load_dataset(RunConfig.from_flat({"data.data-dir": str(data_root), "data.split": "loo"}).data, 0)
    # the default tie rule is the project's leave-one-out split: same held-out items, same training rows
    assert (data.test != loo.test).nnz == 0 and (data.validation != loo.validation).nnz == 0
    assert (data.train != loo.train).nnz == 0
    raw = pd.read_csv(data_root / "ml-100k" / "u.data", sep="\t", header=None, names=["user", "item", "rating", "time"])
    assert sorted(rows) == sorted(raw.user.unique())
    for index, user in enumerate(data.user_ids):
        row, rated = rows[int(user)], set(raw.item[raw.user == user])
        assert data.item_ids[data.test.indices[data.test.indptr[index]]] == row["test"]
        assert data.item_ids[data.validation.indices[data.validation.indptr[index]]] == row["val"]
        assert list(data.item_ids[data.validation_negatives[index]]) == row["val_negatives"]
        assert list(data.item_ids[data.test_negatives[index]]) == row["test_negatives"]
        negatives = set(row["val_negatives"]) | set(row["test_negatives"])
        assert len(negatives) == 2 * N_NEGATIVES and not negatives & rated  # disjoint, never rated
        assert {row["val"], row["test"]} <= rated
        assert data.train[index].nnz == len(rated) - 2
    # seeded: the same seed writes the same bytes, another seed other negatives
    assert write_file(data_root, tmp_path / "again.csv").read_bytes() == path.read_bytes()
    assert write_file(data_root, tmp_path / "other.csv", "--seed", "1").read_bytes() != path.read_bytes()


def test_file_first_reproduces_pandas_rank_first(data_root, tmp_path):
    """PFedRec's split: rank(method='first', ascending=False) per user; rank 1 = test, 2 = validation."""
    rows = file_rows(write_file(data_root, tmp_path / "c.csv", "--ties", "file-first"))
    raw = pd.read_csv(data_root / "ml-100k" / "u.data", sep="\t", header=None, names=["user", "item", "rating", "time"])
    raw["rank"] = raw.groupby("user")["time"].rank(method="first", ascending=False)
    test = raw[raw["rank"] == 1].set_index("user")["item"]
    validation = raw[raw["rank"] == 2].set_index("user")["item"]
    assert {user: row["test"] for user, row in rows.items()} == test.to_dict()
    assert {user: row["val"] for user, row in rows.items()} == validation.to_dict()
    default = file_rows(write_file(data_root, tmp_path / "d.csv"))
    assert any(default[user]["test"] != rows[user]["test"] for user in rows)  # the fixture's ties matter


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and the line
# --------------------------------------------------------------------------------------------------

def _fields(lines, number):
    return lines[number - 1].split(",")


def _set(lines, number, column, value):
    fields = _fields(lines, number)
    fields[column] = value
    lines[number - 1] = ",".join(fields)


def _negatives(lines, number, column):
    return _fields(lines, number)[column].split()


def _set_negatives(lines, number, column, items):
    _set(lines, number, column, " ".join(items))


BAD = {
    "header": (lambda lines, data: lines.__setitem__(0, "user,val,test,val_negatives,test_negatives"), 1, "expected the header"),
    "malformed line": (lambda lines, data: lines.__setitem__(2, "1,2,3"), 3, "expected 5 comma-separated fields"),
    "unknown user": (lambda lines, data: _set(lines, 2, 0, "999"), 2, "unknown user '999'"),
    "user not a number": (lambda lines, data: _set(lines, 2, 0, "abc"), 2, "unknown user 'abc'"),
    "duplicate user": (lambda lines, data: _set(lines, 3, 0, _fields(lines, 2)[0]), 3, "already has a row (line 2)"),
    "unknown held-out item": (lambda lines, data: _set(lines, 2, 1, "5000"), 2, "val_item: unknown item '5000'"),
    "validation equals test": (lambda lines, data: _set(lines, 2, 2, _fields(lines, 2)[1]), 2,
                               "val_item and test_item are the same"),
    "held-out item not a positive": (lambda lines, data: _set(lines, 2, 2, _negatives(lines, 2, 3)[0]), 2,
                                     "is not an interaction of user"),
    "fewer negatives": (lambda lines, data: _set_negatives(lines, 2, 3, _negatives(lines, 2, 3)[:-1]), 2,
                        f"val_negatives holds {N_NEGATIVES - 1} items, expected eval.sampled-negatives = {N_NEGATIVES}"),
    "more negatives": (lambda lines, data: _set_negatives(lines, 2, 4, _negatives(lines, 2, 4) + [_negatives(lines, 3, 4)[0]]), 2,
                       f"test_negatives holds {N_NEGATIVES + 1} items"),
    "duplicate negative": (
        lambda lines, data: _set_negatives(lines, 2, 3, _negatives(lines, 2, 3)[:-1] + _negatives(lines, 2, 3)[:1]), 2,
        "val_negatives repeats item"),
    "unknown negative": (lambda lines, data: _set_negatives(lines, 2, 4, _negatives(lines, 2, 4)[:-1] + ["7777"]), 2,
                         "test_negatives: unknown item '7777'"),
    "positive among negatives": (
        lambda lines, data: _set_negatives(lines, 2, 3, _negatives(lines, 2, 3)[:-1] + [data["train_item"]]), 2,
        "an interaction of user"),
    "held-out item among negatives": (
        lambda lines, data: _set_negatives(lines, 2, 4, _negatives(lines, 2, 4)[:-1] + [_fields(lines, 2)[2]]), 2,
        "an interaction of user"),
    "validation and test negatives overlap": (
        lambda lines, data: _set_negatives(lines, 2, 4, _negatives(lines, 2, 4)[:-1] + _negatives(lines, 2, 3)[:1]), 2,
        "in both val_negatives and test_negatives"),
    "a user missing": (lambda lines, data: lines.pop(5), None, f"1 of the {N_USERS} users of ml-100k have no row"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_candidate_files_name_the_file_and_line(case, data_root, tmp_path):
    good = write_file(data_root, tmp_path / "good.csv")
    lines = good.read_text().splitlines()
    user = int(lines[1].split(",")[0])
    raw = pd.read_csv(data_root / "ml-100k" / "u.data", sep="\t", header=None, names=["user", "item", "rating", "time"])
    held_out = {int(v) for v in lines[1].split(",")[1:3]}
    train_item = str(next(item for item in raw.item[raw.user == user] if item not in held_out))
    mutate, line, fragment = BAD[case]
    mutate(lines, {"train_item": train_item})
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as error:
        load_run_data(run_config(data_root, bad))
    message = str(error.value)
    assert message.startswith(f"{bad}:{line}: " if line else f"{bad}: "), message
    assert fragment in message, message


def test_a_bad_file_stops_simulate_before_any_round_or_output(data_root, tmp_path, capsys):
    good = write_file(data_root, tmp_path / "good.csv")
    lines = good.read_text().splitlines()
    _set(lines, 4, 1, _fields(lines, 4)[2])  # validation item = test item on line 4
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    results = tmp_path / "results"
    code = main(["simulate", "--data-dir", str(data_root), "--eval.candidates", str(bad), "--eval.sampled-negatives",
                 str(N_NEGATIVES), "--results-dir", str(results), "--num-server-rounds", "1", "--no-progress"])
    assert code == 2
    assert f"{bad}:4: val_item and test_item are the same" in capsys.readouterr().err
    assert not results.exists()


def test_candidates_replace_the_split_and_need_timestamps(data_root, tmp_path):
    with pytest.raises(ConfigError, match="eval.candidates"):
        RunConfig.from_flat({"eval.candidates": "x.csv", "data.split": "random"})
    with pytest.raises(ConfigError, match="data.loo-ties"):
        RunConfig.from_flat({"data.loo-ties": "latest"})
    assert RunConfig.from_flat({"eval.candidates": "x.csv", "data.split": "loo"}).eval.candidates == "x.csv"
    # Flower's app runs from a copy: the path travels absolute
    overrides = run_config_overrides(RunConfig.from_flat({"eval.candidates": "x.csv"}))
    assert f'"eval.candidates"="{(Path.cwd() / "x.csv").resolve()}"' in overrides
    with pytest.raises(ConfigError, match="timestamps"):
        main_config = RunConfig.from_flat({"data.dataset": "synthetic", "eval.candidates": "x.csv"})
        load_run_data(main_config)


# --------------------------------------------------------------------------------------------------
# Exactly the file's candidates: central trainer and in-process federation against a slow reference
# --------------------------------------------------------------------------------------------------

def slow_reference(path: Path, data, score, split: str) -> tuple[float, float]:
    """HR@10 and NDCG@10 from the file read with csv, original ids mapped by hand, one user at a time;
    rank = 1 + negatives scoring >= the held-out item (ties against the model)."""
    rows = file_rows(path)
    item_index = {int(item): index for index, item in enumerate(data.item_ids)}
    hits, gains = [], []
    for index, user in enumerate(data.user_ids):
        row = rows[int(user)]
        held_out = row["val" if split == "validation" else "test"]
        negatives = row["val_negatives" if split == "validation" else "test_negatives"]
        scores = [score(index, item_index[item]) for item in [held_out, *negatives]]
        rank = 1 + sum(value >= scores[0] for value in scores[1:])
        hits.append(float(rank <= 10))
        gains.append(1.0 / np.log2(rank + 1) if rank <= 10 else 0.0)
    return float(np.mean(hits)), float(np.mean(gains))


@pytest.mark.parametrize("split", ["validation", "test"])
def test_central_trainer_ranks_exactly_the_files_candidates(split, data_root, tmp_path):
    path = write_file(data_root, tmp_path / "c.csv")
    config = run_config(data_root, path, **{"model.dim": 4})
    data = load_run_data(config)
    model = build_model(config.model, data.n_users, data.n_items, torch_generator_for(0, "test-model"))
    fast = evaluate_sampled(model, data, config, split)
    with torch.no_grad():
        scores = model.score_all(torch.arange(data.n_users)).numpy()
    hr, ndcg = slow_reference(path, data, lambda user, item: scores[user, item], split)
    assert 0.0 < hr < 1.0  # negatives matter
    assert fast["sampled_hr@10"] == pytest.approx(hr)
    assert fast["sampled_ndcg@10"] == pytest.approx(ndcg)
    assert fast["sampled_users_evaluated"] == data.n_users


def test_inprocess_federation_devices_rank_exactly_the_files_candidates(data_root, tmp_path):
    path = write_file(data_root, tmp_path / "c.csv")
    config = run_config(data_root, path, **{"model.dim": 4, "sparse.policy": "dense", "fed.eval-fraction": 1.0,
                                            "fed.nmf-init": "none"})
    data = load_run_data(config)
    population = population_of(data, config)
    transport = InProcessTransport(config, data)
    state = start_run(config, population, transport)
    metrics, _ = evaluate_round(config, state.server, population, transport, state.device_init, 1)
    items = state.server.download(None).table.decode()[0]
    rows = {user: DeviceState.from_arrays(transport.states[user]).user_row for user in range(data.n_users)}
    for split in ("validation", "test"):
        hr, ndcg = slow_reference(path, data, lambda user, item: float(items[item] @ rows[user]), split)
        assert metrics[f"{split}_sampled_hr@10"] == pytest.approx(hr)
        assert metrics[f"{split}_sampled_ndcg@10"] == pytest.approx(ndcg)
    assert metrics["evaluated_clients"] == data.n_users
    # the device's own partition carries its negatives; without them a candidate run refuses to draw its own
    device = DeviceData.of(data, 0)
    assert np.array_equal(device.test_negatives, data.test_negatives[0])
    bare = DeviceData.from_interactions(data.train, data.validation, data.test, 0)
    with pytest.raises(ValueError, match="holds no candidate negatives"):
        evaluate_device(config, DeviceState.from_arrays(transport.states[0]), bare, items, "test")


# --------------------------------------------------------------------------------------------------
# The best round: validation sampled HR@10 under the sampled protocol, validation Recall@20 otherwise
# --------------------------------------------------------------------------------------------------

VALIDATION_HR = {1: 0.2, 2: 0.5, 3: 0.5, 4: 0.1}  # best at 2 and 3: a tie goes to the later round
VALIDATION_RECALL = {1: 0.9, 2: 0.1, 3: 0.2, 4: 0.3}  # best at 1


class ScriptedEvaluation(InProcessTransport):
    """Real evaluation replies whose selection metrics are replaced by a script per round."""

    def send(self, kind, server_round, messages, settings):
        replies = super().send(kind, server_round, messages, settings)
        if kind != "evaluate":
            return replies
        scripted = {
            "validation-sampled_hr@10": VALIDATION_HR[server_round], "validation-recall@20": VALIDATION_RECALL[server_round],
            "test-sampled_hr@10": server_round / 10, "test-recall@20": server_round / 100,
        }
        return {user: Reply(reply.arrays, {**reply.metrics, **scripted}) for user, reply in replies.items()}


@pytest.mark.parametrize("sampled", [True, False])
def test_federation_picks_the_best_round_by_validation_hr_under_the_sampled_protocol(sampled, data_root, tmp_path):
    path = write_file(data_root, tmp_path / "c.csv")
    overrides = {"model.dim": 4, "sparse.policy": "dense", "fed.nmf-init": "none", "num-server-rounds": 4}
    config = run_config(data_root, path, **overrides) if sampled else RunConfig.from_flat(
        {"data.data-dir": str(data_root), "results-dir": str(tmp_path / "r"), **overrides})
    data = load_run_data(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run_federation(config, population_of(data, config), ScriptedEvaluation(config, data), run_dir)
    if sampled:
        assert (summary["best_validation_round"], summary["best_test_sampled_hr@10"]) == (3, pytest.approx(0.3))
        assert summary["selection"] == "best validation_sampled_hr@10"
        assert summary["best_validation_sampled_hr@10"] == pytest.approx(0.5)
    else:
        assert (summary["best_validation_round"], summary["best_test_recall@20"]) == (1, pytest.approx(0.01))
        assert summary["selection"] == "best validation_recall@20"
    assert [r["round"] for r in read_jsonl(run_dir / "rounds.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("sampled", [True, False])
def test_central_trainer_picks_the_best_epoch_by_validation_hr_under_the_sampled_protocol(
    sampled, data_root, tmp_path, monkeypatch
):
    path = write_file(data_root, tmp_path / "c.csv")
    overrides = {"model.dim": 4, "sparse.policy": "dense", "train.epochs": 4, "train.patience": 0, "train.batch-size": 32}
    config = run_config(data_root, path, **overrides) if sampled else RunConfig.from_flat(
        {"data.data-dir": str(data_root), "results-dir": str(tmp_path / "r"), **overrides})
    epoch = {"validation": 0, "sampled": 0}
    real_evaluate, real_sampled = train_module.evaluate, train_module.evaluate_sampled

    def evaluate(model, data, config, split):
        if split != "validation":
            return real_evaluate(model, data, config, split)
        epoch["validation"] += 1
        return {**real_evaluate(model, data, config, split), "recall@20": VALIDATION_RECALL[epoch["validation"]]}

    def evaluate_sampled_scripted(model, data, config, split):
        if split != "validation":
            return real_sampled(model, data, config, split)
        epoch["sampled"] += 1
        return {**real_sampled(model, data, config, split), "sampled_hr@10": VALIDATION_HR[epoch["sampled"]]}

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "evaluate_sampled", evaluate_sampled_scripted)
    result = train_centralised(config, show_progress=False)
    if sampled:
        assert result.summary["best_epoch"] == 3 and result.summary["selection"] == "best validation sampled_hr@10"
        assert result.summary["validation_sampled_hr@10"] == pytest.approx(0.5)
        assert "sampled_hr@10" in result.summary  # the test score at the best epoch
        records = read_jsonl(result.run_dir / "metrics.jsonl")
        assert [r["validation_sampled_hr@10"] for r in records] == [VALIDATION_HR[e] for e in range(1, 5)]
    else:
        assert result.summary["best_epoch"] == 1 and result.summary["selection"] == "best validation recall@20"
        assert "sampled_hr@10" not in result.summary


def test_a_candidate_federation_runs_end_to_end(data_root, tmp_path):
    path = write_file(data_root, tmp_path / "c.csv")
    config = run_config(data_root, path, **{"model.dim": 4, "num-server-rounds": 2, "fed.eval-fraction": 1.0})
    run_dir, summary = run_inprocess(config)
    records = read_jsonl(run_dir / "rounds.jsonl")
    assert all("validation_sampled_hr@10" in r and "test_sampled_hr@10" in r and "recall@20" in r for r in records)
    best = max(records, key=lambda r: (r["validation_sampled_hr@10"], r["round"]))
    assert summary["best_validation_round"] == best["round"]
    assert summary["best_test_sampled_hr@10"] == best["test_sampled_hr@10"]


def test_the_writer_refuses_what_it_cannot_split(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "ml-100k").mkdir(parents=True)
    (root / "ml-100k" / "u.data").write_text("1\t1\t5\t10\n1\t2\t5\t11\n1\t3\t5\t12\n2\t1\t5\t10\n2\t4\t5\t11\n")
    out = tmp_path / "c.csv"
    assert main(["data", "candidates", "ml-100k", "--data-dir", str(root), "--out", str(out), "--negatives", "1"]) == 2
    assert "user 2 with 2" in capsys.readouterr().err and not out.exists()
    (root / "lastfm-2k").mkdir()
    (root / "lastfm-2k" / "user_artists.dat").write_text("userID\tartistID\tweight\n1\t2\t3\n1\t3\t1\n1\t4\t9\n")
    assert main(["data", "candidates", "lastfm-2k", "--data-dir", str(root), "--out", str(out)]) == 2
    assert "timestamps" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------------------------------
# Random leave-one-out (--holdout random): candidate files for data without timestamps
# --------------------------------------------------------------------------------------------------

LIGHTGCN_USERS, LIGHTGCN_ITEMS, LIGHTGCN_PER_USER = 33, 260, 8  # 260 - 8 >= 2 x 99 never-rated items per user


@pytest.fixture
def untimed_root(tmp_path: Path) -> Path:
    """ml-1m as the shared copy holds it: LightGCN train.txt + test.txt, implicit pairs, no timestamps."""
    directory = tmp_path / "untimed" / "ml-1m"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(3)
    train, test = [], []
    for user in range(LIGHTGCN_USERS):
        # consecutive blocks cover every item (ids are remapped over the items that occur), in a random order
        block = (user * LIGHTGCN_PER_USER + np.arange(LIGHTGCN_PER_USER)) % LIGHTGCN_ITEMS
        items = [int(i) for i in rng.permutation(block)]
        train.append(" ".join(map(str, [user, *items[:6]])))
        test.append(" ".join(map(str, [user, *items[6:]])))
    (directory / "train.txt").write_text("\n".join(train) + "\n")
    (directory / "test.txt").write_text("\n".join(test) + "\n")
    return tmp_path / "untimed"


def untimed_rated(root: Path) -> dict[int, set[int]]:
    """Every item each user has in the LightGCN files, read without fedsparse."""
    rated: dict[int, set[int]] = {}
    for name in ("train.txt", "test.txt"):
        for line in (root / "ml-1m" / name).read_text().split("\n"):
            if line.strip():
                user, *items = (int(value) for value in line.split())
                rated.setdefault(user, set()).update(items)
    return rated


def write_random(root: Path, out: Path, *extra: str) -> Path:
    assert main(["data", "candidates", "ml-1m", "--data-dir", str(root), "--out", str(out), "--holdout", "random",
                 *extra]) == 0
    return out


def test_random_holdout_writes_every_rule_for_data_without_timestamps(untimed_root, tmp_path, capsys):
    path = write_random(untimed_root, tmp_path / "random.csv")
    assert "holdout random" in capsys.readouterr().out  # the command says which holdout it used
    assert path.read_text().splitlines()[0] == "user,val_item,test_item,val_negatives,test_negatives"  # nothing new
    rows, rated = file_rows(path), untimed_rated(untimed_root)
    assert sorted(rows) == sorted(rated)
    for user, row in rows.items():
        assert row["val"] != row["test"] and {row["val"], row["test"]} <= rated[user]
        assert len(row["val_negatives"]) == len(set(row["val_negatives"])) == 99
        assert len(row["test_negatives"]) == len(set(row["test_negatives"])) == 99
        assert not set(row["val_negatives"]) & set(row["test_negatives"])  # disjoint
        assert not (set(row["val_negatives"]) | set(row["test_negatives"])) & rated[user]  # never rated
    # seeded: the same seed writes the same bytes; another seed other held-out items and negatives
    assert write_random(untimed_root, tmp_path / "again.csv").read_bytes() == path.read_bytes()
    other = file_rows(write_random(untimed_root, tmp_path / "other.csv", "--seed", "1"))
    assert any(other[user]["test"] != rows[user]["test"] for user in rows)
    assert any(other[user]["val_negatives"] != rows[user]["val_negatives"] for user in rows)


def test_random_holdout_draws_each_users_pair_uniformly(tmp_path):
    """Over seeds, every item of a user is held out for test about equally often (a seeded uniform draw)."""
    from fedsparse.data.candidates import make_candidates

    users, items = np.zeros(4, dtype=np.int64), np.array([3, 1, 2, 0], dtype=np.int64)
    drawn = [make_candidates(users, items, None, 1, 20, "file-last", 2, seed, holdout="random") for seed in range(800)]
    tests = np.bincount([int(c.test_items[0]) for c in drawn], minlength=4)
    assert all(int(c.validation_items[0]) != int(c.test_items[0]) for c in drawn)
    assert tests.min() > 150 and tests.max() < 250  # 200 expected each


def test_latest_holdout_on_data_without_timestamps_is_refused_suggesting_random(untimed_root, tmp_path, capsys):
    out = tmp_path / "c.csv"
    for extra in ([], ["--holdout", "latest"]):  # latest is the default
        assert main(["data", "candidates", "ml-1m", "--data-dir", str(untimed_root), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "has no timestamps" in err and "--holdout random" in err and "not comparable" in err
        assert not out.exists()


def test_a_random_candidate_file_splits_and_runs_data_without_timestamps(untimed_root, tmp_path):
    path = write_random(untimed_root, tmp_path / "random.csv")
    rows = file_rows(path)
    config = RunConfig.from_flat({
        "data.dataset": "ml-1m", "data.data-dir": str(untimed_root), "eval.candidates": str(path),
        "results-dir": str(tmp_path / "results"), "model.dim": 4, "num-server-rounds": 2, "fed.eval-fraction": 1.0,
        "sparse.policy": "dense", "sparse.density": 1.0,
    })
    data = load_run_data(config)
    for index, user in enumerate(data.user_ids):
        assert data.item_ids[data.test.indices[data.test.indptr[index]]] == rows[int(user)]["test"]
        assert data.item_ids[data.validation.indices[data.validation.indptr[index]]] == rows[int(user)]["val"]
        assert data.train[index].nnz == LIGHTGCN_PER_USER - 2  # train and test files alike: every pair but the two
    _, summary = run_inprocess(config, data)
    assert summary["best_validation_round"] in (1, 2) and "best_test_sampled_hr@10" in summary


def test_random_holdout_also_works_with_timestamps_and_ignores_ties(data_root, tmp_path, capsys):
    first = write_file(data_root, tmp_path / "a.csv", "--holdout", "random")
    assert "holdout random" in capsys.readouterr().out
    second = write_file(data_root, tmp_path / "b.csv", "--holdout", "random", "--ties", "file-first")
    assert first.read_bytes() == second.read_bytes()
    latest = write_file(data_root, tmp_path / "c.csv")
    assert "holdout latest, ties file-last" in capsys.readouterr().out
    # the negatives depend only on the user's items and the seed: the same under both holdouts
    assert [r["val_negatives"] for r in file_rows(first).values()] == [r["val_negatives"] for r in file_rows(latest).values()]
