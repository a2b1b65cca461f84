"""The per-device byte ledger: sums per phase and direction, means over every device, checkpoint round trip."""

import numpy as np
import pytest

from fedsparse.federation.traffic import TrafficLedger


def test_means_are_over_every_device_and_totals_add_up():
    ledger = TrafficLedger(np.array([3, 5, 9, 11]))
    ledger.add("wire", "start", "down", {3: 100, 5: 100})
    ledger.add("wire", "train", "up", {3: 10, 9: 30})
    ledger.add("wire", "train", "up", {3: 10})
    ledger.add("payload", "evaluate", "down", {11: 7})
    summary = ledger.summary()
    assert summary["wire_start_down_bytes_per_device_mean"] == 50.0
    assert summary["wire_train_up_bytes_per_device_mean"] == 50 / 4
    assert summary["wire_train_up_bytes_per_device_max"] == 30.0
    assert summary["wire_total_both_bytes_per_device_max"] == 120.0  # device 3: 100 down, 20 up
    assert summary["wire_run_bytes"] == 250.0 == 4 * summary["wire_total_both_bytes_per_device_mean"]
    assert summary["payload_run_bytes"] == 7.0 and summary["payload_train_up_bytes_per_device_mean"] == 0.0


def test_a_device_outside_the_federation_is_an_error():
    with pytest.raises(KeyError, match="device 4"):
        TrafficLedger(np.array([1, 2])).add("wire", "train", "up", {4: 1})


def test_the_ledger_round_trips_through_a_checkpoint():
    ledger = TrafficLedger(np.array([0, 7]))
    ledger.add("payload", "train", "down", {7: 123})
    restored = TrafficLedger.from_state_arrays(ledger.state_arrays())
    assert restored.summary() == ledger.summary()
    broken = {key: value for key, value in ledger.state_arrays().items() if not key.endswith("evaluate.up")}
    with pytest.raises(ValueError, match="traffic.wire.evaluate.up"):
        TrafficLedger.from_state_arrays(broken)


def test_a_checkpoint_without_the_ledger_is_refused_with_its_path(tmp_path):
    """A run checkpointed before byte ledgers existed (manifest consistent, no traffic.*) cannot resume
    with its bytes silently reset: the resume names the file and why."""
    import json

    from fedsparse.config import RunConfig
    from fedsparse.data import load_dataset
    from fedsparse.federation.engine import MANIFEST, CheckpointError, load_checkpoint
    from fedsparse.federation.inprocess import InProcessTransport, run_inprocess

    config = RunConfig.from_flat({"results-dir": str(tmp_path), "num-server-rounds": 1, "data.dataset": "synthetic",
                                  "data.synthetic-users": 20, "data.synthetic-items": 40, "model.dim": 4})
    data = load_dataset(config.data, config.seed)
    run_dir, _ = run_inprocess(config, data)
    path = run_dir / "checkpoint.npz"
    with np.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files if not key.startswith("traffic.")}
    manifest = json.loads(str(arrays[MANIFEST]))
    manifest["arrays"] = {name: signature for name, signature in manifest["arrays"].items() if not name.startswith("traffic.")}
    arrays[MANIFEST] = np.asarray(json.dumps(manifest, sort_keys=True))
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="checkpoint.npz: no traffic.users: the checkpoint predates"):
        load_checkpoint(run_dir, config, InProcessTransport(config, data), data.n_items)


def test_a_run_ledgers_every_phase_and_its_rounds_add_up(tmp_path):
    from fedsparse.config import RunConfig
    from fedsparse.data import load_dataset
    from fedsparse.federation.inprocess import run_inprocess
    from fedsparse.run_files import read_jsonl

    config = RunConfig.from_flat({
        "results-dir": str(tmp_path), "num-server-rounds": 3, "data.dataset": "synthetic", "data.synthetic-users": 30,
        "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 8, "model.dim": 8, "fed.fraction-train": 0.5,
        "fed.downlink": "rows", "fed.nmf-cohort": 0.5, "fed.eval-fraction": 0.5,
    })
    data = load_dataset(config.data, config.seed)
    run_dir, summary = run_inprocess(config, data)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    devices = data.n_users
    for measure in ("wire", "payload"):
        for phase in ("start", "train", "evaluate"):
            assert summary[f"{measure}_{phase}_down_bytes_per_device_mean"] > 0, (measure, phase)
        assert summary[f"{measure}_run_bytes"] == pytest.approx(devices * summary[f"{measure}_total_both_bytes_per_device_mean"])
    # every training round's per-device wire bytes, summed over its devices, are the ledger's training phase
    trained = sum(record["wire_upload_bytes_mean"] * record["clients"] for record in rounds)
    assert devices * summary["wire_train_up_bytes_per_device_mean"] == pytest.approx(trained)
    # the payload is what the papers count; the wire adds Flower's envelope and object headers to every message
    for phase in ("start", "train", "evaluate"):
        for direction in ("down", "up"):
            key = f"{phase}_{direction}_bytes_per_device_mean"
            assert summary[f"wire_{key}"] > summary[f"payload_{key}"], key
    assert summary["payload_start_up_bytes_per_device_mean"] * devices == summary["total_nmf_upload_bytes"]
    # each round says how much the run has cost per device so far; the last equals the summary's total
    so_far = [record["wire_bytes_per_device_so_far"] for record in rounds]
    assert so_far == sorted(so_far) and so_far[0] > summary["wire_start_both_bytes_per_device_mean"]
    assert so_far[-1] == pytest.approx(summary["wire_total_both_bytes_per_device_mean"])
    evaluations = rounds[-1]["wire_evaluate_bytes_per_device_so_far"]
    assert 0 < evaluations < so_far[-1] and evaluations == pytest.approx(summary["wire_evaluate_both_bytes_per_device_mean"])
