"""The memory estimate: its per-device figure is what the engine holds, and a population too large is refused."""

import sys

import numpy as np
import pytest

from fedsparse.cli import main
from fedsparse.config import ConfigError, RunConfig
from fedsparse.federation.device_states import unpack_states
from fedsparse.federation.engine import CHECKPOINT, Population, check_population
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.federation.memory_estimate import (
    GIB,
    available_memory_bytes,
    estimate_memory,
    private_state_bytes,
)


def small_config(tmp_path, **overrides) -> RunConfig:
    return RunConfig.from_flat({
        "results-dir": str(tmp_path), "num-server-rounds": 2, "data.dataset": "synthetic", "data.synthetic-users": 12,
        "data.synthetic-items": 30, "data.synthetic-interactions-per-user": 6, "model.dim": 8,
        "sparse.policy": "sparserec", "sparse.density": 0.25, "fed.fraction-train": 1.0, "fed.nmf-init": "none",
        **overrides,
    })


def held_bytes(arrays: dict[str, np.ndarray]) -> int:
    """A device's state as the in-process engine holds it: a dict of arrays (its keys are shared strings)."""
    return sys.getsizeof(arrays) + sum(sys.getsizeof(value) for value in arrays.values())


@pytest.mark.parametrize("overrides", [{}, {"fed.user-bias": True, "fed.user-optimizer": "sgd", "fed.user-steps": 0,
                                            "train.loss": "bce", "sparse.policy": "dense", "sparse.density": 1.0}])
def test_the_per_device_figure_is_the_state_each_trained_device_keeps(tmp_path, overrides):
    """Reference: the private states of a real run, read back from its checkpoint (packed ``transport.*`` arrays)."""
    config = small_config(tmp_path, **overrides)
    run_dir, _ = run_inprocess(config)
    with np.load(run_dir / CHECKPOINT) as checkpoint:
        states = unpack_states({name.removeprefix("transport."): checkpoint[name] for name in checkpoint.files
                                if name.startswith("transport.")})
    assert len(states) == 12
    assert {held_bytes(state) for state in states.values()} == {private_state_bytes(config)}


def test_the_estimate_adds_states_table_and_one_rounds_rows(tmp_path):
    config = small_config(tmp_path, **{"model.dim": 64, "sparse.density": 0.1, "fed.clients-per-round": 10_000,
                                       "num-server-rounds": 100, "train.negatives": 1})
    estimate = estimate_memory(config, devices=1_000_000, n_items=100_000, n_train_interactions=20_000_000)
    assert estimate.devices == 1_000_000  # 100 rounds x 10,000 devices reach every device
    assert estimate.table_bytes == 100_000 * 64 * (4 + 1)
    assert estimate.round_bytes == 2 * 10_000 * (20 * 2) * round(0.1 * 64) * 4
    assert estimate.total_bytes == 1_000_000 * private_state_bytes(config) + estimate.table_bytes + estimate.round_bytes
    few_rounds = estimate_memory(small_config(tmp_path, **{"fed.clients-per-round": 100, "num-server-rounds": 3}),
                                 devices=1_000_000, n_items=10, n_train_interactions=1_000_000)
    assert few_rounds.devices == 300  # only devices that train hold a state


def test_a_population_larger_than_the_limit_is_refused_with_the_estimate_and_the_limit(tmp_path):
    config = small_config(tmp_path, **{"fed.memory-limit-gib": 1.0, "num-server-rounds": 100})
    users = np.arange(5_000_000, dtype=np.int64)
    population = Population(users, users.size, 100_000, 50_000_000)
    with pytest.raises(ConfigError, match=r"needs at least .* GiB \(device states 5,000,000 x .* more than the 1.00 "
                                          r"GiB fed.memory-limit-gib"):
        check_population(config, population)
    check_population(config, Population(users[:1000], 1000, 100, 10_000))  # a small one passes


def test_the_cli_refuses_before_any_run_directory_is_made(tmp_path, capsys):
    flags = ["--dataset", "synthetic", "--data.synthetic-users", "20", "--data.synthetic-items", "30", "--dim", "8",
             "--num-server-rounds", "2", "--fed.memory-limit-gib", "0.000001", "--results-dir", str(tmp_path / "out")]
    assert main(["simulate", *flags]) == 2
    assert "fed.memory-limit-gib" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_available_memory_is_memavailable_capped_by_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory_bytes(meminfo, cgroup) == 20000000 * 1024  # no cgroup files: MemAvailable alone
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    assert available_memory_bytes(meminfo, cgroup) == 20000000 * 1024  # no cgroup limit
    (cgroup / "memory.max").write_text(f"{4 * GIB}\n")
    assert available_memory_bytes(meminfo, cgroup) == 3 * GIB
    (cgroup / "memory.stat").write_text(f"anon 123\ninactive_file {GIB // 2}\n")  # reclaimable page cache is free
    assert available_memory_bytes(meminfo, cgroup) == 3 * GIB + GIB // 2
    assert available_memory_bytes(tmp_path / "absent", tmp_path / "absent") is None
