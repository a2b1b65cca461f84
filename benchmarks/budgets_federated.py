"""Budget benchmark (federated): element-wise masks vs embedding sizes vs AMGP at equal item-table bytes,
and heterogeneous device classes.

In-process engine, the federated benchmark's settings (benchmarks/federated.py): the config's learning
rates and start, SGD item steps, rows downlink, 10 % of devices per round. sparserec and dsl hold
``--density`` of the item table; the size policies hold the density whose prefix-stored table takes no
more bytes (as in benchmarks/budgets.py); size-bet applies the allocation the central benchmark's BET
search found (budgets_central.csv). The heterogeneous cells give devices widths 16/32/64 (shares
0.3/0.4/0.3) and report accuracy, upload and memory per class; the streaming cells start with half the
items and users and let the rest arrive in four stages under the item table's initial budget. Finished
cells are kept in ``<out>/budgets_federated.csv`` and skipped on a rerun; each row records its negative
rule, step sizes, start, code version and whole-run wire bytes per device.

    FEDSPARSE_DATA=../shared/data python benchmarks/budgets_federated.py --datasets ml-1m
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budgets import equal_bytes_density, timing_note  # noqa: E402
from federated import cell_row, run_simulation, save_curve  # noqa: E402

from fedsparse.config import DataConfig  # noqa: E402
from fedsparse.data import load_dataset  # noqa: E402
from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
WIDTHS, SHARES = "16,32,64", "0.3,0.4,0.3"
NMF_START = ["--sparse.mask-init", "nmf"]  # a size policy started from the NMF factor (its values, its own prefix mask)
HETEROGENEOUS = ["--budget.device-widths", WIDTHS, "--budget.device-shares", SHARES]
STREAMING = ["--budget.stream-stages", "4", "--budget.stream-start", "0.5"]  # half the items and users at round 1,
# the rest in 4 stages
COLUMNS = [
    "dataset", "variant", "policy", "density", "rounds", "start", "item_lr", "local_lr", "recall@20", "ndcg@20",
    "recall_vs_sparserec", "item_table_bytes", "bytes_vs_sparserec", "upload_bytes_mean", "download_bytes_mean",
    "device_memory_bytes_mean", "wire_start_bytes_per_device", "wire_total_bytes_per_device",
    "wire_total_bytes_per_device_max", "seconds_per_round",
    *[f"recall@20_w{w}" for w in WIDTHS.split(",")], *[f"device_memory_bytes_mean_w{w}" for w in WIDTHS.split(",")],
    *[f"upload_bytes_mean_w{w}" for w in WIDTHS.split(",")], "negatives_from", "code_version",
]


def cells(density: float, size_density: float, bet_allocation: str | None) -> list[tuple[str, str, float, list[str]]]:
    """(variant, policy, density, extra flags) of every cell; sparserec first (the reference)."""
    planned = [
        ("sparserec", "sparserec", density, []),
        ("dsl", "dsl", density, []),
        ("size-frequency", "size-frequency", size_density, []),
        ("size-scall", "size-scall", size_density, []),
        ("size-ciess", "size-ciess", size_density, []),
        ("size-frequency NMF start", "size-frequency", size_density, NMF_START),
        ("amgp", "amgp", size_density, []),
        ("sparserec 16/32/64", "sparserec", density, HETEROGENEOUS),
        ("size-frequency NMF start 16/32/64", "size-frequency", size_density, [*NMF_START, *HETEROGENEOUS]),
        ("sparserec streaming", "sparserec", density, STREAMING),
        ("size-frequency NMF start streaming", "size-frequency", size_density, [*NMF_START, *STREAMING]),
    ]
    if bet_allocation:
        planned.insert(5, ("size-bet", "size-bet", size_density, ["--sparse.group-sizes", bet_allocation]))
    return planned


def class_columns(run_dir: Path) -> dict[str, float]:
    """Per-class test Recall@20 at the best validation round, and per-class upload/memory means over rounds."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
    row = {f"recall@20_w{w}": summary.get(f"best_test_recall@20_w{w}") for w in WIDTHS.split(",")}
    for w in WIDTHS.split(","):
        for name in ("device_memory_bytes_mean", "upload_bytes_mean"):
            if f"{name}_w{w}" in rounds:
                row[f"{name}_w{w}"] = float(rounds[f"{name}_w{w}"].mean())
    return {**row, "item_table_bytes": summary["item_table_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-1m")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--nmf-rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--device-batch", type=int, default=500,
                        help="devices trained as one batched computation (the same updates; device classes train one at a time)")
    parser.add_argument("--cells", default="", help="only these comma-separated variants (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="run no cell: rewrite the table and the plot from the CSVs")
    args = parser.parse_args()
    table = ResultTable(args.out / "budgets_federated.csv")
    if args.report_only:
        write_report(args, table, 0.0)
        return
    if not os.environ.get("FEDSPARSE_DATA"):
        parser.error("set FEDSPARSE_DATA to the folder holding the datasets (e.g. ../shared/data)")
    central = ResultTable(args.out / "budgets_central.csv").frame()
    started = time.perf_counter()
    for dataset in args.datasets.split(","):
        data = load_dataset(DataConfig(dataset=dataset), 0)
        size_density = equal_bytes_density([data.n_users, data.n_items], args.density)
        bet = central[(central.get("dataset") == dataset) & (central.get("policy") == "size-bet")] if len(central) else central
        allocation = str(bet["group_sizes"].iloc[0]) if len(bet) else None
        for variant, policy, density, extra in cells(args.density, size_density, allocation):
            cell = f"{dataset}/{variant}/{density}/r{args.rounds}"
            if (args.cells and variant not in args.cells.split(",")) or table.has(cell):
                continue
            flags = ["--dataset", dataset, "--num-server-rounds", str(args.rounds), "--sparse.policy", policy,
                     "--sparse.density", str(density), "--negatives", "1", "--fed.fraction-train", str(args.fraction),
                     "--fed.eval-every", str(args.eval_every), "--fed.nmf-rounds", str(args.nmf_rounds),
                     "--fed.downlink", "rows", "--fed.item-optimizer", "sgd",
                     "--fed.device-batch", str(args.device_batch), *extra]
            run_dir = run_simulation(flags, args.out / "runs")
            row = {**cell_row(run_dir), **class_columns(run_dir)}
            save_curve(args.out / "budgets_federated_curves.csv", cell, run_dir)
            table.add(cell, {"dataset": dataset, "variant": variant, "policy": policy, "density": density, "rounds": args.rounds,
                             **row})
            print(f"{cell:55s} recall@20={row['recall@20']:.4f} table={row['item_table_bytes']:,} B "
                  f"upload={row['upload_bytes_mean']:.0f} B", flush=True)
    write_report(args, table, time.perf_counter() - started)


def write_report(args: argparse.Namespace, table: ResultTable, seconds: float) -> None:
    """The Markdown table (ratios against sparserec of the same dataset) and the plot."""
    frame = table.frame()
    for _, group in frame.groupby("dataset"):
        reference = group[group["variant"] == "sparserec"].iloc[0]
        frame.loc[group.index, "recall_vs_sparserec"] = group["recall@20"] / reference["recall@20"]
        frame.loc[group.index, "bytes_vs_sparserec"] = group["item_table_bytes"] / reference["item_table_bytes"]
    measured = (
        "Rewritten from the CSV (`--report-only`); its cells were measured by the invocations docs/guides/budgets.md "
        "lists (each row's rounds in its column)" if args.report_only else
        f"Measured by `python benchmarks/budgets_federated.py --datasets {args.datasets} --density {args.density} "
        f"--rounds {args.rounds} --nmf-rounds {args.nmf_rounds} --fraction {args.fraction} --eval-every {args.eval_every} "
        f"--device-batch {args.device_batch}` on {machine_description()}; {timing_note(seconds)}"
    )
    header = (
        f"{measured}. Recall@20 is the test value at the best validation round; "
        "item_table_bytes is the server's final masked table as stored; wire_* are the serialised messages per device over "
        "the whole run, both directions (start alone, and start + training + evaluation; mean, and max over devices); "
        "the _w16/_w32/_w64 columns are per device class.\n\n"
    )
    write_markdown_table(args.out / "budgets_federated.md", header, frame.reindex(columns=COLUMNS))
    plot_report(frame, ResultTable(args.out / "budgets_federated_curves.csv").frame(), args.out / "budgets_federated.png")


def plot_report(frame: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    """Left: test Recall@20 against rounds per cell. Right: per-class Recall@20 and device memory of the
    heterogeneous cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rounds_axis, recall_axis, memory_axis) = plt.subplots(1, 3, figsize=(17, 4.5))
    rounds_axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # up to 20 cells without a repeated colour
    for _, row in frame.iterrows():
        curve = curves[curves["cell"] == row["cell"]] if len(curves) else curves
        if len(curve):
            rounds_axis.plot(curve["round"], curve["recall@20"], marker=".", label=f"{row['dataset']} {row['variant']}")
    rounds_axis.set_xlabel("round")
    rounds_axis.set_ylabel("test Recall@20")
    rounds_axis.legend(fontsize=5, ncol=2)
    classes = WIDTHS.split(",")
    hetero = frame[frame["variant"].str.contains("16/32/64")]
    for offset, (_, row) in enumerate(hetero.iterrows()):
        positions = [i + 0.8 * offset / max(1, len(hetero)) for i in range(len(classes))]
        label = f"{row['dataset']} {row['variant']}"
        recall_axis.bar(positions, [row[f"recall@20_w{w}"] for w in classes], width=0.8 / max(1, len(hetero)), label=label)
        memory_axis.bar(positions, [row[f"device_memory_bytes_mean_w{w}"] / 1e3 for w in classes],
                        width=0.8 / max(1, len(hetero)), label=label)
    for axis, ylabel in ((recall_axis, "test Recall@20 (best validation round)"), (memory_axis, "device memory per round (KB)")):
        axis.set_xticks(range(len(classes)), [f"{w} dims" for w in classes])
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


if __name__ == "__main__":
    main()
