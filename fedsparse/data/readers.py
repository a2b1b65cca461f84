"""Readers that turn one data file into a raw interaction table.

Every reader returns a ``pandas.DataFrame`` with columns ``user`` and ``item`` and, when the file has
them, ``rating`` and ``timestamp`` (numeric), one row per interaction in file order, ids as read:
int64 for formats whose ids are integers, strings for token ids. Nothing is filtered, deduplicated or
remapped here (that is ``transforms.py``), so every repair is counted in one place.

Malformed input raises ``DataFormatError`` naming the file and the 1-based line. The fast paths
(numpy, pandas' C parser) only detect that something is wrong; the file is then re-scanned line by
line to name the first bad line, so good files never pay for the slow scan.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from fedsparse.data.errors import DataFormatError

# Field kinds of delimited files.
_ID = "id"  # non-negative integer that fits in int64
_TOKEN = "token"  # non-empty string, kept as read
_NUMBER = "number"  # finite int or float
_UNUSED = "unused"  # a column nobody reads; only the field count is checked

_INT64_MAX = int(np.iinfo(np.int64).max)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_CANONICAL_INTEGER = r"0|[1-9][0-9]*"  # a token that reads back as the integer it spells (no sign, no leading zero)
_LIGHTGCN_BYTES = re.compile(rb"[0-9+\-\s]*")  # anything else cannot be a LightGCN file
_PANDAS_LINE = re.compile(r"line (\d+)")

_MOVIELENS_COLUMNS = (("user", _ID), ("item", _ID), ("rating", _NUMBER), ("timestamp", _NUMBER))
_RECBOLE_COLUMNS = {
    "user_id": ("user", _TOKEN),
    "item_id": ("item", _TOKEN),
    "rating": ("rating", _NUMBER),
    "timestamp": ("timestamp", _NUMBER),
}
_LASTFM_HEADER = ("userID", "artistID", "weight")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def read_lightgcn(path: str | Path) -> pd.DataFrame:
    """Read a LightGCN split file (``train.txt``/``test.txt``): one line per user, ``user item item ...``.

    Ids are whitespace-separated non-negative integers. A line holding a user and no items is allowed
    and adds no rows; blank lines are skipped. Parsed in one vectorised pass (Gowalla's 4.6 MB
    ``train.txt`` takes well under a second).

    Returns
    -------
    DataFrame with ``user`` and ``item``: int64 [n_pairs], users in line order, items in line order.
    """
    path = Path(path)
    data = path.read_bytes()
    _check_has_rows(path, data, header_lines=0)
    lines = data.splitlines()
    if _LIGHTGCN_BYTES.fullmatch(data) is None:
        raise _first_bad_lightgcn_line(path, lines)
    try:
        values = np.array(data.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        raise _first_bad_lightgcn_line(path, lines) from None
    if values.min() < 0:
        raise _first_bad_lightgcn_line(path, lines)
    counts = np.fromiter((len(line.split()) for line in lines), dtype=np.int64, count=len(lines))
    counts = counts[counts > 0]
    starts = np.cumsum(counts) - counts  # position of each line's user id in `values`
    is_item = np.ones(len(values), dtype=bool)
    is_item[starts] = False
    return pd.DataFrame({"user": np.repeat(values[starts], counts - 1), "item": values[is_item]})


def read_movielens_udata(path: str | Path) -> pd.DataFrame:
    """Read MovieLens-100K ``u.data``: tab-separated ``user item rating timestamp``, no header.

    Returns
    -------
    DataFrame with ``user``, ``item`` (int64 [n]), ``rating`` (float64 [n], 1-5 stars) and ``timestamp``
    (numeric [n], seconds since the epoch).
    """
    path = Path(path)
    data = path.read_bytes()
    _check_has_rows(path, data, header_lines=0)
    return _read_delimited(path, data, _MOVIELENS_COLUMNS, header_lines=0)


def read_movielens_dat(path: str | Path) -> pd.DataFrame:
    """Read MovieLens-1M ``ratings.dat``: ``user::item::rating::timestamp``, Latin-1, no header.

    Returns
    -------
    DataFrame with ``user``, ``item`` (int64 [n]), ``rating`` (float64 [n], 1-5 stars) and ``timestamp``
    (numeric [n], seconds since the epoch).
    """
    path = Path(path)
    # "::" -> tab keeps line numbers and lets pandas' C parser (single-character separators only) read it.
    data = path.read_bytes().replace(b"::", b"\t")
    _check_has_rows(path, data, header_lines=0)
    return _read_delimited(path, data, _MOVIELENS_COLUMNS, header_lines=0)


def read_recbole_inter(path: str | Path) -> pd.DataFrame:
    """Read a RecBole atomic ``.inter`` file: tab-separated, typed header such as ``user_id:token``.

    Columns are mapped by the name before the colon: ``user_id`` -> user, ``item_id`` -> item,
    ``rating`` -> rating, ``timestamp`` -> timestamp; other columns are ignored. Ids are RecBole
    tokens, so they stay strings, unless every token of the column is a canonical integer ("0", "196", not
    "007"): then they are the integers they spell, so ids sort (and map to indices) as in the dataset's
    native file (RecBole's ml-100k and ``u.data`` give the same Interactions).

    Returns
    -------
    DataFrame with ``user``, ``item`` (int64 [n] when canonical integers, else str [n]) and, when the header
    has them, ``rating`` (float64 [n]) and ``timestamp`` (numeric [n]).
    """
    path = Path(path)
    data = path.read_bytes()
    _check_has_rows(path, data, header_lines=1)
    names = [field.split(":", 1)[0].strip() for field in _first_line(data).split("\t")]
    missing = [name for name in ("user_id", "item_id") if name not in names]
    if missing:
        raise DataFormatError.at(path, 1, f"header lacks {', '.join(missing)} (found {', '.join(names)})")
    if len(set(names)) != len(names):
        raise DataFormatError.at(path, 1, f"header repeats a column name ({', '.join(names)})")
    columns = [_RECBOLE_COLUMNS.get(name, ("", _UNUSED)) for name in names]
    table = _read_delimited(path, data, columns, header_lines=1)
    for column in ("user", "item"):
        tokens = table[column].astype(str)
        if tokens.str.fullmatch(_CANONICAL_INTEGER).all() and tokens.str.len().max() <= len(str(_INT64_MAX)) - 1:
            table[column] = tokens.astype(np.int64)
    return table


def read_lastfm_user_artists(path: str | Path) -> pd.DataFrame:
    """Read HetRec Last.fm ``user_artists.dat``: tab-separated, header ``userID artistID weight``.

    Returns
    -------
    DataFrame with ``user``, ``item`` (artist, int64 [n]) and ``rating`` (float64 [n], listening count).
    """
    path = Path(path)
    data = path.read_bytes()
    _check_has_rows(path, data, header_lines=1)
    header = tuple(field.strip() for field in _first_line(data).split("\t"))
    if header != _LASTFM_HEADER:
        raise DataFormatError.at(path, 1, f"expected header {' '.join(_LASTFM_HEADER)!r}, found {' '.join(header)!r}")
    return _read_delimited(path, data, (("user", _ID), ("item", _ID), ("rating", _NUMBER)), header_lines=1)


Column = str | int  # a header name, or a 0-based position
WHITESPACE_SEPARATOR = r"\s+"  # pandas' C parser reads this pattern as "any run of spaces and tabs"


def read_table(
    path: str | Path,
    user_col: Column = "user",
    item_col: Column = "item",
    rating_col: Column | None = None,
    timestamp_col: Column | None = None,
    sep: str = ",",
    header: bool = True,
) -> pd.DataFrame:
    """Read a generic CSV (or Parquet, by suffix ``.parquet``/``.pq``); columns by name or 0-based position.

    CSV fields are read as text, so ids stay strings exactly as written ("007" stays "007"; ASINs work);
    Parquet ids keep their column type. Ratings and timestamps must be numeric. ``header=False``: the
    CSV's first line is data and columns can only be positions. ``sep``: the field separator (or
    WHITESPACE_SEPARATOR for runs of blanks). CSV problems name the line (a blank line is a row with
    missing ids); Parquet problems name the 1-based row.

    Returns
    -------
    DataFrame with ``user``, ``item`` [n] and, when their column is given, ``rating`` (float64 [n]) and
    ``timestamp`` (numeric [n]).
    """
    path = Path(path)
    named = {"user": user_col, "item": item_col, "rating": rating_col, "timestamp": timestamp_col}
    wanted = {out: col for out, col in named.items() if col is not None}
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        frame = pd.read_parquet(path)
        first_line: int | None = None
        where = _parquet_row
    else:
        frame = _read_csv(path, sep, header)
        first_line = 1
        where = _csv_line if header else _headerless_line
    labels = {out: _column_label(frame, col, header) for out, col in wanted.items()}
    missing = [str(wanted[out]) for out, label in labels.items() if label is None]
    if missing:
        count = len(frame.columns)
        found = ", ".join(map(str, frame.columns)) if header else f"{count} columns, positions 0-{count - 1}"
        raise DataFormatError.at(path, first_line, f"missing column(s) {', '.join(missing)} (found {found})")
    if frame.empty:
        raise DataFormatError.at(path, first_line, "no rows")
    table = pd.DataFrame({out: frame[label] for out, label in labels.items()}).reset_index(drop=True)
    for out in wanted:
        table[out] = _checked_column(path, table[out], out, numeric=out in ("rating", "timestamp"), where=where)
    return table


def _column_label(frame: pd.DataFrame, column: Column, header: bool) -> object | None:
    """The frame's label of ``column`` (a header name, or a 0-based position); None when it has none."""
    if isinstance(column, int):
        return frame.columns[column] if 0 <= column < len(frame.columns) else None
    return column if header and column in frame.columns else None


def _read_csv(path: Path, sep: str, header: bool) -> pd.DataFrame:
    """pandas' CSV read, every field as text and blank lines kept, so row r is line r + 2 (r + 1 without a header)."""
    try:
        return pd.read_csv(
            path,
            sep=sep,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            engine="c",
        )
    except pd.errors.EmptyDataError:
        raise DataFormatError.at(path, 1, "empty file") from None
    except pd.errors.ParserError as exc:
        match = _PANDAS_LINE.search(str(exc))
        line = int(match.group(1)) if match else None
        raise DataFormatError.at(path, line, f"wrong number of fields ({exc})") from None


def _headerless_line(row: int) -> tuple[int | None, str]:
    """CSV row (0-based, blank lines kept) of a file without a header -> (line, message prefix)."""
    return row + 1, ""


def _csv_line(row: int) -> tuple[int | None, str]:
    """CSV row (0-based, blank lines kept) -> (line, message prefix); line 1 is the header."""
    return row + 2, ""


def _parquet_row(row: int) -> tuple[int | None, str]:
    """Parquet row (0-based) -> (no line, "row N: " prefix)."""
    return None, f"row {row + 1}: "


def _checked_column(
    path: Path, column: pd.Series, name: str, numeric: bool, where: Callable[[int], tuple[int | None, str]]
) -> pd.Series:
    """The checked column (ratings as float64, timestamps as parsed); raise at the first missing or bad value."""
    missing = column.isna().to_numpy()
    if missing.any():
        line, prefix = where(int(np.argmax(missing)))
        raise DataFormatError.at(path, line, f"{prefix}missing {name}")
    if not numeric:
        return column
    is_number = is_numeric_dtype(column) and not is_bool_dtype(column)
    numbers = column if is_number else pd.to_numeric(column, errors="coerce")
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        line, prefix = where(row)
        raise DataFormatError.at(path, line, f"{prefix}non-numeric {name} {column.iloc[row]!r}")
    return pd.Series(values) if name == "rating" else numbers


def _read_delimited(path: Path, data: bytes, columns: Sequence[tuple[str, str]], header_lines: int) -> pd.DataFrame:
    """Parse tab-separated ``data`` into the named columns, or raise at the first bad line.

    ``columns`` gives (output name, kind) for every field in file order; ``""`` names an unused field.
    """
    text_fields = {i: str for i, (_, kind) in enumerate(columns) if kind in (_TOKEN, _UNUSED)}
    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            sep="\t",
            header=None,
            skiprows=header_lines,
            dtype=text_fields,
            keep_default_na=False,
            na_values=[""],
            engine="c",
        )
    except ValueError:  # pandas' ParserError and dtype conversion errors are ValueErrors
        raise _first_bad_delimited_line(path, data, columns, header_lines) from None
    if not _frame_ok(frame, columns):
        raise _first_bad_delimited_line(path, data, columns, header_lines)
    named = {i: name for i, (name, _) in enumerate(columns) if name}
    table = frame[list(named)].rename(columns=named).reset_index(drop=True)
    if "rating" in table:
        table["rating"] = table["rating"].astype(np.float64)
    return table


def _frame_ok(frame: pd.DataFrame, columns: Sequence[tuple[str, str]]) -> bool:
    """Cheap vectorised check that pandas' parse satisfies every field kind."""
    if frame.shape[1] != len(columns):
        return False
    for i, (_, kind) in enumerate(columns):
        column = frame[i]
        if kind != _UNUSED and column.isna().any():
            return False
        if kind == _ID and not (column.dtype == np.int64 and column.min() >= 0):
            return False
        if kind == _NUMBER and not (
            is_numeric_dtype(column) and not is_bool_dtype(column) and np.isfinite(column.to_numpy(np.float64)).all()
        ):
            return False
    return True


def _first_bad_delimited_line(
    path: Path, data: bytes, columns: Sequence[tuple[str, str]], header_lines: int
) -> DataFormatError:
    """Scan line by line (slow, error path only) and describe the first bad line."""
    for number, line in enumerate(data.splitlines(), start=1):
        if number <= header_lines or not line.strip():
            continue
        fields = line.split(b"\t")
        if len(fields) != len(columns):
            return DataFormatError.at(path, number, f"expected {len(columns)} fields, found {len(fields)}")
        for field, (name, kind) in zip(fields, columns, strict=True):
            problem = _field_problem(field.decode("latin-1").strip(), name, kind)
            if problem:
                return DataFormatError.at(path, number, problem)
    return DataFormatError.at(path, None, "could not be parsed, but no single line is at fault")


def _first_bad_lightgcn_line(path: Path, lines: list[bytes]) -> DataFormatError:
    """Scan a LightGCN file line by line (error path only) and describe the first bad id."""
    for number, line in enumerate(lines, start=1):
        for position, token in enumerate(line.split()):
            problem = _id_problem(token.decode("latin-1"), "user" if position == 0 else "item")
            if problem:
                return DataFormatError.at(path, number, problem)
    return DataFormatError.at(path, None, "could not be parsed, but no single line is at fault")


def _field_problem(text: str, name: str, kind: str) -> str | None:
    """What is wrong with one field's text, or None."""
    if kind == _UNUSED:
        return None
    if not text:
        return f"missing {name}"
    if kind == _ID:
        return _id_problem(text, name)
    if kind == _NUMBER:
        try:
            value = float(text)
        except ValueError:
            return f"non-numeric {name} {text!r}"
        return None if math.isfinite(value) else f"non-finite {name} {text!r}"
    return None


def _id_problem(text: str, name: str) -> str | None:
    """What is wrong with an integer id's text (``name`` is "user" or "item"), or None."""
    if _INTEGER.fullmatch(text) is None:
        return f"non-integer {name} id {text!r}"
    value = int(text)
    if value < 0:
        return f"negative {name} id {value}"
    if value > _INT64_MAX:
        return f"{name} id {value} does not fit in int64"
    return None


def _check_has_rows(path: Path, data: bytes, header_lines: int) -> None:
    """Raise if the file is empty, or holds nothing after its header."""
    if not data.strip():
        raise DataFormatError.at(path, 1, "empty file")
    parts = data.split(b"\n", header_lines)
    if len(parts) <= header_lines or not parts[header_lines].strip():
        raise DataFormatError.at(path, header_lines + 1, "no interactions after the header")


def _first_line(data: bytes) -> str:
    """The header line, decoded."""
    return data.partition(b"\n")[0].rstrip(b"\r").decode("utf-8", errors="replace")


__all__ = [
    "read_lightgcn",
    "read_movielens_udata",
    "read_movielens_dat",
    "read_recbole_inter",
    "read_lastfm_user_artists",
    "read_table",
]
