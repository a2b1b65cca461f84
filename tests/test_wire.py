"""Wire payloads: round trips through flat arrays, byte counts from the real arrays (and their closed
form), and every kind of malformed reply rejected with a PayloadError that names the problem."""

from __future__ import annotations

import numpy as np
import pytest

from fedsparse.federation.wire import PayloadError, RowsDownload, RowUpdate, row_id_dtype, signal_col_dtype, wire_row_ids
from fedsparse.rng import rng_for
from fedsparse.sparse.storage import CompactTable, compact_nbytes

N_ITEMS, DIM, K_SIGNAL = 12, 8, 3
ID = row_id_dtype(N_ITEMS)  # uint16: row ids cross the wire in 2 bytes


def item_mask(seed: int = 0) -> np.ndarray:
    """A small random item mask bool [N_ITEMS, DIM]; row 0 fully inactive, row 1 fully active."""
    mask = rng_for(seed, "test-wire-mask").random((N_ITEMS, DIM)) < 0.4
    mask[0] = False
    mask[1] = True
    return mask


def make_update(mask: np.ndarray, rows: list[int], signal: bool = False, weight: float = 3.0) -> RowUpdate:
    """A valid update of ``rows`` against ``mask`` (with a regrowth signal on every other row)."""
    rng = rng_for(1, "test-wire-update", len(rows), signal)
    row_ids = np.asarray(rows, dtype=ID)
    values = rng.normal(size=int(mask[row_ids].sum())).astype(np.float32)
    if not signal:
        return RowUpdate(row_ids, values, weight)
    signal_rows = row_ids[::2].copy()
    cols = np.stack([rng.choice(DIM, K_SIGNAL, replace=False) for _ in signal_rows]).astype(signal_col_dtype(DIM))
    signal_values = rng.normal(size=cols.shape).astype(np.float32)
    return RowUpdate(row_ids, values, weight, signal_rows, cols, signal_values)


def assert_updates_equal(a: RowUpdate, b: RowUpdate) -> None:
    np.testing.assert_array_equal(a.row_ids, b.row_ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.weight == b.weight
    for name in ("signal_rows", "signal_cols", "signal_values"):
        left, right = getattr(a, name), getattr(b, name)
        assert (left is None) == (right is None), name
        if left is not None:
            np.testing.assert_array_equal(left, right)
            assert left.dtype == right.dtype


# ---------------------------------------------------------------- RowUpdate round trip and bytes


@pytest.mark.parametrize("signal", [False, True])
def test_row_update_round_trip(signal: bool) -> None:
    mask = item_mask()
    update = make_update(mask, [0, 1, 4, 7, 11], signal=signal)
    arrays = update.to_arrays()
    assert set(arrays) == {"row-ids", "values", "weight"} | ({"signal-rows", "signal-cols", "signal-values"} if signal else set())

    decoded = RowUpdate.from_arrays(arrays, mask)
    assert_updates_equal(update, decoded)
    assert decoded.nbytes == update.nbytes


def test_a_signal_on_every_row_sends_no_signal_rows() -> None:
    mask = item_mask()
    partial = make_update(mask, [0, 1, 4, 7, 11], signal=True)
    full = RowUpdate(partial.row_ids, partial.values, 2.0, partial.row_ids,
                     np.zeros((5, K_SIGNAL), signal_col_dtype(DIM)), np.ones((5, K_SIGNAL), np.float32))
    arrays = full.to_arrays()
    assert "signal-rows" not in arrays
    assert full.signal_nbytes == 5 * K_SIGNAL * (1 + 4)
    assert_updates_equal(full, RowUpdate.from_arrays(arrays, mask))


@pytest.mark.parametrize("signal", [False, True])
def test_row_update_nbytes_sum_of_arrays_and_closed_form(signal: bool) -> None:
    mask = item_mask()
    rows = [1, 3, 4, 9]
    update = make_update(mask, rows, signal=signal)
    r, k_r = len(rows), int(mask[rows].sum())
    assert update.nbytes == sum(array.nbytes for array in update.to_arrays().values())
    s = len(rows[::2])
    signal_bytes = (2 * s + 1 * s * K_SIGNAL + 4 * s * K_SIGNAL) if signal else 0  # uint16 ids, uint8 cols for dim 8
    assert update.signal_nbytes == signal_bytes
    assert update.nbytes == 2 * r + 4 * k_r + 4 + signal_bytes


def test_row_update_empty_rows_round_trip() -> None:
    mask = item_mask()
    update = RowUpdate(np.empty(0, dtype=ID), np.empty(0, dtype=np.float32), 1.0)
    decoded = RowUpdate.from_arrays(update.to_arrays(), mask)
    assert decoded.row_ids.size == 0 and decoded.values.size == 0
    assert update.nbytes == 4


def test_signal_col_dtype_switches_at_256() -> None:
    assert signal_col_dtype(256) == np.uint8
    assert signal_col_dtype(257) == np.uint16


# ---------------------------------------------------------------- RowUpdate rejections


def good_arrays(signal: bool = True) -> dict[str, np.ndarray]:
    return dict(make_update(item_mask(), [1, 2, 5, 8], signal=signal).to_arrays())


def with_(arrays: dict[str, np.ndarray], **changes: np.ndarray | None) -> dict[str, np.ndarray]:
    """A copy with keys (python names, '_' for '-') replaced, or removed when the value is None."""
    out = dict(arrays)
    for name, value in changes.items():
        key = name.replace("_", "-")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def values_for(rows: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    mask = item_mask() if mask is None else mask
    return np.zeros(int(mask[np.clip(rows, 0, N_ITEMS - 1)].sum()), dtype=np.float32)


BAD_REPLIES = {
    "out-of-range row id": (
        lambda a: with_(a, row_ids=np.array([1, 2, N_ITEMS], dtype=ID), signal_rows=None, signal_cols=None, signal_values=None),
        rf"'row-ids' holds {N_ITEMS}, outside \[0, {N_ITEMS}\)",
    ),
    "signed int64 row ids": (
        lambda a: with_(a, row_ids=a["row-ids"].astype(np.int64)),
        r"'row-ids' must be uint16, got int64",
    ),
    "duplicate row ids": (
        lambda a: with_(a, row_ids=np.array([1, 2, 2, 8], dtype=ID)),
        r"strictly increasing \(no duplicates\); position 2",
    ),
    "unsorted row ids": (
        lambda a: with_(a, row_ids=np.array([2, 1, 5, 8], dtype=ID)),
        r"strictly increasing.*position 1",
    ),
    "int32 row ids": (
        lambda a: with_(a, row_ids=a["row-ids"].astype(np.int32)),
        r"'row-ids' must be uint16, got int32",
    ),
    "float64 values": (
        lambda a: with_(a, values=a["values"].astype(np.float64)),
        r"'values' must be float32, got float64",
    ),
    "2-D row ids": (
        lambda a: with_(a, row_ids=a["row-ids"][None, :]),
        r"'row-ids' must have 1 dimension\(s\)",
    ),
    "2-D values": (
        lambda a: with_(a, values=a["values"][None, :]),
        r"'values' must have 1 dimension\(s\)",
    ),
    "values one too long": (
        lambda a: with_(a, values=np.concatenate([a["values"], np.zeros(1, np.float32)])),
        r"'values' has \d+ entries, the mask of the 4 rows has \d+",
    ),
    "values one too short": (
        lambda a: with_(a, values=a["values"][:-1]),
        r"'values' has \d+ entries, the mask of the 4 rows has \d+",
    ),
    "NaN value": (
        lambda a: with_(a, values=np.where(np.arange(a["values"].size) == 0, np.nan, a["values"]).astype(np.float32)),
        r"'values' holds 1 non-finite value",
    ),
    "Inf values": (
        lambda a: with_(a, values=np.full(a["values"].size, np.inf, dtype=np.float32)),
        r"'values' holds \d+ non-finite value",
    ),
    "zero weight": (lambda a: with_(a, weight=np.array([0.0], np.float32)), r"'weight' must be one positive finite number"),
    "negative weight": (lambda a: with_(a, weight=np.array([-2.0], np.float32)), r"'weight' must be one positive"),
    "NaN weight": (lambda a: with_(a, weight=np.array([np.nan], np.float32)), r"'weight' must be one positive"),
    "Inf weight": (lambda a: with_(a, weight=np.array([np.inf], np.float32)), r"'weight' must be one positive"),
    "two weights": (lambda a: with_(a, weight=np.array([1.0, 1.0], np.float32)), r"'weight' must be one positive"),
    "float64 weight": (lambda a: with_(a, weight=np.array([1.0])), r"'weight' must be float32"),
    "extra array": (lambda a: with_(a, user_row=np.zeros(DIM, np.float32)), r"unexpected array\(s\): user-row"),
    "missing row ids": (lambda a: with_(a, row_ids=None), r"missing array 'row-ids'"),
    "missing values": (lambda a: with_(a, values=None), r"missing array 'values'"),
    "missing weight": (lambda a: with_(a, weight=None), r"missing array 'weight'"),
    "signal without cols": (lambda a: with_(a, signal_cols=None), r"needs 'signal-cols' and 'signal-values' together"),
    "signal values only": (
        lambda a: with_(a, signal_rows=None, signal_cols=None),
        r"needs 'signal-cols' and 'signal-values' together",
    ),
    "signal rows not a subset": (
        lambda a: with_(a, signal_rows=np.array([1, 3], dtype=ID)),
        r"'signal-rows' must be a subset of 'row-ids'",
    ),
    "signal rows out of range": (
        lambda a: with_(a, signal_rows=np.array([1, N_ITEMS + 5], dtype=ID)),
        r"'signal-rows' holds 17, outside",
    ),
    "signal rows unsorted": (
        lambda a: with_(a, signal_rows=np.array([5, 1], dtype=ID)),
        r"'signal-rows' must be strictly increasing",
    ),
    "signal col out of range": (
        lambda a: with_(a, signal_cols=np.full_like(a["signal-cols"], DIM)),
        rf"'signal-cols' holds {DIM}, outside \[0, {DIM}\)",
    ),
    "signal cols wrong dtype": (
        lambda a: with_(a, signal_cols=a["signal-cols"].astype(np.int64)),
        r"'signal-cols' must be uint8, got int64",
    ),
    "signal cols/values shape mismatch": (
        lambda a: with_(a, signal_values=a["signal-values"][:, :-1]),
        r"signal shapes disagree",
    ),
    "signal rows/cols count mismatch": (
        lambda a: with_(a, signal_rows=np.array([1], dtype=ID)),
        r"signal shapes disagree",
    ),
    "signal value NaN": (
        lambda a: with_(a, signal_values=np.full_like(a["signal-values"], np.nan)),
        r"'signal-values' holds \d+ non-finite",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_REPLIES))
def test_row_update_rejects_bad_reply(problem: str) -> None:
    corrupt, message = BAD_REPLIES[problem]
    arrays = corrupt(good_arrays(signal=True))
    with pytest.raises(PayloadError, match=message):
        RowUpdate.from_arrays(arrays, item_mask())


def test_good_arrays_are_accepted() -> None:
    """The fixture the rejections corrupt is itself valid (so each rejection is the named problem)."""
    RowUpdate.from_arrays(good_arrays(signal=True), item_mask())
    RowUpdate.from_arrays(good_arrays(signal=False), item_mask())


def test_payload_error_is_a_value_error() -> None:
    assert issubclass(PayloadError, ValueError)


def test_values_length_checked_against_the_mask_not_the_width() -> None:
    """A dense-looking [r * dim] upload is rejected when the rows' mask is sparser."""
    mask = item_mask()
    rows = np.array([2, 3], dtype=ID)
    assert mask[rows].sum() < rows.size * DIM
    arrays = {"row-ids": rows, "values": np.zeros(rows.size * DIM, np.float32), "weight": np.ones(1, np.float32)}
    with pytest.raises(PayloadError, match="the mask of the 2 rows"):
        RowUpdate.from_arrays(arrays, mask)


# ---------------------------------------------------------------- RowsDownload


def make_download(mask: np.ndarray, rows: np.ndarray | None) -> tuple[RowsDownload, np.ndarray]:
    weight = (rng_for(2, "test-wire-table").normal(size=mask.shape) * mask).astype(np.float32)
    if rows is None:
        return RowsDownload(None, CompactTable.encode(weight, mask)), weight
    return RowsDownload(rows, CompactTable.encode(weight[rows], mask[rows])), weight


@pytest.mark.parametrize("rows", [None, np.array([0, 1, 3, 10], dtype=ID)], ids=["all-rows", "row-ids"])
def test_rows_download_round_trip_and_bytes(rows: np.ndarray | None) -> None:
    mask = item_mask()
    download, weight = make_download(mask, rows)
    arrays = download.to_arrays()
    assert ("row-ids" in arrays) == (rows is not None)
    assert all(key == "row-ids" or key.startswith("table.") for key in arrays)
    decoded = RowsDownload.from_arrays(arrays, N_ITEMS, DIM)
    covered = decoded.rows(N_ITEMS)
    np.testing.assert_array_equal(covered, np.arange(N_ITEMS) if rows is None else rows)
    got_weight, got_mask = decoded.table.decode()
    np.testing.assert_array_equal(got_weight, weight[covered])
    np.testing.assert_array_equal(got_mask, mask[covered])
    assert decoded.nbytes == download.nbytes == sum(array.nbytes for array in arrays.values())
    n_rows = N_ITEMS if rows is None else rows.size
    ids_bytes = 0 if rows is None else 2 * rows.size  # uint16 ids
    assert download.nbytes == ids_bytes + compact_nbytes(n_rows, DIM, int(mask[covered].sum()), "auto")


@pytest.mark.parametrize("format", ["row-index", "bitmask"])
def test_rows_download_both_layouts(format: str) -> None:
    mask = item_mask()
    rows = np.array([2, 5, 6], dtype=ID)
    download = RowsDownload(rows, CompactTable.encode(np.ones(mask.shape, np.float32)[rows], mask[rows], format))
    decoded = RowsDownload.from_arrays(download.to_arrays(), N_ITEMS, DIM)
    assert decoded.table.format == format
    np.testing.assert_array_equal(decoded.table.mask(), mask[rows])


def download_arrays() -> dict[str, np.ndarray]:
    download, _ = make_download(item_mask(), np.array([0, 2, 4], dtype=ID))
    return dict(download.to_arrays())


BAD_DOWNLOADS = {
    "out-of-range row id": (lambda a: {**a, "row-ids": np.array([0, 2, N_ITEMS], ID)}, r"'row-ids' holds 12, outside"),
    "signed int64 row ids": (lambda a: {**a, "row-ids": a["row-ids"].astype(np.int64)}, r"'row-ids' must be uint16, got int64"),
    "duplicate row ids": (lambda a: {**a, "row-ids": np.array([0, 2, 2], ID)}, r"strictly increasing"),
    "int32 row ids": (lambda a: {**a, "row-ids": a["row-ids"].astype(np.int32)}, r"'row-ids' must be uint16"),
    "2-D row ids": (lambda a: {**a, "row-ids": a["row-ids"][None]}, r"'row-ids' must have 1 dimension"),
    "fewer ids than table rows": (lambda a: {**a, "row-ids": np.array([0, 2], ID)}, r"^item rows: "),
    "table values float64": (lambda a: {**a, "table.values": a["table.values"].astype(np.float64)}, r"item rows: values dtype"),
    "table NaN": (lambda a: {**a, "table.values": np.full_like(a["table.values"], np.nan)}, r"item rows: .*non-finite"),
    "table array missing": (lambda a: {k: v for k, v in a.items() if k != "table.values"}, r"item rows: arrays keys"),
    "extra array": (lambda a: {**a, "user-row": np.zeros(DIM, np.float32)}, r"unexpected array\(s\): user-row"),
}


@pytest.mark.parametrize("problem", list(BAD_DOWNLOADS))
def test_rows_download_rejects_bad_payload(problem: str) -> None:
    corrupt, message = BAD_DOWNLOADS[problem]
    with pytest.raises(PayloadError, match=message):
        RowsDownload.from_arrays(corrupt(download_arrays()), N_ITEMS, DIM)


def test_full_download_must_cover_every_row() -> None:
    """Without row ids the table must have exactly n_items rows."""
    arrays = {k: v for k, v in download_arrays().items() if k != "row-ids"}  # a 3-row table, no ids
    with pytest.raises(PayloadError, match="item rows"):
        RowsDownload.from_arrays(arrays, N_ITEMS, DIM)


@pytest.mark.parametrize(("n_rows", "dtype"),
                         [(1, np.uint16), (65_536, np.uint16), (65_537, np.uint32), (2**32, np.uint32), (2**32 + 1, np.uint64)])
def test_row_id_dtype_is_the_narrowest_that_holds_every_id(n_rows: int, dtype: type) -> None:
    assert row_id_dtype(n_rows) == np.dtype(dtype)
    assert int(np.iinfo(row_id_dtype(n_rows)).max) >= n_rows - 1


def test_wire_row_ids_round_trip_and_reject_out_of_range() -> None:
    ids = np.array([0, 7, 65_535], dtype=np.int64)
    sent = wire_row_ids(ids, 65_536)
    assert sent.dtype == np.uint16 and sent.nbytes == 6
    np.testing.assert_array_equal(sent.astype(np.int64), ids)
    for bad in ([-1, 3], [3, 65_536]):
        with pytest.raises(ValueError, match=r"row ids must lie in \[0, 65536\)"):
            wire_row_ids(np.array(bad), 65_536)
