"""Shared fixtures: a Flower home and ports of a test's own, so a real `flwr run` never reuses (or stops)
a SuperLink that someone else started; and the Flower tests first, the longest ones, to spread them over workers."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsparse.experiments.deploy import free_ports
from fedsparse.experiments.flower_run import stop_superlink

# Tests that start real Flower processes (a SuperLink, Ray, supernodes): the longest of the suite, each mostly
# waiting on process start-up. They go first, so that pytest-xdist's two workers (pyproject's addopts) take them
# in turn and the short tests fill in around them.
FLOWER_MODULES = {"test_deployment_e2e.py"}


def starts_flower(item: pytest.Item) -> bool:
    """Whether a test runs real Flower processes: it uses ``isolated_flower`` or lives in a deployment module."""
    return "isolated_flower" in getattr(item, "fixturenames", ()) or item.path.name in FLOWER_MODULES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Flower tests first (a stable sort: each group keeps its collection order)."""
    items.sort(key=lambda item: not starts_flower(item))


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
