"""Sparse-core benchmark: MF-BPR, d = 64, every mask policy x density, plus SparseRec ablations.

Each cell is one ``fedsparse train`` subprocess with the same seed, epochs and hyper-parameters; only
the ``sparse.*`` flags differ. Ratios are taken against the dense cell of the same dataset and negative
rule. Finished cells are kept in ``<out>/sparse_grid.csv`` and skipped on a rerun; each row
records the negative rule and code version its run read, and the table says which rows predate today's rule.

    FEDSPARSE_DATA=../shared/data python benchmarks/sparse_grid.py --datasets gowalla,yelp2018
    FEDSPARSE_DATA=../shared/data python benchmarks/sparse_grid.py --datasets ml-1m --groups choices
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
from common import add_result_flags, require_data, rules_column, run_code_version, run_training  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description  # noqa: E402
from fedsparse.run_files import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
POLICIES = ["static", "magnitude", "set", "rigl", "dsl", "sparserec"]
DENSITIES = [0.05, 0.1, 0.2, 0.5]
ABLATION_DENSITY = 0.2
# SparseRec without one of its three parts (docs/methods.md#sparserec).
ABLATIONS = {
    "sparserec w/o NMF (random init)": ["--sparse.mask-init", "random"],
    "sparserec w/o accumulation (last batch)": ["--sparse.grow-score", "last-batch"],
    "sparserec w/o sparse backward": ["--sparse.sparse-grad", "off"],
    "sparserec w/o NMF values (mask only)": ["--sparse.nmf-values", "random"],
}
# The open choices of the reconstruction, each varied alone from the defaults.
CHOICES = {
    "grow abs-sum": ["--sparse.grow-score", "abs-sum"],
    "grow ema": ["--sparse.grow-score", "ema"],
    "nmf per-row quota": ["--sparse.nmf-select", "per-row"],
    "nmf no rescale": ["--sparse.nmf-rescale", "false"],
    "nmf min-per-row 0": ["--sparse.nmf-min-per-row", "0"],
    "nmf values random (mask only)": ["--sparse.nmf-values", "random"],
    "rigl schedule (0.3, end 0.75)": ["--sparse.drop-fraction", "0.3", "--sparse.drop-fraction-min", "0",
                                      "--sparse.end-fraction", "0.75"],
    "no regrow of pruned": ["--sparse.regrow-pruned", "false"],
    "update every 100": ["--sparse.update-every", "100"],
    "row budget 0.5K by degree": ["--sparse.grad-row-budget", "0.5", "--sparse.grad-rows", "degree"],
}
COLUMNS = [
    "dataset", "rules", "variant", "policy", "density", "recall@20", "ndcg@20", "recall_vs_dense", "seconds_per_epoch",
    "time_vs_dense", "train_seconds", "peak_grad_bytes", "grad_vs_dense", "stored_model_bytes", "stored_vs_dense",
    "training_state_bytes", "mask_updates", "mask_init_seconds", "epochs_run", "best_epoch", "negatives_from",
    "code_version",
]
OLD_RULES_NOTE = (
    "Rows whose `rules` read `old` were made under the old negative rule (before issue 15: training negatives "
    "excluded the held-out items, today `train.negatives-from = unrated`; the default is `non-train`) and record "
    "no code version; they are to be regenerated (issue 17). Rows reading `current` ran at today's rule, "
    "`negatives_from` and `code_version` from their run's config.json.\n\n"
)


def cells(groups: list[str], densities: list[float], policies: list[str]) -> list[tuple[str, str, float, list[str]]]:
    """(variant, policy, density, extra flags) of the requested groups; dense always first."""
    planned = [("dense", "dense", 1.0, [])]
    if "main" in groups:
        planned += [(policy, policy, density, []) for density in densities for policy in policies]
    if "ablation" in groups:
        planned += [(name, "sparserec", ABLATION_DENSITY, flags) for name, flags in ABLATIONS.items()]
    if "choices" in groups:
        planned += [("sparserec", "sparserec", ABLATION_DENSITY, [])]
        planned += [(f"sparserec {name}", "sparserec", ABLATION_DENSITY, flags) for name, flags in CHOICES.items()]
        planned += [("dsl", "dsl", ABLATION_DENSITY, [])]
    return planned


def with_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the rules column (a row that records its negative rule ran at today's) and ratios against the
    dense cell of the same dataset and rules."""
    frame["rules"] = rules_column(frame)
    keys = list(zip(frame["dataset"], frame["rules"], strict=True))
    dense = frame[frame["policy"] == "dense"].set_index(["dataset", "rules"])
    for column, source in [("recall_vs_dense", "recall@20"), ("time_vs_dense", "seconds_per_epoch"),
                           ("grad_vs_dense", "peak_grad_bytes"), ("stored_vs_dense", "stored_model_bytes")]:
        frame[column] = frame[source] / [dense[source].get(key, float("nan")) for key in keys]
    return frame


def last_invocation(table: Path) -> str:
    """The measured invocation a table's header records (kept when only the report is rewritten), or a note
    that there is none."""
    text = table.read_text() if table.exists() else ""
    for prefix in ("Last invocation: ", "Measured by "):
        start = text.find(prefix)
        if start >= 0 and prefix + "a report" not in text[start:start + 30]:
            return text[start:].split("\n\n", 1)[0]
    return "Last invocation: none recorded (the CSV's cells were merged from other invocations)."


def write_report(args: argparse.Namespace, command: str, seconds: float) -> None:
    """The Markdown table from the CSV: the rules note when old rows remain, then the last invocation."""
    frame = with_ratios(ResultTable(args.out / f"{args.name}.csv").frame()).reindex(columns=COLUMNS)
    note = OLD_RULES_NOTE if (frame["rules"] == "old").any() else ""
    table = args.out / f"{args.name}.md"
    last = (f"Last invocation: {command} on {machine_description()}, {seconds:.0f} s (cells already in the CSV were "
            "not rerun)." if command else last_invocation(table))
    header = (f"{note}Every cell is one `fedsparse train` process (MF-BPR, d = 64, one negative, Adam; ratios against "
              f"the dense cell of the same dataset and rules). {last}\n\n")
    atomic_write_text(table, header + frame.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(frame.to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="gowalla,yelp2018")
    parser.add_argument("--groups", default="main,ablation", help="comma list of: main, ablation, choices")
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)), help="main-group densities (to shard a grid)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="main-group policies (to shard a grid)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--lr", default="0.005")
    parser.add_argument("--name", default="sparse_grid", help="file stem of the result table")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    if args.report_only:
        write_report(args, "", 0.0)
        return
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"--policies: unknown {unknown}; known: {POLICIES}")
    require_data(parser)

    table = ResultTable(args.out / f"{args.name}.csv")
    started = time.perf_counter()
    densities = [float(value) for value in args.densities.split(",")]
    for dataset in args.datasets.split(","):
        for variant, policy, density, extra in cells(args.groups.split(","), densities, policies):
            cell = f"{dataset}/{variant}/{density}"
            if table.has(cell):
                continue
            flags = ["--dataset", dataset, "--model", "mf", "--dim", "64", "--loss", "bpr", "--negatives", "1",
                     "--lr", args.lr, "--epochs", str(args.epochs), "--train.eval-every", str(args.eval_every),
                     "--train.patience", "0", "--sparse.policy", policy, "--sparse.density", str(density), *extra]
            summary = run_training(flags, args.out / "runs")
            config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())["config"]
            table.add(cell, {"dataset": dataset, "variant": variant, **{key: summary.get(key) for key in COLUMNS[3:-2]},
                             "negatives_from": config["train.negatives-from"],
                             "code_version": run_code_version(summary["run_dir"])})
            print(f"{cell:55s} recall@20={summary['recall@20']:.4f} {summary['seconds_per_epoch']:.2f} s/epoch "
                  f"grad={summary['peak_grad_bytes'] / 2**20:.1f} MiB", flush=True)
    command = (f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/sparse_grid.py "
               f"--datasets {args.datasets} --groups {args.groups} --densities {args.densities} --policies {args.policies} "
               f"--epochs {args.epochs} "
               f"--eval-every {args.eval_every} --lr {args.lr} --name {args.name}`")
    write_report(args, command, time.perf_counter() - started)


if __name__ == "__main__":
    main()
