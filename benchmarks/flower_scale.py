"""Flower at scale: seconds per round of `flwr run` with g devices per supernode against the in-process engine.

One federation (``synthetic``, ``--users`` users x ``--items`` items, d = 64, SparseRec at density 0.1, "rows"
downlink, no NMF start) with every device in every round (``--users`` devices per round), their local steps and
rankings batched ``--device-batch`` at a time (on a supernode: its hosted devices, that many at a time), run by
the in-process engine and by Flower's simulation runtime with ``fed.clients-per-node`` = g for each g of
``--groups`` (``ceil(users / g)`` supernodes, 2 Ray actors of 1 CPU), all in one invocation. ``train_seconds``
is the median of the rounds' training and aggregation (rows query, training messages, aggregation; the round
record's ``train_seconds``); ``vs_inprocess`` divides it by the in-process engine's. The last round also
evaluates ``--eval-fraction`` of the devices. Peak RSS sums every process of the run (for Flower: the CLI,
SuperLink, ServerApp and Ray workers).

    FEDSPARSE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/flower_scale.py --groups 1000,100,10
    FEDSPARSE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/flower_scale.py --groups 1 --rounds 1 --name flower_scale_g1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags  # noqa: E402
from engines import run_case  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 3.0  # issue 20: Flower within 3x of the in-process engine at 10,000 devices per round
COLUMNS = ["engine", "devices_per_supernode", "supernodes", "devices_per_round", "rounds", "train_seconds", "vs_inprocess",
           "evaluate_seconds", "wall_seconds", "peak_rss_gib", "recall@20", "upload_bytes_mean"]


def cell(args: argparse.Namespace, engine: str, group: int) -> dict:
    """One engine's run: median training seconds per round and the evaluated round's figures."""
    flags = ["--data.dataset", "synthetic", "--data.synthetic-users", str(args.users), "--data.synthetic-items", str(args.items),
             "--model.dim", "64", "--sparse.density", "0.1", "--fed.downlink", "rows", "--fed.nmf-init", "none",
             "--fed.fraction-train", "1.0", "--fed.device-batch", str(args.device_batch), "--num-server-rounds", str(args.rounds),
             "--fed.eval-every", str(args.rounds), "--fed.eval-fraction", str(args.eval_fraction), "--seed", str(args.seed),
             "--fed.clients-per-node", str(group)]
    run_dir, wall, peak = run_case(engine, flags, args.out / "runs" / "flower_scale")
    records = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
    evaluated = records.dropna(subset=["evaluate_seconds"]).iloc[-1]
    return {"engine": engine, "devices_per_supernode": group if engine == "flower" else 0,
            "supernodes": -(-args.users // group) if engine == "flower" else 0,
            "devices_per_round": int(records["clients"].median()), "rounds": len(records),
            "train_seconds": float(records["train_seconds"].median()), "evaluate_seconds": float(evaluated["evaluate_seconds"]),
            "wall_seconds": wall, "peak_rss_gib": peak / 2**30, "recall@20": float(evaluated["recall@20"]),
            "upload_bytes_mean": float(records["upload_bytes_mean"].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000, help="devices, every one of them in every round")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--groups", default="1000,100,10", help="devices per supernode, comma-separated")
    parser.add_argument("--device-batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="flower_scale", help="file name of the table (a separate invocation's own)")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    table = ResultTable(args.out / f"{args.name}.csv")
    groups = [int(group) for group in args.groups.split(",")]
    started = time.perf_counter()
    if not args.report_only:
        baseline = cell(args, "inprocess", 1)
        table.add("inprocess", baseline)
        for group in groups:  # each replaces its earlier row; the ratio is to this invocation's in-process run
            row = cell(args, "flower", group)
            table.add(f"flower/g{group}", {**row, "vs_inprocess": row["train_seconds"] / baseline["train_seconds"]})
            print(f"flower, {group} devices per supernode: {row['train_seconds']:.2f} s per round "
                  f"({row['train_seconds'] / baseline['train_seconds']:.2f}x in process)", flush=True)
        table.add("inprocess", {**baseline, "vs_inprocess": 1.0})
    frame = table.frame().reindex(columns=COLUMNS)
    frame = frame.astype(dict.fromkeys(["devices_per_supernode", "supernodes", "devices_per_round", "rounds"], "int64"))
    header = (
        f"Measured by `OMP_NUM_THREADS=1 python benchmarks/flower_scale.py --users {args.users} --items {args.items} "
        f"--groups {args.groups} --device-batch {args.device_batch} --rounds {args.rounds} --name {args.name}` on "
        f"{machine_description()}, "
        f"{time.perf_counter() - started:.0f} s. Every device in every round; Flower runs use 2 Ray actors of 1 CPU and "
        f"`fed.clients-per-node` = `devices_per_supernode`; `train_seconds`: the median over the rounds of training and "
        f"aggregation; `vs_inprocess`: over the in-process engine's of the same invocation (target: at most "
        f"{TARGET_RATIO:g}x); `evaluate_seconds`: the last round's evaluation of fed.eval-fraction {args.eval_fraction} "
        "of the devices.\n\n"
    )
    write_markdown_table(args.out / f"{args.name}.md", header, frame)


if __name__ == "__main__":
    main()
