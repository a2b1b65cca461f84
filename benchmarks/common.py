"""Shared plumbing of the benchmark scripts: one training run per subprocess, measured peak memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def run_fedsparse(command: str, flags: list[str], results_dir: Path) -> dict:
    """Run ``fedsparse COMMAND FLAGS`` (``train``, or ``simulate`` in process) in its own process, so peak
    memory is its own; return summary.json's keys plus ``run_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    engine = ["--engine", "inprocess"] if command == "simulate" else []
    full = [sys.executable, "-m", "fedsparse.cli", command, *engine, "--no-progress", "--json", "--results-dir", str(results_dir),
            *flags]
    completed = subprocess.run(full, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout)  # --json: summary.json's keys and run_dir


def run_code_version(run_dir: Path) -> str:
    """The commit a run executed (7 hex digits), "+modified" when its checkout had local changes to tracked files."""
    written = json.loads((Path(run_dir) / "config.json").read_text())
    return str(written.get("code_version") or "")[:7] + ("+modified" if written.get("code_modified") else "")


def rules_column(frame: pd.DataFrame) -> list[str]:
    """Per row, "current" when it records its negative rule (``negatives_from``, written since issue 15) and "old"
    when it does not."""
    recorded = frame["negatives_from"] if "negatives_from" in frame else [float("nan")] * len(frame)
    return ["current" if isinstance(rule, str) else "old" for rule in recorded]


def add_result_flags(parser: argparse.ArgumentParser, results: Path) -> None:
    """``--out`` (folder of the CSVs, tables and plots) and ``--report-only`` (redraw them, run nothing)."""
    parser.add_argument("--out", type=Path, default=results)
    parser.add_argument("--report-only", action="store_true", help="run no cell: rewrite the table and the plot from the CSVs")


def require_data(parser: argparse.ArgumentParser) -> None:
    """Stop with the parser's usage when the real datasets' folder is not set."""
    if not os.environ.get("FEDSPARSE_DATA"):
        parser.error("set FEDSPARSE_DATA to the folder holding the datasets (e.g. ../shared/data)")


def run_training(flags: list[str], results_dir: Path) -> dict:
    """``fedsparse train FLAGS`` in its own process; summary.json's keys plus ``run_dir``."""
    return run_fedsparse("train", flags, results_dir)


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

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
