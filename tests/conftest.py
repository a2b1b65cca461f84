"""Shared fixtures: a Flower home and ports of a test's own, so a real `flwr run` never reuses (or stops)
a SuperLink that someone else started."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsparse.experiments.deploy import free_ports
from fedsparse.experiments.flower_run import stop_superlink


@dataclass(frozen=True)
class IsolatedFlower:
    """Where a test's `flwr run` keeps its state and which ports its SuperLink listens on (HTTP, control)."""

    home: Path
    ports: tuple[int, int]


@pytest.fixture
def isolated_flower(tmp_path) -> IsolatedFlower:
    """A fresh Flower home and free ports; afterwards the SuperLink(s) started there are stopped by their
    recorded pids (nothing else). Skips when the `flwr` command is not installed."""
    if shutil.which("flwr") is None:
        pytest.skip("the flwr command is not installed")
    flower = IsolatedFlower(tmp_path / "flwr-home", free_ports(2))
    try:
        yield flower
    finally:
        stop_superlink(flower.home)
