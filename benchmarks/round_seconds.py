"""Seconds per training round of the in-process engine, every device in every round, against dense FedMF.

Each method is a named configuration of ``simulations/configs/`` run by ``fedsparse simulate`` in its own
process, all in one invocation so they share the machine's state: ``--rounds`` training rounds with every
device (ml-100k: 943), evaluation only after the last (left out of the figure). The figure is the median
of the rounds' seconds after the first (round 1 warms caches), with milliseconds per device and the ratio
to FedMF's median of the same invocation. The machine's 1-minute load average before and after each
method is printed beside it: a figure measured beside other work is slower than the code. ``--device-batch B``
runs every method twice, devices one at a time and ``B`` at a time (``fed.device-batch``), and reports both.

    FEDSPARSE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/round_seconds.py --dataset ml-100k --rounds 6 \
        --device-batch 943
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data, run_fedsparse  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "simulations" / "configs"
BASELINE = "FedMF"  # every method's seconds are divided by this one's, measured in the same invocation
METHODS = [  # (method, named config)
    (BASELINE, "fedmf.toml"),
    ("SparseRec 0.2", "sparserec-peer.toml"),
    ("PFedRec", "pfedrec.toml"),
    ("SparseRec 0.2 + PFedRec", "pfedrec-sparserec.toml"),
]
COLUMNS = ["dataset", "method", "device_batch", "devices_per_round", "rounds", "median_round_seconds", "ms_per_device",
           "vs_fedmf", "load_before", "load_after"]


def round_seconds(config: str, dataset: str, rounds: int, results_dir: Path, device_batch: int) -> dict:
    """One method's training rounds, its devices ``device_batch`` at a time (0: one at a time): median seconds
    (rounds after the first, the evaluated last one left out)."""
    flags = ["--config", str(CONFIGS / config), "--dataset", dataset, "--num-server-rounds", str(rounds),
             "--fed.fraction-train", "1.0", "--fed.eval-every", str(rounds + 1), "--fed.eval-fraction", "0.05",
             "--fed.device-batch", str(device_batch)]
    load_before = os.getloadavg()[0]
    summary = run_fedsparse("simulate", flags, results_dir)
    records = pd.DataFrame(read_jsonl(Path(summary["run_dir"]) / "rounds.jsonl"))
    training = records[(records["round"] > 1) & (records["round"] < rounds)]
    devices = int(records["clients"].iloc[-1])
    median = float(training["seconds"].median())
    return {"device_batch": device_batch, "devices_per_round": devices, "rounds": rounds, "median_round_seconds": median,
            "ms_per_device": 1000 * median / devices, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per method (the first and the last are not timed)")
    parser.add_argument("--device-batch", type=int, default=0,
                        help="also run every method with this many devices trained together (0: one at a time only)")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: the first round warms up and the last one evaluates")
    table = ResultTable(args.out / "round_seconds.csv")
    started = time.perf_counter()
    if not args.report_only:
        require_data(parser)
        batches = [0] + ([args.device_batch] if args.device_batch > 1 else [])
        rows = {(method, batch): round_seconds(config, args.dataset, args.rounds, args.out / "runs", batch)
                for batch in batches for method, config in METHODS}
        for (method, batch), row in rows.items():  # one invocation's figures replace the last ones together
            row["vs_fedmf"] = row["median_round_seconds"] / rows[(BASELINE, 0)]["median_round_seconds"]
            table.add(f"{args.dataset}/{method}/b{batch}", {"dataset": args.dataset, "method": method, **row})
            print(f"{method:28s} batch {batch:4d}: {row['median_round_seconds']:.2f} s per round "
                  f"({row['vs_fedmf']:.2f}x FedMF)", flush=True)
    header = (
        f"Measured by `python benchmarks/round_seconds.py --dataset {args.dataset} --rounds {args.rounds} "
        f"--device-batch {args.device_batch}` on "
        f"{machine_description()}, {time.perf_counter() - started:.0f} s. In-process engine, every device in every round, "
        "each method its named configuration (`simulations/configs/`); `median_round_seconds`: the median over the "
        "training rounds after the first (the last, evaluated, round left out); `device_batch`: devices trained together "
        "(`fed.device-batch`; 0: one at a time); `vs_fedmf`: over the median of FedMF one device at a time in the "
        "same invocation. `load_before` / `load_after`: the machine's 1-minute load average around the method's run "
        "(2 cores: above about 1, other work shared the machine).\n\n"
    )
    write_markdown_table(args.out / "round_seconds.md", header, table.frame().reindex(columns=COLUMNS))


if __name__ == "__main__":
    main()
