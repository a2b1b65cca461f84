"""Bytes per device over a whole run: every phase (start, training, evaluation), both directions, two measures.

``wire`` is what Flower sends for the device's messages (``wire_format``: every object of the message's
tree, the envelope included); ``payload`` is the ``nbytes`` of the arrays alone, the figure the papers
quote. A device that is never addressed counts zero; means are over every device of the federation,
so a mean times the device count is the run's total.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PHASES = ("start", "train", "evaluate")
DIRECTIONS = ("down", "up")
MEASURES = ("wire", "payload")


class TrafficLedger:
    """Running byte totals int64 [n_devices] per (measure, phase, direction), for the devices ``users``."""

    def __init__(self, users: np.ndarray) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self._position = {int(user): index for index, user in enumerate(self.users)}
        self.counts = {key: np.zeros(self.users.size, dtype=np.int64) for key in _keys()}

    def add(self, measure: str, phase: str, direction: str, bytes_by_user: Mapping[int, int]) -> None:
        """Add each user's bytes of one kind of message (users outside the federation are an error)."""
        counts = self.counts[(measure, phase, direction)]
        for user, count in bytes_by_user.items():
            if int(user) not in self._position:
                raise KeyError(f"device {user} is not in the federation")
            counts[self._position[int(user)]] += int(count)

    def summary(self) -> dict[str, float]:
        """Per-device figures: ``<measure>_<phase>_<direction>_bytes_per_device_{mean,max}``, the same for
        ``total`` (all phases) and ``both`` (down + up), and the run's sum as ``<measure>_run_bytes``."""
        out: dict[str, float] = {}
        for measure in MEASURES:
            for phase in (*PHASES, "total"):
                for direction in (*DIRECTIONS, "both"):
                    per_device = self._per_device(measure, phase, direction)
                    name = f"{measure}_{phase}_{direction}_bytes_per_device"
                    out[f"{name}_mean"] = float(per_device.mean()) if per_device.size else 0.0
                    out[f"{name}_max"] = float(per_device.max()) if per_device.size else 0.0
            out[f"{measure}_run_bytes"] = float(self._per_device(measure, "total", "both").sum())
        return out

    def mean_per_device(self, measure: str, phase: str = "total") -> float:
        """Bytes per device so far of ``phase`` (or every phase), both directions, averaged over the federation."""
        return float(self._per_device(measure, phase, "both").mean()) if self.users.size else 0.0

    def _per_device(self, measure: str, phase: str, direction: str) -> np.ndarray:
        phases = PHASES if phase == "total" else (phase,)
        directions = DIRECTIONS if direction == "both" else (direction,)
        total = np.zeros(self.users.size, dtype=np.int64)
        for each_phase in phases:
            for each_direction in directions:
                total += self.counts[(measure, each_phase, each_direction)]
        return total

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The counts, to checkpoint (keys ``traffic.<measure>.<phase>.<direction>``) with the device ids."""
        arrays = {f"traffic.{'.'.join(key)}": counts for key, counts in self.counts.items()}
        return {**arrays, "traffic.users": self.users}

    @classmethod
    def from_state_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TrafficLedger:
        """Restore what ``state_arrays`` returned; ValueError naming a missing or misshapen entry."""
        if "traffic.users" not in arrays:
            raise ValueError("no traffic.users: the checkpoint predates the per-device byte ledger (start the run afresh)")
        ledger = cls(arrays["traffic.users"])
        for key in _keys():
            name = f"traffic.{'.'.join(key)}"
            counts = arrays.get(name)
            if counts is None or counts.shape != ledger.users.shape:
                raise ValueError(f"checkpoint entry {name} is missing or not int64 [{ledger.users.size}]")
            ledger.counts[key] = counts.astype(np.int64)
        return ledger


def _keys() -> list[tuple[str, str, str]]:
    return [(measure, phase, direction) for measure in MEASURES for phase in PHASES for direction in DIRECTIONS]
