"""fed.torch-threads: the intra-op threads devices train with, set for the block and restored after it."""

from __future__ import annotations

import json

import pytest
import torch

from fedsparse.config import ConfigError, RunConfig
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.federation.threads import device_threads


@pytest.mark.parametrize("threads", [1, 2])
def test_devices_train_with_the_configured_threads_and_the_count_is_restored(threads: int) -> None:
    before = torch.get_num_threads()
    config = RunConfig.from_flat({"fed.torch-threads": threads})
    with device_threads(config) as in_use:
        assert in_use == threads == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_zero_leaves_torch_default_and_a_negative_count_is_refused() -> None:
    before = torch.get_num_threads()
    with device_threads(RunConfig.from_flat({"fed.torch-threads": 0})) as in_use:
        assert in_use == before
    with pytest.raises(ConfigError, match="fed.torch-threads"):
        RunConfig.from_flat({"fed.torch-threads": -1})


def test_the_count_is_restored_when_the_block_raises() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), device_threads(RunConfig.from_flat({"fed.torch-threads": before + 1})):
        raise RuntimeError("device failed")
    assert torch.get_num_threads() == before


def test_the_in_process_engine_trains_with_the_configured_threads_and_records_them(tmp_path) -> None:
    """The run's config.json names the threads its devices used; the caller's count is back afterwards."""
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    config = RunConfig.from_flat({
        "results-dir": str(tmp_path), "num-server-rounds": 1, "data.dataset": "synthetic", "data.synthetic-users": 12,
        "data.synthetic-items": 30, "data.synthetic-interactions-per-user": 6, "model.dim": 8,
        "fed.torch-threads": target, "fed.nmf-init": "none",
    })
    run_dir, _ = run_inprocess(config)
    assert json.loads((run_dir / "config.json").read_text())["torch_threads"] == target
    assert torch.get_num_threads() == before
