"""Compact storage of a masked embedding table, whose real byte size is what memory figures report.

A table W [n_rows, dim] with mask M keeps only its K = nnz(M) active values (float32, row-major mask
order) plus the mask's structure in one of two layouts:

* ``"row-index"``: ``row_counts`` [n_rows] (uint8 when dim <= 255, else uint16) = active entries per
  row, and ``col_indices`` [K] (uint8 when dim <= 256, else uint16) = their columns, row after row,
  strictly increasing within a row (CSR without the offsets, which are cumsum(row_counts)).
  Bytes: n_rows · count_bytes + K · index_bytes + 4K.
* ``"bitmask"``: ``bitmask`` uint8 [n_rows, ceil(dim / 8)] = ``np.packbits(M, axis=1)`` (big bit
  order, padding bits zero). Bytes: n_rows · ceil(dim / 8) + 4K.
* ``"prefix"``: only for masks whose rows are active on their leading columns (the embedding-size
  methods of fedsparse/sparse/embedding_sizes.py): ``row_sizes`` [n_rows] (the row-count dtype). Bytes: n_rows ·
  count_bytes + 4K. Asked for explicitly; ``"auto"`` chooses between the two general layouts.

Because values follow row-major mask order, a party that already knows the mask needs only ``values``.
``n_rows`` and ``dim`` are metadata both sides know and are not counted in ``nbytes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fedsparse.sparse.embedding_sizes import prefix_mask, prefix_sizes

FORMATS = ("row-index", "bitmask", "prefix")
MAX_DIM = 65535  # uint16 row counts


def count_dtype(dim: int) -> np.dtype:
    """Row-count dtype of the row-index layout: uint8 when dim <= 255 (counts reach dim), else uint16."""
    return np.dtype(np.uint8 if dim <= 255 else np.uint16)


def index_dtype(dim: int) -> np.dtype:
    """Column-index dtype of the row-index layout: uint8 when dim <= 256 (indices < dim), else uint16."""
    return np.dtype(np.uint8 if dim <= 256 else np.uint16)


def dense_nbytes(n_rows: int, dim: int) -> int:
    """Bytes of the dense float32 table, n_rows · dim · 4: the denominator of memory ratios."""
    return int(n_rows) * int(dim) * 4


def compact_nbytes(n_rows: int, dim: int, nnz: int, format: str = "auto") -> int:
    """Closed-form bytes of a ``CompactTable`` with ``nnz`` active entries (it depends only on counts).

    "auto" is the smaller of the two layouts, as ``CompactTable.encode`` chooses it.
    """
    _check_dim(dim)
    row_index = n_rows * count_dtype(dim).itemsize + nnz * index_dtype(dim).itemsize + 4 * nnz
    bitmask = n_rows * _bitmask_width(dim) + 4 * nnz
    if format == "prefix":
        return int(n_rows * count_dtype(dim).itemsize + 4 * nnz)
    if format == "row-index":
        return int(row_index)
    if format == "bitmask":
        return int(bitmask)
    if format == "auto":
        return int(min(row_index, bitmask))
    raise ValueError(f"format must be one of {FORMATS + ('auto',)}, got {format!r}")


@dataclass(frozen=True)
class CompactTable:
    """A masked embedding table stored as its active values plus the mask structure.

    Fields
    ------
    n_rows, dim : the table's shape [n_rows, dim]
    format : "row-index", "bitmask" or "prefix" (see the module docstring for the layouts)
    values : float32 [K], the active values in row-major mask order
    row_counts : "row-index" only, uint8/uint16 [n_rows]; None for "bitmask"
    col_indices : "row-index" only, uint8/uint16 [K]; None for "bitmask"
    bitmask : "bitmask" only, uint8 [n_rows, ceil(dim / 8)]; None otherwise
    row_sizes : "prefix" only, uint8/uint16 [n_rows], each row's active leading columns; None otherwise

    Build with ``encode`` (from a table and mask) or ``from_arrays`` (validated, from received arrays).
    """

    n_rows: int
    dim: int
    format: str
    values: np.ndarray
    row_counts: np.ndarray | None = None
    col_indices: np.ndarray | None = None
    bitmask: np.ndarray | None = None
    row_sizes: np.ndarray | None = None

    @classmethod
    def encode(cls, weight: np.ndarray, mask: np.ndarray, format: str = "auto") -> CompactTable:
        """Store ``weight`` [n, d] under ``mask`` bool [n, d]; off-mask weights are dropped.

        ``format="auto"`` picks the layout with fewer bytes for this mask (ties → "row-index").
        ``format="prefix"`` needs a prefix-form mask. Raises ValueError on shape mismatch, a non-boolean
        mask, dim > 65535, non-finite active values, or a non-prefix mask asked to be stored as one.
        """
        weight = np.asarray(weight)
        mask = np.asarray(mask)
        if weight.ndim != 2 or weight.shape != mask.shape:
            raise ValueError(f"weight and mask must be 2-D with the same shape, got {weight.shape} and {mask.shape}")
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be bool, got {mask.dtype}")
        n_rows, dim = weight.shape
        _check_dim(dim)
        values = np.ascontiguousarray(weight[mask], dtype=np.float32)
        if not np.all(np.isfinite(values)):
            raise ValueError("weight has non-finite values on the mask")
        nnz = values.size
        if format == "auto":
            row_index = compact_nbytes(n_rows, dim, nnz, "row-index")
            format = "row-index" if row_index <= compact_nbytes(n_rows, dim, nnz, "bitmask") else "bitmask"
        if format == "row-index":
            row_counts = mask.sum(axis=1).astype(count_dtype(dim))
            col_indices = np.nonzero(mask)[1].astype(index_dtype(dim))  # row-major, ascending within a row
            return cls(n_rows, dim, format, values, row_counts=row_counts, col_indices=col_indices)
        if format == "bitmask":
            bitmask = np.packbits(mask, axis=1).reshape(n_rows, _bitmask_width(dim))
            return cls(n_rows, dim, format, values, bitmask=bitmask)
        if format == "prefix":
            return cls(n_rows, dim, format, values, row_sizes=prefix_sizes(mask).astype(count_dtype(dim)))
        raise ValueError(f"format must be one of {FORMATS + ('auto',)}, got {format!r}")

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        """The table and its mask: weight float32 [n_rows, dim] with zeros off-mask, mask bool [n_rows, dim]."""
        mask = self.mask()
        weight = np.zeros((self.n_rows, self.dim), dtype=np.float32)
        weight[mask] = self.values
        return weight, mask

    def mask(self) -> np.ndarray:
        """The mask alone, bool [n_rows, dim] (cheaper than ``decode`` when values are not needed)."""
        if self.format == "bitmask":
            return np.unpackbits(self._part("bitmask"), axis=1, count=self.dim).astype(bool).reshape(self.n_rows, self.dim)
        if self.format == "prefix":
            return prefix_mask(self._part("row_sizes").astype(np.int64), self.dim)
        mask = np.zeros((self.n_rows, self.dim), dtype=bool)
        rows = np.repeat(np.arange(self.n_rows), self._part("row_counts").astype(np.int64))
        mask[rows, self._part("col_indices").astype(np.int64)] = True
        return mask

    def decode_rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``positions`` int [r] (any order, repeats allowed) of the table and its mask, without decoding the
        rest: weight float32 [r, dim] with zeros off-mask, mask bool [r, dim]. Where each row's values begin is
        found in one pass over the rows' counts, a chunk at a time: nothing per table row is allocated."""
        values, counts, columns = self.row_entries(positions)
        rows = np.repeat(np.arange(counts.size), counts)
        weight = np.zeros((counts.size, self.dim), dtype=np.float32)
        mask = np.zeros(weight.shape, dtype=bool)
        weight[rows, columns] = values
        mask[rows, columns] = True
        return weight, mask

    def row_entries(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The active entries of rows ``positions`` int [r], row after row (columns ascending), never as dense
        rows: (values float32 [K'], active entries per row int64 [r], their columns int32 [K'])."""
        positions = self._checked_positions(positions)
        if self.format == "row-index":
            entries = self._row_entries(positions)
            counts = self._part("row_counts")[positions].astype(np.int64)
            return self._values_at(entries), counts, self._part("col_indices")[entries].astype(np.int32)
        if self.format == "prefix":
            counts = self._part("row_sizes")[positions].astype(np.int64)
        else:
            counts = _popcounts(self._part("bitmask")[positions])
        columns = np.flatnonzero(self.mask_rows(positions))  # the mask: a quarter of the rows' dense bytes, read once
        columns %= self.dim
        return self._values_at(self._row_entries(positions)), counts, columns.astype(np.int32)

    def _values_at(self, entries: np.ndarray | slice) -> np.ndarray:
        """A writable copy of ``values[entries]`` (a received table's values are shared and read-only)."""
        values = self.values[entries]
        return values.copy() if isinstance(entries, slice) else values

    def mask_rows(self, positions: np.ndarray) -> np.ndarray:
        """The mask of rows ``positions`` int [r] alone, bool [r, dim] (``decode_rows`` without the values)."""
        positions = self._checked_positions(positions)
        if self.format == "bitmask":
            packed = self._part("bitmask")[positions]
            return np.unpackbits(packed, axis=1, count=self.dim).view(bool).reshape(positions.size, self.dim)
        if self.format == "prefix":
            return prefix_mask(self._part("row_sizes")[positions].astype(np.int64), self.dim)
        lengths = self._part("row_counts")[positions].astype(np.int64)
        columns = self._part("col_indices")[self._row_entries(positions)].astype(np.int64)
        mask = np.zeros((positions.size, self.dim), dtype=bool)
        mask[np.repeat(np.arange(positions.size), lengths), columns] = True
        return mask

    def _row_entries(self, positions: np.ndarray) -> np.ndarray | slice:
        """Where the active entries of rows ``positions`` int64 [r] sit in ``values``, row after row: indices [sum of
        their counts] (int32 while they fit), or the whole slice when the rows are every row in order (a download
        of exactly the rows a device touches)."""
        if positions.size == self.n_rows and np.array_equal(positions, np.arange(self.n_rows)):
            return slice(None)
        starts, lengths = self._row_starts(positions)
        index = np.int32 if self.nnz < 2**31 else np.int64
        offsets = (starts - np.cumsum(lengths) + lengths).astype(index)
        return np.repeat(offsets, lengths) + np.arange(int(lengths.sum()), dtype=index)

    def _row_starts(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the values of rows ``positions`` int64 [r] begin in ``values`` and how many they are, int64 [r]
        each: one pass over the rows' counts a chunk at a time, keeping nothing per table row."""
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        starts = np.empty(positions.size, dtype=np.int64)
        lengths = np.empty(positions.size, dtype=np.int64)
        before = 0
        for first, counts in self._row_count_chunks():
            low, high = np.searchsorted(ordered, [first, first + counts.size])
            if high > low:
                local = ordered[low:high] - first
                starts[order[low:high]] = before + (np.cumsum(counts) - counts)[local]
                lengths[order[low:high]] = counts[local]
            before += int(counts.sum())
        return starts, lengths

    def _row_count_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, active entries of each row of the chunk int64 [<= _COUNT_CHUNK_ROWS]) over the whole table
        (the layout's own counts, or the bitmask rows' popcounts)."""
        for first in range(0, self.n_rows, _COUNT_CHUNK_ROWS):
            rows = slice(first, first + _COUNT_CHUNK_ROWS)
            if self.format == "bitmask":
                counts = _popcounts(self._part("bitmask")[rows])
            else:
                counts = self._part("row_counts" if self.format == "row-index" else "row_sizes")[rows].astype(np.int64)
            yield first, counts

    def _checked_positions(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` as int64 [r]; IndexError naming the first one outside [0, n_rows)."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        outside = (positions < 0) | (positions >= self.n_rows)
        if outside.any():
            raise IndexError(f"row {int(positions[np.argmax(outside)])} is outside the table's {self.n_rows} rows")
        return positions

    def _part(self, name: str) -> np.ndarray:
        """The structure array ``name`` of this table's format; ValueError when the format holds none."""
        array = getattr(self, name)
        if array is None:
            raise ValueError(f"a {self.format} table holds no {name}")
        return array

    @property
    def nnz(self) -> int:
        """Active entries K."""
        return int(self.values.size)

    @property
    def density(self) -> float:
        """K / (n_rows · dim); 0 for an empty table."""
        total = self.n_rows * self.dim
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Exact bytes held: the sum of ``.nbytes`` of the arrays in ``to_arrays()`` (no metadata)."""
        return int(sum(array.nbytes for array in self.to_arrays().values()))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to store or send: {"values", "row_counts", "col_indices"}, {"values", "bitmask"} or
        {"values", "row_sizes"}."""
        if self.format == "row-index":
            return {"values": self.values, "row_counts": self._part("row_counts"), "col_indices": self._part("col_indices")}
        if self.format == "prefix":
            return {"values": self.values, "row_sizes": self._part("row_sizes")}
        return {"values": self.values, "bitmask": self._part("bitmask")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_rows: int, dim: int) -> CompactTable:
        """Rebuild from ``to_arrays()`` output, validated; the keys decide the format.

        Raises ValueError naming the first problem (keys, dtypes, shapes, counts, indices, values).
        """
        keys = set(arrays)
        if keys == {"values", "row_counts", "col_indices"}:
            format = "row-index"
        elif keys == {"values", "bitmask"}:
            format = "bitmask"
        elif keys == {"values", "row_sizes"}:
            format = "prefix"
        else:
            raise ValueError(
                f"arrays keys {sorted(keys)} match no format: expected {{'values', 'row_counts', 'col_indices'}} "
                "(row-index), {'values', 'bitmask'} (bitmask) or {'values', 'row_sizes'} (prefix)"
            )
        structure = {key: np.asarray(arrays[key]) for key in keys - {"values"}}
        table = cls(int(n_rows), int(dim), format, np.asarray(arrays["values"]), **structure)
        table.validate()
        return table

    def validate(self) -> None:
        """Raise ValueError naming the first problem; receivers call this on every decoded payload."""
        n_rows, dim = self.n_rows, self.dim
        if n_rows < 0:
            raise ValueError(f"n_rows must be >= 0, got {n_rows}")
        _check_dim(dim)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        values = self.values
        if values.dtype != np.float32:
            raise ValueError(f"values dtype must be float32, got {values.dtype}")
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D [K], got shape {values.shape}")
        if not _all_finite(values):
            raise ValueError("values contain non-finite entries (NaN or inf)")
        nnz = values.size
        if self.format == "prefix":
            _check_none(self, ("row_counts", "col_indices", "bitmask"))
            sizes = self._part("row_sizes")
            _check_dtype("row_sizes", sizes, count_dtype(dim), dim)
            if sizes.shape != (n_rows,):
                raise ValueError(f"row_sizes length must be n_rows = {n_rows}, got shape {sizes.shape}")
            if n_rows and int(sizes.max()) > dim:
                raise ValueError(f"row_sizes exceed dim = {dim} (row {int(np.argmax(sizes.astype(np.int64) > dim))})")
            if int(sizes.astype(np.int64).sum()) != nnz:
                raise ValueError(f"row_sizes sum to {int(sizes.astype(np.int64).sum())} but values has length {nnz}")
            return
        if self.format == "bitmask":
            _check_none(self, ("row_counts", "col_indices", "row_sizes"))
            bitmask = self._part("bitmask")
            width = _bitmask_width(dim)
            _check_dtype("bitmask", bitmask, np.dtype(np.uint8), dim)
            if bitmask.shape != (n_rows, width):
                raise ValueError(
                    f"bitmask shape must be {(n_rows, width)} (ceil(dim / 8) bytes per row), got {bitmask.shape}"
                )
            padding = dim % 8
            if padding and n_rows and np.any(bitmask[:, -1] & np.uint8((1 << (8 - padding)) - 1)):
                raise ValueError(f"bitmask padding bits (past column {dim - 1}) are set")
            active = sum(int(counts.sum()) for _, counts in self._row_count_chunks())  # set bits, mask kept packed
            if active != nnz:
                raise ValueError(f"bitmask has {active} set bits but values has length {nnz}")
            return
        _check_none(self, ("bitmask", "row_sizes"))
        counts, indices = self._part("row_counts"), self._part("col_indices")
        _check_dtype("row_counts", counts, count_dtype(dim), dim)
        _check_dtype("col_indices", indices, index_dtype(dim), dim)
        if counts.shape != (n_rows,):
            raise ValueError(f"row_counts length must be n_rows = {n_rows}, got shape {counts.shape}")
        if indices.shape != (nnz,):
            raise ValueError(f"col_indices length must equal len(values) = {nnz}, got shape {indices.shape}")
        counts64 = counts.astype(np.int64)
        if n_rows and counts64.max() > dim:
            raise ValueError(f"row_counts exceed dim = {dim} (row {int(np.argmax(counts64 > dim))})")
        if int(counts64.sum()) != nnz:
            raise ValueError(f"row_counts sum to {int(counts64.sum())} but values has length {nnz}")
        if nnz and int(indices.max()) >= dim:
            raise ValueError(f"col_indices must be < dim = {dim}, got {int(indices.max())}")
        if nnz > 1:
            offsets = np.cumsum(counts64)[:-1]  # where rows 1.. begin; a new row may restart low
            starts = np.zeros(nnz, dtype=bool)
            starts[offsets[offsets < nnz]] = True
            bad = (np.diff(indices.astype(np.int32)) <= 0) & ~starts[1:]  # int32 holds any column (dim <= 65535)
            if bad.any():
                position = int(np.argmax(bad)) + 1
                row = int(np.searchsorted(np.cumsum(counts64), position, side="right"))
                raise ValueError(
                    f"col_indices must be strictly increasing within a row (row {row}, position {position})"
                )


def _all_finite(values: np.ndarray) -> bool:
    """True when no entry is NaN or infinite, without a temporary the size of ``values`` (min and max carry a NaN)."""
    return values.size == 0 or bool(np.isfinite(values.min()) and np.isfinite(values.max()))


_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)  # set bits of each byte value
_COUNT_CHUNK_ROWS = 4096  # rows whose counts (a bitmask's byte popcounts) are expanded at once


def _popcounts(packed: np.ndarray) -> np.ndarray:
    """Set bits of each row of a packed bit mask uint8 [r, ceil(dim / 8)]: int64 [r]."""
    return _POPCOUNT[packed].sum(axis=1, dtype=np.uint16).astype(np.int64)  # dim <= MAX_DIM fits uint16


def _bitmask_width(dim: int) -> int:
    """Bytes per row of the bitmask layout, ceil(dim / 8)."""
    return (int(dim) + 7) // 8


def _check_dim(dim: int) -> None:
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"dim must be in [1, {MAX_DIM}], got {dim}")


def _check_dtype(name: str, array: np.ndarray | None, dtype: np.dtype, dim: int) -> None:
    if array is None or array.dtype != dtype:
        raise ValueError(f"{name} dtype must be {dtype} for dim {dim}, got {None if array is None else array.dtype}")


def _check_none(table: CompactTable, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(table, name) is not None:
            raise ValueError(f"{name} must be None for format {table.format!r}")
