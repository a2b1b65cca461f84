"""Device-side message handlers: arrays in, a typed reply out, private state carried between calls.

Both the Flower ClientApp and the in-process engine reach exactly these functions, through the one table
of ``fedsparse.federation.dispatch``; they only differ in how the arrays travel and where the device's
private state is kept (``context.state`` vs a dict). Each handler first decodes its message
(``fedsparse.federation.messages``), so a malformed one raises ``PayloadError``: a failed device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.federation.aggregation import needs_row_weights
from fedsparse.federation.device import (
    DeviceData,
    DeviceRound,
    DeviceState,
    LocalResult,
    LocalRound,
    device_scorer,
    evaluate_splits,
    init_device,
    local_train,
    reconstruct_user_row,
    round_negatives,
    round_padding,
    round_view,
    rows_needed,
    set_user_prefix,
)
from fedsparse.federation.device_classes import device_width
from fedsparse.federation.faults import SIMULATED_TIME, DeviceError, inject_fault
from fedsparse.federation.messages import (
    DeviceInitFields,
    EvaluateReply,
    EvaluateRequest,
    QueryReply,
    QueryRequest,
    StartContribution,
    StartRequest,
    TrainRequest,
)
from fedsparse.federation.network import network_shapes
from fedsparse.federation.poisoning import EXPOSURE_K, boost_target, is_malicious, poisoned_view, target_exposed
from fedsparse.federation.secure_start import (
    check_start_vector,
    mu_contribution,
    project_user_factor,
    range_contribution,
    sketch_matrix,
)
from fedsparse.federation.streaming import revealed_items
from fedsparse.federation.unseen import UNSEEN, fit_config
from fedsparse.federation.wire import (
    Arrays,
    NetworkWeights,
    Payload,
    PayloadError,
    RowsDownload,
    RowUpdate,
    SecureUpload,
    wire_row_ids,
)
from fedsparse.privacy.defences import clip_and_noise
from fedsparse.privacy.secure_rows import secure_round_rows
from fedsparse.rng import rng_for
from fedsparse.sparse.nmf import user_factor_update

NMF_FACTOR = "nmf-factor"  # the device's NMF user factor p_u, kept in its private state


@dataclass
class DeviceReply:
    """A handler's result: the typed message to send, the device's new private state, scalar metrics to send."""

    message: Payload
    state: dict[str, np.ndarray]
    metrics: dict[str, float]


def handle_nmf(config: RunConfig, state: dict[str, np.ndarray], data: DeviceData, message: Arrays, n_items: int) -> DeviceReply:
    """The device's term of one secure sum of the federated NMF start (``fedsparse.federation.secure_start``).

    Receives a ``StartRequest``: the sketch seed, a test basis or, for a multiplicative round, Q, QᵀQ and
    the init scale. Returns only a ``StartContribution``: one dense float32 vector whose length depends on
    public sizes, zero off the device's items; no item id and no p_u (which stays in the private state)
    leaves the device. A vector outside the public value bound raises DeviceError (the device is dropped,
    never clipped silently).
    """
    request = StartRequest.from_arrays(message, n_items)
    items = data.train
    present = revealed_items(config, n_items, 1)
    if present is not None:  # streaming: the NMF start knows only the items of round 1
        items = np.intersect1d(items, present)
    new_state = state
    if request.sketch is not None:
        seed, width = request.sketch
        vector = range_contribution(items, sketch_matrix(seed, n_items, width))
    elif request.test_basis is not None:
        vector = range_contribution(items, request.test_basis)
    elif request.item_factor is not None and request.gram is not None:
        item_factor, gram = request.item_factor.astype(np.float64), request.gram.astype(np.float64)
        if request.fit:  # refinement of a range start: p_u fitted afresh on Q, never kept
            p_u = project_user_factor(item_factor[items], gram)
        else:  # multiplicative start: one step on the kept p_u, as one central iteration
            kept = state.get(NMF_FACTOR)
            if kept is None:
                draw = rng_for(config.seed, "nmf-init", data.user_id).standard_normal(item_factor.shape[1])
                kept = request.init_scale * np.abs(draw)
            p_u = user_factor_update(items, kept.astype(np.float64), item_factor, gram)
            new_state = {**state, NMF_FACTOR: p_u}
        vector = mu_contribution(items, p_u, n_items)
    else:  # StartRequest.from_arrays admits none without one of the three forms
        raise PayloadError("start request holds no sketch, test basis or item factor")
    problem = check_start_vector(vector, vector.size)
    if problem:
        raise DeviceError(f"user {data.user_id}: start vector refused before masking: {problem}")
    return DeviceReply(StartContribution(vector), new_state, {})


def handle_query(config: RunConfig, data: DeviceData, message: Arrays, n_items: int, server_round: int) -> DeviceReply:
    """The item rows this round will touch (positives and this round's negatives), for a "rows" downlink."""
    QueryRequest.from_arrays(message)
    data = round_view(config, poisoned_view(config, data), n_items, server_round)
    negatives = round_negatives(config, data, n_items, server_round)
    rows = rows_needed(data, negatives, round_padding(config, data, n_items, server_round))
    return DeviceReply(QueryReply(wire_row_ids(rows, n_items)), {}, {})


def _device_state(
    config: RunConfig, state: dict[str, np.ndarray], data: DeviceData, init: DeviceInitFields, download: RowsDownload
) -> DeviceState:
    """The persisted device state, or a new one (its mask row from the NMF factor when one is known); always a
    new one under ``fed.user-state = reconstruct``, where a device keeps no user row between rounds."""
    if "user-row" in state and config.fed.user_state == "keep":
        return DeviceState.from_arrays(state)
    factor = None
    if init.user_factor is not None:  # central NMF oracle: the server sends p_u
        factor = init.user_factor
    elif NMF_FACTOR in state and init.column_scale is not None:  # federated multiplicative start: p_u is local, the scale is sent
        factor = state[NMF_FACTOR] * init.column_scale
    elif init.projection is not None:  # federated start: p_u fitted here from the rows of the device's items
        factor = project_user_factor(_item_rows(download, data.train), init.projection, signed=config.fed.nmf_start == "svd")
    if factor is None or (np.asarray(factor) >= 0).all():
        return init_device(config, data.user_id, factor)
    # A signed (SVD) factor: the mask keeps the entries of largest magnitude, the values keep their signs.
    device = init_device(config, data.user_id, np.abs(factor))
    if config.sparse.nmf_values == "factors":
        width = device.user_row.size
        device.user_row = (np.asarray(factor, dtype=np.float64)[:width] * device.user_mask).astype(np.float32)
    return device


def _item_rows(download: RowsDownload, items: np.ndarray) -> np.ndarray:
    """The downloaded (masked) item rows float32 [m, w] of those ``items`` the download holds (decoded alone)."""
    if download.row_ids is None:
        return download.table.decode_rows(items)[0]
    if download.row_ids.size == 0:
        return np.zeros((0, download.table.dim), dtype=np.float32)
    position = np.searchsorted(download.row_ids, items).clip(max=download.row_ids.size - 1)
    return download.table.decode_rows(position[download.row_ids[position] == items])[0]


def handle_train(
    config: RunConfig,
    state: dict[str, np.ndarray],
    data: DeviceData,
    message: Arrays,
    n_items: int,
    server_round: int,
    settings: Mapping[str, Any],
) -> DeviceReply:
    """Decode the ``TrainRequest``, train locally, return the sparse item update and the new private state.

    ``settings``: ``send-signal`` (report a regrowth signal), ``user-swap-fraction`` (explore the
    user row's mask after training; 0 keeps it) and ``evaluate`` (report the personal model's
    ``validation-``/``test-`` metrics, ``fed.evaluate-model = local``). A device drawn to fail (``faults.*``)
    raises ``InjectedFault`` / ``DeviceCrash`` here, or answers late (in process only in simulated time).
    """
    job = prepare_train(config, state, data, message, n_items, server_round, settings)
    if isinstance(job, DeviceReply):
        return job
    result = local_train(config, job.state, job.data, job.download, n_items, job.local_round, job.network)
    return finish_train(config, state, job, result, n_items)


def prepare_train(
    config: RunConfig,
    state: dict[str, np.ndarray],
    data: DeviceData,
    message: Arrays,
    n_items: int,
    server_round: int,
    settings: Mapping[str, Any],
) -> DeviceRound | DeviceReply:
    """``handle_train`` up to the local round: the device's inputs to ``local_train``, or the whole reply of a
    device with nothing to train this round (no item in the secure round's rows, or none arrived yet)."""
    inject_fault(config, server_round, data.user_id, bool(settings.get(SIMULATED_TIME, False)))
    request = TrainRequest.from_arrays(message, n_items, device_width(config, data.user_id), network_shapes(config))
    download = request.download
    device = _device_state(config, state, data, request.init, download)
    data = round_view(config, poisoned_view(config, data), n_items, server_round)
    if data.train.size == 0 and config.privacy.secure_aggregation:  # no item of the device's in this round's rows
        return _empty_secure_reply(config, state, device, download, n_items, server_round, bool(settings["send-signal"]))
    if data.train.size == 0 and config.budget.stream_stages:  # none of the device's items has arrived yet
        empty = RowUpdate(wire_row_ids(np.zeros(0, dtype=np.int64), n_items), np.zeros(0, dtype=np.float32), 1.0)
        metrics = {"loss": 0.0, "memory-bytes": float(device.nbytes + download.nbytes), "signal-bytes": 0.0}
        return DeviceReply(empty, {**state, **device.to_arrays()}, metrics)
    if settings.get("user-prefix-share"):  # a structured policy (AMGP) sets the user row's width this round
        set_user_prefix(config, device, float(settings["user-prefix-share"]), server_round, data.user_id)
    local_round = LocalRound(server_round, bool(settings["send-signal"]), float(settings.get("user-swap-fraction", 0.0)),
                             bool(settings.get("evaluate", False)))
    return DeviceRound(device, data, download, local_round, request.network)


def finish_train(
    config: RunConfig, state: dict[str, np.ndarray], job: DeviceRound, result: LocalResult, n_items: int
) -> DeviceReply:
    """``handle_train`` after the local round: local DP, an attacker's boost, the metrics and, under secure
    aggregation, the masked upload; ``state`` is the private state the device came in with."""
    server_round, user_id, download = job.local_round.server_round, job.data.user_id, job.download
    update = privatize(config, result.update, server_round, user_id)
    if is_malicious(config, user_id):  # only an attacker needs the rows' masks (a table decode)
        update = boost_target(config, user_id, update, _row_masks(download, update.row_ids))
    metrics = {
        "loss": result.loss,
        "memory-bytes": float(result.memory_bytes),
        "signal-bytes": float(update.signal_nbytes),
        **(result.evaluation or {}),
    }
    upload: RowUpdate | SecureUpload = update
    if config.privacy.secure_aggregation:
        _, item_mask = download.table.decode()
        weight = min(update.weight, config.privacy.secure_weight_bound) if config.fed.aggregation == "weighted" else 1.0
        covered = secure_round_rows(config, n_items, server_round, item_mask)
        if covered is not None and config.privacy.secure_train_items == "all":  # trained everywhere, sent where covered
            update = update.restricted(item_mask, covered)
        upload = SecureUpload.from_update(update, item_mask, weight, covered, needs_row_weights(config.fed.aggregation))
        metrics["signal-bytes"] = float(upload.signal_nbytes)
    return DeviceReply(upload, _kept_state(config, state, result.state), metrics)


def _kept_state(config: RunConfig, state: dict[str, np.ndarray], device: DeviceState) -> dict[str, np.ndarray]:
    """What the device stores after a round: its user row and optimiser moments, unless it reconstructs them."""
    return {**state, **device.to_arrays()} if config.fed.user_state == "keep" else state


def _row_masks(download: RowsDownload, row_ids: np.ndarray) -> np.ndarray:
    """The masks bool [r, dim] of the downloaded rows ``row_ids`` (a subset of the download)."""
    return download.table.mask_rows(row_ids if download.row_ids is None else np.searchsorted(download.row_ids, row_ids))


def _empty_secure_reply(
    config: RunConfig,
    state: dict[str, np.ndarray],
    device: DeviceState,
    download: RowsDownload,
    n_items: int,
    server_round: int,
    send_signal: bool,
) -> DeviceReply:
    """A device with nothing to train this round still sends its (all-zero) secure vectors: the cohort's
    sum must not reveal who had items in the round's rows (same arrays, signal included when asked)."""
    _, item_mask = download.table.decode()
    no_rows = np.zeros(0, dtype=np.int64)
    signal = (no_rows, np.zeros((0, 1), dtype=np.uint8), np.zeros((0, 1), dtype=np.float32)) if send_signal else ()
    empty = RowUpdate(no_rows, np.zeros(0, dtype=np.float32), 1.0, *signal)
    secure = SecureUpload.from_update(empty, item_mask, 1.0, secure_round_rows(config, n_items, server_round, item_mask),
                                      needs_row_weights(config.fed.aggregation))
    metrics = {"loss": 0.0, "memory-bytes": float(device.nbytes + download.nbytes), "signal-bytes": 0.0}
    return DeviceReply(secure, {**state, **device.to_arrays()}, metrics)


def privatize(config: RunConfig, update: RowUpdate, server_round: int, user_id: int) -> RowUpdate:
    """Apply ``privacy.ldp`` to every value the upload carries (the deltas, the regrowth signal and NeuMF's
    network delta, clipped together as one vector); the row ids and shapes are unchanged. Identity without
    local DP."""
    privacy = config.privacy
    if privacy.ldp == "none":
        return update
    signal = update.signal_values if update.signal_values is not None else np.zeros((0, 0), dtype=np.float32)
    network = update.network.flat() if update.network is not None else np.zeros(0, dtype=np.float32)
    joined = np.concatenate([update.values, signal.ravel(), network])
    rng = rng_for(config.seed, "device-ldp", server_round, user_id)
    noised = clip_and_noise(joined, privacy.ldp, privacy.clip_norm, privacy.noise_multiplier, rng)
    values, rest = noised[: update.values.size], noised[update.values.size :]
    signal_values, network_values = rest[: signal.size].reshape(signal.shape), rest[signal.size :]
    return replace(update, values=values, signal_values=signal_values if update.signal_values is not None else None,
                   network=update.network.with_flat(network_values) if update.network is not None else None)


@dataclass
class EvaluationJob:
    """A device's evaluation up to its rankings: the row it ranks with, the table it ranks (``item_weights``
    float32 [n_items, dim], decoded), the shared network (NeuMF) and the state it keeps afterwards.
    ``batchable``: an MF dot-product ranking with nothing device-specific after it, which
    ``batched_evaluation.evaluate_splits_batch`` may compute together with other devices'."""

    device: DeviceState
    data: DeviceData
    item_weights: np.ndarray
    network: NetworkWeights | None
    kept: dict[str, np.ndarray]
    batchable: bool


class DecodedTables:
    """Whole tables decoded once for the devices of one batch that received the very same arrays (in process,
    and on a supernode hosting a group, every device of a round reads one shared copy). A message whose table
    arrays are other objects is decoded and validated on its own, as a lone device would."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, ...], tuple[tuple[np.ndarray, ...], RowsDownload, np.ndarray]] = {}

    def request(self, message: Arrays, n_items: int, width: int, config: RunConfig) -> tuple[EvaluateRequest, np.ndarray]:
        """The evaluation request in ``message`` and its table decoded (float32 [n_items, width], read-only)."""
        table = tuple(value for key, value in sorted(message.items()) if key.startswith("table."))
        key = (width, *map(id, table))
        known = self._tables.get(key)
        if known is not None and all(a is b for a, b in zip(known[0], table, strict=True)):
            return EvaluateRequest.from_arrays(message, n_items, width, network_shapes(config), known[1]), known[2]
        request = EvaluateRequest.from_arrays(message, n_items, width, network_shapes(config))
        item_weights, _ = request.download.table.decode()
        item_weights.setflags(write=False)
        self._tables[key] = (table, request.download, item_weights)
        return request, item_weights


def prepare_evaluate(
    config: RunConfig, state: dict[str, np.ndarray], data: DeviceData, message: Arrays, n_items: int,
    settings: Mapping[str, Any] | None = None, tables: DecodedTables | None = None,
) -> EvaluationJob:
    """Everything ``handle_evaluate`` does before ranking: decode the message (through ``tables`` when given),
    build the device's row (fitted first for an unseen or reconstructing device)."""
    request, item_weights = (tables or DecodedTables()).request(message, n_items, device_width(config, data.user_id), config)
    unseen = bool((settings or {}).get(UNSEEN, False))
    device = _device_state(config, {} if unseen else state, data, request.init, request.download)
    if unseen:
        device = reconstruct_user_row(fit_config(config), device, data, item_weights, request.network)
    elif config.fed.user_state == "reconstruct":
        device = reconstruct_user_row(config, device, data, item_weights, request.network)
    batchable = request.network is None and config.poison.target_item < 0
    return EvaluationJob(device, data, item_weights, request.network, state if unseen else _kept_state(config, state, device),
                         batchable)


def finish_evaluate(config: RunConfig, job: EvaluationJob, metrics: dict[str, float]) -> DeviceReply:
    """The evaluation reply from the device's ranking metrics (``evaluate_splits``), with the exposure of a
    promoted item when the run poisons one."""
    if config.poison.target_item >= 0:  # exposure of a promoted item needs this user's scores
        scores = (job.item_weights @ job.device.user_row if job.network is None
                  else device_scorer(config, job.device, job.item_weights, job.network)[0].numpy())
        exposed = target_exposed(config, job.data, scores)
        if exposed is not None:
            metrics = {**metrics, f"exposure@{EXPOSURE_K}": exposed}
    return DeviceReply(EvaluateReply(), job.kept, metrics)


def handle_evaluate(
    config: RunConfig, state: dict[str, np.ndarray], data: DeviceData, message: Arrays, n_items: int,
    settings: Mapping[str, Any] | None = None,
) -> DeviceReply:
    """Rank all items for this user on validation and test; metrics prefixed ``validation-``/``test-``.

    A device that never trained evaluates its freshly initialised row (initialised exactly as its first
    training round would, since evaluation messages carry the same NMF fields). A device held out of
    training (the ``unseen.UNSEEN`` setting, ``fed.unseen-users``) starts from such a fresh row whatever it
    stores, fits it against the received table with the items frozen (``unseen.fit_config``: FedRecon's
    reconstruction, under every ``fed.user-state``) and keeps nothing.
    """
    job = prepare_evaluate(config, state, data, message, n_items, settings)
    return finish_evaluate(config, job, evaluate_splits(config, job.device, data, job.item_weights, job.network))
