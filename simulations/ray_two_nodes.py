"""Across machines, on one: the same `flwr run` on one Ray node and on a cluster of two, and where it ran.

Starts a Ray cluster of two ``ray start`` nodes (1 CPU each, a custom resource naming each: the stand-ins for
two machines), runs the tiny federation under ``flwr run`` joining that cluster through ``RAY_ADDRESS`` (two
ClientApp actors of 1 CPU: one fits per node), then the same seed on Flower's usual one-node Ray and in process.
Each ClientApp reply says where it was served (host, pid, Ray node id: ``clients/app.py``, PLACEMENT_ENV), which
the ServerApp writes to ``placement.jsonl``. Prints the messages served per Ray node and whether the rounds match;
every process started is stopped by pid (``fedsparse.experiments.deploy``), and the script checks none is left.

    nice -n 19 python simulations/ray_two_nodes.py [--rounds 2] [--work-dir DIR]

Exit status 0 only when both nodes served messages and the three runs' rounds agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from fedsparse.config import RunConfig
from fedsparse.data import load_run_data
from fedsparse.experiments.deploy import (
    PLACEMENT_ENV,
    TINY_FEDERATION,
    Deployment,
    free_ports,
    read_placement,
    round_mismatches,
    start_ray_cluster,
    write_deployment_results,
)
from fedsparse.experiments.flower_run import run_flower, stop_superlink
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.run_files import read_jsonl

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: this checkout's pyproject.toml
TIMEOUT_SECONDS = 600.0


def flower_run(deployment: Deployment, config: RunConfig, n_users: int, name: str, **env: str) -> Path:
    """``flwr run`` on a SuperLink of its own (Flower home under the deployment's directory), with this
    deployment's token and ``env`` in its environment; the SuperLink is stopped by pid afterwards."""
    home = deployment.work_dir / f"flwr-home-{name}"
    with deployment.exported(**env):
        try:
            return run_flower(config, APP_DIR, n_users, flwr_home=home, ports=free_ports(2), timeout=TIMEOUT_SECONDS)
        finally:
            stop_superlink(home)


def placement_by_node(placement: list[dict], names: dict[str, str]) -> dict[str, dict]:
    """Per Ray node (named as the deployment named it): messages served, devices, ClientApp pids."""
    table: dict[str, dict] = defaultdict(lambda: {"messages": 0, "devices": set(), "pids": set()})
    for record in placement:
        row = table[names.get(record["ray_node"], record["ray_node"] or "no Ray")]
        row["messages"] += 1
        row["devices"].update(record["users"])
        row["pids"].add(record["pid"])
    return {name: {"messages": row["messages"], "devices": sorted(row["devices"]), "pids": sorted(row["pids"])}
            for name, row in sorted(table.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="logs and run directories (default: a new temp dir)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where the committed record goes (<name>.md and <name>.json)")
    args = parser.parse_args(argv)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="fedsparse-ray-"))).resolve()
    config = RunConfig.from_flat({**TINY_FEDERATION, "seed": args.seed, "num-server-rounds": args.rounds,
                                  "results-dir": str(work / "results")})
    data = load_run_data(config)
    report: dict = {"work_dir": str(work)}

    started = time.perf_counter()
    with Deployment(work / "one-node") as one_node:  # Flower starts its own Ray; the token finds all of it
        ray_tmp = Path("/tmp") / f"fsray-{one_node.token}"
        one_node.scratch.append(ray_tmp)
        one_dir = flower_run(one_node, config, data.n_users, "one-node", **{PLACEMENT_ENV: "1", "RAY_TMPDIR": str(ray_tmp)})
    report["one_node"] = {"run_dir": str(one_dir), "seconds": round(time.perf_counter() - started, 1),
                          "left_running": one_node.leftovers()}

    started = time.perf_counter()
    with Deployment(work / "two-nodes") as cluster:
        address, nodes = start_ray_cluster(cluster, ("head", "node2"), cpus=1, **{PLACEMENT_ENV: "1"})
        report["cluster"] = {"address": address, "nodes": [vars(node) for node in nodes],
                             "processes": {name: process.pid for name, process in cluster.started.items()}}
        print(f"Ray cluster at {address}: " + ", ".join(f"{n.name} {n.node_id[:12]}… ({n.cpus:g} CPU)" for n in nodes))
        two_dir = flower_run(cluster, config, data.n_users, "two-nodes", RAY_ADDRESS=address)
    report["two_nodes"] = {"run_dir": str(two_dir), "seconds": round(time.perf_counter() - started, 1),
                           "left_running": cluster.leftovers()}

    inprocess_dir, _ = run_inprocess(config, data)
    rounds = {name: read_jsonl(directory / "rounds.jsonl") for name, directory in
              (("one_node", one_dir), ("two_nodes", two_dir), ("inprocess", inprocess_dir))}
    names = {node.node_id: node.name for node in nodes}
    placement = placement_by_node(read_placement(two_dir), names)
    report["placement_two_nodes"] = placement
    report["placement_one_node"] = placement_by_node(read_placement(one_dir), {})
    report["mismatches_two_vs_one"] = round_mismatches(rounds["two_nodes"], rounds["one_node"])
    report["mismatches_one_vs_inprocess"] = round_mismatches(rounds["one_node"], rounds["inprocess"])
    report["rounds"] = {name: [{key: record[key] for key in ("round", "clients", "recall@20", "ndcg@20", "upload_bytes_mean")}
                               for record in records] for name, records in rounds.items()}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    command = " ".join(["python", f"simulations/{Path(__file__).name}", *(argv or sys.argv[1:])])
    write_deployment_results(report, args.results, "ray_two_nodes", command)

    print(f"\nwhere the ClientApp served its messages ({two_dir / 'placement.jsonl'}):")
    for name, row in placement.items():
        print(f"  Ray node {name}: {row['messages']} messages, devices {row['devices']}, ClientApp pids {row['pids']}")
    for name, records in report["rounds"].items():
        print(f"  {name:10s} " + "  ".join(f"round {r['round']}: recall@20 {r['recall@20']:.4f} ndcg@20 {r['ndcg@20']:.4f}"
                                           for r in records))
    both_nodes = {"head", "node2"} <= set(placement)
    matched = not report["mismatches_two_vs_one"] and not report["mismatches_one_vs_inprocess"]
    left = report["one_node"]["left_running"] + report["two_nodes"]["left_running"]
    print(f"\nboth Ray nodes served messages: {both_nodes}; rounds match (two nodes = one node = in process): {matched}; "
          f"processes left running: {left or 'none'}")
    for problem in report["mismatches_two_vs_one"] + report["mismatches_one_vs_inprocess"]:
        print("  mismatch:", problem)
    print(f"report: {work / 'report.json'}")
    return 0 if both_nodes and matched and not left else 1


if __name__ == "__main__":
    sys.exit(main())
