"""Shared plumbing of the benchmark scripts: one training run per subprocess, resumable result tables."""

from __future__ import annotations

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
    """Rows keyed by a cell id, saved atomically after every cell so an interrupted grid resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = pd.read_csv(path).to_dict("records") if path.exists() else []

    def has(self, cell: str) -> bool:
        """Whether the cell already has a row (and is skipped)."""
        return any(row.get("cell") == cell for row in self.rows)

    def add(self, cell: str, row: dict) -> None:
        """Record a finished cell and rewrite the CSV."""
        self.rows.append({"cell": cell, **row})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False))

    def frame(self) -> pd.DataFrame:
        """All rows as a DataFrame."""
        return pd.DataFrame(self.rows)


def machine_description() -> str:
    """CPU, cores and torch version/threads, for the header of a results table."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({os.environ.get('OMP_NUM_THREADS', 'default')} threads per run)"
    )
