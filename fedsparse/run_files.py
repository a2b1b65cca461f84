"""Run directories and crash-safe result files (written to a temp file, then renamed into place)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedsparse.config import ConfigError

log = logging.getLogger("fedsparse")


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


class ResultFileError(ValueError):
    """A result file (rounds.jsonl, config.json, summary.json, checkpoint.npz) is damaged; the message
    names the file (and line) and what is wrong."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file; ResultFileError names the first bad line.

    Only a torn last line (no final newline: the process died while appending it) is dropped, with a
    warning: anything else bad would make a resume rewrite the file without the valid records after it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ResultFileError(f"{path}: missing") from exc
    except UnicodeDecodeError as exc:
        raise ResultFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline, else a line cut short by a crash
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultFileError(f"{path}:{number}: not a JSON record ({exc.msg}); fix or remove that line") from exc
        if not isinstance(record, dict):
            raise ResultFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if torn.strip():
        try:
            record = json.loads(torn)
        except json.JSONDecodeError:
            log.warning("%s:%d: ignoring a torn last line (the writer stopped mid-line)", path, len(lines) + 1)
        else:
            if not isinstance(record, dict):
                raise ResultFileError(f"{path}:{len(lines) + 1}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def read_json_object(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON file holding one object with the ``required`` keys; ResultFileError names the file and the problem."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ResultFileError(f"{path}: missing") from exc
    except UnicodeDecodeError as exc:
        raise ResultFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ResultFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(payload, dict):
        raise ResultFileError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    missing = [key for key in required if key not in payload]
    if missing:
        raise ResultFileError(f"{path}: lacks {', '.join(missing)}")
    return payload


def read_run_config(run_dir: Path, sections: tuple[str, ...] = ("config", "population")) -> dict[str, Any]:
    """``run_dir/config.json`` with its ``sections`` checked to be objects; ResultFileError names a damaged one."""
    path = Path(run_dir) / "config.json"
    stored = read_json_object(path, sections)
    for key in sections:
        if not isinstance(stored[key], dict):
            raise ResultFileError(f"{path}: {key!r} must be a JSON object, got {type(stored[key]).__name__}")
    return stored


def round_gaps(records: list[dict[str, Any]], expected: int) -> str:
    """What is wrong with the round numbers of a rounds.jsonl against rounds 1..``expected`` ("" when nothing)."""
    have = [record.get("round") for record in records]
    missing = sorted(number for number in range(1, expected + 1) if number not in have)
    repeated = sorted({number for number in have if have.count(number) > 1}, key=str)
    extra = sorted({number for number in have if not isinstance(number, int) or not 1 <= number <= expected}, key=str)
    problems = [f"missing rounds {missing}"] * bool(missing) + [f"duplicated rounds {repeated}"] * bool(repeated) + [
        f"rounds outside 1..{expected}: {extra}"] * bool(extra)
    return "; ".join(problems)


LOCK_FILE = "run.lock"


class RunDirInUse(ValueError):
    """Another live process holds the run directory's lock."""


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` while writing it; RunDirInUse names the holder's pid.

    ``flock`` on ``run_dir/run.lock``: the kernel releases it when the holder exits, however it exits, so
    a lock file left by a dead process is stale by construction and simply taken over.
    """
    path = Path(run_dir) / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunDirInUse(f"run directory {run_dir} is in use by process {owner} ({path}); "
                              "wait for it to finish or stop that process") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_unlocked(run_dir: Path) -> None:
    """Raise RunDirInUse when a live process holds ``run_dir``'s lock (checked before starting Flower)."""
    with run_dir_lock(run_dir):
        pass


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
