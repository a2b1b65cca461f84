"""Flower's deployment runtime, for real: a flower-superlink and flower-supernodes (insecure, on this machine),
each supernode hosting a group of devices, reproduce the in-process engine's rounds for the same seed; and the
process bookkeeping that stops exactly what a deployment started."""

import shutil
import time
from pathlib import Path

import pytest

from fedsparse.config import RunConfig
from fedsparse.data import load_run_data
from fedsparse.experiments.deploy import (
    CONNECTION,
    PLACEMENT_ENV,
    TINY_FEDERATION,
    Deployment,
    pids_with_token,
    read_placement,
    round_mismatches,
    start_supernodes,
)
from fedsparse.experiments.flower_run import process_running, run_flower
from fedsparse.federation.grouping import users_of_partition
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.run_files import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]  # the Flower app


def test_a_deployment_stops_its_processes_and_what_they_left_behind(tmp_path):
    with Deployment(tmp_path) as deployment:
        # A child that detaches (its parent exits, so it leaves the started process tree): only the token finds it.
        shell = deployment.start("shell", ["sh", "-c", "(sleep 300 &); exec sleep 300"])
        deadline = time.monotonic() + 10
        while len(pids_with_token(deployment.token)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        running = pids_with_token(deployment.token)
        assert shell.pid in running and len(running) == 2
    assert deployment.leftovers() == []
    assert not any(process_running(pid) for pid in running)


@pytest.mark.skipif(any(shutil.which(command) is None for command in ("flwr", "flower-superlink", "flower-supernode")),
                    reason="Flower's commands are not installed")
def test_two_supernodes_hosting_groups_of_devices_match_the_inprocess_engine(tmp_path):
    config = RunConfig.from_flat({**TINY_FEDERATION, "num-server-rounds": 1, "fed.clients-per-node": 6,
                                  "fed.downlink": "full", "results-dir": str(tmp_path / "results")})
    data = load_run_data(config)
    # Stops every process it started, also on a failure. Normal priority: at nice 19 the SuperLink, starved by the
    # other test worker, can miss its start deadline.
    with Deployment(tmp_path / "deployment", niceness=0) as deployment:
        home = start_supernodes(deployment, 2, **{PLACEMENT_ENV: "1"})
        run_dir = run_flower(config, REPO_ROOT, data.n_users, flwr_home=home, superlink=CONNECTION, timeout=300)
        started = [process.pid for process in deployment.started.values()]
    assert deployment.leftovers() == [] and not any(process_running(pid) for pid in started)
    inprocess_dir, _ = run_inprocess(config, data)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert round_mismatches(rounds, read_jsonl(inprocess_dir / "rounds.jsonl")) == []
    assert rounds[0]["clients"] == 6 and rounds[0]["failed_clients"] == 0
    # Each supernode served only the devices of its partition (its --node-config), outside Ray.
    placement = read_placement(run_dir)
    assert {record["partition"] for record in placement} == {0, 1}
    for record in placement:
        assert set(record["users"]) <= set(users_of_partition(record["partition"], 6, data.n_users))
        assert record["ray_node"] == ""
    assert len({record["node"] for record in placement}) == 2
