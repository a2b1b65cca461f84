"""Shared plumbing of the benchmark scripts: one training run per subprocess, resumable result tables."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import torch

from fedsparse.results import atomic_write_text


def run_training(flags: list[str], results_dir: Path) -> dict:
    """Run ``fedsparse train FLAGS`` in its own process (so peak memory is its own); return summary.json."""
    results_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fedsparse.cli", "train", "--no-progress", "--results-dir", str(results_dir), *flags]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    run_dir = Path(completed.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    return json.loads((run_dir / "summary.json").read_text())


class ResultTable:
    """Rows keyed by a cell id, saved atomically after every cell so an interrupted grid resumes.

    Several processes may fill one table (e.g. shards of a grid by density): each write re-reads the
    file under an exclusive lock, so no row is lost.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> list[dict]:
        return pd.read_csv(self.path).to_dict("records") if self.path.exists() else []

    def has(self, cell: str) -> bool:
        """Whether the cell already has a row (and is skipped)."""
        return any(row.get("cell") == cell for row in self._read())

    def add(self, cell: str, row: dict) -> None:
        """Record a finished cell and rewrite the CSV."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rows = [existing for existing in self._read() if existing.get("cell") != cell]
            rows.append({"cell": cell, **row})
            atomic_write_text(self.path, pd.DataFrame(rows).to_csv(index=False))

    def frame(self) -> pd.DataFrame:
        """All rows as a DataFrame."""
        return pd.DataFrame(self._read())


def write_markdown_table(path: Path, header: str, frame: pd.DataFrame) -> None:
    """Write ``header`` and ``frame`` as a Markdown table, atomically, and print the frame."""
    atomic_write_text(path, header + frame.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(frame.to_string(index=False))


def machine_description() -> str:
    """CPU, cores and torch version/threads, for the header of a results table."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({os.environ.get('OMP_NUM_THREADS', 'default')} threads per run)"
    )


def _rss_bytes(pid: int) -> int:
    """Resident set size of one process from /proc (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _belongs(pid: int, root: int, marker: bytes | None) -> bool:
    """Whether ``pid`` descends from ``root`` or carries ``marker`` (e.g. FLWR_HOME=...) in its environment."""
    try:
        if marker is not None and marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return True
        while pid > 1:
            if pid == root:
                return True
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return False


class PeakMemory:
    """Samples, every ``interval`` seconds, the summed RSS of a process tree (plus every process whose
    environment holds ``marker``, which catches Flower's detached SuperLink and its Ray workers); keeps
    the peak in bytes. A sampled peak: a spike shorter than the interval can be missed."""

    def __init__(self, root: int, marker: str | None = None, interval: float = 0.5) -> None:
        self.root, self.marker, self.interval = root, marker.encode() if marker else None, interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        pids = [int(path.name) for path in Path("/proc").iterdir() if path.name.isdigit()]
        return sum(_rss_bytes(pid) for pid in pids if _belongs(pid, self.root, self.marker))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
