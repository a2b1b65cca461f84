"""Run directories and crash-safe result files (written to a temp file, then renamed into place)."""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsparse.config import ConfigError


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def results_root(results_dir: str | Path) -> Path:
    """``results_dir`` made absolute and created; ConfigError when it (or a parent) is not a folder."""
    root = Path(results_dir).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"results-dir {root} cannot be a folder: a file is in the way ({exc.strerror})") from exc
    return root


def new_run_dir(results_dir: str | Path, label: str) -> Path:
    """Create and return a fresh directory ``<results_dir>/<UTC time>-<label>-<random hex>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = results_root(results_dir) / f"{stamp}-{label}-{secrets.token_hex(3)}"
    run_dir.mkdir(exist_ok=False)
    return run_dir


def provenance() -> dict[str, Any]:
    """What produced a result: code version (git commit, and whether the tree had local changes; None
    outside a git checkout, e.g. in Flower's bundled app copy), host, Python and start time (UTC)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    return {
        "code_version": commit,
        "code_modified": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "started_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
