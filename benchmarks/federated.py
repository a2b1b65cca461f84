"""Federated benchmark: accuracy vs rounds, upload/download bytes and device memory per client-round.

In-process engine (same loop as `flwr run`, see tests/test_federation_e2e.py). Each cell runs
``fedsparse simulate`` in a subprocess; bytes are the engine's measured per-round means, compared
with three references measured on the same updates: the information floor (row ids + active values
of the rows touched), the same rows uploaded dense, and dense FedAvg of the whole item table; and the
wire bytes per device over the whole run (serialised messages, start, training and evaluation). The
learning rates are the config's defaults unless ``--local-lr`` / ``--item-lr`` (and their dense twins) say.

    FEDSPARSE_DATA=../shared/data python benchmarks/federated.py --datasets ml-1m --rounds 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data, rules_column, run_code_version, run_fedsparse  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
CURVES = "federated_curves.csv"  # per-cell test Recall@20 by round (run directories are not committed)
WIRE_PHASES = ("start", "train", "evaluate", "total")  # summary.json's per-device wire totals, by phase of the run
# (variant, policy, density, extra flags); "per-row" keeps every item row at round(density * dim) values.
CELLS = [
    ("dense", "dense", 1.0, []),
    ("dense NMF-init", "sparserec", 1.0, []),
    ("sparserec", "sparserec", 0.5, []),
    ("sparserec", "sparserec", 0.2, []),
    ("sparserec", "sparserec", 0.1, []),
    ("sparserec per-row", "sparserec", 0.2, ["--sparse.nmf-select", "per-row"]),
]
COLUMNS = [
    "dataset", "rules", "variant", "density", "negatives", "rounds", "start", "downlink", "item_optimizer", "item_lr",
    "local_lr",
    "recall@20", "ndcg@20", "recall_vs_dense", "best_round", "start_recall@20", "final_recall@20",
    "upload_bytes_mean", "upload_vs_floor", "wire_upload_bytes_mean", "wire_upload_vs_floor",
    "dense_fedavg_vs_upload", "dense_rows_vs_upload",
    "download_bytes_mean", "device_memory_bytes_mean", "device_memory_bytes_max", "seconds_per_round",
    "total_nmf_upload_bytes", "total_nmf_download_bytes",
    *[f"wire_{phase}_bytes_per_device" for phase in WIRE_PHASES], "wire_total_bytes_per_device_max",
    "negatives_from", "code_version", "device_batch", "device_memory_count",
]
# How a row's device memory was counted: rows made before the batched path counted what a device alone holds
# record no ``device_memory_count`` and, batched, hold each device's touched rows dense.
MEMORY_AS_ALONE = "as a device alone"
MEMORY_BATCH_DENSE = "batch, dense rows (upper bound)"


def run_simulation(flags: list[str], results_dir: Path) -> Path:
    """``fedsparse simulate --engine inprocess FLAGS`` in a subprocess; returns its run directory."""
    return Path(run_fedsparse("simulate", flags, results_dir)["run_dir"])


def cell_row(run_dir: Path) -> dict:
    """One table row from a run directory: final metrics and per-client-round byte means over rounds."""
    rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())["config"]
    upload = rounds["upload_bytes_mean"].mean()
    evaluated = rounds.dropna(subset=["recall@20"])
    return {
        # Test metrics at the round of best validation Recall@20 (test never picks the round).
        "recall@20": summary["best_test_recall@20"],
        "ndcg@20": summary["best_test_ndcg@20"],
        "best_round": summary["best_validation_round"],
        "start_recall@20": evaluated["recall@20"].iloc[0],  # at the first evaluated round
        "final_recall@20": summary["recall@20"],
        "upload_bytes_mean": upload,
        "upload_vs_floor": upload / rounds["upload_floor_bytes_mean"].mean(),
        **wire_upload_columns(rounds),
        "dense_fedavg_vs_upload": rounds["dense_fedavg_upload_bytes"].mean() / upload,
        "dense_rows_vs_upload": rounds["dense_rows_upload_bytes_mean"].mean() / upload,
        "download_bytes_mean": rounds["download_bytes_mean"].mean(),
        "device_memory_bytes_mean": rounds["device_memory_bytes_mean"].mean(),
        "device_memory_bytes_max": rounds["device_memory_bytes_max"].max(),
        "seconds_per_round": rounds["seconds"].mean(),
        "total_nmf_upload_bytes": summary.get("total_nmf_upload_bytes", 0),
        "total_nmf_download_bytes": summary.get("total_nmf_download_bytes", 0),
        # What crossed the wire per device over the whole run (serialised messages, both directions), by phase.
        **{f"wire_{phase}_bytes_per_device": summary.get(f"wire_{phase}_both_bytes_per_device_mean", float("nan"))
           for phase in WIRE_PHASES},
        "wire_total_bytes_per_device_max": summary.get("wire_total_both_bytes_per_device_max", float("nan")),
        "local_lr": config["fed.local-lr"],
        "item_lr": config["fed.item-lr"] if config["fed.item-optimizer"] == "sgd" else float("nan"),
        "negatives_from": config["train.negatives-from"],
        "device_batch": config["fed.device-batch"],
        "device_memory_count": MEMORY_AS_ALONE,
        "start": start_of(config),
        "code_version": run_code_version(run_dir),
        "run_dir": str(run_dir),
    }


def start_of(config: dict) -> str:
    """The start a run's mask came from, in the words of nmf_start.py's methods ("none" for a dense table)."""
    if config["sparse.policy"] == "dense" or config["fed.nmf-init"] == "none":
        return "none"
    if config["fed.nmf-init"] == "central":
        return "central"
    start, cohort = config["fed.nmf-start"], f"c{config['fed.nmf-cohort']:g}"
    if start == "mu":
        return f"mu-{config['fed.nmf-rounds']} {cohort}"
    return f"{start} {cohort}" + (f" r{config['fed.nmf-refine']}" if start == "range" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-1m,gowalla")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--negatives", default="1,4", help="sampled negatives per positive to compare")
    parser.add_argument("--local-lr", default="", help="the user row's learning rate (sparse cells; default: the config's)")
    parser.add_argument("--dense-local-lr", default="",
                        help="the same for dense FedMF (tuned apart: it starts from random rows)")
    parser.add_argument("--item-optimizer", default="sgd", choices=("sgd", "adam"), help="the devices' optimiser of item rows")
    parser.add_argument("--item-lr", default="", help="sgd step per example on item rows (sparse cells; default: the config's)")
    parser.add_argument("--dense-item-lr", default="", help="the same for dense FedMF")
    parser.add_argument("--local-batch-size", default="0")
    parser.add_argument("--nmf-rounds", type=int, default=3,
                        help="fed.nmf-rounds: the rounds of the multiplicative (mu) start; the default range start ignores it")
    parser.add_argument("--downlink", default="full", choices=("full", "rows"))
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--device-batch", type=int, default=0,
                        help="fed.device-batch of every cell (devices trained as one batch: the same uploads, metrics and "
                             "device memory; 0: one at a time)")
    parser.add_argument("--cells", default="", help="only these comma-separated variant/density cells (default: all)")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    if args.report_only:
        write_report(args, "", 0.0)
        return
    require_data(parser)
    table = ResultTable(args.out / "federated.csv")
    started = time.perf_counter()
    for dataset in args.datasets.split(","):
        for negatives in args.negatives.split(","):
            for variant, policy, density, extra in CELLS:
                item_lr = args.dense_item_lr if policy == "dense" else args.item_lr
                optimizer = args.item_optimizer if args.item_optimizer == "adam" else f"sgd{item_lr or 'default'}"
                cell = (f"{dataset}/{variant}/{density}/neg{negatives}/nmf{args.nmf_rounds}/{args.downlink}/{optimizer}"
                        f"/r{args.rounds}")
                if args.cells and f"{variant}/{density}" not in args.cells.split(","):
                    continue
                if table.has(cell):
                    continue
                local_lr = args.dense_local_lr if policy == "dense" else args.local_lr
                rates = [*(["--fed.local-lr", local_lr] if local_lr else []), *(["--fed.item-lr", item_lr] if item_lr else [])]
                flags = ["--dataset", dataset, "--num-server-rounds", str(args.rounds), "--sparse.policy", policy,
                         "--sparse.density", str(density), "--negatives", negatives,
                         "--fed.fraction-train", str(args.fraction), *rates,
                         "--fed.local-batch-size", args.local_batch_size, "--fed.eval-every", str(args.eval_every),
                         "--fed.nmf-rounds", str(args.nmf_rounds), "--fed.downlink", args.downlink,
                         "--fed.item-optimizer", args.item_optimizer, "--fed.device-batch", str(args.device_batch), *extra]
                run_dir = run_simulation(flags, args.out / "runs")
                row = cell_row(run_dir)
                save_curve(args.out / CURVES, cell, run_dir)
                table.add(cell, {"dataset": dataset, "variant": variant, "policy": policy, "density": density,
                                 "negatives": int(negatives), "rounds": args.rounds, "item_optimizer": args.item_optimizer,
                                 "nmf_rounds": args.nmf_rounds if policy != "dense" else 0, "downlink": args.downlink, **row})
                print(f"{cell:35s} recall@20={row['recall@20']:.4f} upload={row['upload_bytes_mean']:.0f} B "
                      f"({row['dense_fedavg_vs_upload']:.0f}x below dense FedAvg)", flush=True)
    rates = "".join(f" --{name} {value}" for name, value in (
        ("local-lr", args.local_lr), ("dense-local-lr", args.dense_local_lr), ("item-lr", args.item_lr),
        ("dense-item-lr", args.dense_item_lr)) if value)
    command = (
        f"`python benchmarks/federated.py --datasets {args.datasets} --rounds {args.rounds} "
        f"--fraction {args.fraction} --negatives {args.negatives}{rates} --item-optimizer {args.item_optimizer} "
        f"--local-batch-size {args.local_batch_size} --nmf-rounds {args.nmf_rounds} --downlink {args.downlink}"
        f"{f' --device-batch {args.device_batch}' if args.device_batch else ''}`"
    )
    write_report(args, command, time.perf_counter() - started)


def write_report(args: argparse.Namespace, command: str, seconds: float) -> None:
    """The Markdown table (ratios against dense FedMF) and the recall-vs-rounds plot, from the CSVs."""
    fill_from_run_directories(ResultTable(args.out / "federated.csv"))
    frame = ResultTable(args.out / "federated.csv").frame()
    frame["rules"] = rules_column(frame)
    frame["device_memory_count"] = memory_count_column(frame)
    # Against dense FedMF (random rows, no NMF phase) of the same dataset, negatives and rules.
    dense = frame[frame["variant"] == "dense"].groupby(["dataset", "negatives", "rules"])["recall@20"].max()
    frame["recall_vs_dense"] = [row["recall@20"] / dense.get((row["dataset"], row["negatives"], row["rules"]), float("nan"))
                                for _, row in frame.iterrows()]
    old_rules = (
        "Rows whose `rules` read `old` were made under the old rules (before commit `3384ab4`: training negatives "
        "and padding excluded the held-out items, and the federated defaults of that time applied: per-row weighted "
        "mean of item deltas, `fed.item-lr = 1.0`, `fed.local-lr = 0.01`, no `fed.user-steps`); they are to be "
        "regenerated (issue 17). Rows reading `current` ran at today's rules and defaults, their negative rule and "
        "learning rates in their columns, and carry the whole-run wire bytes per device.\n\n"
    )
    header = (
        (old_rules if (frame["rules"] == "old").any() else
         "Every row ran at today's rules and defaults (its negative rule, learning rates and start in its columns: "
         "`start` as `benchmarks/nmf_start.py` names them), with the whole-run wire bytes per device by phase.\n\n")
        + ("A training upload per client-round, mean over rounds, in payload bytes (`upload_bytes_mean`: the arrays' "
           "nbytes) and wire bytes (`wire_upload_bytes_mean`: as Flower serialises the reply), each against the "
           "upload's information floor, its row ids and active values (`upload_vs_floor`, `wire_upload_vs_floor`).\n\n")
        + (f"`device_memory_*` of a row whose `device_memory_count` reads `{MEMORY_BATCH_DENSE}` was counted by the "
           "batched path before it counted what a device alone holds: it holds each device's touched rows dense, for "
           "the sparse cells an upper bound on the per-device (compact) figure (`benchmarks/results/device_memory.md`)."
           "\n\n" if (frame["device_memory_count"] == MEMORY_BATCH_DENSE).any() else "")
        + f"Last invocation: {command or 'a report of the CSVs'} on {machine_description()}, {seconds:.0f} s. Rows from other "
        "invocations keep their own settings in their columns; every command is in docs/guides/communication.md.\n\n"
    )
    write_markdown_table(args.out / "federated.md", header, frame.reindex(columns=COLUMNS))
    curves_path = args.out / CURVES
    saved = set(ResultTable(curves_path).frame().get("cell", []))
    for _, row in frame.iterrows():  # cells whose run directory is still on this machine but whose curve is not saved
        if row["cell"] not in saved and (Path(row["run_dir"]) / "rounds.jsonl").exists():
            save_curve(curves_path, row["cell"], Path(row["run_dir"]))
    curves = ResultTable(curves_path).frame().reindex(columns=["cell", "round", "recall@20"])
    plot_curves(frame, curves, args.out / "federated.png")


WIRE_UPLOAD_COLUMNS = ("wire_upload_bytes_mean", "wire_upload_vs_floor")  # added after the first rows were measured


def wire_upload_columns(rounds: pd.DataFrame) -> dict[str, float]:
    """The mean upload per client-round as Flower serialises it (bytes: arrays' headers, records, envelope) and
    its ratio to the mean information floor (row ids + active values), the payload ratio's wire counterpart."""
    wire = rounds["wire_upload_bytes_mean"].mean()
    return dict(zip(WIRE_UPLOAD_COLUMNS, (wire, wire / rounds["upload_floor_bytes_mean"].mean()), strict=True))


def fill_from_run_directories(table: ResultTable) -> None:
    """Give rows measured before the wire-upload columns existed those columns, read from their run directory
    when it is still on this machine (the same run's rounds.jsonl, nothing rerun); other rows keep their gaps."""
    for row in table.frame().to_dict("records"):
        missing = [key for key in WIRE_UPLOAD_COLUMNS if pd.isna(row.get(key))]
        rounds_path = Path(str(row["run_dir"])) / "rounds.jsonl"
        if missing and rounds_path.exists():
            measured = wire_upload_columns(pd.DataFrame(read_jsonl(rounds_path)))
            table.fill(row["cell"], {key: measured[key] for key in missing})


def memory_count_column(frame: pd.DataFrame) -> pd.Series:
    """Each row's ``device_memory_count``: as recorded, else (older rows) the batch's dense count when it ran in
    batches and a device's own count when it did not."""
    recorded = frame.get("device_memory_count", pd.Series(index=frame.index, dtype=object))
    batched = frame.get("device_batch", pd.Series(0, index=frame.index)).fillna(0) > 0
    return recorded.where(recorded.notna(), batched.map({True: MEMORY_BATCH_DENSE, False: MEMORY_AS_ALONE}))


def save_curve(path: Path, cell: str, run_dir: Path) -> None:
    """Append the cell's evaluated rounds (round, test Recall@20 / NDCG@20) to the committed curves CSV."""
    rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl")).dropna(subset=["recall@20"])
    ResultTable(path).set_rows(cell, rounds.reindex(columns=["round", "recall@20", "ndcg@20"]).to_dict("records"))


def plot_curves(frame: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    """Test Recall@20 against rounds, one panel per dataset and one line per cell with a saved curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(frame["dataset"].unique())
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        for _, row in frame[frame["dataset"] == dataset].iterrows():
            rounds = curves[curves["cell"] == row["cell"]]
            if rounds.empty:
                continue
            label = f"{row['variant']} {row['density']} neg{row['negatives']} start {row['start']}"
            axis.plot(rounds["round"], rounds["recall@20"], marker=".", label=label)
        axis.set_title(dataset)
        axis.set_xlabel("round")
        axis.set_ylabel("test Recall@20")
        axis.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


if __name__ == "__main__":
    main()
