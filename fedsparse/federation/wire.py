"""What crosses the wire between server and devices: payloads that validate themselves and count bytes.

Every payload converts to and from a flat ``dict[str, np.ndarray]`` (what a Flower ``ArrayRecord``
carries), and ``nbytes`` is the sum of those arrays' ``nbytes``: byte counts are measured from the real
arrays, never estimated. ``from_arrays`` rejects anything malformed with a ``PayloadError`` naming the
problem, so a hostile or broken reply can be dropped without touching server state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from fedsparse.sparse.embedding_sizes import width_mask
from fedsparse.sparse.storage import CompactTable

Arrays = dict[str, np.ndarray]


class PayloadError(ValueError):
    """A payload is malformed: wrong keys, dtypes, shapes, ranges, duplicates or non-finite values."""


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of a message's arrays as they cross the wire: the sum of their ``nbytes``. The one byte counter
    of the project: every upload, download and start figure in ``rounds.jsonl`` and ``summary.json`` is it."""
    return int(sum(np.asarray(array).nbytes for array in arrays.values()))


class Payload:
    """A message that converts to flat arrays (``to_arrays``) and counts the bytes of exactly those arrays."""

    def to_arrays(self) -> Arrays:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of every array sent (``payload_bytes`` of ``to_arrays()``)."""
        return payload_bytes(self.to_arrays())


def reject_unexpected(arrays: Mapping[str, np.ndarray], known: set[str], what: str = "") -> None:
    """Raise PayloadError naming the arrays outside ``known`` (nothing received is dropped silently)."""
    extra = sorted(set(arrays) - known)
    if extra:
        raise PayloadError(f"unexpected array(s){what}: {', '.join(extra)}")


def expect_array(arrays: Mapping[str, np.ndarray], key: str, dtype: np.dtype | type, ndim: int) -> np.ndarray:
    """The array ``key`` of a received message, checked to be a numpy array of ``dtype`` with ``ndim``
    dimensions; PayloadError naming the problem otherwise."""
    if key not in arrays:
        raise PayloadError(f"missing array {key!r}")
    array = arrays[key]
    if not isinstance(array, np.ndarray):  # a list, scalar or string would be coerced (or crash np.asarray)
        raise PayloadError(f"{key!r} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.dtype(dtype):
        raise PayloadError(f"{key!r} must be {np.dtype(dtype)}, got {array.dtype}")
    if array.ndim != ndim:
        raise PayloadError(f"{key!r} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def row_id_dtype(n_rows: int) -> np.dtype:
    """Wire dtype of the row ids of an ``n_rows`` table: the narrowest unsigned integer that holds
    ``n_rows - 1`` (uint16 up to 65,536 rows, uint32 up to 2**32), so ids cost 2 or 4 bytes, not 8."""
    for dtype in (np.uint16, np.uint32):
        if n_rows <= int(np.iinfo(dtype).max) + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def wire_row_ids(row_ids: np.ndarray, n_rows: int) -> np.ndarray:
    """Row ids cast to ``row_id_dtype(n_rows)`` for sending; raises ValueError for ids outside [0, n_rows)."""
    row_ids = np.asarray(row_ids)
    if row_ids.size and (int(row_ids.min()) < 0 or int(row_ids.max()) >= n_rows):
        raise ValueError(f"row ids must lie in [0, {n_rows}), got [{int(row_ids.min())}, {int(row_ids.max())}]")
    return row_ids.astype(row_id_dtype(n_rows))


def read_row_ids(arrays: Mapping[str, np.ndarray], key: str, n_rows: int) -> np.ndarray:
    """Validate received row ids (``row_id_dtype(n_rows)``, 1-D, in range, strictly increasing)."""
    row_ids = expect_array(arrays, key, row_id_dtype(n_rows), 1)
    _check_row_ids(row_ids, n_rows, key)
    return row_ids


def _check_row_ids(row_ids: np.ndarray, n_rows: int, name: str = "row-ids") -> None:
    row_ids = row_ids.astype(np.int64)  # unsigned ids would wrap around in np.diff
    if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= n_rows):
        bad = row_ids[(row_ids < 0) | (row_ids >= n_rows)][0]
        raise PayloadError(f"{name!r} holds {bad}, outside [0, {n_rows})")
    if row_ids.size > 1 and np.any(np.diff(row_ids) <= 0):
        position = int(np.flatnonzero(np.diff(row_ids) <= 0)[0]) + 1
        raise PayloadError(f"{name!r} must be strictly increasing (no duplicates); position {position} breaks it")


def check_finite(values: np.ndarray, name: str) -> None:
    """Raise PayloadError when ``values`` hold a NaN or infinity."""
    if not np.isfinite(values).all():
        raise PayloadError(f"{name!r} holds {int((~np.isfinite(values)).sum())} non-finite value(s)")


NETWORK_PREFIX = "network."  # the shared network's arrays travel as network.<parameter name>
NetworkShapes = Mapping[str, tuple[int, ...]]  # parameter name -> shape, in a fixed order


@dataclass(frozen=True)
class NetworkWeights(Payload):
    """The shared network of a NeuMF federation (MLP tower and output layer, FedNCF), by parameter name
    (``mlp.0.weight`` ...): float32 arrays of the shapes ``model.*`` fixes. In a download they are the
    server's weights, in an upload the device's deltas against them.
    """

    arrays: dict[str, np.ndarray]

    def to_arrays(self) -> Arrays:
        """``network.<name>`` for every parameter."""
        return {NETWORK_PREFIX + name: value for name, value in self.arrays.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], shapes: NetworkShapes) -> NetworkWeights:
        """Decode the ``network.*`` arrays among ``arrays`` (others are ignored: the caller checks them);
        PayloadError unless they are exactly the parameters of ``shapes``, each float32 of its shape and finite."""
        received = {key for key in arrays if key.startswith(NETWORK_PREFIX)}
        reject_unexpected({key: arrays[key] for key in received}, {NETWORK_PREFIX + name for name in shapes}, " in the network")
        decoded = {}
        for name, shape in shapes.items():
            key = NETWORK_PREFIX + name
            array = expect_array(arrays, key, np.float32, len(shape))
            if array.shape != tuple(shape):
                raise PayloadError(f"{key!r} must have shape {list(shape)}, got {list(array.shape)}")
            check_finite(array, key)
            decoded[name] = array
        return cls(decoded)

    def flat(self) -> np.ndarray:
        """Every parameter raveled and joined, float32 [n_parameters] (in the arrays' order)."""
        return np.concatenate([array.ravel() for array in self.arrays.values()]).astype(np.float32, copy=False)

    def with_flat(self, values: np.ndarray) -> NetworkWeights:
        """The same parameters holding ``values`` float32 [n_parameters] (the inverse of ``flat``)."""
        arrays, start = {}, 0
        for name, array in self.arrays.items():
            arrays[name] = np.asarray(values[start : start + array.size], dtype=np.float32).reshape(array.shape)
            start += array.size
        return NetworkWeights(arrays)


def split_network(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the ``network.*`` arrays, the others) of a message."""
    network = {key: value for key, value in arrays.items() if key.startswith(NETWORK_PREFIX)}
    return network, {key: value for key, value in arrays.items() if key not in network}


@dataclass(frozen=True)
class RowsDownload(Payload):
    """Item rows sent to a device: the masked rows in compact form, and their ids.

    ``row_ids`` [r] in ``row_id_dtype(n_items)`` (sorted, unique) or None when the whole table is sent
    in order (no ids cross the wire then); ``table`` holds those r rows (values + mask structure).
    """

    row_ids: np.ndarray | None
    table: CompactTable

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for the transport (keys prefixed ``table.``)."""
        arrays = {f"table.{key}": value for key, value in self.table.to_arrays().items()}
        if self.row_ids is not None:
            arrays["row-ids"] = self.row_ids
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_items: int, dim: int) -> RowsDownload:
        """Decode and validate a download for a table of ``n_items`` rows of width ``dim``."""
        # Unknown "table.*" keys are rejected by CompactTable.from_arrays; anything else must not be dropped silently.
        extra = sorted(key for key in arrays if key != "row-ids" and not key.startswith("table."))
        if extra:
            raise PayloadError(f"unexpected array(s): {', '.join(extra)}")
        row_ids = None
        if "row-ids" in arrays:
            row_ids = read_row_ids(arrays, "row-ids", n_items)
        n_rows = n_items if row_ids is None else row_ids.size
        table_arrays = {key.removeprefix("table."): value for key, value in arrays.items() if key.startswith("table.")}
        try:
            table = CompactTable.from_arrays(table_arrays, n_rows, dim)
        except ValueError as exc:
            raise PayloadError(f"item rows: {exc}") from exc
        return cls(row_ids, table)

    def rows(self, n_items: int) -> np.ndarray:
        """The row ids this download covers (all rows when ``row_ids`` is None)."""
        return np.arange(n_items, dtype=np.int64) if self.row_ids is None else self.row_ids.astype(np.int64)


@dataclass(frozen=True)
class RowUpdate(Payload):
    """A device's upload: deltas of the active entries of the item rows it trained.

    row_ids: [r] in ``row_id_dtype(n_items)``, sorted, unique; values: float32 [K_r], the deltas of the active entries of
    those rows in row-major mask order (server and device share the mask, so no column indices);
    weight: float, the device's weight in the per-row mean: its number of training examples, a whole number
    in [1, max(1, r)] (each example trains one of the rows sent; the server rejects larger claims).
    Optional regrowth signal for mask exploration: signal_rows [s] (same dtype, sorted, unique, a subset
    of row_ids), signal_cols (uint8 when dim <= 256, else uint16) [s, k] and signal_values float32 [s, k]:
    per row, the k inactive entries with the largest accumulated |gradient|, with their signed sums.
    When the signal covers every row (the usual case), ``signal-rows`` is not sent: it equals row-ids.
    network: in a NeuMF federation (FedNCF), the device's deltas of the shared network (``NetworkWeights``),
    sent as ``network.*`` arrays; None otherwise.
    """

    row_ids: np.ndarray
    values: np.ndarray
    weight: float
    signal_rows: np.ndarray | None = None
    signal_cols: np.ndarray | None = None
    signal_values: np.ndarray | None = None
    width: int = 0  # leading dimensions the sending device holds (0 = all); the server knows it, it is not sent
    network: NetworkWeights | None = None

    def carried_mask(self, item_mask: np.ndarray) -> np.ndarray:
        """bool [r, dim]: the entries of the update's rows its values stand for (the mask cut to ``width``)."""
        return width_mask(item_mask[self.row_ids], self.width or item_mask.shape[1])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for the transport."""
        arrays = {
            "row-ids": self.row_ids,
            "values": self.values,
            "weight": np.asarray([self.weight], dtype=np.float32),
        }
        if self.signal_rows is not None and self.signal_cols is not None and self.signal_values is not None:
            arrays.update({"signal-cols": self.signal_cols, "signal-values": self.signal_values})
            if not np.array_equal(self.signal_rows, self.row_ids):
                arrays["signal-rows"] = self.signal_rows
        if self.network is not None:
            arrays.update(self.network.to_arrays())
        return arrays

    def restricted(self, item_mask: np.ndarray, rows: np.ndarray) -> RowUpdate:
        """The update cut to the rows of it among ``rows`` (sorted int64): their deltas and regrowth signal
        (against ``item_mask`` bool [n_items, dim]); the weight and the network's delta unchanged."""
        kept = np.isin(self.row_ids.astype(np.int64), rows, assume_unique=True)
        entries = np.repeat(kept, self.carried_mask(item_mask).sum(axis=1))
        signal: tuple[np.ndarray | None, ...] = (None, None, None)
        if self.signal_rows is not None and self.signal_cols is not None and self.signal_values is not None:
            signal_kept = np.isin(self.signal_rows.astype(np.int64), rows, assume_unique=True)
            signal = (self.signal_rows[signal_kept], self.signal_cols[signal_kept], self.signal_values[signal_kept])
        return replace(self, row_ids=self.row_ids[kept], values=self.values[entries], signal_rows=signal[0],
                       signal_cols=signal[1], signal_values=signal[2])

    @property
    def signal_nbytes(self) -> int:
        """Bytes of the regrowth signal alone (0 when none is sent)."""
        arrays = self.to_arrays()
        return payload_bytes({key: arrays[key] for key in ("signal-rows", "signal-cols", "signal-values") if key in arrays})

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], item_mask: np.ndarray, network: NetworkShapes | None = None) -> RowUpdate:
        """Decode and validate an upload against the server's item mask bool [n_items, dim] and, in a NeuMF
        federation, the shared network's parameter shapes (``network``: its deltas must come, exactly those)."""
        if network is not None:
            network_arrays, arrays = split_network(arrays)
            update = cls.from_arrays(arrays, item_mask)
            return replace(update, network=NetworkWeights.from_arrays(network_arrays, network))
        n_items, dim = item_mask.shape
        reject_unexpected(arrays, {"row-ids", "values", "weight", "signal-rows", "signal-cols", "signal-values"})
        row_ids = read_row_ids(arrays, "row-ids", n_items)
        values = expect_array(arrays, "values", np.float32, 1)
        expected = int(item_mask[row_ids].sum())
        if values.size != expected:
            raise PayloadError(f"'values' has {values.size} entries, the mask of the {row_ids.size} rows has {expected}")
        check_finite(values, "values")
        weight = expect_array(arrays, "weight", np.float32, 1)
        if weight.size != 1 or not np.isfinite(weight[0]) or weight[0] <= 0:
            raise PayloadError(f"'weight' must be one positive finite number, got {weight.tolist()}")
        # The weight counts the device's training examples, and every example trains one of the rows it
        # sends: a larger (or fractional) claim would let one device outweigh the others in the mean.
        most = max(1, row_ids.size)
        if not float(weight[0]).is_integer() or weight[0] > most:
            raise PayloadError(f"'weight' {float(weight[0]):g} is not a whole number of training examples in [1, {most}] "
                               f"(each example trains one of the {row_ids.size} rows sent)")
        signal = [key in arrays for key in ("signal-cols", "signal-values")]
        if any(signal) and not all(signal) or ("signal-rows" in arrays and not any(signal)):
            raise PayloadError("a regrowth signal needs 'signal-cols' and 'signal-values' together ('signal-rows' is optional)")
        if not any(signal):
            return cls(row_ids, values, float(weight[0]))
        signal_rows = row_ids
        if "signal-rows" in arrays:
            signal_rows = read_row_ids(arrays, "signal-rows", n_items)
            if not np.isin(signal_rows, row_ids).all():
                raise PayloadError("'signal-rows' must be a subset of 'row-ids'")
        signal_cols = expect_array(arrays, "signal-cols", signal_col_dtype(dim), 2)
        signal_values = expect_array(arrays, "signal-values", np.float32, 2)
        if signal_cols.shape != signal_values.shape or signal_cols.shape[0] != signal_rows.size:
            raise PayloadError(
                f"signal shapes disagree: rows {signal_rows.size}, cols {signal_cols.shape}, values {signal_values.shape}"
            )
        if signal_cols.size and int(signal_cols.max()) >= dim:
            raise PayloadError(f"'signal-cols' holds {int(signal_cols.max())}, outside [0, {dim})")
        check_finite(signal_values, "signal-values")
        return cls(row_ids, values, float(weight[0]), signal_rows, signal_cols, signal_values)


def signal_col_dtype(dim: int) -> np.dtype:
    """Column dtype of the regrowth signal: uint8 when dim <= 256, else uint16."""
    return np.dtype(np.uint8 if dim <= 256 else np.uint16)


@dataclass(frozen=True)
class SecureUpload(Payload):
    """A device's upload under secure aggregation: dense over every row the round covers (the whole
    table, or a public subset), so every device's vectors have one shape and the server learns only
    their sum (what SecAgg+ masks and reveals).

    values float32 [K_S]: weight * delta on every active entry of the covered rows in row-major mask order
    (zero on rows the device did not touch); weights float32 [|S|] or None: the device's weight on its rows,
    zero elsewhere, sent only when the server divides per row (``fed.aggregation`` weighted or uniform: their
    sum counts the devices that touched each row, which the sum and client-mean rules do not need and so never
    reveal); signal float32 [|S|, dim] or None: the regrowth signal scattered over the covered rows.
    """

    values: np.ndarray
    weights: np.ndarray | None
    signal: np.ndarray | None = None

    @classmethod
    def from_update(
        cls, update: RowUpdate, item_mask: np.ndarray, weight: float, covered: np.ndarray | None = None,
        with_weights: bool = True,
    ) -> SecureUpload:
        """Spread a sparse update (encoded against ``item_mask`` bool [n_items, dim]) over the covered rows
        (sorted int64, None = all; they must include every row of the update)."""
        covered = np.arange(item_mask.shape[0], dtype=np.int64) if covered is None else covered
        rows = update.row_ids.astype(np.int64)
        position = np.searchsorted(covered, rows)
        if rows.size and (position.max() >= covered.size or not np.array_equal(covered[position], rows)):
            raise ValueError("the update touches rows outside the round's covered rows")
        covered_mask = item_mask[covered]
        dense = np.zeros(covered_mask.shape, dtype=np.float32)
        dense[position] = scatter_active(update.values, item_mask[rows]) * weight
        weights = np.zeros(covered.size, dtype=np.float32)
        weights[position] = weight
        signal = None
        if update.signal_values is not None and update.signal_rows is not None and update.signal_cols is not None:
            signal = np.zeros(covered_mask.shape, dtype=np.float32)
            signal_position = np.searchsorted(covered, update.signal_rows.astype(np.int64))
            np.add.at(signal, (signal_position[:, None], update.signal_cols.astype(np.int64)), update.signal_values)
        return cls(dense[covered_mask], weights if with_weights else None, signal)

    @property
    def signal_nbytes(self) -> int:
        """Bytes of the scattered regrowth signal alone (0 when none is sent)."""
        return payload_bytes({"secure-signal": self.signal}) if self.signal is not None else 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for the transport."""
        arrays = {"secure-values": self.values}
        if self.weights is not None:
            arrays["secure-weights"] = self.weights
        if self.signal is not None:
            arrays["secure-signal"] = self.signal
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], covered_mask: np.ndarray, with_weights: bool = True) -> SecureUpload:
        """Decode and validate against the covered rows' mask bool [|S|, dim] (shapes, dtypes, finite, weights >= 0);
        ``with_weights``: whether the round's rule needs (and so allows) ``secure-weights``."""
        expected = {"secure-values", "secure-signal"} | ({"secure-weights"} if with_weights else set())
        reject_unexpected(arrays, expected, " in a secure upload")
        values = expect_array(arrays, "secure-values", np.float32, 1)
        if values.size != int(covered_mask.sum()):
            raise PayloadError(
                f"secure upload shape {values.shape} does not fit the round's rows ({int(covered_mask.sum())} active entries)"
            )
        check_finite(values, "secure-values")
        weights = None
        if with_weights:
            weights = expect_array(arrays, "secure-weights", np.float32, 1)
            if weights.size != covered_mask.shape[0]:
                raise PayloadError(f"'secure-weights' has shape {weights.shape}, the round has {covered_mask.shape[0]} rows")
            check_finite(weights, "secure-weights")
            if (weights < 0).any():
                raise PayloadError("'secure-weights' must be >= 0")
        signal = None
        if "secure-signal" in arrays:
            signal = expect_array(arrays, "secure-signal", np.float32, 2)
            if signal.shape != covered_mask.shape:
                raise PayloadError(f"'secure-signal' has shape {signal.shape}, the round's rows {covered_mask.shape}")
            check_finite(signal, "secure-signal")
        return cls(values, weights, signal)


def scatter_active(values: np.ndarray, row_mask: np.ndarray) -> np.ndarray:
    """Place mask-ordered active values float32 [K_r] into a dense [r, dim] array (zeros elsewhere)."""
    dense = np.zeros(row_mask.shape, dtype=np.float32)
    dense[row_mask] = values
    return dense
