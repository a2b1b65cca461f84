"""Bytes per device to reach a given accuracy: the whole run on the wire, start and evaluations included.

Each method is a named configuration of ``simulations/configs/`` (its paper and what it sends are in the
file's header) run by ``fedsparse simulate`` on one dataset, evaluated every round on the same devices.
Its curve is test Recall@20 against the wire bytes per device of the start and the training rounds so
far (every message as Flower serialises it, averaged over every device of the federation); the
evaluation this benchmark runs every round, to draw the curve, is counted apart. The table gives, for
targets that are shares of the best Recall@20 any method reached, those bytes each method needed to
first reach it, and that figure over SparseRec's. Each setting (dataset, rounds, participation, dimension,
evaluation period) is its own group of rows, compared only within itself.

    FEDSPARSE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/bytes_to_accuracy.py --dataset ml-100k --rounds 30
    FEDSPARSE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/bytes_to_accuracy.py --dataset ml-1m --rounds 150 \
        --fraction 0.1 --dim 64 --eval-every 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data, run_code_version, run_fedsparse  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_sections  # noqa: E402
from fedsparse.run_files import read_jsonl, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "simulations" / "configs"
REFERENCE = "SparseRec 0.2"  # the method every other one's bytes are divided by
# (method, named config, flags added to it)
METHODS = [
    (REFERENCE, "sparserec-peer.toml", []),
    ("SparseRec 0.2 (rows downlink)", "sparserec-peer.toml", ["--fed.downlink", "rows"]),
    ("FedMF (rows uplink)", "fedmf.toml", []),
    ("FedAvg upload (whole table)", "fedmf.toml", ["--fed.uplink", "table"]),
    ("PFedRec", "pfedrec.toml", []),
    ("FedRecon", "fedrecon.toml", []),
]
TARGET_SHARES = (0.5, 0.75, 0.9)  # targets: these shares of the best Recall@20 any method reached
CURVE_COLUMNS = ["round", "recall@20", "ndcg@20", "wire_bytes_per_device_so_far", "wire_evaluate_bytes_per_device_so_far",
                 "payload_bytes_per_device_so_far", "payload_evaluate_bytes_per_device_so_far"]
SPENT = "wire_start_train_bytes_per_device_so_far"  # the curves' x: start and training, evaluation left out


def setting_flags(args: argparse.Namespace) -> list[str]:
    """The flags every method of this invocation's setting runs with (participation, dimension, evaluation)."""
    flags = ["--dataset", args.dataset, "--num-server-rounds", str(args.rounds), "--fed.eval-every", str(args.eval_every),
             "--fed.fraction-train", str(args.fraction)]
    return flags + (["--model.dim", str(args.dim)] if args.dim else [])


def setting_of(args: argparse.Namespace) -> str:
    """The group a cell belongs to: methods are compared only with others run under the same setting."""
    dim = f", d {args.dim}" if args.dim else ""
    return f"{args.dataset}, {args.rounds} rounds, participation {args.fraction:g}{dim}, evaluated every {args.eval_every}"


def command_of(args: argparse.Namespace) -> str:
    """The invocation that reproduces a setting's rows."""
    extra = f" --dim {args.dim}" if args.dim else ""
    return (f"python benchmarks/bytes_to_accuracy.py --dataset {args.dataset} --rounds {args.rounds} "
            f"--fraction {args.fraction:g} --eval-every {args.eval_every}{extra}")


def run_method(config: str, extra: list[str], flags: list[str], results_dir: Path) -> tuple[dict, pd.DataFrame]:
    """One method's run: its summary and its per-round curve (the rounds it was evaluated at)."""
    summary = run_fedsparse("simulate", ["--config", str(CONFIGS / config), *flags, *extra], results_dir)
    curve = pd.DataFrame(read_jsonl(Path(summary["run_dir"]) / "rounds.jsonl")).reindex(columns=CURVE_COLUMNS)
    curve = curve.dropna(subset=["recall@20"])
    curve[SPENT] = curve["wire_bytes_per_device_so_far"] - curve["wire_evaluate_bytes_per_device_so_far"]
    return summary, curve


def bytes_to_reach(curve: pd.DataFrame, target: float) -> float:
    """Start and training wire bytes per device when the curve first reaches ``target`` Recall@20 (nan if never)."""
    reached = curve[curve["recall@20"] >= target]
    return float(reached[SPENT].iloc[0]) if len(reached) else float("nan")


def setting_table(frame: pd.DataFrame, points: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """One setting's rows: bytes to each target (shares of the setting's best Recall@20), ratios to SparseRec."""
    best = points[points["cell"].isin(frame["cell"])]["recall@20"].max()
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
    return result, best


def report(args: argparse.Namespace, table: ResultTable, curves: ResultTable, seconds: float) -> None:
    """The Markdown tables, one per setting (bytes to each target, ratios to SparseRec), and the plot."""
    frame, points = table.frame(), curves.frame()
    invocation = ("Rewritten from the CSVs (`--report-only`)" if args.report_only else
                  f"Last invocation: `{command_of(args)}` on {machine_description()}, {seconds:.0f} s (cells already in the "
                  "CSV were not rerun)")
    header = (
        f"{invocation}. Each method is its named configuration (`simulations/configs/`) on the dataset's standard split, "
        "under the setting of its group (each group's command reproduces it), evaluated on the same sample of devices "
        "at the rounds its group names (test Recall@20, full ranking). Bytes are wire bytes per device (what Flower "
        "serialises, averaged over every device of the federation, whether it took part or not) of the start and the "
        "training rounds so far; the evaluations run for the curve are their own column (a deployment evaluates far "
        "less often); payload bytes count the arrays alone. Targets are shares of the best Recall@20 any method of the "
        "group reached, first reached at an evaluated round; nan: never reached in the rounds run. `rows downlink`: "
        "the device downloads only the rows it trains (it names them to the server, as FedMF's rows uplink does).\n"
    )
    sections = []
    for setting, group in frame.groupby("setting", sort=False):
        result, best = setting_table(group, points)
        code = ", ".join(sorted(set(group["code_version"].astype(str)))) if "code_version" in group else "not recorded"
        sections.append((f"\n## {setting}\n\n`{group['command'].iloc[0]}` at code {code}; best Recall@20 of the group: "
                         f"{best:.4f}.\n\n", result))
    write_markdown_sections(args.out / "bytes_to_accuracy.md", header, sections)
    plot(points, frame, args.out / "bytes_to_accuracy.png")


def plot(points: pd.DataFrame, frame: pd.DataFrame, path: Path) -> None:
    """Recall@20 against start and training wire bytes per device, one panel per setting."""
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(frame["setting"]))
    figure, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 4.5), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        for _, row in frame[frame["setting"] == setting].iterrows():
            curve = points[points["cell"] == row["cell"]].sort_values("round")
            axis.plot(curve[SPENT], curve["recall@20"], marker=".", label=row["method"])
        axis.set_xscale("log")
        axis.set_title(setting, fontsize=9)
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
    parser.add_argument("--fraction", type=float, default=1.0, help="devices per training round / devices")
    parser.add_argument("--dim", type=int, default=0, help="model.dim for every method (0 = each named config's)")
    parser.add_argument("--eval-every", type=int, default=1, help="rounds between the evaluations that draw the curves")
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
            cell = f"{setting_of(args)}/{name}"
            if name not in wanted or table.has(cell):
                continue
            summary, curve = run_method(config, extra, setting_flags(args), args.out / "runs")
            keys = [key for key in summary if key.startswith(("wire_", "payload_")) or key in ("recall@20", "ndcg@20")]
            table.add(cell, {"cell": cell, "setting": setting_of(args), "command": command_of(args),
                             "code_version": run_code_version(Path(summary["run_dir"])),
                             "method": name,
                             "dataset": args.dataset, "rounds": args.rounds, **{key: summary[key] for key in keys}})
            curves.set_rows(cell, [{"cell": cell, **record} for record in curve.to_dict("records")])
            spent = summary["wire_start_both_bytes_per_device_mean"] + summary["wire_train_both_bytes_per_device_mean"]
            print(f"{cell}: Recall@20 {summary['recall@20']:.4f}, {spent:,.0f} wire bytes per device (start, training)",
                  flush=True)
    report(args, table, curves, 0.0 if args.report_only else time.perf_counter() - started)


if __name__ == "__main__":
    main()
