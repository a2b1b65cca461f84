"""Injected device faults, configs that cannot run, and a real kill-and-resume of the run process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import load_dataset
from fedsparse.experiments.flower_run import run_flower
from fedsparse.federation.engine import TIMING_KEYS
from fedsparse.federation.faults import device_fails
from fedsparse.federation.inprocess import InProcessTransport, population_of, run_inprocess
from fedsparse.federation.server_state import clients_per_round, sample_clients
from fedsparse.run_files import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path, **overrides) -> RunConfig:
    flat = {
        "results-dir": str(tmp_path / "results"),
        "num-server-rounds": 3,
        "data.dataset": "synthetic",
        "data.synthetic-users": 30,
        "data.synthetic-items": 40,
        "data.synthetic-interactions-per-user": 8,
        "model.dim": 8,
        "sparse.density": 0.25,
        "fed.fraction-train": 0.5,
        "fed.nmf-rounds": 2,
        **overrides,
    }
    return RunConfig.from_flat(flat)


def expected_failures(config: RunConfig, population, server_round: int) -> set[int]:
    """The sampled devices the fault draw picks in a round (the reference the engine must match)."""
    per_round = clients_per_round(config, population.users.size)
    chosen = population.users[sample_clients(config.seed, server_round, population.users.size, per_round)]
    return {int(user) for user in chosen if device_fails(config, server_round, int(user))}


def test_the_fault_draw_is_seeded_and_has_the_configured_rate():
    config = RunConfig.from_flat({"faults.failure-rate": 0.3})
    draws = [device_fails(config, server_round, user) for server_round in range(1, 11) for user in range(1000)]
    assert draws == [device_fails(config, r, u) for r in range(1, 11) for u in range(1000)]
    assert abs(np.mean(draws) - 0.3) < 3 * np.sqrt(0.3 * 0.7 / len(draws))
    assert not any(device_fails(RunConfig(), r, u) for r in range(1, 4) for u in range(100))


@pytest.mark.parametrize("mode", ["exception", "crash"])
def test_failing_devices_are_counted_and_every_round_completes(tmp_path, mode):
    config = small_config(tmp_path, **{"faults.failure-rate": 0.4, "faults.failure-mode": mode})
    data = load_dataset(config.data, config.seed)
    run_dir, summary = run_inprocess(config, data)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    population = population_of(data, config)
    failures = [len(expected_failures(config, population, record["round"])) for record in rounds]
    assert [record["failed_clients"] for record in rounds] == failures
    assert sum(failures) > 0
    assert [record["round"] for record in rounds] == [1, 2, 3] and np.isfinite(summary["recall@20"])


def test_a_crashed_device_loses_its_private_state(tmp_path):
    config = small_config(tmp_path, **{"faults.failure-rate": 0.4, "faults.failure-mode": "crash", "fed.fraction-train": 1.0})
    data = load_dataset(config.data, config.seed)
    transport = InProcessTransport(config, data)
    users = population_of(data, config).users
    transport.states = {int(user): {"user-row": np.ones(8, dtype=np.float32)} for user in users}
    replies = transport.send("train", 1, {int(user): {} for user in users}, {"send-signal": False})
    crashed = {int(user) for user in users if device_fails(config, 1, int(user))}
    assert crashed and crashed.isdisjoint(transport.states)
    assert all(isinstance(replies[user], str) and "DeviceCrash" in replies[user] for user in crashed)


def test_a_straggler_past_the_round_timeout_is_a_failed_device(tmp_path):
    config = small_config(tmp_path, **{
        "faults.failure-rate": 0.2, "faults.failure-mode": "timeout", "faults.straggler-seconds": 0.3,
        "fed.round-timeout": 0.2, "num-server-rounds": 2,
    })
    data = load_dataset(config.data, config.seed)
    run_dir, _ = run_inprocess(config, data)
    population = population_of(data, config)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    stragglers = [len(expected_failures(config, population, record["round"])) for record in rounds]
    assert sum(stragglers) > 0
    assert [record["failed_clients"] for record in rounds] == stragglers


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fed.clients-per-round": 31}, "exceeds the 30 devices"),
        ({"poison.target-item": 40}, "poison.target-item"),
    ],
)
def test_a_config_that_cannot_run_fails_before_any_output(tmp_path, overrides, message):
    config = small_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        run_inprocess(config)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--fed.clients-per-round", "31"], "exceeds the 30 devices"),
        (["--sparse.density", "1.5"], "sparse.density"),
        (["--num-server-rounds", "-1"], "num-server-rounds"),
        (["--dataset", "no-such-dataset"], "no-such-dataset"),
        (["--fed.no-such-key", "1"], "no-such-key"),
        (["--privacy.secure-aggregation", "true", "--fed.clients-per-node", "2"], "fed.clients-per-node = 1"),
    ],
)
def test_the_flower_engine_rejects_bad_configs_before_starting_flower(tmp_path, flags, message):
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", "--engine", "flower", "--results-dir", str(tmp_path / "out"),
               "--dataset", "synthetic", "--data.synthetic-users", "30", "--data.synthetic-items", "40", *flags]
    env = {**os.environ, "PATH": str(tmp_path / "no-flwr-here")}  # were `flwr` reached, it would not be found
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    flags = ["--engine", "inprocess", "--num-server-rounds", "40", "--dataset", "synthetic",
             "--data.synthetic-users", "200", "--data.synthetic-items", "150", "--model.dim", "16",
             "--fed.nmf-rounds", "2", "--fed.eval-every", "10"]
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", *flags]
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([*command, "--results-dir", str(killed_dir)], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        rounds_file = None
        while time.monotonic() < deadline:
            found = list(killed_dir.glob("*/rounds.jsonl"))
            if found and len(found[0].read_text().splitlines()) >= 3:
                rounds_file = found[0]
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        assert rounds_file is not None, "no round was written in time"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    run_dir = rounds_file.parent
    written = len(read_jsonl(rounds_file))
    assert 3 <= written < 40 and not (run_dir / "summary.json").exists()

    resumed = subprocess.run([*command, "--results-dir", str(killed_dir), "--resume", str(run_dir)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = subprocess.run([*command, "--results-dir", str(tmp_path / "reference")], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    reference_dir = next((tmp_path / "reference").iterdir())

    def without_timing(directory: Path) -> list[dict]:
        return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in read_jsonl(directory / "rounds.jsonl")]

    assert without_timing(run_dir) == without_timing(reference_dir)
    final, expected = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference_dir))
    for key in ("recall@20", "ndcg@20", "total_upload_bytes", "total_download_bytes", "item_active_entries"):
        assert final[key] == expected[key], key


def test_resuming_under_a_different_config_or_without_a_checkpoint_is_refused(tmp_path):
    config = small_config(tmp_path, **{"num-server-rounds": 2})
    data = load_dataset(config.data, config.seed)
    run_dir, _ = run_inprocess(config, data)
    changed = config.with_overrides({"fed.local-lr": 0.5, "num-server-rounds": 4})
    with pytest.raises(ConfigError, match=r"fed.local-lr 0.05 -> 0.5"):
        run_inprocess(changed, data, resume_dir=run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint.npz"):
        run_inprocess(config, data, resume_dir=tmp_path / "empty")
    _, resumed = run_inprocess(config.with_overrides({"num-server-rounds": 3}), data, resume_dir=run_dir)
    assert [record["round"] for record in read_jsonl(run_dir / "rounds.jsonl")] == [1, 2, 3] and resumed["rounds"] == 3


def test_a_flower_run_resumes_from_its_checkpoint_with_fresh_devices(tmp_path, isolated_flower):
    config = small_config(tmp_path, **{"num-server-rounds": 2, "fed.downlink": "rows"})
    data = load_dataset(config.data, config.seed)
    flower = {"flwr_home": isolated_flower.home, "ports": isolated_flower.ports, "timeout": 600}
    run_dir = run_flower(config, REPO_ROOT, data.n_users, **flower)
    first = read_jsonl(run_dir / "rounds.jsonl")
    before = json.loads((run_dir / "summary.json").read_text())
    resumed_config = config.with_overrides({"num-server-rounds": 3, "resume-dir": str(run_dir)})
    assert run_flower(resumed_config, REPO_ROOT, data.n_users, **flower) == run_dir
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert rounds[:2] == first and [record["round"] for record in rounds] == [1, 2, 3]
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["rounds"] == 3 and after["total_upload_bytes"] > before["total_upload_bytes"]
    assert after["total_nmf_upload_bytes"] == before["total_nmf_upload_bytes"]  # NMF is not redone on resume
    assert rounds[2]["failed_clients"] == 0 and np.isfinite(rounds[2]["recall@20"])


@pytest.mark.parametrize("engine", ["inprocess", "flower"])
def test_a_malformed_data_file_stops_a_simulation_with_the_loaders_message(tmp_path, engine):
    data_dir = tmp_path / "data" / "ml-100k"
    data_dir.mkdir(parents=True)
    (data_dir / "u.data").write_text("1\t10\t5\t881250949\n2\tnot-an-item\t3\t891717742\n")
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", "--engine", engine, "--dataset", "ml-100k",
               "--data-dir", str(tmp_path / "data"), "--results-dir", str(tmp_path / "out")]
    env = {**os.environ, "PATH": str(tmp_path / "no-flwr-here")}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert completed.returncode == 2, completed.stderr
    assert "u.data:2: non-integer item id" in completed.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
