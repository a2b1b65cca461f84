"""Result tables of sweeps and benchmarks: one CSV row per finished cell, resumable, shareable by processes."""

from __future__ import annotations

import fcntl
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

from fedsparse.run_files import atomic_write_text


class ResultTable:
    """Rows keyed by a cell id, saved atomically after every cell so an interrupted grid resumes.

    Several processes may fill one table (e.g. shards of a grid by density): each write re-reads the
    file under an exclusive lock on the table's folder (no lock file is left behind), so no row is lost.
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
        self.set_rows(cell, [row])

    def set_rows(self, cell: str, rows: list[dict]) -> None:
        """Replace every row of ``cell`` by ``rows`` (e.g. one per round of a curve) and rewrite the CSV."""
        with self._locked():
            kept = [existing for existing in self._read() if existing.get("cell") != cell]
            atomic_write_text(self.path, pd.DataFrame(kept + [{"cell": cell, **row} for row in rows]).to_csv(index=False))

    def fill(self, cell: str, values: dict) -> None:
        """Set ``values`` (column -> value) on the rows of ``cell`` in place, keeping the rows' order."""
        with self._locked():
            rows = [{**row, **values} if row.get("cell") == cell else row for row in self._read()]
            atomic_write_text(self.path, pd.DataFrame(rows).to_csv(index=False))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the table's folder while a write re-reads and rewrites the CSV."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The folder is locked rather than a lock file (which would outlive the sweep) or the CSV (replaced by
        # rename on every write, so a lock on it would guard a file nobody reads any more).
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the lock

    def frame(self) -> pd.DataFrame:
        """All rows as a DataFrame."""
        return pd.DataFrame(self._read())


def write_markdown_table(path: Path, header: str, frame: pd.DataFrame) -> None:
    """Write ``header`` and ``frame`` as a Markdown table, atomically, and print the frame."""
    atomic_write_text(path, header + frame.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(frame.to_string(index=False))


def write_markdown_sections(path: Path, header: str, sections: list[tuple[str, pd.DataFrame]]) -> None:
    """Write ``header`` then each (heading, frame) as a Markdown table under its heading, atomically."""
    text = header + "".join(heading + frame.to_markdown(index=False, floatfmt=".4g") + "\n" for heading, frame in sections)
    atomic_write_text(path, text)
    for heading, frame in sections:
        print(heading.strip(), frame.to_string(index=False), sep="\n")


def standing_notes(path: Path) -> str:
    """The bold notes at the top of an existing table (e.g. "**Made under the old rules**"), to keep on a rewrite.

    Such notes are added to a committed table when later code changes what its cells would measure; a
    ``--report-only`` rewrite from the same CSV does not change that, so it keeps them. Returns "" when
    ``path`` is absent or starts with no such paragraph."""
    if not path.exists():
        return ""
    kept = []
    for paragraph in path.read_text().split("\n\n"):
        if not paragraph.startswith("**"):
            break
        kept.append(paragraph + "\n\n")
    return "".join(kept)


def machine_description() -> str:
    """CPU, cores and torch version/threads, for the header of a results table."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({os.environ.get('OMP_NUM_THREADS', 'default')} threads per run)"
    )
