"""Bytes per device to reach a given accuracy: the whole run on the wire, start and evaluations included.

Each method is a named configuration of ``simulations/configs/`` (its paper and what it sends are in the
file's header) run by ``fedsparse simulate`` on one dataset, evaluated every round on the same devices.
Its curve is test Recall@20 against the wire bytes per device of the start and the training rounds so
far (every message as Flower serialises it, averaged over every device of the federation); the
evaluation this benchmark runs every round, to draw the curve, is counted apart. The table gives, for
targets that are shares of the best Recall@20 any method reached, those bytes each method needed to
first reach it, and that figure over SparseRec's.

    FEDSPARSE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/bytes_to_accuracy.py --dataset ml-100k --rounds 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data, run_fedsparse  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "simulations" / "configs"
REFERENCE = "SparseRec 0.2"  # the method every other one's bytes are divided by
# (method, named config, flags added to it)
METHODS = [
    (REFERENCE, "sparserec-peer.toml", []),
    ("FedMF (rows uplink)", "fedmf.toml", []),
    ("FedAvg upload (whole table)", "fedmf.toml", ["--fed.uplink", "table"]),
    ("PFedRec", "pfedrec.toml", []),
    ("FedRecon", "fedrecon.toml", []),
]
TARGET_SHARES = (0.5, 0.75, 0.9)  # targets: these shares of the best Recall@20 any method reached
CURVE_COLUMNS = ["round", "recall@20", "ndcg@20", "wire_bytes_per_device_so_far", "wire_evaluate_bytes_per_device_so_far",
                 "payload_bytes_per_device_so_far", "payload_evaluate_bytes_per_device_so_far"]
SPENT = "wire_start_train_bytes_per_device_so_far"  # the curves' x: start and training, evaluation left out


def run_method(config: str, extra: list[str], dataset: str, rounds: int, results_dir: Path) -> tuple[dict, pd.DataFrame]:
    """One method's run: its summary and its per-round curve."""
    flags = ["--config", str(CONFIGS / config), "--dataset", dataset, "--num-server-rounds", str(rounds),
             "--fed.eval-every", "1", *extra]
    summary = run_fedsparse("simulate", flags, results_dir)
    curve = pd.DataFrame(read_jsonl(Path(summary["run_dir"]) / "rounds.jsonl")).reindex(columns=CURVE_COLUMNS)
    curve[SPENT] = curve["wire_bytes_per_device_so_far"] - curve["wire_evaluate_bytes_per_device_so_far"]
    return summary, curve


def bytes_to_reach(curve: pd.DataFrame, target: float) -> float:
    """Start and training wire bytes per device when the curve first reaches ``target`` Recall@20 (nan if never)."""
    reached = curve[curve["recall@20"] >= target]
    return float(reached[SPENT].iloc[0]) if len(reached) else float("nan")


def report(args: argparse.Namespace, table: ResultTable, curves: ResultTable, seconds: float) -> None:
    """The Markdown table (bytes to each target, ratios to SparseRec) and the plot of the curves."""
    frame, points = table.frame(), curves.frame()
    best = points["recall@20"].max()
    rows = []
    for _, row in frame.iterrows():
        curve = points[points["cell"] == row["cell"]].sort_values("round")
        out = {"method": row["method"], "final_recall@20": curve["recall@20"].iloc[-1],
               "best_recall@20": curve["recall@20"].max(),
               "start_bytes_per_device": row["wire_start_both_bytes_per_device_mean"],
               "train_bytes_per_device": row["wire_train_both_bytes_per_device_mean"],
               "evaluate_bytes_per_device": row["wire_evaluate_both_bytes_per_device_mean"],
               "payload_start_train_bytes_per_device": (row["payload_start_both_bytes_per_device_mean"]
                                                        + row["payload_train_both_bytes_per_device_mean"])}
        for share in TARGET_SHARES:
            out[f"bytes_to_{share:g}_of_best"] = bytes_to_reach(curve, share * best)
        rows.append(out)
    result = pd.DataFrame(rows)
    reference = result[result["method"] == REFERENCE]
    for share in TARGET_SHARES:
        column = f"bytes_to_{share:g}_of_best"
        base = reference[column].iloc[0] if len(reference) else float("nan")
        result[f"{column}_vs_sparserec"] = result[column] / base
    header = (
        f"Measured by `python benchmarks/bytes_to_accuracy.py --dataset {args.dataset} --rounds {args.rounds}` on "
        f"{machine_description()}, {seconds:.0f} s (cells already in the CSV were not rerun). Each method is its named "
        "configuration (`simulations/configs/`) on the dataset's standard split, evaluated every round (test "
        "Recall@20, full ranking). Bytes are wire bytes per device (what Flower serialises, averaged over every "
        "device of the federation) of the start and the training rounds; the evaluation run every round for the "
        "curve is its own column (a deployment evaluates far less often); payload bytes count the arrays alone. "
        f"Targets are shares of the best Recall@20 any method reached ({best:.4f}); nan: never reached in the "
        "rounds run.\n\n"
    )
    write_markdown_table(args.out / "bytes_to_accuracy.md", header, result)
    plot(points, frame, args.out / "bytes_to_accuracy.png")


def plot(points: pd.DataFrame, frame: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for _, row in frame.iterrows():
        curve = points[points["cell"] == row["cell"]].sort_values("round")
        axis.plot(curve[SPENT], curve["recall@20"], marker=".", label=row["method"])
    axis.set_xscale("log")
    axis.set_xlabel("wire bytes per device so far (start and training)")
    axis.set_ylabel("test Recall@20")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--methods", default=",".join(name for name, _, _ in METHODS), help="comma-separated method names")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    table = ResultTable(args.out / "bytes_to_accuracy.csv")
    curves = ResultTable(args.out / "bytes_to_accuracy_curves.csv")
    if not args.report_only:
        require_data(parser)
        wanted = set(args.methods.split(","))
        for name, config, extra in METHODS:
            cell = f"{args.dataset}/r{args.rounds}/{name}"
            if name not in wanted or table.has(cell):
                continue
            summary, curve = run_method(config, extra, args.dataset, args.rounds, args.out / "runs")
            keys = [key for key in summary if key.startswith(("wire_", "payload_")) or key in ("recall@20", "ndcg@20")]
            table.add(cell, {"cell": cell, "method": name, "dataset": args.dataset, "rounds": args.rounds,
                             **{key: summary[key] for key in keys}})
            curves.set_rows(cell, [{"cell": cell, **record} for record in curve.to_dict("records")])
            spent = summary["wire_start_both_bytes_per_device_mean"] + summary["wire_train_both_bytes_per_device_mean"]
            print(f"{cell}: Recall@20 {summary['recall@20']:.4f}, {spent:,.0f} wire bytes per device (start, training)",
                  flush=True)
    report(args, table, curves, 0.0 if args.report_only else time.perf_counter() - started)


if __name__ == "__main__":
    main()
