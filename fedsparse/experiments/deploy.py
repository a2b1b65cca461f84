"""Real deployments on this machine: a Ray cluster of ``ray start`` nodes, or a ``flower-superlink`` with
``flower-supernode`` processes, every process started tracked so that exactly those are stopped.

Shells out to ``ray``, ``flower-superlink`` and ``flower-supernode`` (this module imports neither flwr nor ray).
Each started process gets a token in its environment, inherited by everything it starts (Ray's raylets and
workers, Flower's SuperExec and app processes): ``Deployment.stop`` stops each started process tree by pid,
then whatever still carries the token (a daemon that left its parent), and ``leftovers`` proves none is left.
Nothing is found by name, so other users' Ray or Flower processes on the machine are never touched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedsparse.experiments.flower_run import (
    FLOWER_ENV,
    POLL_SECONDS,
    process_running,
    stop_process_tree,
    terminate,
    write_superlink_connection,
)
from fedsparse.experiments.tables import machine_description, write_markdown_table
from fedsparse.run_files import atomic_write_text

TOKEN_ENV = "FEDSPARSE_DEPLOYMENT"  # in the environment of every process a Deployment starts
# Set to 1 in the environment of the processes that run ClientApps (each `ray start` node, each flower-supernode):
# every reply of clients/app.py then carries a "placement" record (partition, host, pid, Ray node) that the ServerApp
# writes to the run's placement.jsonl. Off by default: the record adds wire bytes to every reply.
PLACEMENT_ENV = "FEDSPARSE_REPORT_PLACEMENT"
START_SECONDS = 60.0  # how long a Ray node or the SuperLink may take to come up
CONNECTION = "fedsparse-deploy"  # the SuperLink connection written into the Flower home


def free_ports(count: int) -> tuple[int, ...]:
    """Ports the kernel reports free on 127.0.0.1 (held together while picked, so they differ)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return tuple(sock.getsockname()[1] for sock in sockets)


def pids_with_token(token: str) -> list[int]:
    """Running processes whose environment holds ``TOKEN_ENV=token`` (read from /proc)."""
    marker = f"{TOKEN_ENV}={token}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return sorted(pid for pid in found if pid != os.getpid() and process_running(pid))


@dataclass
class Deployment:
    """The processes one deployment started (a context manager: leaving it stops them, even on an error).

    ``work_dir`` holds each process's log (``<name>.log``) and whatever the processes keep on disk."""

    work_dir: Path
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    started: dict[str, subprocess.Popen] = field(default_factory=dict)
    scratch: list[Path] = field(default_factory=list)  # directories removed once everything stopped
    niceness: int = 19  # CPU priority of the started processes: 19 yields to all other work on the machine

    def __enter__(self) -> Deployment:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a started process: this one's, Flower's quiet settings, the token, ``extra``."""
        return {**os.environ, **FLOWER_ENV, TOKEN_ENV: self.token, **extra}

    @contextlib.contextmanager
    def exported(self, **extra: str) -> Iterator[None]:
        """Within the block, this process's environment holds the token and ``extra`` (restored after): what it
        starts itself, e.g. ``flwr run`` with the SuperLink and local Ray it may start, is this deployment's too."""
        saved = {key: os.environ.get(key) for key in (TOKEN_ENV, *extra)}
        os.environ.update({TOKEN_ENV: self.token, **extra})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def start(self, name: str, command: list[str], **extra_env: str) -> subprocess.Popen:
        """Start ``command`` (output to ``<work_dir>/<name>.log``) at the deployment's ``niceness``."""
        log = (self.work_dir / f"{name}.log").open("w")
        process = subprocess.Popen(["nice", "-n", str(self.niceness), *command], env=self.env(**extra_env), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=self.work_dir)
        log.close()
        self.started[name] = process
        return process

    def check_running(self) -> None:
        """Raise RuntimeError naming a started process that has exited, with the tail of its log."""
        for name, process in self.started.items():
            if process.poll() is not None:
                tail = (self.work_dir / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited with code {process.returncode}; log tail:\n{tail}")

    def stop(self) -> list[int]:
        """Stop every started process tree (newest first), then any process still carrying the token;
        returns the pids signalled. Raises RuntimeError when one survives SIGKILL."""
        stopped: list[int] = []
        for process in reversed(list(self.started.values())):
            if process.poll() is None:
                stopped += stop_process_tree(process.pid)
            process.wait()
        stragglers = pids_with_token(self.token)
        terminate(stragglers)
        left = self.leftovers()
        if left:
            raise RuntimeError(f"processes of deployment {self.token} still run after SIGKILL: {left}")
        for directory in self.scratch:
            shutil.rmtree(directory, ignore_errors=True)
        return stopped + stragglers

    def leftovers(self) -> list[int]:
        """Processes of this deployment still running (empty after ``stop``)."""
        time.sleep(POLL_SECONDS)  # a process killed a moment ago may still be listed until it is reaped
        return pids_with_token(self.token)


@dataclass(frozen=True)
class RayNode:
    """One node of the Ray cluster: its id, the name this deployment gave it, its CPUs."""

    node_id: str
    name: str
    cpus: float


def start_ray_cluster(deployment: Deployment, names: tuple[str, ...] = ("head", "node2"), cpus: int = 1,
                      **extra_env: str) -> tuple[str, list[RayNode]]:
    """Start one Ray node per name (the first the head), ``cpus`` CPUs each and a custom resource named after
    the node, all with ports of their own; wait until every node is alive. Returns the head's address
    (``host:port``, what ``RAY_ADDRESS`` takes) and the nodes. ``extra_env`` reaches every Ray worker.

    Each node is a ``ray start --block`` process (the stand-in for one machine): stopping it stops its raylet and
    workers. Ray's temporary files go to a directory of this deployment under /tmp (short: Ray's sockets live
    there), removed by ``Deployment.stop``."""
    temp_dir = Path("/tmp") / f"fsray-{deployment.token}"  # unix socket paths are limited to 107 characters
    deployment.scratch.append(temp_dir)
    head_port, client_port = free_ports(2)
    address = f"127.0.0.1:{head_port}"
    for index, name in enumerate(names):
        node_manager, object_manager, agent_listen, agent_grpc, runtime_env_agent, metrics = free_ports(6)
        command = ["ray", "start", "--block", "--num-cpus", str(cpus), "--num-gpus", "0",
                   "--resources", json.dumps({name: 1}), "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
                   "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
                   "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
                   "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
                   "--disable-usage-stats"]
        if index == 0:
            command += ["--head", "--port", str(head_port), "--ray-client-server-port", str(client_port),
                        "--include-dashboard", "false"]
        else:
            command += ["--address", address]
        deployment.start(f"ray-{name}", command, RAY_USAGE_STATS_ENABLED="0", **extra_env)
        nodes = _wait_for_ray_nodes(deployment, address, names[: index + 1])
    return address, nodes


def _wait_for_ray_nodes(deployment: Deployment, address: str, names: tuple[str, ...]) -> list[RayNode]:
    """Poll the cluster at ``address`` until a live node carries each named resource."""
    probe = ("import json, ray\n"
             f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
             "print(json.dumps([[n['NodeID'], n['Resources']] for n in ray.nodes() if n['Alive']]))\n"
             "ray.shutdown()\n")
    deadline = time.monotonic() + START_SECONDS
    while True:
        deployment.check_running()
        result = subprocess.run([sys.executable, "-c", probe], env=deployment.env(), capture_output=True, text=True,
                                timeout=START_SECONDS)
        if result.returncode == 0:
            nodes = []
            for node_id, resources in json.loads(result.stdout.strip().splitlines()[-1]):
                name = next((key for key in resources if key in names), "")
                nodes.append(RayNode(node_id, name, float(resources.get("CPU", 0.0))))
            if {node.name for node in nodes} >= set(names):
                return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster at {address} did not show nodes {names}: {result.stdout}{result.stderr}")
        time.sleep(1.0)


def start_supernodes(deployment: Deployment, partitions: int, **extra_env: str) -> Path:
    """Start a ``flower-superlink`` (insecure, on this machine) and one ``flower-supernode`` per partition, each
    told its partition by ``--node-config`` (the group of devices it hosts, ``fed.clients-per-node``) and with a
    Flower home of its own, as separate machines would have. Returns the Flower home from which to ``flwr run``
    (``fedsparse.experiments.flower_run.run_flower(..., superlink=CONNECTION)``). ``extra_env`` reaches every
    ClientApp process."""
    api_port, *node_ports = free_ports(1 + partitions)
    address = f"127.0.0.1:{api_port}"
    home = deployment.work_dir / "flwr-home"
    deployment.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(api_port),
                                   "--disable-runtime-dependency-installation"], FLWR_HOME=str(home / "superlink"))
    _wait_for_health(deployment, f"http://{address}/health")
    for partition, port in enumerate(node_ports):
        node_config = f"partition-id={partition} num-partitions={partitions}"
        deployment.start(f"supernode-{partition}", [
            "flower-supernode", "--insecure", "--superlink", address, "--node-config", node_config,
            "--host", "127.0.0.1", "--port", str(port),
        ], FLWR_HOME=str(home / f"supernode-{partition}"), **extra_env)
    write_superlink_connection(home, CONNECTION, address)
    return home


def _wait_for_health(deployment: Deployment, url: str) -> None:
    """Wait until ``url`` answers (the SuperLink's HTTP API is up)."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        deployment.check_running()
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=2.0) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {START_SECONDS:.0f} s")
        time.sleep(POLL_SECONDS)


def read_placement(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``placement.jsonl`` (where each reply was served), [] when the replies did not say."""
    path = run_dir / "placement.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


# Per-round keys two runs of the same seed must agree on: exactly, and to float tolerance (as tests/test_federation_e2e.py).
EXACT_KEYS = ("round", "clients", "failed_clients", "dropped_updates", "upload_bytes_mean", "upload_bytes_max",
              "download_bytes_mean", "download_bytes_max", "rows_updated", "evaluated_clients")
METRIC_KEYS = ("recall@20", "ndcg@20", "validation_recall@20", "device_memory_bytes_mean")


def round_mismatches(rounds: list[dict[str, Any]], reference: list[dict[str, Any]], rel: float = 1e-5) -> list[str]:
    """Where two runs' rounds.jsonl records differ on EXACT_KEYS (exactly) or METRIC_KEYS (beyond ``rel``,
    or 1e-7 absolute); empty when they match."""
    if len(rounds) != len(reference):
        return [f"{len(rounds)} rounds against {len(reference)}"]
    problems = []
    for mine, theirs in zip(rounds, reference, strict=True):
        for key in EXACT_KEYS:
            if mine.get(key) != theirs.get(key):
                problems.append(f"round {theirs.get('round')}: {key} {mine.get(key)} != {theirs.get(key)}")
        for key in METRIC_KEYS:
            a, b = mine.get(key), theirs.get(key)
            if a is None or b is None or not math.isclose(a, b, rel_tol=rel, abs_tol=1e-7):
                problems.append(f"round {theirs.get('round')}: {key} {a} != {b}")
    return problems


# A federation small enough for a 2-core machine shared with others (as tests/test_federation_e2e.py): 12 devices,
# 40 items, the central NMF start (the federated one runs SecAgg+, which needs one device per supernode).
TINY_FEDERATION: dict[str, Any] = {
    "data.dataset": "synthetic", "data.synthetic-users": 12, "data.synthetic-items": 40,
    "data.synthetic-interactions-per-user": 8, "model.dim": 8, "sparse.policy": "sparserec", "sparse.density": 0.25,
    "fed.fraction-train": 0.5, "fed.explore-every": 1, "fed.nmf-init": "central", "fed.downlink": "rows",
    "fed.eval-fraction": 1.0,
}


def write_deployment_results(report: dict[str, Any], out: Path, name: str, command: str) -> None:
    """The committed record of a deployment check: ``<out>/<name>.json`` (the whole report) and ``<name>.md``
    (every runtime's rounds side by side, where the messages were served, processes left running)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    rows = [{"runtime": runtime, **record} for runtime, records in report["rounds"].items() for record in records]
    placement = {key: value for key, value in report.items() if key.startswith("placement")}
    served = "; ".join(f"{key} {where}: {row['messages']} messages (devices {row['devices']})"
                       for key, value in placement.items() for where, row in value.items())
    header = (f"Measured by `{command}` on {machine_description()}. Rounds of the same seed under each runtime "
              f"(Recall@20 / NDCG@20 of the evaluated devices, payload upload bytes per device). Where the messages were "
              f"served: {served}. The whole report: `{name}.json`.\n\n")
    write_markdown_table(out / f"{name}.md", header, pd.DataFrame(rows))
