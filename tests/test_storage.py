"""Compact table storage: round trips, exact byte counts in closed form, auto choice, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsparse.rng import rng_for
from fedsparse.sparse.storage import CompactTable, compact_nbytes, count_dtype, dense_nbytes, index_dtype

N_ROWS = 37


def random_table(n_rows: int, dim: int, density: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = rng_for(seed, "test-storage", n_rows, dim, density)
    weight = rng.standard_normal((n_rows, dim)).astype(np.float32)
    mask = rng.random((n_rows, dim)) < density
    return weight, mask


def closed_form(n_rows: int, dim: int, nnz: int, format: str) -> int:
    if format == "row-index":
        count_bytes = 1 if dim <= 255 else 2
        index_bytes = 1 if dim <= 256 else 2
        return n_rows * count_bytes + nnz * index_bytes + 4 * nnz
    return n_rows * math.ceil(dim / 8) + 4 * nnz


@pytest.mark.parametrize("format", ["row-index", "bitmask"])
@pytest.mark.parametrize("dim", [8, 64, 300])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_round_trip_and_bytes(format, dim, density):
    weight, mask = random_table(N_ROWS, dim, density)
    table = CompactTable.encode(weight, mask, format)
    assert table.format == format
    decoded, decoded_mask = table.decode()
    assert decoded.dtype == np.float32 and decoded_mask.dtype == np.bool_
    np.testing.assert_array_equal(decoded_mask, mask)
    np.testing.assert_array_equal(decoded, np.where(mask, weight, 0.0))
    np.testing.assert_array_equal(table.values, weight[mask])  # row-major mask order

    nnz = int(mask.sum())
    assert table.nnz == nnz
    assert table.nbytes == sum(array.nbytes for array in table.to_arrays().values())
    assert table.nbytes == closed_form(N_ROWS, dim, nnz, format) == compact_nbytes(N_ROWS, dim, nnz, format)

    rebuilt = CompactTable.from_arrays(table.to_arrays(), N_ROWS, dim)
    assert rebuilt.format == format
    np.testing.assert_array_equal(rebuilt.decode()[0], decoded)


@pytest.mark.parametrize(
    "dim, count, index", [(255, np.uint8, np.uint8), (256, np.uint16, np.uint8), (257, np.uint16, np.uint16)]
)
def test_dtype_boundaries(dim, count, index):
    assert count_dtype(dim) == count and index_dtype(dim) == index
    weight, mask = random_table(4, dim, 1.0)
    table = CompactTable.encode(weight, mask, "row-index")
    assert table.row_counts.dtype == count and table.col_indices.dtype == index
    np.testing.assert_array_equal(table.decode()[1], mask)


@pytest.mark.parametrize("dim", [8, 64, 300])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 0.15, 0.3, 1.0])
def test_auto_picks_the_smaller(dim, density):
    weight, mask = random_table(N_ROWS, dim, density)
    sizes = {f: CompactTable.encode(weight, mask, f).nbytes for f in ("row-index", "bitmask")}
    table = CompactTable.encode(weight, mask)
    assert table.nbytes == min(sizes.values()) == compact_nbytes(N_ROWS, dim, int(mask.sum()))
    if sizes["row-index"] <= sizes["bitmask"]:
        assert table.format == "row-index"  # ties go to row-index
    else:
        assert table.format == "bitmask"


def test_auto_tie_goes_to_row_index():
    # dim 8: row-index n + K + 4K vs bitmask n + 4K -> tie only at K = 0
    weight, mask = random_table(5, 8, 0.0)
    assert CompactTable.encode(weight, mask).format == "row-index"


def _prefix_table(n_rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = rng_for(0, "test-storage-prefix", n_rows, dim)
    sizes = rng.integers(0, dim + 1, n_rows)
    return rng.standard_normal((n_rows, dim)).astype(np.float32), np.arange(dim)[None, :] < sizes[:, None]


@pytest.mark.parametrize("format", ["row-index", "bitmask", "prefix"])
@pytest.mark.parametrize("dim", [5, 64, 300])
def test_decode_rows_equals_the_rows_of_the_whole_decode(format, dim):
    weight, mask = _prefix_table(N_ROWS, dim) if format == "prefix" else random_table(N_ROWS, dim, 0.3)
    mask[[0, N_ROWS - 1]] = False  # empty rows at both ends: their values take no room
    mask[3] = True  # a full row
    table = CompactTable.encode(weight, mask, format)
    whole, whole_mask = table.decode()
    rng = rng_for(1, "test-storage-rows", dim)
    for positions in (np.arange(N_ROWS), np.array([N_ROWS - 1, 3, 0, 3]), rng.integers(0, N_ROWS, 11),
                      np.zeros(0, dtype=np.int64), np.array([N_ROWS - 2])):
        rows, rows_mask = table.decode_rows(positions)
        assert rows.dtype == np.float32 and rows_mask.dtype == np.bool_ and rows.shape == (positions.size, dim)
        np.testing.assert_array_equal(rows, whole[positions])
        np.testing.assert_array_equal(rows_mask, whole_mask[positions])
        np.testing.assert_array_equal(table.mask_rows(positions), whole_mask[positions])
        values, counts, columns = table.row_entries(positions)  # the same rows, entry by entry
        np.testing.assert_array_equal(values, whole[positions][whole_mask[positions]])
        np.testing.assert_array_equal(counts, whole_mask[positions].sum(axis=1))
        np.testing.assert_array_equal(columns, np.nonzero(whole_mask[positions])[1])
        assert values.flags.writeable and columns.dtype == np.int32


def test_decode_rows_rejects_a_row_outside_the_table():
    table = CompactTable.encode(*random_table(4, 8, 0.5))
    with pytest.raises(IndexError, match="row 4 is outside the table's 4 rows"):
        table.decode_rows(np.array([1, 4]))
    with pytest.raises(IndexError, match="row -1"):
        table.mask_rows(np.array([-1]))


def test_dense_nbytes_and_compression():
    assert dense_nbytes(1000, 64) == 256_000
    weight, mask = random_table(1000, 64, 0.1)
    assert CompactTable.encode(weight, mask).nbytes < dense_nbytes(1000, 64) / 5


def test_empty_and_edge_shapes():
    for n_rows, dim in [(0, 8), (1, 1), (3, 9)]:
        weight, mask = random_table(n_rows, dim, 0.5)
        for format in ("row-index", "bitmask", "auto"):
            table = CompactTable.encode(weight, mask, format)
            np.testing.assert_array_equal(table.decode()[1], mask)
            CompactTable.from_arrays(table.to_arrays(), n_rows, dim)


def test_encode_rejects_bad_input():
    weight, mask = random_table(4, 8, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        CompactTable.encode(weight, mask[:3])
    with pytest.raises(ValueError, match="bool"):
        CompactTable.encode(weight, mask.astype(np.uint8))
    with pytest.raises(ValueError, match="format"):
        CompactTable.encode(weight, mask, "coo")
    bad = weight.copy()
    bad[mask] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        CompactTable.encode(bad, mask)


def _row_index_arrays() -> dict[str, np.ndarray]:
    mask = np.array([[1, 0, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], dtype=bool)
    weight = np.arange(24, dtype=np.float32).reshape(3, 8) + 1
    return {k: v.copy() for k, v in CompactTable.encode(weight, mask, "row-index").to_arrays().items()}


def _bitmask_arrays(dim: int = 10) -> dict[str, np.ndarray]:
    weight, mask = random_table(3, dim, 0.5, seed=1)
    return {k: v.copy() for k, v in CompactTable.encode(weight, mask, "bitmask").to_arrays().items()}


def _corrupt(arrays: dict[str, np.ndarray], key: str, value) -> dict[str, np.ndarray]:
    return {**arrays, key: value}


ROW_INDEX_CORRUPTIONS = {
    "values dtype": lambda a: _corrupt(a, "values", a["values"].astype(np.float64)),
    "values must be 1-D": lambda a: _corrupt(a, "values", a["values"].reshape(1, -1)),
    "non-finite": lambda a: _corrupt(a, "values", np.where(np.arange(5) == 2, np.inf, a["values"]).astype(np.float32)),
    "row_counts dtype": lambda a: _corrupt(a, "row_counts", a["row_counts"].astype(np.int64)),
    "col_indices dtype": lambda a: _corrupt(a, "col_indices", a["col_indices"].astype(np.uint16)),
    "row_counts length": lambda a: _corrupt(a, "row_counts", a["row_counts"][:2]),
    "col_indices length": lambda a: _corrupt(a, "col_indices", a["col_indices"][:4]),
    "sum to": lambda a: _corrupt(a, "row_counts", np.array([3, 1, 2], dtype=np.uint8)),
    "exceed dim": lambda a: _corrupt(a, "row_counts", np.array([9, 0, 0], dtype=np.uint8)),
    "< dim": lambda a: _corrupt(a, "col_indices", np.array([0, 2, 8, 1, 2], dtype=np.uint8)),
    "strictly increasing": lambda a: _corrupt(a, "col_indices", np.array([0, 7, 2, 1, 2], dtype=np.uint8)),
    "keys": lambda a: {**a, "bitmask": np.zeros((3, 1), dtype=np.uint8)},
}


@pytest.mark.parametrize("problem", sorted(ROW_INDEX_CORRUPTIONS))
def test_from_arrays_rejects_row_index_corruption(problem):
    arrays = _row_index_arrays()
    CompactTable.from_arrays(arrays, 3, 8)  # the clean arrays pass
    with pytest.raises(ValueError, match=problem):
        CompactTable.from_arrays(ROW_INDEX_CORRUPTIONS[problem](arrays), 3, 8)


def test_from_arrays_rejects_duplicate_index_within_a_row():
    arrays = _corrupt(_row_index_arrays(), "col_indices", np.array([0, 2, 2, 1, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"strictly increasing within a row \(row 0"):
        CompactTable.from_arrays(arrays, 3, 8)


def test_a_new_row_may_restart_low():
    arrays = _row_index_arrays()  # rows [0, 2, 7], [], [1, 2]: 7 -> 1 crosses an empty row
    np.testing.assert_array_equal(arrays["col_indices"], [0, 2, 7, 1, 2])
    CompactTable.from_arrays(arrays, 3, 8)


BITMASK_CORRUPTIONS = {
    "bitmask dtype": lambda a: _corrupt(a, "bitmask", a["bitmask"].astype(np.int16)),
    "bitmask shape": lambda a: _corrupt(a, "bitmask", a["bitmask"][:, :1]),
    "padding bits": lambda a: _corrupt(a, "bitmask", a["bitmask"] | np.array([0, 1], dtype=np.uint8)),
    "set bits": lambda a: _corrupt(a, "values", a["values"][:-1]),
    "non-finite": lambda a: _corrupt(a, "values", np.full_like(a["values"], np.nan)),
    "keys": lambda a: {"values": a["values"]},
}


@pytest.mark.parametrize("problem", sorted(BITMASK_CORRUPTIONS))
def test_from_arrays_rejects_bitmask_corruption(problem):
    arrays = _bitmask_arrays(dim=10)
    CompactTable.from_arrays(arrays, 3, 10)
    with pytest.raises(ValueError, match=problem):
        CompactTable.from_arrays(BITMASK_CORRUPTIONS[problem](arrays), 3, 10)


def test_from_arrays_rejects_bad_shape_metadata():
    with pytest.raises(ValueError, match="dim"):
        CompactTable.from_arrays(_row_index_arrays(), 3, 0)
    with pytest.raises(ValueError, match="row_counts length"):
        CompactTable.from_arrays(_row_index_arrays(), 4, 8)
