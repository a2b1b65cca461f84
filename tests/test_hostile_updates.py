"""Property test: thousands of hostile or malformed uploads (enormous norms included) are each rejected with a PayloadError (never
another exception), accepted only when an independent slow check finds them valid, and never change
the server's state."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsparse.config import RunConfig
from fedsparse.federation import Server, validate_update
from fedsparse.rng import rng_for
from fedsparse.wire import RowUpdate, row_id_dtype, signal_col_dtype

N_ITEMS, DIM = 30, 8
MAX_NORM = 1e3  # robust.max-update-norm: honest uploads here have norms below 50
SERVER = Server.create(RunConfig.from_flat({
    "seed": 1, "model.dim": DIM, "sparse.policy": "static", "sparse.density": 0.25, "robust.max-update-norm": MAX_NORM,
}), N_ITEMS)
KEYS = ("row-ids", "values", "weight", "signal-rows", "signal-cols", "signal-values")


def valid_arrays(seed: int, signal: bool) -> dict[str, np.ndarray]:
    rng = rng_for(seed, "test-hostile")
    rows = np.sort(rng.choice(N_ITEMS, size=int(rng.integers(1, 8)), replace=False)).astype(row_id_dtype(N_ITEMS))
    values = rng.normal(size=int(SERVER.item_mask[rows].sum())).astype(np.float32)
    extra = ()
    if signal:
        cols = np.stack([rng.choice(DIM, 2, replace=False) for _ in rows]).astype(signal_col_dtype(DIM))
        extra = (rows.copy(), cols, rng.normal(size=cols.shape).astype(np.float32))
    return RowUpdate(rows, values, float(rng.integers(1, 5)), *extra).to_arrays()


def is_valid(arrays: dict) -> bool:
    """The wire contract, checked slowly and independently of fedsparse.wire."""
    if not set(arrays) <= set(KEYS) or not {"row-ids", "values", "weight"} <= set(arrays):
        return False
    if any(not isinstance(value, np.ndarray) for value in arrays.values()):
        return False
    rows, values, weight = arrays["row-ids"], arrays["values"], arrays["weight"]
    if rows.dtype != np.uint16 or rows.ndim != 1 or values.dtype != np.float32 or values.ndim != 1:
        return False
    ids = [int(r) for r in rows]
    if any(r >= N_ITEMS for r in ids) or any(b <= a for a, b in zip(ids, ids[1:])):
        return False
    if values.size != sum(int(SERVER.item_mask[r].sum()) for r in ids) or not all(np.isfinite(v) for v in values):
        return False
    if np.sqrt(sum(float(v) ** 2 for v in values)) > MAX_NORM:
        return False
    if weight.dtype != np.float32 or weight.shape != (1,) or not np.isfinite(weight[0]) or weight[0] <= 0:
        return False
    has = [key in arrays for key in ("signal-cols", "signal-values")]
    if not any(has):
        return "signal-rows" not in arrays
    if not all(has):
        return False
    signal_rows = arrays.get("signal-rows", rows)
    cols, signal_values = arrays["signal-cols"], arrays["signal-values"]
    if signal_rows.dtype != np.uint16 or signal_rows.ndim != 1 or not set(int(r) for r in signal_rows) <= set(ids):
        return False
    srows = [int(r) for r in signal_rows]
    if any(b <= a for a, b in zip(srows, srows[1:])):
        return False
    if cols.dtype != np.uint8 or cols.ndim != 2 or signal_values.dtype != np.float32 or signal_values.ndim != 2:
        return False
    if cols.shape != signal_values.shape or cols.shape[0] != len(srows):
        return False
    return bool((cols < DIM).all()) and all(np.isfinite(v) for v in signal_values.ravel())


def mutate(arrays: dict, data: st.DataObject) -> dict:
    """Apply one to three random corruptions."""
    arrays = dict(arrays)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(arrays) + ["extra"]))
        kind = data.draw(st.sampled_from(
            ["dtype", "reshape", "truncate", "extend", "non-finite", "out-of-range", "duplicate", "unsorted",
             "drop", "python-list", "ragged", "string", "none", "scalar", "negative", "zero", "huge"]
        ))
        value = arrays.get(key, np.zeros(2, np.float32))
        if not isinstance(value, np.ndarray) or value.ndim == 0:  # already replaced by a non-array: start anew
            value = np.zeros(2, np.float32)
        if kind == "dtype":
            arrays[key] = np.asarray(value).astype(data.draw(st.sampled_from([np.float64, np.int64, np.int32, np.uint8, np.uint32, bool, np.float16])))
        elif kind == "reshape":
            arrays[key] = np.asarray(value).reshape(1, -1) if np.asarray(value).ndim == 1 else np.asarray(value).ravel()
        elif kind == "truncate":
            arrays[key] = np.asarray(value)[:-1]
        elif kind == "extend":
            flat = np.asarray(value)
            arrays[key] = np.concatenate([flat, flat[:1]]) if flat.size else np.zeros(1, flat.dtype)
        elif kind == "non-finite" and np.asarray(value).dtype.kind == "f" and np.asarray(value).size:
            corrupted = np.array(value, copy=True)
            corrupted.flat[data.draw(st.integers(0, corrupted.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            arrays[key] = corrupted
        elif kind in ("out-of-range", "duplicate", "unsorted") and key in ("row-ids", "signal-rows") and np.asarray(value).size:
            ids = np.array(value, copy=True)
            if kind == "out-of-range":
                ids.flat[-1] = min(N_ITEMS + data.draw(st.integers(0, 60_000)), np.iinfo(ids.dtype).max if ids.dtype.kind in "iu" else 1e9)
            elif kind == "duplicate" and ids.size > 1:
                ids.flat[1] = ids.flat[0]
            elif ids.size > 1:
                ids = ids.ravel()[::-1].reshape(ids.shape).copy()
            arrays[key] = ids
        elif kind == "drop":
            arrays.pop(key, None)
        elif kind == "python-list":
            arrays[key] = np.asarray(value).tolist()
        elif kind == "ragged":
            arrays[key] = [[1.0, 2.0], [3.0]]
        elif kind == "string":
            arrays[key] = "not an array"
        elif kind == "none":
            arrays[key] = None
        elif kind == "scalar":
            arrays[key] = np.float32(1.0)
        elif kind in ("negative", "zero") and key == "weight":
            arrays[key] = np.asarray([-1.0 if kind == "negative" else 0.0], np.float32)
        elif kind == "huge" and np.asarray(value).dtype == np.float32:
            arrays[key] = np.asarray(value) * np.float32(1e30)
        else:
            arrays[key] = value
    return arrays


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), signal=st.booleans(), data=st.data())
def test_hostile_uploads_are_rejected_cleanly_and_leave_the_server_untouched(seed: int, signal: bool, data: st.DataObject) -> None:
    weight_before, mask_before = SERVER.item_weight.copy(), SERVER.item_mask.copy()
    arrays = mutate(valid_arrays(seed, signal), data)
    update, reason = validate_update(SERVER, arrays)  # must not raise anything
    assert (update is not None) == is_valid(arrays), reason
    assert update is not None or reason
    np.testing.assert_array_equal(SERVER.item_weight, weight_before)
    np.testing.assert_array_equal(SERVER.item_mask, mask_before)
