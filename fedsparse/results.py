"""Run directories and crash-safe result files (written to a temp file, then renamed into place)."""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any


NEW_FILE_MODE = 0o666  # what open() asks for; the kernel removes the user's umask (tempfile's 0o600 would not)


def new_temp_file(path: Path) -> tuple[int, Path]:
    """Create ``.<name>.<random>.tmp`` beside ``path`` with the user's umask applied; returns (fd, its path)."""
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE), temp


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = new_temp_file(path)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_figure(figure: Any, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    temp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp.png")
    try:
        figure.savefig(temp, dpi=dpi)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
        plt.close(figure)


def write_json(path: Path, payload: Any) -> None:
    """Atomically write ``payload`` as indented JSON."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line and fsync it (a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record, sort_keys=True) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete JSON lines of a file (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def new_run_dir(results_dir: str | Path, label: str) -> Path:
    """Create and return a fresh directory ``<results_dir>/<UTC time>-<label>-<random hex>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = Path(results_dir).expanduser().resolve() / f"{stamp}-{label}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


MODIFIED_SUFFIX = "+modified"  # a code version whose checkout had local changes


def code_version() -> str:
    """The git commit of this checkout, with MODIFIED_SUFFIX when tracked files have local changes; ""
    outside a git checkout (e.g. in Flower's bundled app copy, hence the launcher passes its own)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return ""
    return commit + (MODIFIED_SUFFIX if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance(launched_from: str = "") -> dict[str, Any]:
    """What produced a result: code version (git commit, and whether the tree had local changes; None
    when unknown), host, Python and start time (UTC). ``launched_from``: the ``code_version()`` of the
    process that launched the run (config key ``code-version``), used instead of asking git here."""
    version = launched_from or code_version()
    return {
        "code_version": version.removesuffix(MODIFIED_SUFFIX) or None,
        "code_modified": version.endswith(MODIFIED_SUFFIX) if version else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "started_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
