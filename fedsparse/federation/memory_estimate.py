"""Memory a federation will need, estimated before it starts, so a population too large is refused up front.

Terms, beyond the data already loaded: the private state of every device that can train (measured on a fresh
``DeviceState``: its arrays and their Python objects) and the server's item table and mask, both lower bounds of
what the run must allocate; and one round's item rows in flight, estimated from mean counts (each chosen device's
training items with their sampled negatives, down and up). A run whose estimate exceeds the memory available
would be killed mid-run, so it is refused with the estimate, its parts and the limit; one under it may still need
more (policy accumulators, evaluation).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from fedsparse.config import ConfigError, RunConfig
from fedsparse.federation.device import init_device
from fedsparse.federation.server_state import clients_per_round

GIB = 2**30
FLOAT32_BYTES = 4
MASK_BYTES = 1  # a bool per table entry


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs, by part: device states and the server's table (lower bounds), one round's rows in flight
    (from mean counts)."""

    devices: int  # devices whose private state the run can hold at once
    state_bytes_per_device: int  # one device's private state as held in memory (``private_state_bytes``)
    table_bytes: int  # the server's item weights (float32) and mask (bool)
    round_bytes: int  # the item rows one round's devices receive and send (active float32 values)

    @property
    def total_bytes(self) -> int:
        return self.devices * self.state_bytes_per_device + self.table_bytes + self.round_bytes

    def describe(self) -> str:
        """The estimate and its parts, in GiB (one line)."""
        return (f"{self.total_bytes / GIB:.2f} GiB (device states {self.devices:,} x {self.state_bytes_per_device:,} B = "
                f"{self.devices * self.state_bytes_per_device / GIB:.2f} GiB, item table {self.table_bytes / GIB:.2f} GiB, "
                f"one round's rows about {self.round_bytes / GIB:.2f} GiB)")


def private_state_bytes(config: RunConfig) -> int:
    """Bytes of one dormant device's private state as the simulation holds it: the arrays of a fresh
    ``DeviceState`` (user row, mask, optimiser moments, step count, bias) with their NumPy objects and the
    dict that keeps them (what ``InProcessTransport.states`` stores per device); its keys are the same string
    objects for every device, so they are not counted."""
    arrays = init_device(config, 0).to_arrays()
    return sys.getsizeof(arrays) + sum(sys.getsizeof(value) for value in arrays.values())


def estimate_memory(config: RunConfig, devices: int, n_items: int, n_train_interactions: int) -> MemoryEstimate:
    """The estimate for a federation of ``devices`` training devices over ``n_items`` items.

    A device's state exists once it has trained, so the run holds at least min(devices, rounds x clients per
    round) of them (states made by the start or by evaluation are not counted). A round's rows, from mean
    counts: each chosen device's training items (the mean per device) and ``train.negatives`` sampled
    negatives per positive, at the table's active share of ``model.dim`` values each, downloaded and uploaded."""
    dim = config.model.dim
    chosen = clients_per_round(config, devices)
    holding = min(devices, max(1, config.num_server_rounds) * chosen)
    density = min(1.0, config.sparse.density) if config.sparse.policy != "dense" else 1.0
    rows_per_device = (n_train_interactions / devices) * (1 + config.train.negatives)
    round_bytes = 2 * chosen * rows_per_device * max(1, round(density * dim)) * FLOAT32_BYTES
    return MemoryEstimate(
        devices=holding,
        state_bytes_per_device=private_state_bytes(config),
        table_bytes=n_items * dim * (FLOAT32_BYTES + MASK_BYTES),
        round_bytes=int(round_bytes),
    )


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process may still allocate: MemAvailable, capped by a cgroup v2 limit when one is set
    (``memory.max`` minus ``memory.current``, the reclaimable page cache, ``inactive_file`` of ``memory.stat``,
    not counted as used); None when neither is readable (not Linux)."""
    limits = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        maximum = (cgroup / "memory.max").read_text().strip()
        if maximum != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            stat = cgroup / "memory.stat"
            for line in stat.read_text().splitlines() if stat.exists() else []:
                if line.startswith("inactive_file "):
                    used -= int(line.split()[1])
            limits.append(int(maximum) - used)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def check_memory(config: RunConfig, devices: int, n_items: int, n_train_interactions: int) -> MemoryEstimate:
    """ConfigError, before any work, when the run's estimate exceeds ``fed.memory-limit-gib`` (0: the memory
    this machine has available now, ``available_memory_bytes``); the estimate otherwise."""
    estimate = estimate_memory(config, devices, n_items, n_train_interactions)
    configured = config.fed.memory_limit_gib
    limit = int(configured * GIB) if configured > 0 else available_memory_bytes()
    source = "fed.memory-limit-gib" if configured > 0 else "available on this machine"
    if limit is not None and estimate.total_bytes > limit:
        raise ConfigError(
            f"this federation needs at least {estimate.describe()}, more than the {limit / GIB:.2f} GiB {source} "
            f"(pid {os.getpid()}): use fewer devices or fewer per round (fed.clients-per-round), a lower model.dim or "
            "sparse.density, or raise fed.memory-limit-gib if the machine has more")
    return estimate
