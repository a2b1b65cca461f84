"""Per-row aggregation: the vectorised merge against a slow, obviously correct per-row loop; single
contributors pass through exactly; off-mask stays zero; contributor counts; the regrowth signal sum."""

from __future__ import annotations

import numpy as np
import pytest

from fedsparse.federation.aggregation import (
    aggregate_row_updates,
    aggregate_secure_sum,
    needs_row_weights,
    scatter_active,
    sum_secure_uploads,
)
from fedsparse.federation.wire import PayloadError, RowUpdate, SecureUpload, signal_col_dtype
from fedsparse.rng import rng_for

N_ITEMS, DIM = 20, 6


def random_mask(seed: int) -> np.ndarray:
    mask = rng_for(seed, "test-agg-mask").random((N_ITEMS, DIM)) < 0.5
    mask[3] = False  # a row with no active entry: deltas must still come out as zeros
    return mask


def random_updates(mask: np.ndarray, n_devices: int, seed: int, signal: bool = False) -> list[RowUpdate]:
    rng = rng_for(seed, "test-agg-updates", n_devices, signal)
    updates = []
    for _ in range(n_devices):
        rows = np.sort(rng.choice(N_ITEMS, size=int(rng.integers(1, 8)), replace=False)).astype(np.int64)
        values = rng.normal(size=int(mask[rows].sum())).astype(np.float32)
        weight = float(rng.integers(1, 10))
        if not signal:
            updates.append(RowUpdate(rows, values, weight))
            continue
        signal_rows = rows[rng.random(rows.size) < 0.6]
        cols = rng.integers(0, DIM, size=(signal_rows.size, 2)).astype(signal_col_dtype(DIM))
        signal_values = rng.normal(size=cols.shape).astype(np.float32)
        updates.append(RowUpdate(rows, values, weight, signal_rows, cols, signal_values))
    return updates


def slow_aggregate(updates: list[RowUpdate], mask: np.ndarray, mode: str) -> dict[int, tuple[np.ndarray, int, np.ndarray]]:
    """row -> (merged dense delta under ``mode``, contributors, summed signal), with plain python loops."""
    merged: dict[int, list] = {}
    for update in updates:
        weight = update.weight if mode == "weighted" else 1.0
        offset = 0
        for row in update.row_ids.tolist():
            dense = np.zeros(DIM)
            for col in range(DIM):
                if mask[row, col]:
                    dense[col] = update.values[offset]
                    offset += 1
            entry = merged.setdefault(row, [np.zeros(DIM), 0.0, 0, np.zeros(DIM)])
            entry[0] += weight * dense
            entry[1] += weight
            entry[2] += 1
        assert offset == update.values.size
        if update.signal_rows is not None:
            for i, row in enumerate(update.signal_rows.tolist()):
                for j in range(update.signal_cols.shape[1]):
                    merged[row][3][int(update.signal_cols[i, j])] += float(update.signal_values[i, j])
    divisor = {"sum": lambda weight_sum: 1.0, "client-mean": lambda weight_sum: len(updates)}.get(
        mode, lambda weight_sum: weight_sum
    )
    return {row: (total / divisor(weight_sum), count, signal) for row, (total, weight_sum, count, signal) in merged.items()}


@pytest.mark.parametrize("mode", ["weighted", "uniform", "sum", "client-mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slow_reference(mode: str, seed: int) -> None:
    mask = random_mask(seed)
    updates = random_updates(mask, n_devices=6, seed=seed, signal=True)
    fast = aggregate_row_updates(updates, mask, mode)
    slow = slow_aggregate(updates, mask, mode)
    np.testing.assert_array_equal(fast.rows, sorted(slow))
    assert fast.rows.dtype == np.int64 and fast.contributors.dtype == np.int64
    assert fast.deltas.dtype == np.float32 and fast.signal.dtype == np.float32
    assert fast.deltas.shape == fast.signal.shape == (fast.rows.size, DIM)
    for i, row in enumerate(fast.rows.tolist()):
        mean, count, signal = slow[row]
        np.testing.assert_allclose(fast.deltas[i], mean, rtol=1e-5, atol=1e-6)
        assert fast.contributors[i] == count
        np.testing.assert_allclose(fast.signal[i], signal, rtol=1e-5, atol=1e-6)


def test_weighted_and_uniform_differ_on_shared_row() -> None:
    mask = np.ones((N_ITEMS, DIM), dtype=bool)
    row = np.array([5], dtype=np.int64)
    a = RowUpdate(row, np.full(DIM, 1.0, np.float32), 1.0)
    b = RowUpdate(row, np.full(DIM, 4.0, np.float32), 3.0)
    other = RowUpdate(np.array([6], dtype=np.int64), np.full(DIM, 2.0, np.float32), 1.0)
    weighted = aggregate_row_updates([a, b], mask, "weighted")
    uniform = aggregate_row_updates([a, b], mask, "uniform")
    np.testing.assert_allclose(weighted.deltas[0], (1 * 1 + 3 * 4) / 4)
    np.testing.assert_allclose(uniform.deltas[0], (1 + 4) / 2)
    np.testing.assert_allclose(aggregate_row_updates([a, b, other], mask, "sum").deltas[0], 1 + 4)
    np.testing.assert_allclose(aggregate_row_updates([a, b, other], mask, "client-mean").deltas[:, 0], [(1 + 4) / 3, 2 / 3])
    assert weighted.contributors.tolist() == [2]


def test_single_contributor_rows_pass_through_exactly() -> None:
    """A row only one device touched gets that device's delta unchanged (not shrunk by other devices)."""
    mask = random_mask(7)
    updates = random_updates(mask, n_devices=5, seed=7)
    merged = aggregate_row_updates(updates, mask, "weighted")
    owners: dict[int, list[int]] = {}
    for d, update in enumerate(updates):
        for row in update.row_ids.tolist():
            owners.setdefault(row, []).append(d)
    single = [row for row, devices in owners.items() if len(devices) == 1]
    assert single, "fixture should have rows touched by one device"
    for row in single:
        update = updates[owners[row][0]]
        expected = scatter_active(update.values, mask[update.row_ids])[np.searchsorted(update.row_ids, row)]
        i = int(np.searchsorted(merged.rows, row))
        np.testing.assert_array_equal(merged.deltas[i], expected)
        assert merged.contributors[i] == 1


def test_off_mask_entries_stay_zero() -> None:
    mask = random_mask(3)
    merged = aggregate_row_updates(random_updates(mask, n_devices=8, seed=3), mask)
    assert np.all(merged.deltas[~mask[merged.rows]] == 0.0)
    if 3 in merged.rows:
        assert np.all(merged.deltas[np.searchsorted(merged.rows, 3)] == 0.0)


def test_scatter_active_row_major_order() -> None:
    row_mask = np.array([[True, False, True], [False, True, True]])
    np.testing.assert_array_equal(scatter_active(np.array([1, 2, 3, 4], np.float32), row_mask), [[1, 0, 2], [0, 3, 4]])


def test_signal_sums_same_entry_from_two_devices() -> None:
    mask = np.zeros((N_ITEMS, DIM), dtype=bool)
    mask[:, 0] = True
    rows = np.array([2, 9], dtype=np.int64)
    cols_dtype = signal_col_dtype(DIM)
    a = RowUpdate(
        rows, np.zeros(2, np.float32), 1.0, rows[:1].copy(), np.array([[4, 5]], cols_dtype), np.array([[1.5, -1.0]], np.float32)
    )
    b = RowUpdate(
        rows, np.zeros(2, np.float32), 5.0, rows.copy(), np.array([[4, 1], [3, 2]], cols_dtype),
        np.array([[2.0, 0.25], [-0.5, 7.0]], np.float32),
    )
    c = RowUpdate(np.array([9], np.int64), np.zeros(1, np.float32), 2.0)  # no signal
    merged = aggregate_row_updates([a, b, c], mask)
    np.testing.assert_array_equal(merged.rows, [2, 9])
    np.testing.assert_array_equal(merged.contributors, [2, 3])
    expected = np.zeros((2, DIM), np.float32)
    expected[0, [4, 5, 1]] = [1.5 + 2.0, -1.0, 0.25]  # (2, 4) reported by both: summed, not weighted
    expected[1, [3, 2]] = [-0.5, 7.0]
    np.testing.assert_array_equal(merged.signal, expected)


def test_signal_repeated_column_within_one_row_is_summed() -> None:
    mask = np.ones((N_ITEMS, DIM), dtype=bool)
    rows = np.array([1], dtype=np.int64)
    signal_cols = np.array([[2, 2]], signal_col_dtype(DIM))
    update = RowUpdate(rows, np.zeros(DIM, np.float32), 1.0, rows, signal_cols, np.array([[1.0, 2.0]], np.float32))
    assert aggregate_row_updates([update], mask).signal[0, 2] == pytest.approx(3.0)


def test_no_signal_gives_zero_signal() -> None:
    mask = random_mask(4)
    merged = aggregate_row_updates(random_updates(mask, 3, seed=4, signal=False), mask)
    assert np.all(merged.signal == 0.0)


def test_empty_update_list() -> None:
    merged = aggregate_row_updates([], random_mask(0))
    assert merged.rows.shape == (0,) and merged.rows.dtype == np.int64
    assert merged.deltas.shape == (0, DIM) and merged.deltas.dtype == np.float32
    assert merged.contributors.shape == (0,)
    assert merged.signal.shape == (0, DIM)


def test_update_with_no_rows_is_harmless() -> None:
    mask = random_mask(5)
    empty = RowUpdate(np.empty(0, np.int64), np.empty(0, np.float32), 4.0)
    updates = random_updates(mask, 3, seed=5)
    with_empty = aggregate_row_updates(updates + [empty], mask)
    without = aggregate_row_updates(updates, mask)
    np.testing.assert_array_equal(with_empty.rows, without.rows)
    np.testing.assert_array_equal(with_empty.deltas, without.deltas)
    np.testing.assert_array_equal(with_empty.contributors, without.contributors)


# ---------------------------------------------------------------- secure aggregation


@pytest.mark.parametrize("mode", ["weighted", "uniform", "sum", "client-mean"])
def test_secure_sum_gives_the_same_means_and_signal_as_sparse_aggregation(mode: str) -> None:
    mask = random_mask(7)
    updates = random_updates(mask, 6, 7, signal=True)
    secure = [SecureUpload.from_update(update, mask, update.weight if mode == "weighted" else 1.0, None,
                                       needs_row_weights(mode)) for update in updates]
    assert (secure[0].weights is None) == (mode in ("sum", "client-mean"))
    merged = aggregate_secure_sum(sum_secure_uploads(secure), mask, None, mode, len(updates))
    reference = aggregate_row_updates(updates, mask, mode)
    np.testing.assert_array_equal(merged.rows, reference.rows)
    np.testing.assert_allclose(merged.deltas, reference.deltas, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.signal, reference.signal, rtol=1e-5, atol=1e-6)


def test_secure_sum_over_a_row_subset_equals_sparse_aggregation_of_updates_inside_it() -> None:
    mask = random_mask(10)
    covered = np.array([0, 2, 5, 7, 8, 11, 13, 17, 19], dtype=np.int64)
    rng = rng_for(10, "test-agg-covered")
    updates = []
    for _ in range(5):
        rows = np.sort(rng.choice(covered, size=4, replace=False))
        updates.append(RowUpdate(rows, rng.normal(size=int(mask[rows].sum())).astype(np.float32), float(rng.integers(1, 5))))
    secure = [SecureUpload.from_update(update, mask, update.weight, covered) for update in updates]
    assert secure[0].values.size == int(mask[covered].sum()) and secure[0].weights.size == covered.size
    merged = aggregate_secure_sum(sum_secure_uploads(secure), mask, covered)
    reference = aggregate_row_updates(updates, mask)
    np.testing.assert_array_equal(merged.rows, reference.rows)
    np.testing.assert_allclose(merged.deltas, reference.deltas, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside the round's covered rows"):
        SecureUpload.from_update(RowUpdate(np.array([1]), np.zeros(int(mask[1].sum()), np.float32), 1.0), mask, 1.0, covered)


def test_secure_upload_is_dense_over_the_table_and_round_trips() -> None:
    mask = random_mask(8)
    update = random_updates(mask, 1, 8)[0]
    secure = SecureUpload.from_update(update, mask, 2.0)
    arrays = secure.to_arrays()
    assert arrays["secure-values"].nbytes == 4 * int(mask.sum()) and arrays["secure-weights"].nbytes == 4 * N_ITEMS
    decoded = SecureUpload.from_arrays(arrays, mask)
    np.testing.assert_array_equal(decoded.values, secure.values)
    assert np.flatnonzero(decoded.weights).tolist() == update.row_ids.tolist()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda a: {**a, "secure-values": a["secure-values"][:-1]}, "does not fit the round"),
        (lambda a: {**a, "secure-weights": a["secure-weights"][:-1]}, "'secure-weights' has shape"),
        (lambda a: {key: value for key, value in a.items() if key != "secure-weights"}, "secure-weights"),
        (lambda a: {**a, "secure-values": np.where(np.arange(a["secure-values"].size) == 0, np.nan, a["secure-values"])
                    .astype(np.float32)}, "non-finite"),
        (lambda a: {**a, "secure-weights": -a["secure-weights"] - 1}, ">= 0"),
        (lambda a: {**a, "row-ids": np.zeros(1, np.uint16)}, "unexpected"),
        (lambda a: {**a, "secure-signal": np.zeros((N_ITEMS, DIM + 1), np.float32)}, "secure-signal"),
    ],
)
def test_malformed_secure_uploads_are_rejected(corrupt, message) -> None:
    mask = random_mask(9)
    arrays = SecureUpload.from_update(random_updates(mask, 1, 9)[0], mask, 1.0).to_arrays()
    with pytest.raises(PayloadError, match=message):
        SecureUpload.from_arrays(corrupt(arrays), mask)


def test_a_weightless_secure_upload_carries_no_row_weights_and_refuses_them() -> None:
    """Under the sum and client-mean rules a device sends only its values (and signal): the server never holds
    per-row touch counts, and an upload that carries them anyway is rejected by name."""
    mask = random_mask(11)
    update = random_updates(mask, 1, 11)[0]
    plain = SecureUpload.from_update(update, mask, 1.0, None, with_weights=False)
    arrays = plain.to_arrays()
    assert set(arrays) == {"secure-values"}
    assert SecureUpload.from_arrays(arrays, mask, with_weights=False).weights is None
    weighted = SecureUpload.from_update(update, mask, 1.0).to_arrays()
    with pytest.raises(PayloadError, match="unexpected"):
        SecureUpload.from_arrays(weighted, mask, with_weights=False)
    with pytest.raises(ValueError, match="needs the secure uploads' row weights"):
        aggregate_secure_sum(plain, mask, None, "weighted")
    with pytest.raises(ValueError, match="all carry row weights or none"):
        sum_secure_uploads([plain, SecureUpload.from_update(update, mask, 1.0)])
