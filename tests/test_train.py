"""Centralised trainer and CLI end to end on small data: files written, selection on validation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsparse.central.train import train_centralised
from fedsparse.cli import main as cli_main
from fedsparse.config import RunConfig
from fedsparse.data.registry import DATA_ENV
from fedsparse.run_files import read_jsonl

SHARED_DATA = Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")

SMALL = {
    "data.dataset": "synthetic",
    "data.synthetic-users": 300,
    "data.synthetic-items": 120,
    "data.synthetic-interactions-per-user": 15,
    "model.dim": 16,
    "train.epochs": 6,
    "train.batch-size": 256,
    "train.lr": 0.01,
}


@pytest.mark.parametrize("model, loss", [("mf", "bpr"), ("neumf", "bce")])
def test_training_writes_run_directory_and_beats_random(tmp_path, model, loss):
    config = RunConfig.from_flat({**SMALL, "model.name": model, "train.loss": loss, "results-dir": str(tmp_path)})
    result = train_centralised(config, show_progress=False)
    assert json.loads((result.run_dir / "config.json").read_text())["config"]["model.name"] == model
    epochs = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [record["epoch"] for record in epochs] == list(range(1, result.summary["epochs_run"] + 1))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    for key in ("recall@20", "ndcg@20", "train_seconds", "best_epoch", "peak_rss_bytes"):
        assert key in summary
    # The best epoch is the one with the highest validation recall, never a test-set pick.
    best = max(epochs, key=lambda record: record["validation_recall@20"])
    assert summary["best_epoch"] == best["epoch"]
    # 20 of 120 items at random gives recall ~ 0.17; the clustered data is learnable far beyond it.
    assert summary["recall@20"] > 0.3


def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    config = RunConfig.from_flat({**SMALL, "train.epochs": 40, "train.lr": 0.2, "train.patience": 1,
                                  "results-dir": str(tmp_path)})
    result = train_centralised(config, show_progress=False)
    epochs = read_jsonl(result.run_dir / "metrics.jsonl")
    assert len(epochs) < 40
    assert epochs[-1]["validation_recall@20"] <= epochs[-2]["validation_recall@20"]


def test_same_seed_gives_same_summary_metrics(tmp_path):
    config = RunConfig.from_flat({**SMALL, "train.epochs": 2, "results-dir": str(tmp_path)})
    first = train_centralised(config, show_progress=False).summary
    again = train_centralised(config, show_progress=False).summary
    assert first["recall@20"] == again["recall@20"] and first["ndcg@20"] == again["ndcg@20"]


def test_cli_train_rejects_unknown_key_before_work(tmp_path, capsys):
    code = cli_main(["train", "--results-dir", str(tmp_path), "--model", "transformer"])
    assert code == 2
    assert "model.name must be one of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k").is_dir(), reason="shared ml-100k not present")
def test_cli_data_info_and_loo_training_report_both_protocols(tmp_path, capsys):
    assert cli_main(["data", "info", "ml-100k", "--data-dir", str(SHARED_DATA), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["users"], counts["items"], counts["interactions"]) == (943, 1682, 100000)

    code = cli_main(
        ["train", "--no-progress", "--data-dir", str(SHARED_DATA), "--dataset", "ml-100k", "--split", "loo",
         "--epochs", "2", "--dim", "16", "--results-dir", str(tmp_path), "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)  # --json: one object for scripts (the default is a short table)
    assert summary["users_evaluated"] == summary["sampled_users_evaluated"] == 943
    assert 0.0 <= summary["sampled_ndcg@10"] <= summary["sampled_hr@10"] <= 1.0


def test_most_popular_run_is_scored_like_a_trained_model(tmp_path):
    """``model.name = popular``: nothing trains, and its test Recall@20 equals a direct count-based ranking."""
    from fedsparse.data import load_dataset
    from fedsparse.eval.metrics import full_ranking_metrics

    config = RunConfig.from_flat({**SMALL, "model.name": "popular", "results-dir": str(tmp_path)})
    result = train_centralised(config, show_progress=False)
    assert result.summary["epochs_run"] == 0 and "validation_recall@20" in result.summary
    data = load_dataset(config.data, config.seed)
    counts = np.asarray(data.train.sum(axis=0)).ravel()
    expected = full_ranking_metrics(lambda users: torch.from_numpy(np.tile(counts, (len(users), 1)).astype(np.float32)),
                                    data.test, [data.train, data.validation], [10, 20], 1024)
    assert result.summary["recall@20"] == pytest.approx(expected["recall@20"])
