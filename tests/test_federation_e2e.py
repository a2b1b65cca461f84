"""End to end: a real `flwr run` and the in-process engine on the same small federation.

The Flower run is checked through what it wrote (rounds.jsonl, summary.json), not its exit code, and
must reproduce the in-process engine's per-round metrics and byte counts for the same seed.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedsparse.config import RunConfig
from fedsparse.data import load_dataset
from fedsparse.experiments.flower_run import run_flower
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.federation.secagg_vectors import SECAGG_CLIPPING_RANGE, SECAGG_STAGES, secagg_ranges, weight_bound
from fedsparse.run_files import MODIFIED_SUFFIX, code_version, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUND_KEYS = {"round", "recall@20", "ndcg@20", "upload_bytes_mean", "upload_bytes_max", "download_bytes_mean",
              "device_memory_bytes_mean", "device_memory_bytes_max", "clients", "failed_clients", "seconds", "train_seconds"}
EXACT_KEYS = ["round", "clients", "failed_clients", "dropped_updates", "upload_bytes_mean", "upload_bytes_max",
              "download_bytes_mean", "download_bytes_max", "rows_updated", "evaluated_clients"]
METRIC_KEYS = ["recall@20", "ndcg@20", "validation_recall@20", "device_memory_bytes_mean"]
WIRE_KEYS = ["wire_upload_bytes_mean", "wire_upload_bytes_max", "wire_download_bytes_mean", "wire_download_bytes_max"]
# In process, a message's envelope is counted with every id at its largest (10 varint bytes, task ids set);
# Flower's ids are random and may be shorter or unset: at most this many bytes fewer per message.
ENVELOPE_SLACK = 64


def small_config(tmp_path: Path, **overrides) -> RunConfig:
    flat = {
        "results-dir": str(tmp_path / "results"),
        "num-server-rounds": 2,
        "data.dataset": "synthetic",
        "data.synthetic-users": 12,
        "data.synthetic-items": 40,
        "data.synthetic-interactions-per-user": 8,
        "model.dim": 8,
        "sparse.policy": "sparserec",
        "sparse.density": 0.25,
        "fed.fraction-train": 0.5,
        "fed.explore-every": 1,
        "fed.nmf-rounds": 2,
        **overrides,
    }
    return RunConfig.from_flat(flat)


def test_inprocess_run_writes_every_round_with_the_documented_keys(tmp_path):
    run_dir, summary = run_inprocess(small_config(tmp_path))
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [record["round"] for record in rounds] == [1, 2]
    for record in rounds:
        assert set(record) >= ROUND_KEYS
        assert record["failed_clients"] == 0 and record["clients"] == 6
        assert 0.0 <= record["recall@20"] <= 1.0
    assert summary["item_active_entries"] == round(0.25 * summary_items(run_dir) * 8)
    assert json.loads((run_dir / "summary.json").read_text())["total_upload_bytes"] > 0


def summary_items(run_dir: Path) -> int:
    return json.loads((run_dir / "config.json").read_text())["population"]["n_items"]


def run_both_engines(flower, config: RunConfig) -> tuple[Path, Path]:
    """The same config under `flwr run` (on the test's own SuperLink, see conftest.isolated_flower) and in
    process: both run dirs."""
    data = load_dataset(config.data, config.seed)
    flower_dir = run_flower(config, REPO_ROOT, data.n_users, flwr_home=flower.home, ports=flower.ports, timeout=600)
    inprocess_dir, _ = run_inprocess(config, data)
    return flower_dir, inprocess_dir


@pytest.mark.parametrize(
    "overrides",
    [
        {"fed.downlink": "rows"},
        {"fed.downlink": "full", "fed.clients-per-node": 3},
        {"fed.downlink": "rows", "faults.failure-rate": 0.4, "faults.failure-mode": "exception"},
        {"fed.downlink": "full", "faults.failure-rate": 0.4, "faults.failure-mode": "crash"},
        {"fed.downlink": "rows", "sparse.policy": "size-frequency", "sparse.mask-init": "nmf", "budget.device-widths": "2,4,8",
         "budget.stream-stages": 1,
         "fed.fraction-train": 1.0, "fed.eval-fraction": 1.0},
        {"fed.downlink": "rows", "model.name": "neumf", "model.mlp-layers": "8,4", "sparse.policy": "dense",
         "sparse.density": 1.0, "train.loss": "bce", "fed.eval-fraction": 1.0},
    ],
    ids=["one-device-per-supernode-rows-downlink", "three-devices-per-supernode-full-downlink",
         "injected-exceptions", "injected-crashes", "device-classes-size-policy-streaming", "fedncf-neumf"],
)
def test_flower_run_matches_the_inprocess_engine(tmp_path, isolated_flower, overrides):
    # The central start: rounds must agree to 1e-5, which SecAgg+'s stochastic rounding of the secure
    # start's sums would not allow (that start has its own test below).
    config = small_config(tmp_path, **{"fed.nmf-init": "central", **overrides})
    flower_dir, inprocess_dir = run_both_engines(isolated_flower, config)
    flower_rounds = read_jsonl(flower_dir / "rounds.jsonl")
    inprocess_rounds = read_jsonl(inprocess_dir / "rounds.jsonl")
    assert len(flower_rounds) == len(inprocess_rounds) == 2
    for flower, local in zip(flower_rounds, inprocess_rounds, strict=True):
        assert set(flower) >= ROUND_KEYS
        for key in EXACT_KEYS:
            assert flower[key] == local[key], key
        for key in METRIC_KEYS:
            assert flower[key] == pytest.approx(local[key], rel=1e-5, abs=1e-7), key
        for key in WIRE_KEYS:  # Flower's serialiser measured against the in-process re-derivation
            assert flower[key] > 0 and local[key] > 0, key
            if overrides == {"fed.downlink": "rows"}:  # one device per supernode, no faults: the same messages
                assert 0 <= local[key] - flower[key] <= 2 * ENVELOPE_SLACK, key  # a row request and a training message
        per_class = [key for key in local if key.endswith(("_w2", "_w4", "_w8"))]  # prefixes agree between the shells
        assert bool(per_class) == bool(config.budget.widths)
        for key in per_class:
            assert flower[key] == pytest.approx(local[key], rel=1e-5, abs=1e-7), key
    if config.faults.failure_rate:
        assert sum(record["failed_clients"] for record in flower_rounds) > 0
    # The bundled app copy has no git: the launcher passed its commit, and Flower's app hash is kept beside it.
    recorded = json.loads((flower_dir / "config.json").read_text())
    assert recorded["code_version"] == (code_version().removesuffix(MODIFIED_SUFFIX) or None) and recorded["flower_app_hash"]


def test_held_out_devices_under_flower_match_the_inprocess_engine(tmp_path, isolated_flower):
    """fed.unseen-users: the same devices held out, never trained, evaluated apart with the same metrics and
    payload bytes under `flwr run` as in process (the ClientApp reads the held-out setting from the message)."""
    config = small_config(tmp_path, **{"fed.nmf-init": "none", "fed.unseen-users": 0.25, "fed.eval-fraction": 1.0,
                                       "fed.fraction-train": 1.0})
    flower_dir, inprocess_dir = run_both_engines(isolated_flower, config)
    flower_rounds = read_jsonl(flower_dir / "rounds.jsonl")
    inprocess_rounds = read_jsonl(inprocess_dir / "rounds.jsonl")
    for flower, local in zip(flower_rounds, inprocess_rounds, strict=True):
        assert flower["clients"] == local["clients"] == 9  # 12 devices, 3 held out: every other one trains
        assert flower["unseen_users"] == local["unseen_users"] == 3
        assert flower["unseen_evaluated_clients"] == local["unseen_evaluated_clients"] > 0
        unseen = [key for key in local if key.startswith("unseen_")]
        assert "unseen_recall@20" in unseen and set(unseen) == {key for key in flower if key.startswith("unseen_")}
        for key in [*unseen, *METRIC_KEYS]:
            assert flower[key] == pytest.approx(local[key], rel=1e-5, abs=1e-7), key
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in (flower_dir, inprocess_dir)]
    for key in ("payload_evaluate_down_bytes_per_device_mean", "payload_train_down_bytes_per_device_mean"):
        assert summaries[0][key] == summaries[1][key] > 0, key
    assert summaries[0]["wire_evaluate_down_bytes_per_device_mean"] > 0
    assert json.loads((flower_dir / "config.json").read_text())["population"]["unseen_devices"] == 3


def test_secure_aggregation_under_flower_runs_secaggplus_and_matches_the_simulated_sum(tmp_path, isolated_flower):
    config = small_config(tmp_path, **{"privacy.secure-aggregation": True, "fed.downlink": "full", "fed.fraction-train": 0.5,
                                       "fed.nmf-init": "central"})
    flower_dir, inprocess_dir = run_both_engines(isolated_flower, config)
    flower_rounds = read_jsonl(flower_dir / "rounds.jsonl")
    inprocess_rounds = read_jsonl(inprocess_dir / "rounds.jsonl")
    for flower, local in zip(flower_rounds, inprocess_rounds, strict=True):
        assert flower["failed_clients"] == local["failed_clients"] == 0
        # Under the sum rule no row weights are sent: a row counts as updated when its sum is non-zero, and
        # SecAgg+'s rounding can take a sum below its step (about 1e-8 per contributor) to exactly zero.
        assert 0.9 * local["rows_updated"] <= flower["rows_updated"] <= local["rows_updated"]
        # SecAgg+ rounds each masked entry stochastically (unseeded) to 2C / levels of the weight bound: the
        # same model up to that, so metrics agree unless a near-tie in some ranking flips.
        for key in ("recall@20", "ndcg@20", "validation_recall@20"):
            assert flower[key] == pytest.approx(local[key], abs=0.02), key
        # The protocol's key exchange and masked vectors cost more than the simulated vectors alone.
        assert flower["upload_bytes_mean"] > local["upload_bytes_mean"]
    # Each SecAgg+ round's wire upload, split by stage, adds up to the round's; the masked vectors' stage
    # carries at least the vectors (tests/test_secagg_reply.py checks they leave at 4 bytes an entry).
    stages = read_jsonl(flower_dir / "secagg_stages.jsonl")
    assert [record["round"] for record in stages] == [record["round"] for record in flower_rounds]
    for record, flower, local in zip(stages, flower_rounds, inprocess_rounds, strict=True):
        assert list(record["stages"]) == list(SECAGG_STAGES) and record["devices"] == flower["clients"]
        assert sum(stage["up"] for stage in record["stages"].values()) == pytest.approx(flower["wire_upload_bytes_mean"])
        assert record["stages"]["collect-masked-vectors"]["up"] > local["upload_bytes_mean"]
    tables = [np.load(directory / "checkpoint.npz")["server.item-weight"] for directory in (flower_dir, inprocess_dir)]
    # Each contributor's weighted delta is off by less than one step in each round's sum (the step is
    # 2C / levels of the weight bound, 1.1e-8 for these 6-device rounds under the sum rule).
    cohort = flower_rounds[0]["clients"]
    levels, _ = secagg_ranges(cohort)
    step = 2 * SECAGG_CLIPPING_RANGE / levels * weight_bound(config)
    np.testing.assert_allclose(tables[0], tables[1], atol=len(flower_rounds) * cohort * step)
    assert np.abs(tables[1]).sum() > 0


def test_a_run_records_its_code_version_dataset_checksum_and_machine(tmp_path):
    config = small_config(tmp_path)
    data = load_dataset(config.data, config.seed)
    run_dir, _ = run_inprocess(config, data)
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["dataset_checksum"] == data.checksum() == load_dataset(config.data, config.seed).checksum()
    other = load_dataset(config.with_overrides({"data.synthetic-users": 13}).data, config.seed)
    assert other.checksum() != data.checksum()
    if shutil.which("git") and (REPO_ROOT / ".git").exists():
        assert len(recorded["code_version"]) == 40 and isinstance(recorded["code_modified"], bool)
    assert recorded["machine"] and recorded["started_at_utc"].endswith("Z")


@pytest.mark.skipif(shutil.which("flwr") is None, reason="flwr command not installed")
def test_federated_start_under_flower_refuses_several_devices_per_supernode(tmp_path):
    from fedsparse.config import ConfigError
    from fedsparse.experiments.flower_run import check_flower_config

    with pytest.raises(ConfigError, match="clients-per-node = 1"):
        check_flower_config(small_config(tmp_path, **{"fed.clients-per-node": 3}))
    check_flower_config(small_config(tmp_path, **{"fed.clients-per-node": 3, "fed.nmf-init": "central"}))


def test_secure_nmf_start_under_flower_runs_secaggplus_and_matches_the_inprocess_start(tmp_path, isolated_flower):
    # The whole federation as cohort: a cohort of 5 of these 12 devices has rank 5 < model.dim 8, and the
    # start of such a degenerate cohort is decided by ties that SecAgg+'s random rounding breaks differently.
    config = small_config(tmp_path, **{"num-server-rounds": 1, "fed.nmf-refine": 1, "fed.downlink": "full",
                                       "fed.nmf-cohort": 1.0})
    flower_dir, inprocess_dir = run_both_engines(isolated_flower, config)
    summaries = [json.loads((directory / "summary.json").read_text()) for directory in (flower_dir, inprocess_dir)]
    flower, local = summaries
    assert flower["total_nmf_rounds"] == local["total_nmf_rounds"] == 2  # the seeded pass and one refinement
    assert flower["total_nmf_cohort"] == local["total_nmf_cohort"] == 12
    # Every start byte went through SecAgg+ (key exchange, shares, masked vectors): more than the vectors alone.
    assert flower["total_nmf_upload_bytes"] > local["total_nmf_upload_bytes"] > 0
    # The ledger holds the start: Flower's measured SecAgg+ wire bytes, beside the payload it counted.
    assert flower["wire_start_up_bytes_per_device_mean"] > local["wire_start_up_bytes_per_device_mean"] > 0
    assert flower["payload_start_up_bytes_per_device_mean"] * 12 == flower["total_nmf_upload_bytes"]
    # The same start up to SecAgg+'s stochastic rounding (a step of 1.8e-7 per device and entry at 12 devices).
    tables = [np.load(directory / "checkpoint.npz") for directory in (flower_dir, inprocess_dir)]
    masks = [table["server.item-mask"] for table in tables]
    assert (masks[0] == masks[1]).mean() > 0.95
    agree = masks[0] & masks[1]
    np.testing.assert_allclose(tables[0]["server.item-weight"][agree], tables[1]["server.item-weight"][agree], atol=1e-3)
    assert flower["recall@20"] == pytest.approx(local["recall@20"], abs=0.05)
