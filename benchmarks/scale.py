"""Seconds per round and peak memory of the in-process engine against the population: up to a million devices.

Each population is ``synthetic`` with ``--users`` users x ``--items`` items (``--interactions`` per user on
average), d = ``--dim``, SparseRec at ``--density``, a "rows" downlink, ``--devices-per-round`` devices per
round with their local steps and rankings batched (``fed.device-batch``, ``--torch-threads`` intra-op threads
for their large products), no NMF start (a random mask: the
secure start's sums are dense over the item table), ``--rounds`` rounds with the last one evaluating
``--eval-fraction`` of the devices. Every run is ``fedsparse simulate`` in its own process; its peak RSS is
the kernel's (``wait4``). ``train_seconds`` is training and aggregation (the median over the rounds; the
round record's ``train_seconds``), ``evaluate_seconds`` the last round's evaluation, ``run_seconds`` the whole
run (data generation, checkpoints and start included). The baseline is today's per-device loop
(``fed.device-batch = 0``) on the smallest population, measured in the same invocation: ``train_vs_loop`` and
``evaluate_vs_loop`` divide the milliseconds per device by the loop's.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --users 10000,100000,1000000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
KIB = 1024
GIB = 1024**3
TARGETS = {"peak_rss_gib": 16.0, "train_seconds": 10.0, "evaluate_seconds": 10.0}  # issue 20, at 1M devices
COLUMNS = [
    "users", "items", "device_batch", "torch_threads", "devices_per_round", "rounds", "train_seconds", "train_ms_per_device",
    "train_vs_loop", "evaluated_devices", "evaluate_seconds", "evaluate_ms_per_device", "evaluate_vs_loop", "peak_rss_gib",
    "run_seconds", "recall@20", "load_before", "load_after",
]


def run_cell(args: argparse.Namespace, users: int, device_batch: int, threads: int, runs: Path) -> dict:
    """One population's run in its own process (``threads`` torch intra-op threads): its round figures and the
    process's peak RSS."""
    flags = ["--data.dataset", "synthetic", "--data.synthetic-users", str(users), "--data.synthetic-items", str(args.items),
             "--data.synthetic-interactions-per-user", str(args.interactions), "--model.dim", str(args.dim),
             "--sparse.density", str(args.density), "--fed.downlink", "rows", "--fed.nmf-init", "none",
             "--fed.clients-per-round", str(min(args.devices_per_round, users)), "--fed.device-batch", str(device_batch),
             "--num-server-rounds", str(args.rounds), "--fed.eval-every", str(args.rounds),
             "--fed.eval-fraction", str(args.eval_fraction), "--fed.torch-threads", str(threads), "--seed", str(args.seed)]
    runs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", "--engine", "inprocess", "--no-progress", "--json",
               "--results-dir", str(runs), *flags]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(runs / "last-stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        output = process.stdout.read() if process.stdout else ""
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: see {runs / 'last-stderr.txt'}")
    summary = json.loads(output)
    records = pd.DataFrame(read_jsonl(Path(summary["run_dir"]) / "rounds.jsonl"))
    devices = int(records["clients"].median())
    train = float(records["train_seconds"].median())
    evaluated = records.dropna(subset=["evaluate_seconds"]).iloc[-1]
    evaluate_seconds, evaluated_devices = float(evaluated["evaluate_seconds"]), int(evaluated["evaluated_clients"])
    return {"users": users, "items": args.items, "device_batch": device_batch, "torch_threads": threads,
            "devices_per_round": devices, "rounds": args.rounds, "train_seconds": train,
            "train_ms_per_device": 1000 * train / devices, "evaluated_devices": evaluated_devices,
            "evaluate_seconds": evaluate_seconds, "evaluate_ms_per_device": 1000 * evaluate_seconds / evaluated_devices,
            "peak_rss_gib": usage.ru_maxrss * KIB / GIB, "run_seconds": time.perf_counter() - started,
            "recall@20": float(evaluated["recall@20"]), "load_before": load_before, "load_after": os.getloadavg()[0]}


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Seconds per round (training, evaluation) and peak RSS against the population, batched devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batched = frame[frame["device_batch"] > 0].sort_values("users")
    figure, (seconds, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    seconds.plot(batched["users"], batched["train_seconds"], marker="o", label="training + aggregation per round")
    seconds.plot(batched["users"], batched["evaluate_seconds"], marker="s", label="evaluation of the sample")
    seconds.axhline(TARGETS["train_seconds"], color="grey", linestyle=":", label="target (10 s)")
    memory.plot(batched["users"], batched["peak_rss_gib"], marker="o", label="peak RSS, whole run")
    memory.axhline(TARGETS["peak_rss_gib"], color="grey", linestyle=":", label="target (16 GiB)")
    for axis, label in ((seconds, "seconds"), (memory, "GiB")):
        axis.set_xscale("log")
        axis.set_xlabel("devices in the federation")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="10000,100000,1000000", help="populations, comma-separated")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=20, help="mean interactions per user")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--devices-per-round", type=int, default=10_000)
    parser.add_argument("--device-batch", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-fraction", type=float, default=0.01)
    parser.add_argument("--torch-threads", type=int, default=2,
                        help="torch threads of the batched runs (their rankings are large products); the loop keeps 1")
    parser.add_argument("--seed", type=int, default=0)
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    table = ResultTable(args.out / "scale.csv")
    populations = sorted(int(users) for users in args.users.split(","))
    started = time.perf_counter()
    if not args.report_only:
        runs = args.out / "runs" / "scale"
        loop = run_cell(args, populations[0], 0, 1, runs)
        rows = [loop] + [run_cell(args, users, args.device_batch, args.torch_threads, runs) for users in populations]
        for row in rows:
            row["train_vs_loop"] = row["train_ms_per_device"] / loop["train_ms_per_device"]
            row["evaluate_vs_loop"] = row["evaluate_ms_per_device"] / loop["evaluate_ms_per_device"]
            print(f"{row['users']:>9,} users, batch {row['device_batch']:>6}: train {row['train_seconds']:.2f} s, "
                  f"evaluate {row['evaluate_seconds']:.2f} s, peak {row['peak_rss_gib']:.2f} GiB", flush=True)
        table.set_rows("scale", rows)
    frame = table.frame().reindex(columns=COLUMNS)
    counts = ["users", "items", "device_batch", "torch_threads", "devices_per_round", "rounds", "evaluated_devices"]
    frame = frame.astype(dict.fromkeys(counts, "int64")).astype(object)  # all-numeric frames reach tabulate as floats
    header = (
        f"Measured by `OMP_NUM_THREADS=1 python benchmarks/scale.py --users {args.users} --items {args.items} "
        f"--devices-per-round {args.devices_per_round} --device-batch {args.device_batch} "
        f"--rounds {args.rounds} --torch-threads {args.torch_threads}` on "
        f"{machine_description()}, {time.perf_counter() - started:.0f} s. `synthetic` ({args.interactions:g} interactions "
        f"per user), d = {args.dim}, SparseRec at density {args.density}, rows downlink, no NMF start; `device_batch` 0 is "
        "the per-device loop with one torch thread, today's default (the baseline of the `*_vs_loop` ratios); otherwise "
        "devices trained and ranked together with `torch_threads` (fed.torch-threads). "
        "`train_seconds`: training and aggregation per round (median over the rounds); `evaluate_seconds`: the last "
        f"round's evaluation of `evaluated_devices` (fed.eval-fraction {args.eval_fraction}); `peak_rss_gib`: the run's "
        f"process, whole run (data generation, checkpoints and evaluation included); targets (issue 20, 1M devices): "
        f"{TARGETS['train_seconds']:g} s per round, {TARGETS['evaluate_seconds']:g} s for the evaluation, "
        f"{TARGETS['peak_rss_gib']:g} GiB. `load_before` / `load_after`: the 1-minute load average around the run (2 "
        "cores: above about 1, other work shared the machine).\n\n"
    )
    write_markdown_table(args.out / "scale.md", header, frame)
    plot(table.frame(), args.out / "scale.png")


if __name__ == "__main__":
    main()
