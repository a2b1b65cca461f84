"""Launch ``flwr run`` for a RunConfig and find what it wrote; stop the local SuperLink afterwards.

Shells out to the ``flwr`` command (this module does not import flwr). ``flwr run --stream`` exits 0
even when the run fails, so success is judged from the run directory the ServerApp wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from fedsparse.config import ConfigError, RunConfig, flat_defaults
from fedsparse.grouping import partitions_needed

# Without these, every `flwr run` rebuilds an environment from the app's dependencies (a CUDA torch),
# reports telemetry and checks for updates; they must be set before the local SuperLink starts.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
STOP_GRACE_SECONDS = 10.0


def check_flower_config(config: RunConfig) -> None:
    """Raise ConfigError for settings the Flower engine cannot run (the in-process engine can)."""
    if config.privacy.secure_aggregation and config.fed.clients_per_node != 1:
        raise ConfigError("privacy.secure-aggregation under Flower runs SecAgg+ between supernodes: needs fed.clients-per-node = 1")
    if federated_start(config) and config.fed.clients_per_node != 1:
        raise ConfigError("the federated NMF start (fed.nmf-init = federated) runs SecAgg+ between supernodes: needs "
                          "fed.clients-per-node = 1 (or fed.nmf-init = central / none)")


def federated_start(config: RunConfig) -> bool:
    """Whether the run starts with the federated NMF start (its policy needs an NMF mask and fed.nmf-init = federated)."""
    from fedsparse.policies import build_policy

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
    if config.resume_dir:
        flat["resume-dir"] = str(Path(config.resume_dir).expanduser().resolve())
    changed = {key: value for key, value in flat.items() if value != defaults[key] or key == "results-dir"}
    return " ".join(f'"{key}"={toml_value(value)}' for key, value in changed.items())


def run_flower(
    config: RunConfig,
    app_dir: Path,
    n_users: int,
    flwr_home: Path | None = None,
    cpus_per_client: int = 1,
    timeout: float | None = None,
) -> Path:
    """Run the app in ``app_dir`` under ``flwr run`` and return the run directory it wrote.

    One supernode per partition (``fed.clients-per-node`` users each). With ``resume-dir`` set, the run
    continues there. Raises RuntimeError with the tail of Flower's output when no complete run
    directory appears.
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
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    output = (completed.stdout + completed.stderr)[-4000:]
    if config.resume_dir:  # the run continues in its own directory: done when it wrote a new summary
        run_dir = Path(config.resume_dir).expanduser().resolve()
        summary = run_dir / "summary.json"
        done = summary.exists() and summary.stat().st_mtime >= started
    else:
        created = sorted(path for path in set(results.iterdir()) - before if path.name.split("-", 2)[-1].startswith("flwr-"))
        run_dir = created[-1] if created else results
        done = bool(created) and (run_dir / "summary.json").exists()
    if completed.returncode != 0 or not done:
        raise RuntimeError(f"flwr run did not complete (exit {completed.returncode}); output tail:\n{output}")
    return run_dir


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
