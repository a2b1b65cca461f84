"""The two errors the data layer raises on purpose: a malformed file and a dataset found nowhere."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file (or a pair of split files) is malformed.

    The message starts with the file and, when the problem sits on one line, its 1-based line
    number (``train.txt:3: negative item id -5``), so the user can open the file at the right place.
    """

    @classmethod
    def at(cls, path: str | Path, line: int | None, problem: str) -> DataFormatError:
        """An error located at ``path`` and 1-based ``line`` (``None`` when no single line is at fault)."""
        location = f"{path}:{line}" if line is not None else str(path)
        return cls(f"{location}: {problem}")


class DatasetNotFoundError(FileNotFoundError):
    """No directory holds the dataset's files and every download failed; the message lists each attempt."""


__all__ = ["DataFormatError", "DatasetNotFoundError"]
