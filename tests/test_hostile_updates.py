"""Property test: thousands of hostile or malformed uploads (enormous norms included) are each rejected with a PayloadError (never
another exception), accepted only when an independent slow check finds them valid, and never change
the server's state."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsparse.config import RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.engine import Reply, RunState, effective_config, start_run, train_round
from fedsparse.federation.inprocess import InProcessTransport, population_of
from fedsparse.federation.server_state import Server, sample_clients, validate_update
from fedsparse.federation.wire import RowUpdate, row_id_dtype, signal_col_dtype
from fedsparse.rng import rng_for

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
    """The wire contract, checked slowly and independently of fedsparse.federation.wire."""
    if not set(arrays) <= set(KEYS) or not {"row-ids", "values", "weight"} <= set(arrays):
        return False
    if any(not isinstance(value, np.ndarray) for value in arrays.values()):
        return False
    rows, values, weight = arrays["row-ids"], arrays["values"], arrays["weight"]
    if rows.dtype != np.uint16 or rows.ndim != 1 or values.dtype != np.float32 or values.ndim != 1:
        return False
    ids = [int(r) for r in rows]
    if any(r >= N_ITEMS for r in ids) or any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
        return False
    if values.size != sum(int(SERVER.item_mask[r].sum()) for r in ids) or not all(np.isfinite(v) for v in values):
        return False
    if np.sqrt(sum(float(v) ** 2 for v in values)) > MAX_NORM:
        return False
    if weight.dtype != np.float32 or weight.shape != (1,) or not np.isfinite(weight[0]) or weight[0] <= 0:
        return False
    if not float(weight[0]).is_integer() or weight[0] > max(1, len(ids)):  # a count of examples, one per row at most
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
    if any(b <= a for a, b in zip(srows, srows[1:], strict=False)):
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
            arrays[key] = np.asarray(value).astype(
                data.draw(st.sampled_from([np.float64, np.int64, np.int32, np.uint8, np.uint32, bool, np.float16])))
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
                ids.flat[-1] = min(N_ITEMS + data.draw(st.integers(0, 60_000)),
                                   np.iinfo(ids.dtype).max if ids.dtype.kind in "iu" else 1e9)
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
def test_hostile_uploads_are_rejected_cleanly_and_leave_the_server_untouched(
    seed: int, signal: bool, data: st.DataObject
) -> None:
    weight_before, mask_before = SERVER.item_weight.copy(), SERVER.item_mask.copy()
    arrays = mutate(valid_arrays(seed, signal), data)
    update, reason = validate_update(SERVER, arrays)  # must not raise anything
    assert (update is not None) == is_valid(arrays), reason
    assert update is not None or reason
    np.testing.assert_array_equal(SERVER.item_weight, weight_before)
    np.testing.assert_array_equal(SERVER.item_mask, mask_before)


# --- Through the engine's real apply path (issue 18 item 14) -----------------------------------------
# The property test above only calls validate_update, which never applies anything. Here hostile replies
# travel the whole training round (engine.train_round: validation, metrics check, aggregation, server
# optimiser, mask exploration), and the whole server state must equal that of a run where those devices
# did not reply at all.

HOSTILE_ROUNDS = 10
HOSTILE_PER_ROUND = 100  # 1,000 hostile replies in all
HONEST_PER_ROUND = 20
APPLY_CONFIG = effective_config(RunConfig.from_flat({
    "seed": 3, "num-server-rounds": HOSTILE_ROUNDS, "data.dataset": "synthetic", "data.synthetic-users": 400,
    "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 6, "model.dim": DIM, "sparse.policy": "sparserec",
    "sparse.density": 0.25, "fed.clients-per-round": HOSTILE_PER_ROUND + HONEST_PER_ROUND, "fed.explore-every": 2,
    "fed.server-optimizer": "adam", "fed.server-lr": 0.01, "fed.nmf-init": "none", "robust.max-update-norm": MAX_NORM,
}))  # a random initial mask: no NMF messages


def corrupt(arrays: dict, kind: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """One hostile reply (arrays, metrics) made from a valid upload: every ``kind`` must be rejected."""
    arrays, metrics = dict(arrays), {"memory-bytes": 1.0}
    rows, values = arrays["row-ids"], arrays["values"]
    if kind == "nan-value":
        arrays["values"] = np.where(np.arange(values.size) == 0, np.float32(np.nan), values).astype(np.float32)
    elif kind == "inf-value":
        arrays["values"] = np.concatenate([values[:-1], np.float32([np.inf])])
    elif kind == "huge-norm":
        arrays["values"] = (values + np.float32(1.0)) * np.float32(1e30)
    elif kind == "float64-values":
        arrays["values"] = values.astype(np.float64)
    elif kind == "values-short":
        arrays["values"] = values[:-1]
    elif kind == "values-long":
        arrays["values"] = np.concatenate([values, values[:1]])
    elif kind == "row-out-of-range":
        arrays["row-ids"] = np.concatenate(
            [rows[:-1], [rows.dtype.type(N_HOSTILE_ITEMS + int(rng.integers(0, 1000)))]]).astype(rows.dtype)
    elif kind == "rows-unsorted":
        arrays["row-ids"] = rows[::-1].copy()
    elif kind == "rows-duplicated":
        arrays["row-ids"] = np.concatenate([rows[:1], rows[:-1]]).astype(rows.dtype)
    elif kind == "weight-absurd":
        arrays["weight"] = np.float32([1e30])
    elif kind == "weight-above-rows":
        arrays["weight"] = np.float32([rows.size + 1])
    elif kind == "weight-fraction":
        arrays["weight"] = np.float32([0.5])
    elif kind == "weight-zero":
        arrays["weight"] = np.float32([0.0])
    elif kind == "weight-missing":
        arrays.pop("weight")
    elif kind == "extra-array":
        arrays["backdoor"] = np.ones(3, np.float32)
    elif kind == "list-not-array":
        arrays["values"] = values.tolist()
    elif kind == "string-not-array":
        arrays["row-ids"] = "all rows"
    elif kind == "metric-nan":
        metrics["memory-bytes"] = float("nan")
    elif kind == "metric-string":
        metrics["memory-bytes"] = "lots"
    return arrays, metrics


HOSTILE_KINDS = ["nan-value", "inf-value", "huge-norm", "float64-values", "values-short", "values-long", "row-out-of-range",
                 "rows-unsorted", "rows-duplicated", "weight-absurd", "weight-above-rows", "weight-fraction", "weight-zero",
                 "weight-missing", "extra-array", "list-not-array", "string-not-array", "metric-nan", "metric-string"]
N_HOSTILE_ITEMS = 60


class HostileTransport:
    """The in-process transport for honest devices; the hostile ones either send a corrupt training reply
    (``hostile=True``) or do not reply at all (the reference run)."""

    def __init__(self, inner, server_of, hostile_users: set[int], hostile: bool) -> None:
        self.inner, self.server_of, self.hostile_users, self.hostile = inner, server_of, hostile_users, hostile
        self.sent = 0

    def send(self, kind, server_round, messages, settings):
        honest = {user: message for user, message in messages.items() if user not in self.hostile_users}
        replies = self.inner.send(kind, server_round, honest, settings)
        for user in sorted(set(messages) - set(honest)):
            if not self.hostile:
                replies[user] = "no reply"
                continue
            rng = rng_for(0, "hostile-reply", server_round, user)
            mask = self.server_of().item_mask
            active = np.flatnonzero(mask.any(axis=1))  # rows with values, so every corruption of the values bites
            rows = np.sort(rng.choice(active, size=int(rng.integers(2, 6)), replace=False)).astype(row_id_dtype(N_HOSTILE_ITEMS))
            valid = RowUpdate(rows, rng.normal(size=int(mask[rows].sum())).astype(np.float32), float(rows.size)).to_arrays()
            arrays, metrics = corrupt(valid, HOSTILE_KINDS[(server_round * 7 + user) % len(HOSTILE_KINDS)], rng)
            replies[user] = Reply(arrays, metrics)
            self.sent += 1
        return replies


def run_rounds(hostile: bool) -> tuple[RunState, HostileTransport, list[dict]]:
    data = load_dataset(APPLY_CONFIG.data, APPLY_CONFIG.seed)
    population = population_of(data, APPLY_CONFIG)
    assert data.n_items == N_HOSTILE_ITEMS
    chosen = set()
    for server_round in range(1, HOSTILE_ROUNDS + 1):
        picked = population.users[sample_clients(APPLY_CONFIG.seed, server_round, population.users.size,
                                                 HOSTILE_PER_ROUND + HONEST_PER_ROUND)]
        chosen |= {int(user) for user in picked[:HOSTILE_PER_ROUND]}  # the hostile devices of each round
    holder: dict[str, RunState] = {}
    transport = HostileTransport(InProcessTransport(APPLY_CONFIG, data), lambda: holder["state"].server, chosen, hostile)
    holder["state"] = state = start_run(APPLY_CONFIG, population, transport)
    records = [train_round(APPLY_CONFIG, population, transport, state, r) for r in range(1, HOSTILE_ROUNDS + 1)]
    return state, transport, records


def test_a_thousand_hostile_replies_through_the_apply_path_leave_the_server_as_if_they_never_replied():
    attacked, hostile, attacked_records = run_rounds(hostile=True)
    reference, silent, reference_records = run_rounds(hostile=False)
    rejected = sum(record["dropped_updates"] for record in attacked_records)
    assert hostile.sent >= 1000 and rejected == hostile.sent  # every hostile reply reached validation and was dropped
    assert sum(record["failed_clients"] for record in reference_records) == hostile.sent  # the same devices stayed silent
    assert all(record["dropped_updates"] == 0 for record in reference_records)
    assert sum(record["rows_updated"] for record in attacked_records) > 0  # honest updates were applied meanwhile
    after, expected = attacked.server.state_arrays(), reference.server.state_arrays()
    assert set(after) == set(expected) and {"item-weight", "item-mask", "round"} <= set(after)
    assert any(key.startswith("policy.") for key in after) and any(key.startswith("optimizer.") for key in after)
    for key in expected:
        assert after[key].dtype == expected[key].dtype and after[key].tobytes() == expected[key].tobytes(), key
    for user in silent.inner.states:  # honest devices' private state, which the rounds' RNG streams shaped
        for name, value in silent.inner.states[user].items():
            assert hostile.inner.states[user][name].tobytes() == value.tobytes(), (user, name)
