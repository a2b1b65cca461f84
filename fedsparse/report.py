"""Collect run directories into one table and draw the standard plots.

A run directory (federated) holds ``config.json``, ``rounds.jsonl`` and ``summary.json``; the table
has one row per run: its config keys that differ between the runs, its final summary and its mean
upload bytes per client-round. Plots: Recall@20 against rounds, and final Recall@20 against upload
bytes per client-round (one marker per run, by policy and density).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fedsparse.results import atomic_write_text, read_jsonl, save_figure
from fedsparse.tables import write_markdown_table

HEADLINE = ["recall@20", "ndcg@20", "upload_bytes_mean", "download_bytes_mean", "device_memory_bytes_mean", "rounds", "seconds"]


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Every directory under ``roots`` (or a root itself) holding a finished federated run."""
    found = set()
    for root in roots:
        candidates = [root] if (root / "summary.json").exists() else [path.parent for path in root.rglob("summary.json")]
        found.update(path for path in candidates if (path / "rounds.jsonl").exists() and (path / "config.json").exists())
    return sorted(found)


def collect_runs(run_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(one row per run, one row per evaluated round of every run, the config keys that differ between runs)."""
    rows, curves = [], []
    for run_dir in run_dirs:
        config = json.loads((run_dir / "config.json").read_text())["config"]
        summary = json.loads((run_dir / "summary.json").read_text())
        rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
        upload = float(rounds["upload_bytes_mean"].mean()) if "upload_bytes_mean" in rounds else float("nan")
        download = float(rounds["download_bytes_mean"].mean()) if "download_bytes_mean" in rounds else float("nan")
        rows.append({"run": run_dir.name, **{f"config:{k}": v for k, v in config.items()}, **summary,
                     "upload_bytes_mean": upload, "download_bytes_mean": download, "run_dir": str(run_dir)})
        if "recall@20" in rounds:
            evaluated = rounds.dropna(subset=["recall@20"])
            curves.append(evaluated[["round", "recall@20"]].assign(run=run_dir.name))
    table = pd.DataFrame(rows)
    config_columns = [c for c in table.columns if c.startswith("config:")]
    varying = [c for c in config_columns if table[c].astype(str).nunique() > 1]
    table = table.drop(columns=[c for c in config_columns if c not in varying]).rename(columns={c: c.removeprefix("config:") for c in varying})
    curve_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["round", "recall@20", "run"])
    return table, curve_frame, [c.removeprefix("config:") for c in varying]


def write_report(run_dirs: list[Path], out: Path) -> pd.DataFrame:
    """Write ``report.csv`` (and ``.parquet``), ``report.md``, ``recall_vs_rounds.png`` and
    ``recall_vs_upload.png`` into ``out``."""
    if not run_dirs:
        raise ValueError("no finished run directory (with config.json, rounds.jsonl and summary.json) was found")
    table, curves, varying = collect_runs(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.csv", table.to_csv(index=False))
    parquet = out / ".report.parquet.tmp"
    table.astype({column: str for column in table.columns if table[column].dtype == object}).to_parquet(parquet, index=False)
    parquet.replace(out / "report.parquet")
    columns = ["run", *varying, *[c for c in HEADLINE if c in table]]
    write_markdown_table(out / "report.md", f"{len(table)} runs collected by `fedsparse report`.\n\n", table[columns])
    _plot_curves(curves, table, varying, out / "recall_vs_rounds.png")
    _plot_tradeoff(table, varying, out / "recall_vs_upload.png")
    return table


def _label(row: pd.Series, varying: list[str]) -> str:
    return ", ".join(f"{key}={row[key]}" for key in varying) or row["run"]


def _plot_curves(curves: pd.DataFrame, table: pd.DataFrame, varying: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for _, row in table.iterrows():
        curve = curves[curves["run"] == row["run"]]
        if not curve.empty:
            axis.plot(curve["round"], curve["recall@20"], marker=".", label=_label(row, varying))
    axis.set_xlabel("round")
    axis.set_ylabel("test Recall@20")
    axis.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path)


def _plot_tradeoff(table: pd.DataFrame, varying: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for _, row in table.iterrows():
        axis.scatter(row["upload_bytes_mean"], row.get("recall@20", float("nan")), label=_label(row, varying))
    axis.set_xscale("log")
    axis.set_xlabel("upload bytes per client-round (mean)")
    axis.set_ylabel("final test Recall@20")
    axis.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path)
