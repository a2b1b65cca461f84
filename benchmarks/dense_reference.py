"""Dense reference figures: MF-BPR and NeuMF, d = 64, on the real datasets (the 100 % line).

Each cell runs ``fedsparse train`` in its own subprocess so its peak memory is its own, then the
summaries are collected into ``benchmarks/results/dense_reference.{csv,md}``. Not a test.

    FEDSPARSE_DATA=../shared/data python benchmarks/dense_reference.py            # full grid
    FEDSPARSE_DATA=../shared/data python benchmarks/dense_reference.py --quick    # ml-100k only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent

# (label, dataset, split, large): "large" cells get --large-epochs, the others --epochs.
# Hyper-parameters per model are in MODEL_FLAGS.
CELLS = [
    ("ml-100k", "ml-100k", "random", False),
    ("ml-100k LOO", "ml-100k", "loo", False),
    ("ml-1m", "ml-1m", "provided", False),
    ("gowalla", "gowalla", "provided", True),
    ("yelp2018", "yelp2018", "provided", True),
]
MODEL_FLAGS = {
    "mf": ["--model", "mf", "--loss", "bpr", "--negatives", "1", "--lr", "0.005", "--train.l2-reg", "1e-4"],
    "neumf": ["--model", "neumf", "--loss", "bce", "--negatives", "4", "--lr", "0.001", "--train.l2-reg", "0"],
}
COLUMNS = [
    "dataset", "split", "model", "epochs_run", "best_epoch", "recall@20", "ndcg@20", "hr@20",
    "sampled_hr@10", "sampled_ndcg@10", "seconds_per_epoch", "train_seconds", "peak_rss_mib", "model_mib",
]


def run_cell(dataset: str, split: str, model: str, epochs: int, eval_every: int, results_dir: Path) -> dict:
    """Train one cell in a subprocess and return its summary.json."""
    results_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "fedsparse.cli", "train", "--no-progress",
        "--dataset", dataset, "--split", split, "--dim", "64", "--epochs", str(epochs),
        "--train.eval-every", str(eval_every), "--results-dir", str(results_dir), *MODEL_FLAGS[model],
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    run_dir = Path(completed.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ml-100k cells only")
    parser.add_argument("--models", default="mf,neumf")
    parser.add_argument("--epochs", type=int, default=200, help="upper bound; early stopping on validation")
    parser.add_argument("--large-epochs", type=int, default=40, help="upper bound for gowalla and yelp2018")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not os.environ.get("FEDSPARSE_DATA"):
        parser.error("set FEDSPARSE_DATA to the folder holding the datasets (e.g. ../shared/data)")

    rows = []
    started = time.perf_counter()
    for label, dataset, split, large in CELLS:
        if args.quick and dataset != "ml-100k":
            continue
        for model in args.models.split(","):
            epochs = args.large_epochs if large else args.epochs
            summary = run_cell(dataset, split, model, epochs, args.eval_every, args.out / "runs")
            row = {"dataset": label, "split": split, "model": model, **summary}
            row["peak_rss_mib"] = summary["peak_rss_bytes"] / 2**20
            row["model_mib"] = summary["model_bytes"] / 2**20
            rows.append(row)
            print(f"{label:12s} {model:6s} recall@20={summary['recall@20']:.4f} ndcg@20={summary['ndcg@20']:.4f} "
                  f"{summary['seconds_per_epoch']:.2f} s/epoch, {summary['epochs_run']} epochs", flush=True)
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "dense_reference.csv", index=False)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    header = (
        f"Measured by `python benchmarks/dense_reference.py --epochs {args.epochs} --large-epochs {args.large_epochs} "
        f"--eval-every {args.eval_every}` "
        f"on {machine}; total wall time {time.perf_counter() - started:.0f} s.\n\n"
    )
    (args.out / "dense_reference.md").write_text(header + table.to_markdown(index=False, floatfmt=".4f") + "\n")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
