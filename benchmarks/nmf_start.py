"""NMF start benchmark: per start method, its bytes per device, rounds, and the Recall@20 after training.

Every cell is one in-process federation (``fedsparse simulate`` in a subprocess) with the same training
settings; only the start differs. The reference is the central NMF oracle (``fed.nmf-init = central``:
it costs no start bytes in the simulation, but no real federation can run it). Start bytes are the
engine's exact count of the start's secure-sum vectors and messages (in process: no SecAgg+ key
exchange), as a mean over all devices; training bytes are the run's training-round uploads and
downloads, also per device.

    OMP_NUM_THREADS=1 FEDSPARSE_DATA=/work/shared/data python benchmarks/nmf_start.py --dataset ml-100k --rounds 20
    OMP_NUM_THREADS=1 FEDSPARSE_DATA=/work/shared/data python benchmarks/nmf_start.py --dataset ml-1m --rounds 100
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated import run_simulation  # noqa: E402  (the sibling benchmark's subprocess runner)

HERE = Path(__file__).resolve().parent
# (label, start flags); "mu-30 all" is the start before issue 16 (30 multiplicative rounds, every device).
METHODS = {
    "central": ["--fed.nmf-init", "central"],
    "mu-30 all": ["--fed.nmf-start", "mu", "--fed.nmf-rounds", "30", "--fed.nmf-cohort", "1.0"],
    "mu-3 all": ["--fed.nmf-start", "mu", "--fed.nmf-rounds", "3", "--fed.nmf-cohort", "1.0"],
    "random mask": ["--fed.nmf-init", "none"],
    **{f"range c{cohort} r{refine}": ["--fed.nmf-start", "range", "--fed.nmf-cohort", str(cohort),
                                      "--fed.nmf-refine", str(refine)]
       for cohort in (0.05, 0.07, 0.1, 0.2, 0.4, 1.0) for refine in (0, 1, 2, 3)},
    **{f"svd c{cohort}": ["--fed.nmf-start", "svd", "--fed.nmf-cohort", str(cohort)] for cohort in (0.1, 0.2, 1.0)},
}
COLUMNS = [
    "dataset", "method", "rounds", "density", "dim", "start_rounds", "start_cohort", "start_bytes_per_device",
    "training_bytes_per_device", "start_vs_training", "recall@20", "final_recall@20", "recall_vs_central",
    "final_vs_central", "seconds",
]


def cell_row(run_dir: Path) -> dict:
    """Start and training bytes per device and the accuracy of one run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    devices = json.loads((run_dir / "config.json").read_text())["population"]["devices"]
    start = (summary.get("total_nmf_upload_bytes", 0) + summary.get("total_nmf_download_bytes", 0)) / devices
    training = (summary["total_upload_bytes"] + summary["total_download_bytes"]) / devices
    return {
        "start_rounds": summary.get("total_nmf_rounds", 0),
        "start_cohort": summary.get("total_nmf_cohort", 0),
        "start_bytes_per_device": start,
        "training_bytes_per_device": training,
        "start_vs_training": start / training,
        "recall@20": summary["best_test_recall@20"],  # at the round of best validation Recall@20
        "final_recall@20": summary["recall@20"],
        "seconds": summary["seconds"],
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--density", default="0.2")
    parser.add_argument("--dim", default="64")
    parser.add_argument("--fraction", default="0.1")
    parser.add_argument("--eval-every", default="5")
    parser.add_argument("--methods", default="central,range c0.05 r2,range c0.1 r1,svd c0.1",
                        help="comma-separated: central, mu-30 all, mu-3 all, random mask, range cC rR "
                             "(C in 0.05 0.07 0.1 0.2 0.4 1.0, R in 0-3), svd cC")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not os.environ.get("FEDSPARSE_DATA"):
        parser.error("set FEDSPARSE_DATA to the folder holding the datasets (e.g. /work/shared/data)")
    table = ResultTable(args.out / "nmf_start.csv")
    started = time.perf_counter()
    for method in args.methods.split(","):
        cell = f"{args.dataset}/{method}/d{args.dim}/{args.density}/r{args.rounds}"
        if table.has(cell):
            continue
        flags = ["--dataset", args.dataset, "--num-server-rounds", str(args.rounds), "--sparse.policy", "sparserec",
                 "--sparse.density", args.density, "--model.dim", args.dim, "--negatives", "1",
                 "--fed.fraction-train", args.fraction,
                 "--fed.local-lr", "0.01", "--fed.eval-every", args.eval_every, "--fed.downlink", "rows",
                 "--fed.item-optimizer", "sgd", "--fed.item-lr", "1.0", *METHODS[method]]
        row = cell_row(run_simulation(flags, args.out / "runs"))
        table.add(cell, {"dataset": args.dataset, "method": method, "rounds": args.rounds, "density": float(args.density),
                         "dim": int(args.dim), **row})
        print(f"{cell:40s} start={row['start_bytes_per_device']:.0f} B/device training={row['training_bytes_per_device']:.0f} "
              f"recall@20={row['recall@20']:.4f}", flush=True)
    frame = pd.read_csv(args.out / "nmf_start.csv")
    central = frame[frame["method"] == "central"].set_index(["dataset", "rounds", "density", "dim"])
    for column, source in (("recall_vs_central", "recall@20"), ("final_vs_central", "final_recall@20")):
        frame[column] = [row[source] / central.loc[key, source] if key in central.index else float("nan")
                         for key, row in zip(frame[["dataset", "rounds", "density", "dim"]].itertuples(index=False, name=None),
                                             frame.to_dict("records"), strict=True)]
    frame.to_csv(args.out / "nmf_start.csv", index=False)
    arguments = " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = "OMP_NUM_THREADS=1 FEDSPARSE_DATA=... python benchmarks/nmf_start.py " + arguments
    header = (f"Last invocation: `{command}` on {machine_description()}, {time.perf_counter() - started:.0f} s. "
              "In-process engine, sparserec, rows downlink, 1 negative, sgd item rows (lr 1.0), device Adam 0.01. "
              "Bytes per device = the run's total over all devices / devices (start: exact secure-sum vectors and messages, "
              "no SecAgg+ key exchange; training: training-round uploads + downloads, evaluation excluded). "
              "recall@20 = test Recall@20 at the round of best validation Recall@20.")
    write_markdown_table(args.out / "nmf_start.md", header + "\n\n", frame[[c for c in COLUMNS if c in frame]])


if __name__ == "__main__":
    main()
