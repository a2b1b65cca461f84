"""Resumable sweeps: a grid over config keys × seeds from a TOML file, one in-process federation per cell.

The file holds ``[base]`` (flat config keys every cell shares), ``[grid]`` (key = [values, ...]) and
``seeds = [...]``. A cell is one combination and one seed; its id names its grid values, so a rerun
skips every cell already in ``sweep.csv`` and a changed grid only adds cells.

    seeds = [0, 1]
    [base]
    "data.dataset" = "ml-100k"
    num-server-rounds = 20
    [grid]
    "sparse.density" = [0.1, 0.2]
    "sparse.policy" = ["sparserec", "set"]
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedsparse.config import ConfigError, RunConfig
from fedsparse.tables import ResultTable

SWEEP_TABLE = "sweep.csv"


@dataclass(frozen=True)
class SweepCell:
    """One run of a sweep: its id, its grid values and its full flat config."""

    cell: str
    values: dict[str, Any]
    flat: dict[str, Any]


def read_sweep(path: Path) -> tuple[dict[str, Any], dict[str, list], list[int]]:
    """(base keys, grid, seeds) from a sweep TOML file; ConfigError names what is wrong."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc}") from exc
    unknown = sorted(set(document) - {"base", "grid", "seeds"})
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown table(s) {', '.join(unknown)}; expected base, grid, seeds")
    grid = document.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep file {path}: grid key {key!r} must list at least one value")
    seeds = document.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise ConfigError(f"sweep file {path}: seeds must be a non-empty list of integers")
    return dict(document.get("base", {})), grid, seeds


def expand_grid(base: dict[str, Any], grid: dict[str, list], seeds: list[int], results_dir: Path) -> list[SweepCell]:
    """Every cell of the grid, each config validated before any cell runs."""
    keys = sorted(grid)
    cells = []
    for combination in itertools.product(*(grid[key] for key in keys)):
        for seed in seeds:
            values = {**dict(zip(keys, combination)), "seed": seed}
            cell = ",".join(f"{key}={value}" for key, value in values.items())
            flat = {**base, **values, "results-dir": str(results_dir / "runs")}
            RunConfig.from_flat(flat)  # a bad key or value stops the sweep before any work
            cells.append(SweepCell(cell, values, flat))
    return cells


def run_cell(cell: SweepCell) -> dict[str, Any]:
    """Run one cell in process; its table row: grid values, final summary and run directory."""
    from fedsparse.inprocess import run_inprocess

    run_dir, summary = run_inprocess(RunConfig.from_flat(cell.flat))
    scalars = {key: value for key, value in summary.items() if isinstance(value, (int, float, str)) or value is None}
    return {**cell.values, **scalars, "run_dir": str(run_dir)}


def run_sweep(
    path: Path, results_dir: Path, jobs: int = 1, on_cell: Callable[[str, dict], None] | None = None
) -> ResultTable:
    """Run every unfinished cell of the sweep in ``path`` (``jobs`` at a time); returns the table."""
    base, grid, seeds = read_sweep(path)
    cells = expand_grid(base, grid, seeds, results_dir)
    table = ResultTable(results_dir / SWEEP_TABLE)
    todo = [cell for cell in cells if not table.has(cell.cell)]
    with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else nullcontext() as pool:
        rows = pool.map(run_cell, todo) if pool else map(run_cell, todo)
        for cell, row in zip(todo, rows):  # in grid order; each row is saved as soon as its turn comes
            table.add(cell.cell, row)
            if on_cell:
                on_cell(cell.cell, row)
    return table
