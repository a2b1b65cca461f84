"""The messages server and devices exchange, one dataclass per kind, each validating itself in one place.

Every message converts to the flat arrays a transport carries (``to_arrays``) and back (``from_arrays``),
and ``from_arrays`` raises ``PayloadError`` naming the first problem, so a malformed message is a failed
device (on the device) or a dropped reply (on the server), never a crash. The payloads of ``wire.py`` are
the training kinds' bodies; scalar settings and metrics travel beside the arrays, not in them.

| kind       | server -> device                  | device -> server                          |
|------------|-----------------------------------|-------------------------------------------|
| "nmf"      | ``StartRequest``                  | ``StartContribution``                     |
| "query"    | ``QueryRequest``                  | ``QueryReply`` (the rows it will touch)   |
| "train"    | ``TrainRequest`` (rows + NMF init) | ``wire.RowUpdate``, or ``wire.SecureUpload`` under secure aggregation |
| "evaluate" | ``EvaluateRequest`` (full table)  | ``EvaluateReply`` (metrics only)          |

In a NeuMF federation (FedNCF) the training and evaluation requests also carry the shared network's
weights and the ``RowUpdate`` its deltas (``wire.NetworkWeights``, ``network.*`` arrays).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self

import numpy as np

from fedsparse.federation.secure_start import SECURE_SUM, check_start_vector
from fedsparse.federation.wire import (
    Arrays,
    NetworkShapes,
    NetworkWeights,
    Payload,
    PayloadError,
    RowsDownload,
    check_finite,
    expect_array,
    read_row_ids,
    reject_unexpected,
    split_network,
)

START = "nmf"
QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"
KINDS = (START, QUERY, TRAIN, EVALUATE)  # every kind a transport delivers
MESSAGE_TYPES = {START: "query.nmf", QUERY: "query.rows", TRAIN: "train", EVALUATE: "evaluate"}  # Flower's name of each kind


@dataclass(frozen=True)
class NoArrays(Payload):
    """A message with no arrays at all; receiving any array is an error."""

    def to_arrays(self) -> Arrays:
        """No arrays."""
        return {}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Self:
        """The message, or PayloadError when it carries arrays."""
        reject_unexpected(arrays, set())
        return cls()


class QueryRequest(NoArrays):
    """"Which item rows will you touch this round?" (``fed.downlink = rows``): the question alone."""


class EvaluateReply(NoArrays):
    """A device's evaluation answer: its metrics travel beside the arrays, so the arrays are empty."""


@dataclass(frozen=True)
class QueryReply(Payload):
    """The item rows a device will touch this round: ``row_ids`` [r] in ``row_id_dtype(n_items)``, sorted, unique."""

    row_ids: np.ndarray

    def to_arrays(self) -> Arrays:
        """``row-ids``."""
        return {"row-ids": self.row_ids}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], n_items: int) -> QueryReply:
        """Decode and validate the requested rows of an ``n_items`` table."""
        reject_unexpected(arrays, {"row-ids"})
        return cls(read_row_ids(arrays, "row-ids", n_items))

    def rows(self) -> np.ndarray:
        """The requested rows as int64 [r], as the server indexes its table."""
        return self.row_ids.astype(np.int64)


INIT_FIELDS = {"nmf-user-factor": 1, "nmf-scale": 1, "nmf-project": 2}  # array -> dimensions


@dataclass(frozen=True)
class DeviceInitFields(Payload):
    """What a device initialises from with an NMF start, sent with its downloads (all optional):
    ``user_factor`` float32 [dim], its p_u (central oracle only); ``column_scale`` float32 [dim], the column
    scale of a multiplicative start; ``projection`` float32 [dim, dim], the public gram QᵀQ of the masked
    item table from which the device fits its own p_u (once, with its first message)."""

    user_factor: np.ndarray | None = None
    column_scale: np.ndarray | None = None
    projection: np.ndarray | None = None

    def to_arrays(self) -> Arrays:
        """The fields that are set: ``nmf-user-factor``, ``nmf-scale``, ``nmf-project``."""
        fields = {"nmf-user-factor": self.user_factor, "nmf-scale": self.column_scale, "nmf-project": self.projection}
        return {key: value for key, value in fields.items() if value is not None}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> DeviceInitFields:
        """Decode the init fields among ``arrays`` (float32, finite; the projection square)."""
        fields = {}
        for key, ndim in INIT_FIELDS.items():
            if key in arrays:
                fields[key] = expect_array(arrays, key, np.float32, ndim)
                check_finite(fields[key], key)
        projection = fields.get("nmf-project")
        if projection is not None and projection.shape[0] != projection.shape[1]:
            raise PayloadError(f"'nmf-project' must be square, got shape {projection.shape}")
        return cls(fields.get("nmf-user-factor"), fields.get("nmf-scale"), projection)


def _download_and_init(
    arrays: Mapping[str, np.ndarray], n_items: int, width: int, network: NetworkShapes | None,
    known: RowsDownload | None = None,
) -> tuple[RowsDownload, DeviceInitFields, NetworkWeights | None]:
    """Split a download message into its item rows (``table.*``, ``row-ids``; ``known`` when they were decoded
    from these very arrays already), its init fields and, in a NeuMF federation (``network``: the shared
    network's parameter shapes), the network's weights."""
    network_arrays, arrays = split_network(arrays)
    rows = {key: value for key, value in arrays.items() if key.startswith("table.") or key == "row-ids"}
    reject_unexpected({key: value for key, value in {**arrays, **network_arrays}.items() if key not in rows},
                      set(INIT_FIELDS) | (set() if network is None else set(network_arrays)))
    weights = None if network is None else NetworkWeights.from_arrays(network_arrays, network)
    download = known if known is not None else RowsDownload.from_arrays(rows, n_items, width)
    return download, DeviceInitFields.from_arrays(arrays), weights


@dataclass(frozen=True)
class TrainRequest(Payload):
    """A training message: the item rows the device trains on (all, or the rows it asked for), its NMF init
    fields and, in a NeuMF federation, the shared network's weights (FedNCF's broadcast)."""

    download: RowsDownload
    init: DeviceInitFields = DeviceInitFields()
    network: NetworkWeights | None = None

    def to_arrays(self) -> Arrays:
        """The download's arrays, the init fields and the network's (``network.*``)."""
        network = self.network.to_arrays() if self.network is not None else {}
        return {**self.download.to_arrays(), **self.init.to_arrays(), **network}

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], n_items: int, width: int, network: NetworkShapes | None = None
    ) -> TrainRequest:
        """Decode and validate for a table of ``n_items`` rows, ``width`` of whose dimensions the device holds,
        and the shared network's parameter shapes (``network``; None: no network may come)."""
        return cls(*_download_and_init(arrays, n_items, width, network))


@dataclass(frozen=True)
class EvaluateRequest(Payload):
    """An evaluation message: the whole masked item table (no row ids: every row, in order), the init fields
    and, in a NeuMF federation, the shared network's weights."""

    download: RowsDownload
    init: DeviceInitFields = DeviceInitFields()
    network: NetworkWeights | None = None

    def to_arrays(self) -> Arrays:
        """The table's arrays, the init fields and the network's (``network.*``)."""
        network = self.network.to_arrays() if self.network is not None else {}
        return {**self.download.to_arrays(), **self.init.to_arrays(), **network}

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], n_items: int, width: int, network: NetworkShapes | None = None,
        known: RowsDownload | None = None,
    ) -> EvaluateRequest:
        """Decode and validate; PayloadError unless the full table came (ranking needs every item). ``known``:
        the download already decoded and validated from these very arrays (``protocol.DecodedTables``)."""
        download, init, weights = _download_and_init(arrays, n_items, width, network, known)
        if download.row_ids is not None:
            raise PayloadError("evaluation needs the full item table")
        return cls(download, init, weights)


@dataclass(frozen=True)
class StartRequest(Payload):
    """One round of the secure NMF start (``fedsparse.federation.secure_start``), in one of three forms:

    - ``sketch`` (seed, width): the range start's first pass; the device rebuilds the public sketch
      [n_items, width] from the seed (``nmf-sketch`` int64 [2]);
    - ``test_basis`` float32 [n_items, k]: a power pass (``nmf-test``);
    - ``item_factor`` Q float32 [n_items, rank] with ``gram`` QᵀQ float32 [rank, rank] and ``init_scale``
      (the scale of a first p_u): a multiplicative round; ``fit`` marks the refinement after a range
      start, where p_u is fitted afresh on Q (``nmf-fit`` int64 [1], sent only when set).
    """

    sketch: tuple[int, int] | None = None
    test_basis: np.ndarray | None = None
    item_factor: np.ndarray | None = None
    gram: np.ndarray | None = None
    init_scale: float = 0.0
    fit: bool = False

    def to_arrays(self) -> Arrays:
        """The arrays of the form this request takes."""
        if self.sketch is not None:
            return {"nmf-sketch": np.asarray(self.sketch, dtype=np.int64)}
        if self.test_basis is not None:
            return {"nmf-test": self.test_basis}
        if self.item_factor is None or self.gram is None:
            raise ValueError("a StartRequest holds a sketch, a test basis, or an item factor with its gram")
        init_scale = np.asarray([self.init_scale], dtype=np.float32)
        arrays = {"item-factor": self.item_factor, "gram": self.gram, "init-scale": init_scale}
        return {**arrays, "nmf-fit": np.ones(1, dtype=np.int64)} if self.fit else arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], n_items: int) -> StartRequest:
        """Decode and validate a start message for a table of ``n_items`` items."""
        if "nmf-sketch" in arrays:
            reject_unexpected(arrays, {"nmf-sketch"})
            sketch = expect_array(arrays, "nmf-sketch", np.int64, 1)
            if sketch.size != 2 or sketch[1] < 1:
                raise PayloadError(f"'nmf-sketch' must be [seed, width >= 1], got {sketch.tolist()}")
            return cls(sketch=(int(sketch[0]), int(sketch[1])))
        if "nmf-test" in arrays:
            reject_unexpected(arrays, {"nmf-test"})
            test = expect_array(arrays, "nmf-test", np.float32, 2)
            if test.shape[0] != n_items:
                raise PayloadError(f"nmf-test must be [{n_items}, k], got {list(test.shape)}")
            check_finite(test, "nmf-test")
            return cls(test_basis=test)
        reject_unexpected(arrays, {"item-factor", "gram", "init-scale", "nmf-fit"})
        item_factor = expect_array(arrays, "item-factor", np.float32, 2)
        if item_factor.shape[0] != n_items:
            raise PayloadError(f"item-factor must cover all {n_items} items (the start never sends some rows)")
        rank = item_factor.shape[1]
        gram = expect_array(arrays, "gram", np.float32, 2)
        if gram.shape != (rank, rank):
            raise PayloadError(f"'gram' must be [{rank}, {rank}] (QᵀQ of the item factor), got {list(gram.shape)}")
        init_scale = expect_array(arrays, "init-scale", np.float32, 1)
        if init_scale.size != 1:
            raise PayloadError(f"'init-scale' must hold one number, got {init_scale.size}")
        for key, value in (("item-factor", item_factor), ("gram", gram), ("init-scale", init_scale)):
            check_finite(value, key)
        fit = "nmf-fit" in arrays
        if fit and expect_array(arrays, "nmf-fit", np.int64, 1).tolist() != [1]:
            raise PayloadError(f"'nmf-fit' must be [1], got {arrays['nmf-fit'].tolist()}")
        return cls(item_factor=item_factor, gram=gram, init_scale=float(init_scale[0]), fit=fit)


@dataclass(frozen=True)
class StartContribution(Payload):
    """A device's term of one secure sum of the start: one dense float32 vector [length] whose length
    depends only on public sizes, zero off the device's items; no item id and no p_u."""

    vector: np.ndarray

    def to_arrays(self) -> Arrays:
        """``secure-sum``, the one array of every start reply."""
        return {SECURE_SUM: self.vector}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], length: int) -> StartContribution:
        """Decode and validate (only ``secure-sum``: float32 [length], finite, within the public bound)."""
        if set(arrays) != {SECURE_SUM}:
            raise PayloadError(f"expected only {SECURE_SUM!r}, got {sorted(arrays)}")
        problem = check_start_vector(arrays[SECURE_SUM], length)
        if problem:
            raise PayloadError(problem)
        return cls(arrays[SECURE_SUM])
