"""Shared plumbing of the benchmark scripts: one training run per subprocess, resumable result tables."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
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


def machine_description() -> str:
    """CPU, cores and torch version/threads, for the header of a results table."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({os.environ.get('OMP_NUM_THREADS', 'default')} threads per run)"
    )
