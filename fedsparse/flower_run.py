"""Launch ``flwr run`` for a RunConfig and find what it wrote; stop the local SuperLink afterwards.

Shells out to the ``flwr`` command (this module does not import flwr). ``flwr run --stream`` exits 0
even when the run fails, so success is judged from the run directory the ServerApp wrote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from fedsparse.config import ConfigError, RunConfig, flat_defaults
from fedsparse.console import ROUND_LINE, SUMMARY_HEADER
from fedsparse.grouping import partitions_needed
from fedsparse.results import code_version

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
OUTPUT_TAIL_CHARS = 4000  # of Flower's output, quoted when a run fails
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# Flower >= 1.32 prints these on every simulation start whatever the federation size (flwr/simulation/app.py);
# the size actually used follows on its own line ("Federation `...` (943 simulated SuperNodes)").
FLOWER_NOISE = ("default simulated SuperNodes changed from 10 to 2", "To change federation size",
                "flwr federation simulation-config")


def check_flower_config(config: RunConfig) -> None:
    """Raise ConfigError for settings the Flower engine cannot run (the in-process engine can)."""
    if config.privacy.secure_aggregation and config.fed.clients_per_node != 1:
        raise ConfigError("privacy.secure-aggregation under Flower runs SecAgg+ between supernodes: needs fed.clients-per-node = 1")


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


def run_flower(
    config: RunConfig,
    app_dir: Path,
    n_users: int,
    flwr_home: Path | None = None,
    cpus_per_client: int = 1,
    timeout: float | None = None,
    show_progress: bool | None = False,
) -> Path:
    """Run the app in ``app_dir`` under ``flwr run`` and return the run directory it wrote.

    One supernode per partition (``fed.clients-per-node`` users each). With ``resume-dir`` set, the run
    continues there. Each line of Flower's log stream is logged (logger ``fedsparse``) as it arrives,
    colours removed, without Flower's size notices that do not apply and up to the ServerApp's summary
    table (the caller prints its own). ``show_progress``: a bar over rounds, advanced by the ServerApp's
    round lines (None = only on a terminal). Raises RuntimeError with the tail of Flower's output when
    no complete run directory appears.
    """
    results = Path(config.results_dir).expanduser().resolve()
    results.mkdir(parents=True, exist_ok=True)
    before = set(results.iterdir())
    started = time.time()
    env = {**os.environ, **FLOWER_ENV}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    federation = f"num-supernodes={partitions_needed(n_users, config.fed.clients_per_node)} client-resources-num-cpus={cpus_per_client}"
    command = ["flwr", "run", str(app_dir), "--stream", "--federation-config", federation,
               "--run-config", run_config_overrides(config)]
    disable = None if show_progress is None else not show_progress
    with tqdm(total=config.num_server_rounds, desc="rounds (flwr run)", unit="round", disable=disable) as progress:
        summary_reached = False

        def follow(line: str) -> None:
            nonlocal summary_reached
            summary_reached = summary_reached or line.startswith(SUMMARY_HEADER)
            if summary_reached:
                return
            log.info(line)
            finished = ROUND_LINE.match(line)
            if finished:
                progress.n = int(finished.group(1))
                progress.refresh()

        returncode, output = _run_streaming(command, env, timeout, follow)
    if config.resume_dir:  # the run continues in its own directory: done when it wrote a new summary
        run_dir = Path(config.resume_dir).expanduser().resolve()
        summary = run_dir / "summary.json"
        done = summary.exists() and summary.stat().st_mtime >= started
    else:
        created = sorted(path for path in set(results.iterdir()) - before if path.name.split("-", 2)[-1].startswith("flwr-"))
        run_dir = created[-1] if created else results
        done = bool(created) and (run_dir / "summary.json").exists()
    if returncode != 0 or not done:
        raise RuntimeError(f"flwr run did not complete (exit {returncode}); output tail:\n{output}")
    return run_dir


def _run_streaming(
    command: list[str], env: dict[str, str], timeout: float | None, on_line: Callable[[str], None] | None
) -> tuple[int, str]:
    """Run ``command`` with stdout and stderr merged, handing each cleaned line to ``on_line`` as it comes;
    returns (exit code, the output's last OUTPUT_TAIL_CHARS). Raises subprocess.TimeoutExpired after
    ``timeout`` seconds (the process is killed)."""
    tail: deque[str] = deque()
    tail_chars = 0
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            process.kill()

        timer = threading.Timer(timeout, stop) if timeout else None
        if timer is not None:
            timer.start()
        try:
            for raw in process.stdout or ():
                line = ANSI_ESCAPE.sub("", raw.rstrip("\n"))
                tail.append(line)
                tail_chars += len(line) + 1
                while tail_chars > OUTPUT_TAIL_CHARS and len(tail) > 1:
                    tail_chars -= len(tail.popleft()) + 1
                if on_line is not None and not any(noise in line for noise in FLOWER_NOISE):
                    on_line(line)
            returncode = process.wait()
        finally:
            if timer is not None:
                timer.cancel()
    output = "\n".join(tail)
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(command, timeout, output=output)
    return returncode, output


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


def superlink_pids(flwr_home: Path | None = None) -> list[int]:
    """Pids of local SuperLink processes (started with FLWR_HOME = ``flwr_home``, when given)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"flower-superlink" not in cmdline.read_bytes():
                continue
            environ = (cmdline.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if flwr_home is None or f"FLWR_HOME={flwr_home}".encode() in environ:
            pids.append(int(cmdline.parent.name))
    return pids


def stop_process_tree(pid: int) -> None:
    """SIGTERM ``pid`` and its descendants, then SIGKILL whatever is left after a grace period."""
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in _children(parent)]
        tree += frontier
    for target in tree:
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and any(Path(f"/proc/{target}").exists() for target in tree):
        time.sleep(0.2)
    for target in tree:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_superlink(flwr_home: Path | None = None) -> int:
    """Stop the local SuperLink(s) of ``flwr_home`` with their Ray processes; returns how many."""
    pids = superlink_pids(flwr_home)
    for pid in pids:
        stop_process_tree(pid)
    return len(pids)
