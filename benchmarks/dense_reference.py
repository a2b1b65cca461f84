"""Dense reference figures: MF-BPR and NeuMF, d = 64, on the real datasets (the 100 % line).

Each cell runs ``fedsparse train`` in its own subprocess so its peak memory is its own; finished cells
are kept in ``benchmarks/results/dense_reference.csv`` and skipped on a rerun. Not a test.

    FEDSPARSE_DATA=../shared/data python benchmarks/dense_reference.py            # full grid
    FEDSPARSE_DATA=../shared/data python benchmarks/dense_reference.py --quick    # ml-100k only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data, run_training  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description  # noqa: E402
from fedsparse.run_files import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent

# (label, dataset, split, large): "large" cells get --large-epochs, the others --epochs.
CELLS = [
    ("ml-100k", "ml-100k", "random", False),
    ("ml-100k LOO", "ml-100k", "loo", False),
    ("ml-1m", "ml-1m", "provided", False),
    ("gowalla", "gowalla", "provided", True),
    ("yelp2018", "yelp2018", "provided", True),
]
MODEL_FLAGS = {
    "mf": ["--sparse.policy", "dense", "--model", "mf", "--loss", "bpr", "--negatives", "1", "--lr", "0.005",
           "--train.l2-reg", "1e-4"],
    "neumf": ["--sparse.policy", "dense", "--model", "neumf", "--loss", "bce", "--negatives", "4", "--lr", "0.001",
              "--train.l2-reg", "0"],
}
COLUMNS = [
    "dataset", "split", "model", "epochs_run", "best_epoch", "recall@20", "ndcg@20", "hr@20",
    "sampled_hr@10", "sampled_ndcg@10", "seconds_per_epoch", "train_seconds", "peak_rss_mib", "model_mib",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ml-100k cells only")
    parser.add_argument("--models", default="mf,neumf")
    parser.add_argument("--datasets", default="", help="comma list of dataset labels to run (default: all)")
    parser.add_argument("--epochs", type=int, default=60, help="upper bound; early stopping on validation")
    parser.add_argument("--large-epochs", type=int, default=20, help="upper bound for gowalla and yelp2018")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--large-eval-every", type=int, default=10, help="for gowalla and yelp2018 (full ranking is slow)")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    table = ResultTable(args.out / "dense_reference.csv")
    command = (f"`python benchmarks/dense_reference.py --epochs {args.epochs} --large-epochs {args.large_epochs} "
               f"--eval-every {args.eval_every} --large-eval-every {args.large_eval_every}`")
    if args.report_only:
        write_table(args.out, table, f"Rewritten from the CSV (`--report-only`); its cells were measured by {command}.")
        return
    require_data(parser)
    started = time.perf_counter()
    # Cheap cells first: every MF cell, then NeuMF (whose full ranking on the large sets is slowest).
    for model, (label, dataset, split, large) in [(m, c) for m in args.models.split(",") for c in CELLS]:
        if args.quick and dataset != "ml-100k" or args.datasets and label not in args.datasets.split(","):
            continue
        cell = f"{label}/{model}"
        if table.has(cell):
            continue
        epochs = args.large_epochs if large else args.epochs
        eval_every = args.large_eval_every if large else args.eval_every
        flags = ["--dataset", dataset, "--split", split, "--dim", "64", "--epochs", str(epochs),
                 "--train.eval-every", str(eval_every), *MODEL_FLAGS[model]]
        summary = run_training(flags, args.out / "runs")
        row = {"dataset": label, "split": split, "model": model, **summary,
               "peak_rss_mib": summary["peak_rss_bytes"] / 2**20, "model_mib": summary["model_bytes"] / 2**20}
        table.add(cell, {key: row.get(key) for key in COLUMNS})
        print(f"{cell:20s} recall@20={summary['recall@20']:.4f} ndcg@20={summary['ndcg@20']:.4f} "
              f"{summary['seconds_per_epoch']:.2f} s/epoch, {summary['epochs_run']} epochs", flush=True)
    write_table(args.out, table, f"Measured by {command} on {machine_description()}; this invocation took "
                f"{time.perf_counter() - started:.0f} s (cells already in the CSV were not rerun).")


def write_table(out: Path, table: ResultTable, header: str) -> None:
    """The Markdown table of every cell in the CSV under ``header``, written atomically."""
    frame = table.frame().reindex(columns=COLUMNS)
    atomic_write_text(out / "dense_reference.md", header + "\n\n" + frame.to_markdown(index=False, floatfmt=".4f") + "\n")
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
