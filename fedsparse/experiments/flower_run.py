"""Launch ``flwr run`` for a RunConfig and find what it wrote; stop the local SuperLink it started afterwards.

Shells out to the ``flwr`` command (this module does not import flwr). ``flwr run --stream`` exits 0
even when the run fails, so success is judged from the run directory the ServerApp wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from fedsparse.config import ConfigError, RunConfig, flat_defaults
from fedsparse.console import ROUND_LINE, SUMMARY_HEADER
from fedsparse.federation.grouping import partitions_needed
from fedsparse.run_files import code_version, results_root, write_json

# Without these, every `flwr run` rebuilds an environment from the app's dependencies (a CUDA torch),
# reports telemetry and checks for updates; they must be set before the local SuperLink starts.
log = logging.getLogger("fedsparse")

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
STOP_GRACE_SECONDS = 10.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# Flower >= 1.32 prints these on every simulation start whatever the federation size (flwr/simulation/app.py);
# the size actually used follows on its own line ("Federation `...` (943 simulated SuperNodes)").
FLOWER_NOISE = ("default simulated SuperNodes changed from 10 to 2", "To change federation size",
                "flwr federation simulation-config")
STREAM_GRACE_SECONDS = 30.0  # how long `flwr run --stream` may stay open after the run wrote its summary
POLL_SECONDS = 0.2
OUTPUT_TAIL_CHARS = 4000  # of Flower's output, in the error when a run does not complete
LAUNCH_ENV = "FEDSPARSE_LAUNCH"  # token in the environment of the processes one run_flower call starts
HTTP_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"  # flwr 1.42: ports of the local SuperLink `flwr run` starts
CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"
SUPERLINK_RECORD = "fedsparse-superlinks.json"  # in the Flower home: the SuperLinks fedsparse started (pid, start time)


def check_flower_config(config: RunConfig) -> None:
    """Raise ConfigError for settings the Flower engine cannot run (the in-process engine can)."""
    if config.privacy.secure_aggregation and config.fed.clients_per_node != 1:
        raise ConfigError("privacy.secure-aggregation under Flower runs SecAgg+ between supernodes: "
                          "needs fed.clients-per-node = 1")
    if federated_start(config) and config.fed.clients_per_node != 1:
        raise ConfigError("the federated NMF start (fed.nmf-init = federated) runs SecAgg+ between supernodes: needs "
                          "fed.clients-per-node = 1 (or fed.nmf-init = central / none)")


def federated_start(config: RunConfig) -> bool:
    """Whether the run starts with the federated NMF start (its policy needs an NMF mask and fed.nmf-init = federated)."""
    from fedsparse.sparse.policies import build_policy

    return config.fed.nmf_init == "federated" and build_policy(config.sparse).settings.mask_init == "nmf"


def toml_value(value: object) -> str:
    """A config value in the TOML syntax ``--run-config`` parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_config_overrides(config: RunConfig) -> str:
    """``--run-config`` text for every key that differs from the defaults (paths made absolute)."""
    defaults = flat_defaults()
    flat = config.to_flat()
    flat["results-dir"] = str(Path(config.results_dir).expanduser().resolve())
    if config.data.data_dir:
        flat["data.data-dir"] = str(Path(config.data.data_dir).expanduser().resolve())
    if config.eval.candidates:
        flat["eval.candidates"] = str(Path(config.eval.candidates).expanduser().resolve())
    if config.data.path:
        flat["data.path"] = str(Path(config.data.path).expanduser().resolve())
    if config.resume_dir:
        flat["resume-dir"] = str(Path(config.resume_dir).expanduser().resolve())
    if not config.code_version:  # the app runs from a bundled copy without git: tell it which commit launched it
        flat["code-version"] = code_version()
    changed = {key: value for key, value in flat.items() if value != defaults[key] or key == "results-dir"}
    return " ".join(f'"{key}"={toml_value(value)}' for key, value in changed.items())


def flower_home(flwr_home: Path | None = None) -> Path:
    """The Flower home a ``flwr run`` uses: ``flwr_home``, else ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser().resolve()


def run_flower(
    config: RunConfig,
    app_dir: Path,
    n_users: int,
    flwr_home: Path | None = None,
    cpus_per_client: int = 1,
    timeout: float | None = None,
    show_progress: bool | None = False,
    ports: tuple[int, int] | None = None,
    superlink: str | None = None,
) -> Path:
    """Run the app in ``app_dir`` under ``flwr run`` and return the run directory it wrote.

    One supernode per partition (``fed.clients-per-node`` users each). With ``resume-dir`` set, the run
    continues there. Each line of Flower's log stream is logged (logger ``fedsparse``) as it arrives,
    colours removed, without Flower's size notices that do not apply and up to the ServerApp's summary
    table (the caller prints its own). ``show_progress``: a bar over rounds, advanced by the ServerApp's
    round lines (None = only on a terminal). ``ports`` (SuperLink HTTP API, control API) start a SuperLink of its own instead of
    reusing whatever listens on Flower's default ports. A SuperLink this call starts is recorded (pid) in
    the Flower home, so ``stop_superlink`` stops exactly it. ``superlink``: the name of a SuperLink connection
    in the Flower home's config.toml (``write_superlink_connection``) to run on a deployment (a flower-superlink
    with flower-supernodes, ``fedsparse.experiments.deploy``) instead of the simulation runtime; the supernodes
    already running there are the federation. The run is judged by the run directory:
    once its summary is written, a ``flwr run --stream`` that does not end within ``STREAM_GRACE_SECONDS``
    is stopped. Raises RuntimeError with the tail of Flower's output when no complete run directory
    appears (within ``timeout`` seconds, when given).
    """
    results = results_root(config.results_dir)
    before = set(results.iterdir())
    started = time.time()
    launch = secrets.token_hex(8)  # inherited by the SuperLink `flwr run` may start: how we recognise it
    env = {**os.environ, **FLOWER_ENV, LAUNCH_ENV: launch}
    home = flower_home(flwr_home)
    env["FLWR_HOME"] = str(home)
    if ports is not None:
        env[HTTP_PORT_ENV], env[CONTROL_PORT_ENV] = (str(port) for port in ports)
    federation = (f"num-supernodes={partitions_needed(n_users, config.fed.clients_per_node)} "
                  f"client-resources-num-cpus={cpus_per_client}")
    if superlink is None:
        command = ["flwr", "run", str(app_dir), "--stream", "--federation-config", federation]
    else:
        command = ["flwr", "run", str(app_dir), superlink, "--stream"]
    command += ["--run-config", run_config_overrides(config)]
    disable = None if show_progress is None else not show_progress
    with tqdm(total=config.num_server_rounds, desc="rounds (flwr run)", unit="round", disable=disable) as progress:
        summary_reached = False

        def follow(line: str) -> None:
            nonlocal summary_reached
            summary_reached = summary_reached or line.startswith(SUMMARY_HEADER)
            if summary_reached:
                return
            log.info(line)
            round_done = ROUND_LINE.match(line)
            if round_done:
                progress.n = int(round_done.group(1))
                progress.refresh()

        def finished() -> Path | None:
            if config.resume_dir:  # the run continues in its own directory: done when it wrote a new summary
                run_dir = Path(config.resume_dir).expanduser().resolve()
                summary = run_dir / "summary.json"
                return run_dir if summary.exists() and summary.stat().st_mtime >= started else None
            created = sorted(path for path in set(results.iterdir()) - before if path.name.split("-", 2)[-1].startswith("flwr-"))
            return created[-1] if created and (created[-1] / "summary.json").exists() else None

        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = OutputTail()
        reader = threading.Thread(target=tail.follow, args=(process, follow), daemon=True)
        reader.start()
        try:
            ended = _wait(process, finished, timeout)
        finally:
            _record_superlinks(home, launch, ports)
        reader.join(timeout=STOP_GRACE_SECONDS)
    run_dir = finished()
    if run_dir is None:
        reason = "timed out" if not ended else f"exit {process.returncode}"
        raise RuntimeError(f"flwr run did not complete ({reason}); output tail:\n{tail.text()}")
    return run_dir


def write_superlink_connection(flwr_home: Path, name: str, address: str) -> None:
    """Make ``name`` the default SuperLink connection of the Flower home ``flwr_home``: an insecure (no TLS)
    connection to the SuperLink whose API listens at ``address`` (host:port). Overwrites the home's config.toml."""
    home = flower_home(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n'
    )


class OutputTail:
    """Reads ``flwr run``'s merged output line by line: each cleaned line (colours removed) goes to a
    callback unless it is one of Flower's misleading size notices; the last OUTPUT_TAIL_CHARS are kept."""

    def __init__(self) -> None:
        self._lines: deque[str] = deque()
        self._chars = 0

    def follow(self, process: subprocess.Popen, on_line: Callable[[str], None] | None) -> None:
        """Consume the process's stdout until it closes."""
        for raw in process.stdout or ():
            line = ANSI_ESCAPE.sub("", raw.rstrip("\n"))
            self._lines.append(line)
            self._chars += len(line) + 1
            while self._chars > OUTPUT_TAIL_CHARS and len(self._lines) > 1:
                self._chars -= len(self._lines.popleft()) + 1
            if on_line is not None and not any(noise in line for noise in FLOWER_NOISE):
                on_line(line)

    def text(self) -> str:
        """The kept tail of the output."""
        return "\n".join(self._lines)


def _wait(process: subprocess.Popen, finished: Callable[[], Path | None], timeout: float | None) -> bool:
    """Wait for ``flwr run`` to end; stop it when the run directory is complete but the log stream stays
    open past a grace period, or at ``timeout``. Returns False when it was stopped at the timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done_at = None
    while process.poll() is None:
        now = time.monotonic()
        if done_at is None and finished() is not None:
            done_at = now
        if (done_at is not None and now - done_at > STREAM_GRACE_SECONDS) or (deadline is not None and now > deadline):
            process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return done_at is not None
        time.sleep(POLL_SECONDS)
    return True


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which only waits to be reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), None if gone:
    with the pid it identifies one process, even after the pid is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _record_superlinks(home: Path, launch: str, ports: tuple[int, int] | None) -> None:
    """Add to ``home``'s record every SuperLink process that this launch started (its environment holds
    the launch token)."""
    started = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"flower-superlink" not in cmdline.read_bytes():
                continue
            environ = (cmdline.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{LAUNCH_ENV}={launch}".encode() in environ:
            pid = int(cmdline.parent.name)
            started.append({"pid": pid, "start_ticks": _start_ticks(pid), "ports": list(ports) if ports else None})
    if started:
        records = _read_records(home)
        write_json(home / SUPERLINK_RECORD, records + started)


def _read_records(home: Path) -> list[dict]:
    """The SuperLinks fedsparse started with this Flower home (an unreadable record counts as empty)."""
    try:
        records = json.loads((home / SUPERLINK_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("pid"), int)] if isinstance(records, list) else []


def stop_process_tree(pid: int) -> list[int]:
    """SIGTERM ``pid`` and its descendants, then SIGKILL whatever is left after a grace period; returns the tree's pids."""
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in _children(parent)]
        tree += frontier
    terminate(tree)
    return tree


def terminate(pids: list[int]) -> None:
    """SIGTERM every pid, then SIGKILL whichever still runs after a grace period (gone ones are skipped)."""
    for target in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and any(process_running(target) for target in pids):
        time.sleep(POLL_SECONDS)
    for target in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def stop_superlink(flwr_home: Path | None = None) -> list[dict]:
    """Stop the SuperLinks fedsparse started with this Flower home (see ``flower_home``), with their Ray
    processes, and forget them; a recorded pid that now names another process is left alone. Returns
    one entry per stopped SuperLink: its pid, ports and the pids of its stopped children."""
    home = flower_home(flwr_home)
    stopped = []
    for record in _read_records(home):
        pid = record["pid"]
        if _start_ticks(pid) is None or _start_ticks(pid) != record.get("start_ticks"):
            continue  # already gone, or the pid now belongs to another process
        tree = stop_process_tree(pid)
        stopped.append({**record, "children": tree[1:]})
    (home / SUPERLINK_RECORD).unlink(missing_ok=True)
    return stopped
