"""Device-side message handlers: arrays in, arrays out, private state carried between calls.

Both the Flower ClientApp and the in-process engine call exactly these functions; they only differ in
how the arrays travel and where the device's private state is kept (``context.state`` vs a dict).
Message arrays are plain ``dict[str, np.ndarray]`` (what an ``ArrayRecord`` holds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.faults import SIMULATED_TIME, DeviceError, inject_fault
from fedsparse.device import (
    DeviceData, DeviceState, evaluate_splits, init_device, local_train, reconstruct_user_row, round_items, round_negatives,
    round_padding, round_view, rows_needed, set_user_prefix,
)
from fedsparse.devices import device_width
from fedsparse.nmf import user_factor_update
from fedsparse.poisoning import EXPOSURE_K, boost_target, is_malicious, poisoned_view, target_exposed
from fedsparse.rng import rng_for
from fedsparse.streaming import revealed_items
from fedsparse.privacy.defences import clip_and_noise
from fedsparse.wire import PayloadError, RowsDownload, RowUpdate, SecureUpload, wire_row_ids

NMF_FACTOR = "nmf-factor"  # the device's NMF user factor p_u, kept in its private state


@dataclass
class DeviceReply:
    """A handler's result: arrays to send, the device's new private state, scalar metrics to send."""

    arrays: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    metrics: dict[str, float]


def handle_nmf(
    config: RunConfig, state: dict[str, np.ndarray], data: DeviceData, message: dict[str, np.ndarray], n_items: int
) -> DeviceReply:
    """One federated multiplicative-update round on the device.

    Receives Q float32 (all rows [n_items, rank], or only the rows ``row-ids`` it asked for), QᵀQ
    [rank, rank] and the init scale; updates its private p_u and returns its item ids, p_u (once: every
    row of r_uᵀ p_u equals it for binary r_u) and p_u p_uᵀ.
    """
    item_factor = message["item-factor"].astype(np.float64)
    gram_q = message["gram"].astype(np.float64)
    present = revealed_items(config, n_items, 1)
    if present is not None:  # streaming: the NMF start knows only the items of round 1
        data = replace(data, train=np.intersect1d(data.train, present))
    items = data.train
    if "row-ids" in message:  # only some rows of Q came: index the device's items within them
        rows = message["row-ids"]
        items = np.searchsorted(rows, data.train)
        if items.size and (items.max() >= rows.size or not np.array_equal(rows[items], data.train)):
            raise DeviceError(f"user {data.user_id}: the NMF download lacks rows of the user's items")
    p_u = state.get(NMF_FACTOR)
    if p_u is None:
        scale = float(message["init-scale"][0])
        p_u = scale * np.abs(rng_for(config.seed, "nmf-init", data.user_id).standard_normal(item_factor.shape[1]))
    p_u = user_factor_update(items, p_u.astype(np.float64), item_factor, gram_q)
    arrays = {"rows": wire_row_ids(data.train, n_items), "user-factor": p_u.astype(np.float32), "gram": np.outer(p_u, p_u).astype(np.float32)}
    return DeviceReply(arrays, {**state, NMF_FACTOR: p_u}, {})


def handle_query(config: RunConfig, data: DeviceData, n_items: int, server_round: int) -> DeviceReply:
    """The item rows this round will touch (positives and this round's negatives), for a "rows" downlink."""
    data = round_view(config, poisoned_view(config, data), n_items, server_round)
    rows = rows_needed(data, round_negatives(config, data, n_items, server_round), round_padding(config, data, n_items, server_round))
    return DeviceReply({"row-ids": wire_row_ids(rows, n_items)}, {}, {})


def _download_arrays(message: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The item-row arrays of a message (the rest are NMF init fields)."""
    return {key: value for key, value in message.items() if key.startswith("table.") or key == "row-ids"}


def _device_state(config: RunConfig, state: dict[str, np.ndarray], data: DeviceData, message: dict[str, np.ndarray]) -> DeviceState:
    """The persisted device state, or a new one (its mask row from the NMF factor when one is known); always a
    new one under ``fed.user-state = reconstruct``, where a device keeps no user row between rounds."""
    if "user-row" in state and config.fed.user_state == "keep":
        return DeviceState.from_arrays(state)
    factor = None
    if "nmf-user-factor" in message:  # central NMF oracle: the server sends p_u
        factor = message["nmf-user-factor"]
    elif NMF_FACTOR in state and "nmf-scale" in message:  # federated NMF: p_u is local, the scale is sent
        factor = state[NMF_FACTOR] * message["nmf-scale"]
    return init_device(config, data.user_id, factor)


def handle_train(
    config: RunConfig,
    state: dict[str, np.ndarray],
    data: DeviceData,
    message: dict[str, np.ndarray],
    n_items: int,
    server_round: int,
    settings: Mapping[str, Any],
) -> DeviceReply:
    """Decode the item rows, train locally, return the sparse item update and the new private state.

    ``settings``: ``send-signal`` (report a regrowth signal), ``user-swap-fraction`` (explore the
    user row's mask after training; 0 keeps it) and ``evaluate`` (report the personal model's
    ``validation-``/``test-`` metrics, ``fed.evaluate-model = local``). A device drawn to fail (``faults.*``)
    raises ``InjectedFault`` / ``DeviceCrash`` here, or answers late (in process only in simulated time).
    """
    inject_fault(config, server_round, data.user_id, bool(settings.get(SIMULATED_TIME, False)))
    download = RowsDownload.from_arrays(_download_arrays(message), n_items, device_width(config, data.user_id))
    device = _device_state(config, state, data, message)
    data = round_view(config, poisoned_view(config, data), n_items, server_round)
    if data.train.size == 0 and config.privacy.secure_aggregation:  # no item of the device's in this round's rows
        return _empty_secure_reply(config, state, device, download, n_items, server_round, bool(settings["send-signal"]))
    if data.train.size == 0 and config.budget.stream_stages:  # none of the device's items has arrived yet
        empty = RowUpdate(wire_row_ids(np.zeros(0, dtype=np.int64), n_items), np.zeros(0, dtype=np.float32), 1.0)
        metrics = {"loss": 0.0, "memory-bytes": float(device.nbytes + download.nbytes), "signal-bytes": 0.0}
        return DeviceReply(empty.to_arrays(), {**state, **device.to_arrays()}, metrics)
    if settings.get("user-prefix-share"):  # a structured policy (AMGP) sets the user row's width this round
        set_user_prefix(config, device, float(settings["user-prefix-share"]), server_round, data.user_id)
    result = local_train(
        config, device, data, download, n_items, server_round,
        bool(settings["send-signal"]), float(settings.get("user-swap-fraction", 0.0)), bool(settings.get("evaluate", False)),
    )
    update = privatize(config, result.update, server_round, data.user_id)
    if is_malicious(config, data.user_id):  # only an attacker needs the rows' masks (a table decode)
        update = boost_target(config, data.user_id, update, _row_masks(download, update.row_ids))
    metrics = {
        "loss": result.loss,
        "memory-bytes": float(result.memory_bytes),
        "signal-bytes": float(update.signal_nbytes),
        **(result.evaluation or {}),
    }
    arrays = update.to_arrays()
    if config.privacy.secure_aggregation:
        _, item_mask = download.table.decode()
        weight = min(update.weight, config.privacy.secure_weight_bound) if config.fed.aggregation == "weighted" else 1.0
        secure = SecureUpload.from_update(update, item_mask, weight, round_items(config, n_items, server_round))
        arrays = secure.to_arrays()
        metrics["signal-bytes"] = float(secure.signal.nbytes if secure.signal is not None else 0)
    return DeviceReply(arrays, _kept_state(config, state, result.state), metrics)


def _kept_state(config: RunConfig, state: dict[str, np.ndarray], device: DeviceState) -> dict[str, np.ndarray]:
    """What the device stores after a round: its user row and optimiser moments, unless it reconstructs them."""
    return {**state, **device.to_arrays()} if config.fed.user_state == "keep" else state


def _row_masks(download: RowsDownload, row_ids: np.ndarray) -> np.ndarray:
    """The masks bool [r, dim] of the downloaded rows ``row_ids`` (a subset of the download)."""
    _, mask = download.table.decode()
    return mask[row_ids] if download.row_ids is None else mask[np.searchsorted(download.row_ids, row_ids)]


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
    secure = SecureUpload.from_update(empty, item_mask, 1.0, round_items(config, n_items, server_round))
    metrics = {"loss": 0.0, "memory-bytes": float(device.nbytes + download.nbytes), "signal-bytes": 0.0}
    return DeviceReply(secure.to_arrays(), {**state, **device.to_arrays()}, metrics)


def privatize(config: RunConfig, update: RowUpdate, server_round: int, user_id: int) -> RowUpdate:
    """Apply ``privacy.ldp`` to every value the upload carries (the deltas and the regrowth signal,
    clipped together as one vector); the row ids and shapes are unchanged. Identity without local DP."""
    privacy = config.privacy
    if privacy.ldp == "none":
        return update
    signal = update.signal_values if update.signal_values is not None else np.zeros((0, 0), dtype=np.float32)
    joined = np.concatenate([update.values, signal.ravel()])
    rng = rng_for(config.seed, "device-ldp", server_round, user_id)
    noised = clip_and_noise(joined, privacy.ldp, privacy.clip_norm, privacy.noise_multiplier, rng)
    values, signal_values = noised[: update.values.size], noised[update.values.size :].reshape(signal.shape)
    return replace(update, values=values, signal_values=signal_values if update.signal_values is not None else None)


def handle_evaluate(
    config: RunConfig, state: dict[str, np.ndarray], data: DeviceData, message: dict[str, np.ndarray], n_items: int
) -> DeviceReply:
    """Rank all items for this user on validation and test; metrics prefixed ``validation-``/``test-``.

    A device that never trained evaluates its freshly initialised row (initialised exactly as its first
    training round would, since evaluation messages carry the same NMF fields).
    """
    download = RowsDownload.from_arrays(_download_arrays(message), n_items, device_width(config, data.user_id))
    if download.row_ids is not None:
        raise PayloadError("evaluation needs the full item table")
    device = _device_state(config, state, data, message)
    item_weights, _ = download.table.decode()
    if config.fed.user_state == "reconstruct":
        device = reconstruct_user_row(config, device, data, item_weights)
    metrics = evaluate_splits(config, device, data, item_weights)
    if config.poison.target_item >= 0:  # exposure of a promoted item needs this user's scores
        exposed = target_exposed(config, data, item_weights @ device.user_row)
        if exposed is not None:
            metrics[f"exposure@{EXPOSURE_K}"] = exposed
    return DeviceReply({}, _kept_state(config, state, device), metrics)
