"""Collect run directories into one table and draw the standard plots.

A run directory (federated) holds ``config.json``, ``rounds.jsonl`` and ``summary.json``; the table
has one row per run: its config keys that differ between the runs, its final summary and its mean
upload bytes per client-round. Plots, each drawn when the runs hold what it needs:

- ``recall_vs_rounds.png``: test Recall@20 at every evaluated round, one line per run (always).
- ``recall_vs_upload.png``: final test Recall@20 against mean upload bytes per client-round, one
  marker per run (always).
- ``recall_vs_density.png``: test Recall@20 at the round of best validation Recall@20 against the
  density the run's policy trained at, one line per policy (and per value of any other varying key;
  seeds averaged, their spread as error bars). Drawn only when the runs differ in density.
- ``privacy_frontier.png``: Recall@20 relative to the undefended run against the strongest attack's
  popularity-matched ROC-AUC on all the server saw (tables written before that column: the strongest
  ROC-AUC among the uploaded rows), one marker per defence. Run directories record no attack metric
  (the attacks are scored by ``simulations/privacy_frontier.py`` on the uploads it watched), so this
  plot reads that study's results CSVs (``privacy`` below); without one it is skipped, with the reason.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedsparse.experiments.tables import write_markdown_table
from fedsparse.run_files import (
    ResultFileError,
    atomic_write_text,
    read_json_object,
    read_jsonl,
    read_run_config,
    round_gaps,
    save_figure,
)

log = logging.getLogger(__name__)

HEADLINE = ["recall@20", "ndcg@20", "upload_bytes_mean", "download_bytes_mean", "device_memory_bytes_mean", "rounds", "seconds"]
IDENTITY = ["engine", "dataset"]  # columns every report shows, whether or not they vary
# Keys that tell runs apart without changing what they compute: never in a legend.
NOT_A_LABEL = {"results-dir", "data.data-dir", "resume-dir", "code-version"}
# Keys that never define a line of the density plot: the x axis itself, seeds (averaged) and paths.
NOT_A_SERIES = {"sparse.density", "sparse.policy", "seed"} | NOT_A_LABEL
# Runs with the same legend label are drawn with these styles in turn, so their lines stay apart.
REPEAT_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
SELECTED_RECALL = "best_test_recall@20"  # test Recall@20 at the best validation round (by Recall@20;
# by HR@10 under the sampled protocol)
ATTACK_AUC_SUFFIX = "_auc_uploaded"  # the privacy study's ROC-AUC among the uploaded rows, one column per attack
MATCHED_AUC_SUFFIX = "_auc_matched"  # the study's popularity-matched ROC-AUC, one column per attack
MATCHED_ATTACKS = ("row-id", "value", "imia", "differencing", "start")  # every attack on what the server saw
NO_LEAKAGE_AUC = 0.5  # where a run with no per-device upload to attack (secure aggregation) is drawn
# The privacy study's target (simulations/README.md): Recall@20 >= 90 % of undefended at attack AUC <= 0.55.
TARGET_RECALL_RATIO = 0.9
TARGET_AUC = 0.55
MARKER_AREA = 60  # points^2 of a marker whose upload equals the undefended one
LEGEND_MARKER_AREA = 30  # points^2 of every marker in a legend
LEGEND_LABEL_CHARS = 120  # longer legend labels (many varying keys) wrap onto more lines


@dataclass
class Report:
    """What ``write_report`` wrote: the run table, the figures drawn and, per skipped figure, why."""

    table: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    skipped_runs: dict[str, str] = field(default_factory=dict)  # run directory -> why it could not be read


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Every directory under ``roots`` (or a root itself) holding a federated run (a ``rounds.jsonl``);
    ``collect_runs`` skips, with a warning naming it, one whose other files are missing or damaged."""
    found = set()
    for root in roots:
        found.update([root] if (root / "rounds.jsonl").exists() else [path.parent for path in root.rglob("rounds.jsonl")])
    return sorted(found)


def read_run(run_dir: Path) -> tuple[dict, dict, pd.DataFrame, str]:
    """(config keys, summary, rounds, what is wrong with the round numbers or "") of one run directory;
    ResultFileError names the damaged file."""
    config = read_run_config(run_dir, ("config",))["config"]
    summary = read_json_object(run_dir / "summary.json", ("rounds",))
    records = read_jsonl(run_dir / "rounds.jsonl")
    return config, summary, pd.DataFrame(records), round_gaps(records, _rounds(summary, run_dir))


def _rounds(summary: dict, run_dir: Path) -> int:
    """The summary's round count, checked to be a count."""
    rounds = summary["rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ResultFileError(f"{run_dir / 'summary.json'}: 'rounds' must be an integer >= 0, got {rounds!r}")
    return rounds


def collect_runs(run_dirs: list[Path],
                 skipped_runs: dict[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(one row per run, one row per evaluated round of every run, the config keys that differ between runs).

    A run directory whose files cannot be read is left out and recorded in ``skipped_runs`` with the reason
    (ValueError when none is left). ``rounds_check`` names missing or duplicated rounds ("" when complete).
    """
    rows, curves = [], []
    skipped = {} if skipped_runs is None else skipped_runs
    for run_dir in run_dirs:
        try:
            config, summary, rounds, rounds_check = read_run(run_dir)
            engine = read_run_config(run_dir, ("config",)).get("engine")
        except ResultFileError as exc:
            if skipped_runs is None:  # nobody collects the skipped runs to report them: log each
                log.warning("skipping run directory %s: %s", run_dir, exc)
            skipped[str(run_dir)] = str(exc)
            continue
        upload = float(rounds["upload_bytes_mean"].mean()) if "upload_bytes_mean" in rounds else float("nan")
        download = float(rounds["download_bytes_mean"].mean()) if "download_bytes_mean" in rounds else float("nan")
        dataset = Path(config["data.path"]).stem if config.get("data.path") else config.get("data.dataset")  # own file: its name
        identity = {"engine": engine or _engine_from_name(run_dir.name), "dataset": dataset}
        rows.append({"run": run_dir.name, **identity, **{f"config:{k}": v for k, v in config.items()}, **summary,
                     "upload_bytes_mean": upload, "download_bytes_mean": download, "rounds_check": rounds_check,
                     "run_dir": str(run_dir)})
        if "recall@20" in rounds:
            evaluated = rounds.dropna(subset=["recall@20"])
            curves.append(evaluated[["round", "recall@20"]].assign(run=run_dir.name))
    if not rows:
        raise ValueError("no readable run directory: " + "; ".join(f"{d}: {why}" for d, why in skipped.items()))
    table = pd.DataFrame(rows)
    config_columns = [c for c in table.columns if c.startswith("config:")]
    varying = [c for c in config_columns if table[c].astype(str).nunique() > 1]
    table = table.drop(columns=[c for c in config_columns if c not in varying]).rename(
        columns={c: c.removeprefix("config:") for c in varying})
    curve_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["round", "recall@20", "run"])
    return table, curve_frame, [c.removeprefix("config:") for c in varying]


def write_report(run_dirs: list[Path], out: Path, privacy: list[Path] | None = None) -> Report:
    """Write the run table (``report.csv``, ``report.parquet``, ``report.md``) and the plots into ``out``.

    ``privacy``: results CSVs of ``simulations/privacy_frontier.py`` for ``privacy_frontier.png``. With
    no run directory, only that plot is drawn. Raises ValueError when there is nothing to report.
    """
    privacy = privacy or []
    if not run_dirs and not privacy:
        raise ValueError("no finished run directory (with config.json, rounds.jsonl and summary.json) "
                         "and no --privacy table was given")
    out.mkdir(parents=True, exist_ok=True)
    report = Report(table=pd.DataFrame())
    if run_dirs:
        report.table = _write_run_report(run_dirs, out, report)
    if privacy:
        report.figures.append(plot_privacy_frontier(read_privacy_tables(privacy), out / "privacy_frontier.png"))
    else:
        report.skipped["privacy_frontier.png"] = (
            "run directories record no attack metric; pass --privacy with a CSV written by simulations/privacy_frontier.py")
    for name, reason in report.skipped.items():
        log.info("%s: skipped: %s", name, reason)
    return report


def _write_run_report(run_dirs: list[Path], out: Path, report: Report) -> pd.DataFrame:
    table, curves, varying = collect_runs(run_dirs, report.skipped_runs)
    atomic_write_text(out / "report.csv", table.to_csv(index=False))
    parquet = out / ".report.parquet.tmp"
    table.astype({column: str for column in table.columns if table[column].dtype == object}).to_parquet(parquet, index=False)
    parquet.replace(out / "report.parquet")
    flagged = table["rounds_check"].astype(bool).any()  # a run with missing or duplicated rounds gets the column
    columns = ["run", *IDENTITY, *[key for key in varying if key not in NOT_A_LABEL], *[c for c in HEADLINE if c in table],
               *(["rounds_check"] if flagged else [])]
    write_markdown_table(out / "report.md", f"{len(table)} runs collected by `fedsparse report`.\n\n", table[columns])
    _plot_curves(curves, table, varying, out / "recall_vs_rounds.png")
    _plot_tradeoff(table, varying, out / "recall_vs_upload.png")
    report.figures += [out / "recall_vs_rounds.png", out / "recall_vs_upload.png"]
    density_plot = out / "recall_vs_density.png"
    if "density" in table and table["density"].nunique() > 1:
        _plot_density(table, varying, density_plot)
        report.figures.append(density_plot)
    else:
        report.skipped[density_plot.name] = "every run trained at the same density"
    return table


def _axes(height: float = 4.5):
    """A figure and axes whose legend goes below the plot, so long run labels never cover the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, height), layout="constrained")


def _finish(figure, axis, path: Path, fontsize: float = 6) -> None:
    """Legend below the axes (markers at one size), then save atomically."""
    handles, labels = axis.get_legend_handles_labels()
    labels = [textwrap.fill(label, LEGEND_LABEL_CHARS) for label in labels]
    legend = figure.legend(handles, labels, loc="outside lower center", fontsize=fontsize)
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([LEGEND_MARKER_AREA])
    save_figure(figure, path)


def _engine_from_name(name: str) -> str:
    """The engine of a run directory written before config.json recorded it: its name says fed- or flwr-."""
    return "flower" if "-flwr-" in name else "inprocess"


def labels(table: pd.DataFrame, varying: list[str]) -> list[str]:
    """One short legend label per run: the varying keys without their section prefix (``density=0.2``),
    engine and dataset when they differ, no paths; equal labels get ``#2``, ``#3``... in run order."""
    keys = [key for key in IDENTITY if table[key].nunique() > 1] + [key for key in varying if key not in NOT_A_LABEL]
    short = [", ".join(f"{key.rsplit('.', 1)[-1]}={row[key]}" for key in keys) or "run" for _, row in table.iterrows()]
    seen: dict[str, int] = {}
    unique = []
    for label in short:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return unique


def _repeat_style(label: str) -> tuple[str, str]:
    """(line style, marker) of a label's ``#n`` repeat, so equal runs are told apart."""
    repeat = int(label.rsplit(" #", 1)[1]) - 1 if " #" in label else 0
    return REPEAT_STYLES[repeat % len(REPEAT_STYLES)]


def _plot_curves(curves: pd.DataFrame, table: pd.DataFrame, varying: list[str], path: Path) -> None:
    figure, axis = _axes()
    for label, (_, row) in zip(labels(table, varying), table.iterrows(), strict=True):
        curve = curves[curves["run"] == row["run"]]
        if not curve.empty:
            linestyle, marker = _repeat_style(label)
            axis.plot(curve["round"], curve["recall@20"], linestyle=linestyle, marker=marker, markersize=4, label=label)
    axis.set_xlabel("round")
    axis.set_ylabel("test Recall@20")
    _finish(figure, axis, path)


def _plot_tradeoff(table: pd.DataFrame, varying: list[str], path: Path) -> None:
    figure, axis = _axes()
    for label, (_, row) in zip(labels(table, varying), table.iterrows(), strict=True):
        axis.scatter(row["upload_bytes_mean"], row.get("recall@20", float("nan")), marker=_repeat_style(label)[1], label=label)
    axis.set_xscale("log")
    axis.set_xlabel("upload bytes per client-round (mean)")
    axis.set_ylabel("final test Recall@20")
    _finish(figure, axis, path)


def density_lines(table: pd.DataFrame, varying: list[str]) -> dict[str, pd.DataFrame]:
    """What ``recall_vs_density.png`` draws: per line label, test Recall@20 by density (index) as the mean,
    min and max over the line's runs (seeds).

    A line is a policy and a value of each other varying config key (paths and seeds excepted). The
    round is the best validation round (``best_test_recall@20``); a run without validation metrics
    contributes its final test Recall@20.
    """
    recall = table[SELECTED_RECALL].fillna(table["recall@20"]) if SELECTED_RECALL in table else table["recall@20"]
    frame = table.assign(selected=recall)
    series = ["policy", *[key for key in varying if key not in NOT_A_SERIES]]
    lines = {}
    for keys, group in frame.groupby(series, sort=True, dropna=False):
        label = ", ".join(f"{key}={value}" if key != "policy" else str(value) for key, value in zip(series, keys, strict=True))
        lines[label] = group.groupby("density")["selected"].agg(["mean", "min", "max"]).sort_index()
    return lines


def _plot_density(table: pd.DataFrame, varying: list[str], path: Path) -> None:
    figure, axis = _axes()
    for label, line in density_lines(table, varying).items():
        spread = np.vstack([line["mean"] - line["min"], line["max"] - line["mean"]])
        axis.errorbar(line.index, line["mean"], yerr=spread, marker="o", capsize=3, label=label)
    axis.set_xlabel("density (share of active embedding entries)")
    axis.set_ylabel("test Recall@20 (best validation round)")
    axis.set_title("mean over seeds; bars: min to max", fontsize=9)
    _finish(figure, axis, path)


def read_privacy_tables(paths: list[Path]) -> pd.DataFrame:
    """The rows of the privacy study's results CSVs; ValueError names a file without the needed columns."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path)
        attacks = [column for column in frame.columns if column.endswith(ATTACK_AUC_SUFFIX)]
        missing = [column for column in ("recall@20", "defence") if column not in frame]
        if missing or not attacks:
            raise ValueError(f"{path} is not a privacy-study table: "
                             f"it lacks {', '.join(missing) or f'*{ATTACK_AUC_SUFFIX} columns'}")
        frames.append(frame.assign(table=Path(path).stem))
    return pd.concat(frames, ignore_index=True)


def frontier_points(frame: pd.DataFrame) -> pd.DataFrame:
    """What ``privacy_frontier.png`` draws, one row per row of the privacy tables.

    Columns: ``series`` (table and density), ``defence``, ``auc`` (``strongest_matched_auc`` when every row
    has it, which attacks the sums of secure cells too; else the strongest attack's ROC-AUC among the uploaded rows,
    0.5 where no per-device upload was left to attack, e.g. secure aggregation), ``attacked`` (False there),
    ``utility`` (Recall@20 relative to undefended when every row has it, else Recall@20) and ``upload``
    (upload bytes relative to undefended; 1 when the table lacks it).
    """
    if _matched_leakage(frame):
        leakage = strongest_matched_auc(frame)
    else:
        leakage = frame[[column for column in frame.columns if column.endswith(ATTACK_AUC_SUFFIX)]].max(axis=1)
    series = frame["table"].astype(str)
    if "density" in frame:
        series = series + ", density " + frame["density"].astype(str)
    return pd.DataFrame({
        "series": series,
        "defence": frame["defence"].astype(str),
        "auc": leakage.fillna(NO_LEAKAGE_AUC),
        "attacked": leakage.notna(),
        "utility": frame["recall_vs_undefended"] if _relative_utility(frame) else frame["recall@20"],
        "upload": frame["upload_vs_undefended"].fillna(1.0) if "upload_vs_undefended" in frame else 1.0,
    })


def strongest_matched_auc(frame: pd.DataFrame) -> pd.Series:
    """Per row of a privacy table, the largest popularity-matched AUC of any attack on anything the server saw
    (uploads, training sums, the start's sums): what the area's target reads; NaN in rows measured before it."""
    measured = [f"{attack}{MATCHED_AUC_SUFFIX}" for attack in MATCHED_ATTACKS]
    return frame.reindex(columns=measured).astype(float).max(axis=1, skipna=True)


def _matched_leakage(frame: pd.DataFrame) -> bool:
    """Whether every row of the privacy tables has a popularity-matched AUC."""
    return bool(strongest_matched_auc(frame).notna().all())


def _relative_utility(frame: pd.DataFrame) -> bool:
    """Whether every row of the privacy tables has its Recall@20 relative to the undefended cell."""
    return "recall_vs_undefended" in frame and bool(frame["recall_vs_undefended"].notna().all())


def plot_privacy_frontier(frame: pd.DataFrame, path: Path) -> Path:
    """Draw ``frontier_points(frame)``: utility against leakage, one marker per defence; returns ``path``.

    A row with no per-device upload to attack is drawn hollow at AUC 0.5; marker area = upload bytes
    relative to undefended; dotted lines at the study's target.
    """
    points = frontier_points(frame)
    relative = _relative_utility(frame)
    figure, axis = _axes(height=5.5)
    for number, (label, group) in enumerate(points.groupby("series", sort=True)):
        color = f"C{number}"
        for attacked, part in group.groupby("attacked"):
            style = {"color": color, "alpha": 0.6} if attacked else {"facecolors": "none", "edgecolors": color}
            axis.scatter(part["auc"], part["utility"], s=MARKER_AREA * part["upload"], **style,
                         label=label if attacked else f"{label}: no per-device upload to attack")
        for _, row in group.iterrows():
            axis.annotate(row["defence"], (row["auc"], row["utility"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.axvline(TARGET_AUC, color="grey", linestyle=":", linewidth=1)
    if relative:
        axis.axhline(TARGET_RECALL_RATIO, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("strongest popularity-matched attack AUC on all the server saw (0.5: nothing learnt)"
                    if _matched_leakage(frame) else "strongest attack's ROC-AUC among uploaded rows (0.5 = no leakage)")
    axis.set_ylabel("Recall@20 / undefended" if relative else "test Recall@20")
    axis.set_title("utility vs leakage (marker area = upload bytes / undefended)", fontsize=9)
    _finish(figure, axis, path, fontsize=7)
    return path
