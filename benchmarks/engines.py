"""Engine benchmark: seconds per round and peak memory of `flwr run` against the in-process engine.

Same config, same seed, ml-1m (6,040 user devices), for 100 and 1,000 sampled clients per round: the
in-process engine; Flower with one device per supernode (6,040 supernodes); Flower with 10 devices
per supernode (604 supernodes, `fed.clients-per-node`). Then the scale run the federation issue asks
for: Flower, 6,040 supernodes, 10 % participation, federated NMF, and the "rows" downlink (each
device receives only the rows it trains on, so an NMF round does not push 6,040 copies of the table). Rounds train only, except
the last,
which also evaluates (`fed.eval-fraction` of the devices): train seconds per round are the mean over
the rounds before the last. Peak memory is the sampled RSS sum of every process of the run (for
Flower: the `flwr` command, the SuperLink, the ServerApp and the Ray workers). Each Flower case starts
its own SuperLink (its start-up is in the wall time, not in the per-round seconds) and stops it.

    FEDSPARSE_DATA=../shared/data python benchmarks/engines.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakMemory  # noqa: E402

from fedsparse.experiments.flower_run import FLOWER_ENV, stop_superlink  # noqa: E402
from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.run_files import read_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GROUPED_DEVICES_PER_NODE = 10
COLUMNS = [
    "case", "engine", "devices_per_supernode", "supernodes", "clients_per_round", "rounds", "train_seconds_per_round",
    "eval_round_seconds", "init_seconds", "wall_seconds", "peak_rss_mib", "recall@20", "upload_bytes_mean",
]


def run_case(engine: str, flags: list[str], results_dir: Path) -> tuple[Path, float, int]:
    """``fedsparse simulate`` in a subprocess under a memory sampler; (run dir, wall seconds, peak RSS bytes)."""
    home = Path(tempfile.mkdtemp(prefix="fedsparse-flwr-home-"))
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home)}
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", "--engine", engine, "--app-dir", str(REPO), "--json",
               "--results-dir", str(results_dir), *flags]
    started = time.perf_counter()
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with PeakMemory(process.pid, f"FLWR_HOME={home}") as memory:
            stdout, stderr = process.communicate()
    finally:
        stop_superlink(home)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return Path(json.loads(stdout)["run_dir"]), wall, memory.peak_bytes


def case_row(run_dir: Path, wall: float, peak: int) -> dict:
    """Per-round timing and the last round's metrics from a run directory."""
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    train = [r["seconds"] for r in rounds[:-1]]
    train_mean = sum(train) / len(train)
    return {
        "rounds": len(rounds),
        "train_seconds_per_round": train_mean,
        "eval_round_seconds": rounds[-1]["seconds"],
        "init_seconds": summary.get("total_init_seconds", float("nan")),
        "wall_seconds": wall,
        "peak_rss_mib": peak / 2**20,
        "recall@20": rounds[-1].get("recall@20", float("nan")),
        "upload_bytes_mean": sum(r["upload_bytes_mean"] for r in rounds) / len(rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--clients", default="100,1000", help="sampled clients per round to compare")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per comparison case (the last evaluates)")
    parser.add_argument("--eval-fraction", type=float, default=0.02)
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--scale-nmf-rounds", type=int, default=1)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not os.environ.get("FEDSPARSE_DATA"):
        parser.error("set FEDSPARSE_DATA to the folder holding the datasets (e.g. ../shared/data)")
    n_users = int(json.loads(subprocess.run(
        [sys.executable, "-m", "fedsparse.cli", "data", "info", args.dataset, "--json"],
        capture_output=True, text=True, check=True).stdout)["users"])
    table = ResultTable(args.out / "engines.csv")
    started = time.perf_counter()
    common = ["--dataset", args.dataset, "--sparse.policy", "sparserec", "--sparse.density", "0.2",
              "--fed.nmf-init", "central", "--fed.eval-fraction", str(args.eval_fraction)]
    cases = []
    for clients in map(int, args.clients.split(",")):
        timing = [*common, "--num-server-rounds", str(args.rounds), "--fed.clients-per-round", str(clients),
                  "--fed.eval-every", str(args.rounds)]
        cases += [
            (f"{clients} clients/round, in-process", "inprocess", 1, clients, timing),
            (f"{clients} clients/round, flower, 1 device/supernode", "flower", 1, clients, timing),
            (f"{clients} clients/round, flower, {GROUPED_DEVICES_PER_NODE} devices/supernode", "flower",
             GROUPED_DEVICES_PER_NODE, clients, [*timing, "--fed.clients-per-node", str(GROUPED_DEVICES_PER_NODE)]),
        ]
    if not args.skip_scale:
        scale = ["--dataset", args.dataset, "--sparse.policy", "sparserec", "--sparse.density", "0.2",
                 "--fed.nmf-init", "federated", "--fed.nmf-rounds", str(args.scale_nmf_rounds), "--fed.downlink", "rows",
                 "--num-server-rounds", str(args.scale_rounds), "--fed.fraction-train", "0.1",
                 "--fed.eval-every", str(args.scale_rounds), "--fed.eval-fraction", str(args.eval_fraction)]
        cases.append(("scale: 10 % participation, federated NMF, flower, 1 device/supernode", "flower", 1,
                      -(-n_users // 10), scale))
    for name, engine, per_node, clients, flags in cases:
        if table.has(name):
            continue
        run_dir, wall, peak = run_case(engine, flags, args.out / "runs")
        row = {"engine": engine, "devices_per_supernode": per_node if engine == "flower" else "",
               "supernodes": -(-n_users // per_node) if engine == "flower" else "", "clients_per_round": clients,
               **case_row(run_dir, wall, peak)}
        table.add(name, {"case": name, **row})
        print(f"{name:75s} {row['train_seconds_per_round']:7.2f} s/round, peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    frame = table.frame()
    header = (
        f"Measured by `python benchmarks/engines.py --dataset {args.dataset} --clients {args.clients} --rounds "
        f"{args.rounds}` on {machine_description()}; Flower runs use 2 Ray actors of 1 CPU; this invocation took "
        f"{time.perf_counter() - started:.0f} s (cases already in the CSV were not rerun).\n\n"
    )
    write_markdown_table(args.out / "engines.md", header, frame.reindex(columns=COLUMNS))


if __name__ == "__main__":
    main()
