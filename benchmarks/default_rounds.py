"""Do the defaults gain with rounds? Recall@20 of a default federation, round by round, per dataset.

Each cell runs ``fedsparse simulate`` with every federated setting at its default (SparseRec at density
0.2, federated NMF start, 10 % of the devices per round) and only the dataset, the rounds and the
evaluation schedule given. The check the table reports: test Recall@20 at the last round against the
best of rounds 1-10, with validation Recall@20 beside it (the run directory's curve).

    FEDSPARSE_DATA=../shared/data python benchmarks/default_rounds.py --datasets ml-100k,ml-1m,gowalla --rounds 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data, run_fedsparse  # noqa: E402

from fedsparse.config import flat_defaults  # noqa: E402
from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
CURVES = "default_rounds_curves.csv"
EARLY_ROUNDS = 10  # the last round must reach the best of these
COLUMNS = ["dataset", "rounds", "best_recall@20_rounds_1_10", "last_recall@20", "last_vs_early_best",
           "best_validation_round", "last_validation_recall@20", "seconds_per_round", "settings"]
SETTINGS = ("fed.aggregation", "fed.item-lr", "fed.local-lr", "fed.user-steps", "fed.fraction-train", "sparse.policy",
            "sparse.density", "train.negatives-from", "fed.nmf-start", "fed.nmf-cohort", "fed.nmf-refine")


def run_default(dataset: str, rounds: int, results_dir: Path) -> Path:
    """``fedsparse simulate`` at the defaults, evaluated every round; returns its run directory."""
    flags = ["--dataset", dataset, "--num-server-rounds", str(rounds), "--fed.eval-every", "1"]
    return Path(run_fedsparse("simulate", flags, results_dir)["run_dir"])


def cell_row(run_dir: Path) -> dict:
    """The check's figures from a run directory's rounds.jsonl and summary.json."""
    rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
    summary = json.loads((run_dir / "summary.json").read_text())
    early = rounds.loc[rounds["round"] <= EARLY_ROUNDS, "recall@20"].max()
    last = rounds["recall@20"].iloc[-1]
    return {
        "rounds": int(rounds["round"].iloc[-1]),
        "best_recall@20_rounds_1_10": early,
        "last_recall@20": last,
        "last_vs_early_best": last / early,
        "best_validation_round": summary["best_validation_round"],
        "last_validation_recall@20": rounds["validation_recall@20"].iloc[-1],
        "seconds_per_round": rounds["seconds"].median(),
        "settings": ", ".join(f"{key}={flat_defaults()[key]}" for key in SETTINGS),
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-100k,ml-1m,gowalla")
    parser.add_argument("--rounds", type=int, default=30)
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    table = ResultTable(args.out / "default_rounds.csv")
    if not args.report_only:
        require_data(parser)
        for dataset in args.datasets.split(","):
            cell = f"{dataset}/r{args.rounds}"
            if table.has(cell):
                continue
            run_dir = run_default(dataset, args.rounds, args.out / "runs")
            row = cell_row(run_dir)
            rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
            curve = rounds.reindex(columns=["round", "recall@20", "validation_recall@20"]).to_dict("records")
            ResultTable(args.out / CURVES).set_rows(cell, curve)
            table.add(cell, {"dataset": dataset, **row})
            print(f"{cell}: last {row['last_recall@20']:.4f} vs best of rounds 1-10 "
                  f"{row['best_recall@20_rounds_1_10']:.4f}", flush=True)
    command = ("a report of the CSVs" if args.report_only
               else f"`python benchmarks/default_rounds.py --datasets {args.datasets} --rounds {args.rounds}`")
    header = (f"Last invocation: {command} on {machine_description()}, {time.perf_counter() - started:.0f} s. Defaults of "
              "the code at the time of each row (its settings column); test Recall@20 of the evaluated devices "
              "(fed.eval-fraction of them, the same devices every round).\n\n")
    write_markdown_table(args.out / "default_rounds.md", header, table.frame().reindex(columns=COLUMNS))
    plot(table.frame(), ResultTable(args.out / CURVES).frame(), args.out / "default_rounds.png")


def plot(frame: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    """Test and validation Recall@20 against rounds, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, max(1, len(frame)), figsize=(5 * max(1, len(frame)), 4), squeeze=False)
    for axis, (_, row) in zip(axes[0], frame.iterrows(), strict=False):
        points = curves[curves["cell"] == row["cell"]]
        axis.plot(points["round"], points["recall@20"], marker=".", label="test")
        axis.plot(points["round"], points["validation_recall@20"], marker=".", label="validation")
        axis.set_title(row["dataset"])
        axis.set_xlabel("round")
        axis.set_ylabel("Recall@20")
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


if __name__ == "__main__":
    main()
