"""Real SuperNodes: the same ClientApp under Flower's deployment runtime, against the simulation of the same seed.

Starts one ``flower-superlink --insecure`` and ``--supernodes`` ``flower-supernode --insecure`` processes on this
machine, each hosting one group of devices (``fed.clients-per-node`` = users / supernodes; ``--node-config
partition-id=P`` tells a supernode which group), runs the tiny federation on them with ``flwr run`` against that
SuperLink, then the same config under Flower's simulation runtime and in process. Each ClientApp reply says where it
was served (``clients/app.py``, PLACEMENT_ENV), written to the run's ``placement.jsonl``. Every process started is
stopped by pid (``fedsparse.experiments.deploy``), and the script checks none is left.

    nice -n 19 python simulations/supernodes.py [--supernodes 2] [--rounds 2] [--no-simulation] [--work-dir DIR]

Exit status 0 only when every supernode served its devices and the rounds agree.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from fedsparse.config import RunConfig
from fedsparse.data import load_run_data
from fedsparse.experiments.deploy import (
    CONNECTION,
    PLACEMENT_ENV,
    TINY_FEDERATION,
    Deployment,
    free_ports,
    read_placement,
    round_mismatches,
    start_supernodes,
    write_deployment_results,
)
from fedsparse.experiments.flower_run import run_flower, stop_superlink
from fedsparse.federation.grouping import users_of_partition
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.run_files import read_jsonl

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: this checkout's pyproject.toml
TIMEOUT_SECONDS = 600.0


def placement_by_partition(placement: list[dict]) -> dict[int, dict]:
    """Per supernode (its partition): messages served, the Flower node id, the devices served and the ClientApp
    processes that served them (Flower 1.42's SuperNode starts a fresh ClientApp process for every message)."""
    table: dict[int, dict] = defaultdict(lambda: {"messages": 0, "nodes": set(), "devices": set(), "pids": set()})
    for record in placement:
        row = table[record["partition"]]
        row["messages"] += 1
        row["nodes"].add(record["node"])
        row["devices"].update(record["users"])
        row["pids"].add(f"{record['host']}:{record['pid']}")
    return {partition: {"messages": row["messages"], "nodes": sorted(row["nodes"]), "devices": sorted(row["devices"]),
                        "processes": sorted(row["pids"])} for partition, row in sorted(table.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-simulation", action="store_true", help="compare with the in-process engine only")
    parser.add_argument("--work-dir", type=Path, default=None, help="logs and run directories (default: a new temp dir)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where the committed record goes (<name>.md and <name>.json)")
    args = parser.parse_args(argv)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="fedsparse-supernodes-"))).resolve()
    users = TINY_FEDERATION["data.synthetic-users"]
    per_node = math.ceil(users / args.supernodes)
    config = RunConfig.from_flat({**TINY_FEDERATION, "seed": args.seed, "num-server-rounds": args.rounds,
                                  "fed.clients-per-node": per_node, "results-dir": str(work / "results")})
    data = load_run_data(config)
    partitions = math.ceil(data.n_users / per_node)
    report: dict = {"work_dir": str(work), "clients_per_node": per_node,
                    "groups": {p: users_of_partition(p, per_node, data.n_users) for p in range(partitions)}}

    started = time.perf_counter()
    with Deployment(work / "deployment") as deployment:
        home = start_supernodes(deployment, partitions, **{PLACEMENT_ENV: "1"})
        report["processes"] = {name: process.pid for name, process in deployment.started.items()}
        print("started " + ", ".join(f"{name} (pid {pid})" for name, pid in report["processes"].items()))
        deployed_dir = run_flower(config, APP_DIR, data.n_users, flwr_home=home, superlink=CONNECTION,
                                  timeout=TIMEOUT_SECONDS)
    report["deployment"] = {"run_dir": str(deployed_dir), "seconds": round(time.perf_counter() - started, 1),
                            "left_running": deployment.leftovers()}
    runs = {"deployment": deployed_dir}

    if not args.no_simulation:
        started = time.perf_counter()
        with Deployment(work / "simulation") as simulation:  # Flower starts its own Ray; the token finds all of it
            ray_tmp = Path("/tmp") / f"fsray-{simulation.token}"
            simulation.scratch.append(ray_tmp)
            home = simulation.work_dir / "flwr-home"
            with simulation.exported(RAY_TMPDIR=str(ray_tmp)):
                try:
                    runs["simulation"] = run_flower(config, APP_DIR, data.n_users, flwr_home=home, ports=free_ports(2),
                                                    timeout=TIMEOUT_SECONDS)
                finally:
                    stop_superlink(home)
        report["simulation"] = {"run_dir": str(runs["simulation"]), "seconds": round(time.perf_counter() - started, 1),
                                "left_running": simulation.leftovers()}
    runs["inprocess"], _ = run_inprocess(config, data)

    rounds = {name: read_jsonl(directory / "rounds.jsonl") for name, directory in runs.items()}
    placement = placement_by_partition(read_placement(deployed_dir))
    report["placement"] = placement
    report["mismatches"] = {name: round_mismatches(rounds["deployment"], records)
                            for name, records in rounds.items() if name != "deployment"}
    report["rounds"] = {name: [{key: record[key] for key in ("round", "clients", "recall@20", "ndcg@20", "upload_bytes_mean")}
                               for record in records] for name, records in rounds.items()}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    command = " ".join(["python", f"simulations/{Path(__file__).name}", *(argv or sys.argv[1:])])
    write_deployment_results(report, args.results, "supernodes", command)

    print(f"\nwhere the ClientApps served their messages ({deployed_dir / 'placement.jsonl'}):")
    for partition, row in placement.items():
        print(f"  supernode {partition} (Flower node {', '.join(map(str, row['nodes']))}): {row['messages']} messages, "
              f"devices {row['devices']}, in {len(row['processes'])} ClientApp processes ({', '.join(row['processes'])})")
    for name, records in report["rounds"].items():
        print(f"  {name:10s} " + "  ".join(f"round {r['round']}: recall@20 {r['recall@20']:.4f} ndcg@20 {r['ndcg@20']:.4f}"
                                           for r in records))
    every_group = set(placement) == set(report["groups"]) and all(
        set(row["devices"]) <= set(report["groups"][partition]) and len(row["nodes"]) == 1
        for partition, row in placement.items())
    matched = not any(report["mismatches"].values())
    left = [pid for name in ("deployment", "simulation") for pid in report.get(name, {}).get("left_running", [])]
    print(f"\nevery supernode served, each only its own group: {every_group}; rounds match "
          f"({' = '.join(runs)}): {matched}; processes left running: {left or 'none'}")
    for name, problems in report["mismatches"].items():
        for problem in problems:
            print(f"  mismatch against {name}:", problem)
    print(f"report: {work / 'report.json'}")
    return 0 if every_group and matched and not left else 1


if __name__ == "__main__":
    sys.exit(main())
