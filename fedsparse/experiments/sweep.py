"""Resumable sweeps: a grid over config keys × seeds from a TOML file, one federation per cell.

The file holds ``[base]`` (flat config keys every cell shares), ``[grid]`` (key = [values, ...]),
``seeds = [...]`` and optionally ``engine`` (``"inprocess"``, the default, or ``"flower"``: each cell
is a ``flwr run`` of the app, as ``fedsparse simulate --engine flower``). A cell is one combination and
one seed; its id names its grid values (and the engine when it is not the default), so a rerun skips
every cell already in ``sweep.csv`` and a changed grid only adds cells.

    seeds = [0, 1]
    engine = "inprocess"
    [base]
    "data.dataset" = "ml-100k"
    num-server-rounds = 20
    [grid]
    "sparse.density" = [0.1, 0.2]
    "sparse.policy" = ["sparserec", "set"]
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedsparse.config import ConfigError, RunConfig, check_flat_keys, read_toml
from fedsparse.experiments.flower_run import check_flower_config
from fedsparse.experiments.tables import ResultTable

SWEEP_TABLE = "sweep.csv"
ENGINES = ("inprocess", "flower")
DEFAULT_ENGINE = "inprocess"


@dataclass(frozen=True)
class SweepSpec:
    """A sweep file: keys every cell shares, the grid, the seeds and the engine every cell runs on."""

    base: dict[str, Any]
    grid: dict[str, list]
    seeds: list[int]
    engine: str = DEFAULT_ENGINE


@dataclass(frozen=True)
class SweepCell:
    """One run of a sweep: its id, its grid values, its full flat config and its engine."""

    cell: str
    values: dict[str, Any]
    flat: dict[str, Any]
    engine: str = DEFAULT_ENGINE


def read_sweep(path: Path) -> SweepSpec:
    """The sweep in a TOML file; ConfigError names what is wrong."""
    document, text = read_toml(path, "sweep file")
    for table in ("base", "grid"):
        check_flat_keys(document.get(table, {}), path, text)
    unknown = sorted(set(document) - {"base", "grid", "seeds", "engine"})
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; expected base, grid, seeds, engine")
    grid = document.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep file {path}: grid key {key!r} must list at least one value")
    seeds = document.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(seed, int) for seed in seeds):
        raise ConfigError(f"sweep file {path}: seeds must be a non-empty list of integers")
    engine = document.get("engine", DEFAULT_ENGINE)
    if engine not in ENGINES:
        raise ConfigError(f"sweep file {path}: engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    return SweepSpec(dict(document.get("base", {})), grid, seeds, engine)


def expand_grid(spec: SweepSpec, results_dir: Path) -> list[SweepCell]:
    """Every cell of the grid, each config validated (for its engine) before any cell runs."""
    keys = sorted(spec.grid)
    suffix = "" if spec.engine == DEFAULT_ENGINE else f",engine={spec.engine}"  # ids of in-process sweeps stay as they were
    cells = []
    for combination in itertools.product(*(spec.grid[key] for key in keys)):
        for seed in spec.seeds:
            values = {**dict(zip(keys, combination, strict=True)), "seed": seed}
            cell = ",".join(f"{key}={value}" for key, value in values.items()) + suffix
            flat = {**spec.base, **values, "results-dir": str(results_dir / "runs")}
            config = RunConfig.from_flat(flat)  # a bad key or value stops the sweep before any work
            if spec.engine == "flower":
                check_flower_config(config)
            cells.append(SweepCell(cell, values, flat, spec.engine))
    return cells


def run_cell(cell: SweepCell, app_dir: Path | None = None) -> dict[str, Any]:
    """Run one cell on its engine; its table row: grid values, engine, final summary and run directory.

    ``app_dir``: the Flower app (repository root) for ``engine = "flower"``; default the working directory.
    """
    config = RunConfig.from_flat(cell.flat)
    if cell.engine == "flower":
        run_dir, summary = _run_flower_cell(config, app_dir or Path.cwd())
    else:
        from fedsparse.federation.inprocess import run_inprocess

        run_dir, summary = run_inprocess(config)
    scalars = {key: value for key, value in summary.items() if isinstance(value, (int, float, str)) or value is None}
    return {**cell.values, "engine": cell.engine, **scalars, "run_dir": str(run_dir)}


def _run_flower_cell(config: RunConfig, app_dir: Path) -> tuple[Path, dict[str, Any]]:
    """One ``flwr run`` (as ``fedsparse simulate --engine flower``); the local SuperLink is left running."""
    from fedsparse.data import load_run_data
    from fedsparse.experiments.flower_run import run_flower
    from fedsparse.federation.engine import check_population
    from fedsparse.federation.inprocess import population_of

    data = load_run_data(config)
    check_population(config, population_of(data, config))  # before Flower starts, as simulate does
    run_dir = run_flower(config, app_dir.resolve(), data.n_users)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def run_sweep(
    path: Path,
    results_dir: Path,
    jobs: int = 1,
    on_cell: Callable[[str, dict], None] | None = None,
    show_progress: bool | None = False,
    app_dir: Path | None = None,
) -> ResultTable:
    """Run every unfinished cell of the sweep in ``path`` (``jobs`` at a time); returns the table.

    ``show_progress``: a bar over cells (None = only on a terminal, so CI logs stay quiet). Flower cells
    run one at a time: they share the local SuperLink and its Ray workers.
    """
    spec = read_sweep(path)
    if spec.engine == "flower" and jobs != 1:
        raise ConfigError(f"sweep file {path}: engine = \"flower\" runs one cell at a time (one local SuperLink): use --jobs 1")
    cells = expand_grid(spec, results_dir)
    table = ResultTable(results_dir / SWEEP_TABLE)
    todo = [cell for cell in cells if not table.has(cell.cell)]
    disable = None if show_progress is None else not show_progress
    with (
        ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else nullcontext() as pool,
        tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"sweep {Path(path).stem}", unit="cell",
             disable=disable) as progress,
    ):
        rows = pool.map(run_cell, todo, itertools.repeat(app_dir)) if pool else (run_cell(cell, app_dir) for cell in todo)
        for cell, row in zip(todo, rows, strict=True):  # in grid order; each row is saved as soon as its turn comes
            table.add(cell.cell, row)
            progress.update()
            if on_cell:
                on_cell(cell.cell, row)
    return table
