"""The federated run loop, independent of how messages travel.

``run_federation`` drives federated NMF, the training rounds and evaluation through a ``Transport``:
the in-process engine calls the device handlers directly, the Flower ServerApp sends Flower messages.
Everything else (sampling, downloads, validation, aggregation, accounting, result files) is this one
loop, so both engines produce the same per-round metrics and byte counts for the same seed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedsparse.config import ConfigError, RunConfig, flat_defaults, uses_sampled_protocol
from fedsparse.console import round_line
from fedsparse.eval.metrics import improves, selection_key
from fedsparse.federation.device_classes import device_width
from fedsparse.federation.memory_estimate import check_memory
from fedsparse.federation.messages import (
    EVALUATE,
    MESSAGE_TYPES,
    QUERY,
    START,
    TRAIN,
    DeviceInitFields,
    EvaluateReply,
    EvaluateRequest,
    QueryReply,
    QueryRequest,
    StartContribution,
    StartRequest,
    TrainRequest,
)
from fedsparse.federation.network import check_federated_model
from fedsparse.federation.secure_start import (
    MIN_SECURE_COHORT,
    START_VALUE_BOUND,
    StartRefused,
    balance_columns,
    cohort_size,
    nndsvd_item_factor,
    nystrom_svd,
    orthonormal_basis,
    sketch_matrix,
    solve_item_factor,
    svd_item_factor,
)
from fedsparse.federation.server_state import (
    Server,
    central_nmf_item_factor,
    clients_per_round,
    is_evaluation_round,
    sample_clients,
    validate_update,
)
from fedsparse.federation.streaming import arrived_users
from fedsparse.federation.traffic import TrafficLedger
from fedsparse.federation.unseen import UNSEEN
from fedsparse.federation.wire import Arrays, PayloadError, RowsDownload, RowUpdate, SecureUpload, payload_bytes
from fedsparse.federation.wire_format import ArrayCache, reply_wire_bytes, request_wire_bytes
from fedsparse.rng import rng_for
from fedsparse.run_files import (
    ResultFileError,
    append_jsonl,
    atomic_write_text,
    provenance,
    read_jsonl,
    read_run_config,
    round_gaps,
    run_dir_lock,
    write_json,
)
from fedsparse.sparse.nmf import apply_item_update, multiplicative_init
from fedsparse.sparse.policies import build_policy

log = logging.getLogger("fedsparse")

# In process, a start round's cohort is delivered in batches of this many devices and summed as the
# replies come: each start vector is n_items x width float32 (10 MB on Gowalla at width 64), and a whole
# cohort's replies at once would not fit in memory. Under Flower, SecAgg+ sums them itself.
START_BATCH_DEVICES = 64


@dataclass(frozen=True)
class Reply:
    """One device's answer as it arrived: arrays (still to be decoded and validated by the reply's message
    class, since a device may send anything) and scalar metrics."""

    arrays: Arrays
    metrics: dict[str, float]


class Transport(Protocol):
    """Delivers one kind of message (``messages.KINDS``: "nmf", "query", "train", "evaluate") to some devices.

    ``messages`` maps a user id to its message's arrays (``to_arrays()`` of the kind's request class);
    ``settings`` are scalars every device gets. The result
    maps each user id to its ``Reply``, or to a string saying why no usable reply came back.
    """

    def send(
        self, kind: str, server_round: int, messages: Mapping[int, Arrays], settings: Mapping[str, Any]
    ) -> dict[int, Reply | str]: ...


@runtime_checkable
class SecureTransport(Transport, Protocol):
    """A transport that runs secure aggregation itself (Flower's SecAgg+): only sums come back, with every
    byte of the protocol per device (sent, received)."""

    def secure_train(
        self, server_round: int, messages: Mapping[int, Arrays], settings: Mapping[str, Any]
    ) -> tuple[SecureUpload | None, dict[int, Reply | str], dict[int, int], dict[int, int]]: ...

    def secure_sum(
        self, server_round: int, messages: Mapping[int, Arrays], bound: float, length: int
    ) -> tuple[np.ndarray | None, dict[int, Reply | str], dict[int, int], dict[int, int]]: ...


@dataclass(frozen=True)
class Meter:
    """Records every exchange's bytes per device in a ``TrafficLedger``: payload (the arrays' ``nbytes``) and
    wire (measured by the transport when it can, ``take_wire``: Flower's own serialisation; else Flower's
    format re-derived, ``wire_format``, one device per supernode and ids at their largest)."""

    ledger: TrafficLedger

    def exchange(
        self, transport: Transport, phase: str, kind: str, server_round: int, messages: Mapping[int, Arrays],
        settings: Mapping[str, Any], replies: Mapping[int, Reply | str],
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Record one ``send``; returns its wire bytes (down, up) per device. A device that sent no reply
        has no payload upload."""
        answered = {user: reply for user, reply in replies.items() if isinstance(reply, Reply) and user in messages}
        self.ledger.add("payload", phase, "down", {user: payload_bytes(arrays) for user, arrays in messages.items()})
        self.ledger.add("payload", phase, "up", {user: payload_bytes(reply.arrays) for user, reply in answered.items()})
        measured = transport.take_wire() if hasattr(transport, "take_wire") else None
        if measured is None:
            message_type = MESSAGE_TYPES[kind]
            cache: ArrayCache = {}  # a table sent to many devices is measured once
            measured = (
                {user: request_wire_bytes(message_type, server_round, user, arrays, settings, cache)
                 for user, arrays in messages.items()},
                {user: reply_wire_bytes(message_type, server_round, user, reply.arrays, _numbers(reply.metrics))
                 for user, reply in answered.items()},
            )
        return self._wire(phase, measured)

    def secure(
        self, transport: Transport, phase: str, sent: Mapping[int, int], received: Mapping[int, int]
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Record one SecAgg+ round run by the transport (every stage): its payload counts and its measured wire."""
        self.ledger.add("payload", phase, "down", sent)
        self.ledger.add("payload", phase, "up", received)
        measured = transport.take_wire() if hasattr(transport, "take_wire") else None
        return self._wire(phase, measured or ({}, {}))

    def _wire(self, phase: str, measured: tuple[dict[int, int], dict[int, int]]) -> tuple[dict[int, int], dict[int, int]]:
        self.ledger.add("wire", phase, "down", measured[0])
        self.ledger.add("wire", phase, "up", measured[1])
        return measured


def _numbers(metrics: Mapping[str, Any]) -> dict[str, int | float]:
    """The metrics a Flower MetricRecord can carry (ints and floats); a hostile device's other values are
    not counted (under Flower its reply could not have been built)."""
    return {key: value for key, value in metrics.items() if isinstance(value, int | float) and not isinstance(value, bool)}


class UploadObserver(Protocol):
    """What an honest-but-curious server records: each accepted upload, with the server's state before
    the round (the item rows it sent). Called before the round's updates are applied."""

    def observe(self, server_round: int, user: int, update: RowUpdate, server: Server) -> None: ...


@dataclass(frozen=True)
class Population:
    """What the server may know about the federation: the device ids, table sizes, interaction count."""

    users: np.ndarray  # int64 ids of the devices that train: with a training item, not held out
    n_users: int
    n_items: int
    n_train_interactions: int  # of the devices that train
    # Training interactions per item, float [n_items], read by the size policies. A server receiving
    # sparse uploads learns these counts from their row ids; the simulation hands them over up front.
    item_popularity: np.ndarray | None = None
    # int64 ids of the devices held out of training (``fed.unseen-users``, ``unseen.split_unseen``): never in a
    # start or training cohort, evaluated apart at every evaluation.
    unseen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def devices(self) -> np.ndarray:
        """Every device of the federation, sorted int64: those that train and those held out."""
        return np.union1d(self.users, self.unseen).astype(np.int64)


def check_population(config: RunConfig, population: Population) -> None:
    """Raise ConfigError, before any work or output, when the config cannot run on this federation."""
    check_federated_model(config)
    devices = int(population.users.size)
    if devices == 0:
        raise ConfigError("the dataset has no user with a training interaction: no device to federate")
    if config.fed.clients_per_round > devices:
        raise ConfigError(f"fed.clients-per-round = {config.fed.clients_per_round} exceeds the {devices} devices of this dataset")
    if config.poison.target_item >= population.n_items:
        raise ConfigError(f"poison.target-item = {config.poison.target_item} is not an item id "
                          f"(the dataset has {population.n_items})")
    if population.unseen.size and config.fed.nmf_init == "central" and build_policy(config.sparse).settings.mask_init == "nmf":
        raise ConfigError("fed.unseen-users cannot be combined with fed.nmf-init = central: the central NMF oracle "
                          "factorises every user's interactions, the held-out users' included (use federated or none)")
    check_memory(config, devices, population.n_items, population.n_train_interactions)


RESUMABLE_CHANGES = {"num-server-rounds", "resume-dir", "results-dir", "code-version"}  # keys a resumed run may change


def resume_target(run_dir: Path) -> int:
    """The ``num-server-rounds`` the run in ``run_dir`` was started with (what a resume continues to by default)."""
    target = read_run_config(run_dir)["config"].get("num-server-rounds")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ResultFileError(f"{Path(run_dir) / 'config.json'}: num-server-rounds must be an integer >= 0, got {target!r}")
    return target


def check_resumable(config: RunConfig, run_dir: Path) -> None:
    """Raise ConfigError unless ``run_dir`` holds a valid checkpoint of a run with this config (up to the
    number of rounds and paths) that ``num-server-rounds`` reaches: resuming under other settings would
    silently mix two experiments, and a target below the checkpoint would label its metrics wrongly.
    A damaged config.json or checkpoint raises ResultFileError naming the file and the problem."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).exists():
        raise ConfigError(f"cannot resume {run_dir}: it holds no {CHECKPOINT}")
    stored_file = read_run_config(run_dir)
    stored = {**flat_defaults(), **stored_file["config"]}  # keys added since: defaults
    current = effective_config(config).to_flat()
    changed = sorted(key for key in current.keys() - RESUMABLE_CHANGES if stored.get(key) != current[key])
    if changed:
        details = ", ".join(f"{key} {stored.get(key)!r} -> {current[key]!r}" for key in changed)
        raise ConfigError(f"cannot resume {run_dir} under a different config: {details}")
    arrays = read_checkpoint(run_dir / CHECKPOINT)
    done = validate_checkpoint(arrays, run_dir / CHECKPOINT, config, stored_file["population"].get("n_items"))
    if done > config.num_server_rounds:
        raise ConfigError(
            f"cannot resume {run_dir}: its checkpoint is at round {done}, past num-server-rounds = {config.num_server_rounds}; "
            f"pass --num-server-rounds {max(done, resume_target(run_dir))} (the run's own target) or more")


def effective_config(config: RunConfig) -> RunConfig:
    """The config as run: the density the policy trains at (1 for ``dense``, whatever was asked), and
    without an NMF source, an NMF-initialised policy falls back to a random mask."""
    settings = build_policy(config.sparse).settings
    sparse = replace(config.sparse, density=settings.density)
    if settings.mask_init == "nmf" and config.fed.nmf_init == "none":
        sparse = replace(sparse, mask_init="random")
    return replace(config, sparse=sparse)


class DeviceInit:
    """Per-device fields the server adds to its messages so devices initialise from NMF: the user factor
    (central oracle only), the column scale of a multiplicative start, and the public gram QᵀQ of the
    masked item table from which a device fits its own p_u (``fedsparse.federation.secure_start.project_user_factor``),
    sent once per device, with its first message."""

    def __init__(
        self, user_factors: np.ndarray | None = None, column_scale: np.ndarray | None = None,
        projection: np.ndarray | None = None, projected: np.ndarray | None = None,
    ) -> None:
        self.user_factors = user_factors
        self.column_scale = column_scale
        self.projection = projection  # float [dim, dim]
        self.projected: set[int] = set() if projected is None else {int(u) for u in projected}  # devices it was sent to

    def fields(self, user: int, stateless: bool = False) -> DeviceInitFields:
        """The init fields for ``user``: its factor (central oracle) or public scales (federated); the
        projection only the first time (it is then marked sent), or every time to a ``stateless`` device
        (held out of training: it keeps nothing between evaluations)."""
        if self.user_factors is not None:
            return DeviceInitFields(user_factor=self.user_factors[user].astype(np.float32))
        scale = self.column_scale.astype(np.float32) if self.column_scale is not None else None
        projection = None
        if self.projection is not None and (stateless or user not in self.projected):
            projection = self.projection.astype(np.float32)
            if not stateless:
                self.projected.add(user)
        return DeviceInitFields(column_scale=scale, projection=projection)


def federated_nmf(
    config: RunConfig, population: Population, transport: Transport, meter: Meter | None = None
) -> tuple[np.ndarray, DeviceInit, dict]:
    """The federated NMF start: returns (item factor, device init, accounting).

    The server sees only secure sums over a public seeded cohort (``fed.nmf-cohort``): never an item id,
    a p_u or a single device's vector (``fedsparse.federation.secure_start`` says what each sum holds). Devices
    outside the cohort, and all devices under ``fed.nmf-start = range | svd``, fit p_u themselves from the
    item rows they download and the public gram (``DeviceInit``). Raises StartRefused when a sum cannot be
    formed securely.
    """
    meter = meter or Meter(TrafficLedger(population.devices))
    devices = arrived_users(config, population.users, 1)  # streaming: the devices of round 1 (never a held-out one)
    count = cohort_size(config.fed.nmf_cohort, int(devices.size))
    cohort = [int(u) for u in devices[sample_clients(config.seed, 0, devices.size, count, "nmf-start")]]
    accounting = {"nmf_download_bytes": 0, "nmf_upload_bytes": 0, "nmf_rounds": 0, "nmf_cohort": len(cohort),
                  "nmf_start_bytes_per_device": 0.0}
    n_items, rank = population.n_items, config.model.dim
    if config.fed.nmf_start in ("range", "svd"):
        width = max(rank, config.fed.nmf_sketch)
        test = sketch_matrix(config.seed, n_items, width).astype(np.float64)
        request = StartRequest(sketch=(config.seed, width))
        sample = _secure_start_sum(transport, 1, cohort, request, n_items * width, accounting, meter).reshape(n_items, width)
        for power_pass in range(config.fed.nmf_power):
            test = orthonormal_basis(sample)
            request = StartRequest(test_basis=test.astype(np.float32))
            sample = _secure_start_sum(
                transport, 2 + power_pass, cohort, request, n_items * width, accounting, meter).reshape(n_items, width)
        W, sigma = nystrom_svd(test, sample, rank)
        sigma = sigma * np.sqrt(devices.size / len(cohort))  # the cohort's spectrum scaled to the whole federation
        if config.fed.nmf_start == "svd":
            item_factor = svd_item_factor(W, sigma)
        else:
            item_factor = balance_columns(nndsvd_item_factor(W, sigma), W, sigma)
        if config.fed.nmf_refine and config.fed.nmf_start == "range":
            # NNDSVDa: multiplicative steps never move a zero, so zeros start at the mean of R (as scikit-learn's)
            # (seeded jitter, so that columns a low-rank cohort left empty are not identical, a tie SecAgg+'s
            # rounding would break at random)
            tiny = item_factor <= 1e-6 * item_factor.max(initial=0.0)  # zero up to SecAgg+'s rounding
            mean = population.n_train_interactions / (population.n_users * n_items)
            fill = mean * (0.5 + rng_for(config.seed, "nmf-fill").random(item_factor.shape))
            item_factor = np.where(tiny, fill, item_factor)
            item_factor, gram_users = _multiplicative_rounds(
                config, transport, cohort, item_factor, config.fed.nmf_refine, 2 + config.fed.nmf_power, True, accounting,
                meter, devices=devices)
            item_factor = item_factor / _column_scale(item_factor, gram_users, config.fed.nmf_refine * len(cohort) / devices.size)
        device_init = DeviceInit()
    else:
        mean = population.n_train_interactions / max(1, population.n_users * population.n_items)
        _, item_factor = multiplicative_init(population.n_users, n_items, rank, config.seed, mean)
        item_factor, gram_users = _multiplicative_rounds(
            config, transport, cohort, item_factor, config.fed.nmf_rounds, 1, False, accounting, meter,
            float(np.sqrt(mean / rank)))
        scale = _column_scale(item_factor, gram_users, 1.0)  # cohort devices keep p_u: balance against the cohort's own P
        item_factor, device_init = item_factor / scale, DeviceInit(column_scale=scale)
    accounting["nmf_start_bytes_per_device"] = (
        (accounting["nmf_download_bytes"] + accounting["nmf_upload_bytes"]) / max(1, population.users.size))
    if not np.isfinite(item_factor).all():  # never mask from a broken factor: the run stops, saying why
        raise StartRefused("the start's item factor is not finite (the secure sums were unusable)")
    return item_factor.astype(np.float32), device_init, accounting


def _add_start_vectors(
    total: np.ndarray, replies: Mapping[int, Reply | str], messages: Mapping[int, Arrays], nmf_round: int, length: int,
    accounting: dict,
) -> int:
    """Add each valid start vector of ``replies`` to ``total`` (in place) and their bytes to ``accounting``;
    returns how many were summed. A failed device or a bad vector is logged and left out."""
    summed = 0
    for user, reply in replies.items():
        accounting["nmf_download_bytes"] += payload_bytes(messages[user])
        if isinstance(reply, str):
            log.warning("nmf round %d: device %d failed: %s", nmf_round, user, reply)
            continue
        accounting["nmf_upload_bytes"] += payload_bytes(reply.arrays)
        try:
            contribution = StartContribution.from_arrays(reply.arrays, length)
        except PayloadError as exc:
            log.warning("nmf round %d: dropped the vector of device %d: %s", nmf_round, user, exc)
            continue
        total += contribution.vector
        summed += 1
    return summed


def _batches(items: Sequence[int], size: int) -> list[list[int]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def _multiplicative_rounds(
    config: RunConfig, transport: Transport, cohort: list[int], item_factor: np.ndarray, rounds: int, first_round: int,
    fit: bool, accounting: dict, meter: Meter, init_scale: float = 0.0, devices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``rounds`` secure multiplicative item updates over the cohort: (new Q, the summed PᵀP it used).

    Each round sends Q and QᵀQ (public to the cohort) and sums [Rᵀ P, PᵀP]. A device takes one
    multiplicative step on its kept p_u (``fit`` False: central multiplicative NMF, round for round), or
    fits p_u afresh by non-negative least squares on Q (``fit`` True: the refinement after a range start).
    With ``fit``, each round draws a fresh public cohort of the same size from ``devices`` and Q is solved
    from the sums of every round so far: more devices cover more items at the same bytes per device.
    ``init_scale``: the scale of a device's first p_u (multiplicative start only).
    """
    n_items, rank = item_factor.shape
    gram_users = np.zeros((rank, rank))
    numerators, grams = np.zeros((n_items, rank)), np.zeros((rank, rank))
    for nmf_round in range(first_round, first_round + rounds):
        if fit and devices is not None:
            cohort = [int(u) for u in devices[sample_clients(config.seed, nmf_round, devices.size, len(cohort), "nmf-start")]]
        request = StartRequest(item_factor=item_factor.astype(np.float32), gram=(item_factor.T @ item_factor).astype(np.float32),
                               init_scale=init_scale, fit=fit)
        total = _secure_start_sum(transport, nmf_round, cohort, request, n_items * rank + rank * rank, accounting, meter)
        numerator, gram_users = total[: n_items * rank].reshape(n_items, rank), total[n_items * rank :].reshape(rank, rank)
        if fit:  # an item no cohort device holds so far has no information: its row is kept
            numerators += numerator
            grams += gram_users
            numerator, gram_users = numerators, grams
            mass = numerator.sum(axis=1)
            seen = mass > 1e-4 * mass.max(initial=0.0)  # not just SecAgg+'s rounding noise
            item_factor = np.where(seen[:, None], solve_item_factor(item_factor, numerator, gram_users), item_factor)
        else:
            # clipped: SecAgg+'s rounding noise on sums that are exactly >= 0 (a no-op on the exact in-process sums)
            item_factor = apply_item_update(item_factor, np.clip(numerator, 0.0, None), np.clip(gram_users, 0.0, None))
    return item_factor, gram_users


def _column_scale(item_factor: np.ndarray, gram_users: np.ndarray, users_share: float) -> np.ndarray:
    """c_j = sqrt(||Q_j|| / ||P_j||), with ||P_j||² = diag(PᵀP) of the cohort divided by its share of the devices."""
    user_norm = np.sqrt(np.clip(np.diag(gram_users), 0.0, None) / users_share)
    item_norm = np.linalg.norm(item_factor, axis=0)
    scale = np.ones(item_factor.shape[1])
    ok = (user_norm > 0) & (item_norm > 0)
    scale[ok] = np.sqrt(item_norm[ok] / user_norm[ok])
    return scale


def _secure_start_sum(
    transport: Transport, nmf_round: int, cohort: list[int], request: StartRequest, length: int, accounting: dict,
    meter: Meter,
) -> np.ndarray:
    """The secure sum float64 [length] of the cohort's start vectors (each device sent ``request``), its
    bytes added to ``accounting``.

    Under Flower (a transport with ``secure_sum``) SecAgg+ returns only the sum, with every byte of the
    protocol counted per device. In process, each reply is checked (length, dtype, finite, bound) and the
    valid ones summed exactly; a bad vector is dropped with its reason logged. Fewer than SecAgg+'s
    threshold of valid vectors, or an unusable sum, raises StartRefused: there is no plaintext fallback.
    """
    round_started = time.perf_counter()
    messages = {user: request.to_arrays() for user in cohort}
    if hasattr(transport, "secure_sum"):
        total, replies, sent, received = transport.secure_sum(nmf_round, messages, START_VALUE_BOUND, length)
        for user, reply in replies.items():
            if isinstance(reply, str):
                log.warning("nmf round %d: device %d left the secure sum: %s", nmf_round, user, reply)
        summed = sum(1 for reply in replies.values() if not isinstance(reply, str))
        meter.secure(transport, "start", sent, received)
        accounting["nmf_download_bytes"] += sum(sent.values())
        accounting["nmf_upload_bytes"] += sum(received.values())
    else:
        total, summed = np.zeros(length), 0
        for batch in _batches(cohort, START_BATCH_DEVICES):  # a batch of vectors in memory at a time, summed as they come
            batch_messages = {user: messages[user] for user in batch}
            batch_replies = transport.send(START, nmf_round, batch_messages, {})
            meter.exchange(transport, "start", START, nmf_round, batch_messages, {}, batch_replies)
            summed += _add_start_vectors(total, batch_replies, batch_messages, nmf_round, length, accounting)
    accounting["nmf_rounds"] = nmf_round
    if summed < MIN_SECURE_COHORT:
        raise StartRefused(f"nmf round {nmf_round}: {summed} valid vectors, below SecAgg+'s threshold of {MIN_SECURE_COHORT}")
    if total is None or np.shape(total) != (length,) or not np.isfinite(total).all():
        raise StartRefused(f"nmf round {nmf_round}: the secure sum is unusable (shape {np.shape(total)} or non-finite values)")
    log.info("NMF start round %d: %d devices in the secure sum, %.1f s", nmf_round, summed, time.perf_counter() - round_started)
    return np.asarray(total, dtype=np.float64)


def metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    """Why a reply's scalar metrics are unusable (a value that is not a finite real number), or None."""
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
            return f"metric {name!r} is not a finite number: {value!r}"
    return None


def _summary_stats(values: Sequence[float], name: str) -> dict[str, float]:
    if not values:
        return {f"{name}_mean": 0.0, f"{name}_max": 0.0}
    return {f"{name}_mean": float(np.mean(values)), f"{name}_max": float(np.max(values))}


@dataclass
class RunState:
    """Everything the loop carries between rounds; checkpointed after every round."""

    server: Server
    device_init: DeviceInit
    totals: dict[str, float]
    best: dict[str, Any]
    last_metrics: dict[str, float]
    traffic: TrafficLedger  # bytes per device so far, every phase
    # int64 ids of the devices held out of training (``Population.unseen``): checkpointed, so a resume that
    # would hold out other devices is refused instead of training on devices the run evaluated as unseen
    unseen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # fed.evaluate-model = local-last: per device, the metrics its personal model reported in its last training round
    last_personal: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_arrays(self) -> Arrays:
        """Flat arrays for ``checkpoint.npz`` (JSON for the small dicts)."""
        arrays = {f"server.{key}": value for key, value in self.server.state_arrays().items()}
        if self.device_init.user_factors is not None:
            arrays["init.user-factors"] = self.device_init.user_factors
        if self.device_init.column_scale is not None:
            arrays["init.column-scale"] = self.device_init.column_scale
        if self.device_init.projection is not None:
            arrays["init.projection"] = self.device_init.projection
            arrays["init.projected"] = np.asarray(sorted(self.device_init.projected), dtype=np.int64)
        for name in ("totals", "best", "last_metrics"):
            arrays[f"json.{name}"] = np.asarray(json.dumps(getattr(self, name)))
        if self.unseen.size:  # only with held-out devices: checkpoints of other runs keep their arrays
            arrays[UNSEEN_ARRAY] = np.asarray(self.unseen, dtype=np.int64)
        if self.last_personal:  # only under local-last
            arrays[LAST_PERSONAL_ARRAY] = np.asarray(json.dumps(self.last_personal))
        return {**arrays, **self.traffic.state_arrays()}

    @classmethod
    def from_arrays(cls, config: RunConfig, arrays: Mapping[str, np.ndarray]) -> RunState:
        """Rebuild from ``to_arrays`` output."""
        server_arrays = {key.removeprefix("server."): value for key, value in arrays.items() if key.startswith("server.")}
        device_init = DeviceInit(arrays.get("init.user-factors"), arrays.get("init.column-scale"),
                                 arrays.get("init.projection"), arrays.get("init.projected"))
        loads = {name: json.loads(str(arrays[f"json.{name}"])) for name in ("totals", "best", "last_metrics")}
        unseen = np.asarray(arrays.get(UNSEEN_ARRAY, np.zeros(0)), dtype=np.int64)
        last_personal = {int(user): metrics for user, metrics in json.loads(str(arrays.get(LAST_PERSONAL_ARRAY, "{}"))).items()}
        return cls(Server.restore(config, server_arrays), device_init, **loads, traffic=TrafficLedger.from_state_arrays(arrays),
                   unseen=unseen, last_personal=last_personal)


UNSEEN_ARRAY = "population.unseen"  # the held-out devices in checkpoint.npz
LAST_PERSONAL_ARRAY = "json.last_personal"  # local-last: each device's last personal metrics, in checkpoint.npz
CHECKPOINT = "checkpoint.npz"
MANIFEST = "json.manifest"  # every other array's name, shape and dtype, and the round: what a resume checks
NPZ_MAGIC = b"PK\x03\x04"  # a .npz is a zip archive
JSON_FIELDS = ("totals", "best", "last_metrics")
NAMES_SHOWN = 5  # array names a checkpoint error lists before "..."


class CheckpointError(ResultFileError):
    """``checkpoint.npz`` is damaged or does not fit the run's config; the message names the file."""


def save_checkpoint(run_dir: Path, state: RunState, transport: Transport) -> None:
    """Atomically write the run state (and the transport's device states, when it can export them) with a
    manifest of every array, so a resume notices any array that went missing or changed shape."""
    arrays = {name: np.asarray(value) for name, value in state.to_arrays().items()}
    if hasattr(transport, "state_arrays"):
        arrays.update({f"transport.{key}": np.asarray(value) for key, value in transport.state_arrays().items()})
    listing = {name: _array_signature(value) for name, value in arrays.items()}
    arrays[MANIFEST] = np.asarray(json.dumps({"round": state.server.round, "arrays": listing}, sort_keys=True))
    temporary = run_dir / f".{CHECKPOINT}.tmp.npz"
    np.savez(temporary, **arrays)  # type: ignore[arg-type]  # numpy's stub lets ** fill allow_pickle
    os.replace(temporary, run_dir / CHECKPOINT)


def _array_signature(value: np.ndarray) -> list:
    """[shape, dtype] as the manifest lists it; text arrays (JSON fields) by kind only, their length varies."""
    return [list(value.shape), "text" if value.dtype.kind == "U" else value.dtype.str]


def read_checkpoint(path: Path) -> Arrays:
    """Every array of a checkpoint file; CheckpointError (one line, naming the file) when it cannot be read."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(len(NPZ_MAGIC))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from exc
    if head != NPZ_MAGIC:
        raise CheckpointError(f"{path}: not a checkpoint archive ({'empty' if not head else 'no .npz header'})")
    arrays: Arrays = {}
    try:
        with np.load(path, allow_pickle=False) as stored:
            for name in stored.files:
                try:
                    arrays[name] = stored[name]
                except ValueError as exc:
                    if "allow_pickle" in str(exc):  # an object array: a checkpoint only ever holds numbers and text
                        raise CheckpointError(f"{path}: array {name!r} holds Python objects, "
                                              "which a checkpoint never does") from None
                    raise
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: damaged archive ({exc}); it cannot be resumed") from exc
    return arrays


def _json_array(arrays: Arrays, name: str, path: Path) -> Any:
    """The JSON text stored as the 0-d string array ``name``, parsed."""
    value = arrays[name]
    if value.shape != () or value.dtype.kind != "U":
        raise CheckpointError(f"{path}: {name} must be one JSON text, got a {value.dtype} array of shape {value.shape}")
    try:
        return json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: {name} is not valid JSON ({exc.msg})") from exc


def validate_checkpoint(arrays: Arrays, path: Path, config: RunConfig, n_items: int) -> int:
    """Check a checkpoint against its manifest and the config (table shapes, dtypes, finite values, the
    round); returns the round it holds. CheckpointError names the first problem."""
    if MANIFEST not in arrays:
        raise CheckpointError(f"{path}: has no {MANIFEST} (damaged, or written before checkpoints carried one)")
    manifest = _json_array(arrays, MANIFEST, path)
    listing = manifest.get("arrays") if isinstance(manifest, dict) else None
    if not isinstance(listing, dict) or not isinstance(manifest.get("round"), int):
        raise CheckpointError(f"{path}: {MANIFEST} must hold 'round' and 'arrays'")
    missing = sorted(set(listing) - set(arrays))
    extra = sorted(set(arrays) - set(listing) - {MANIFEST})
    if missing or extra:
        problems = [f"{what} {len(names)} {kind}array(s) "
                    f"({', '.join(names[:NAMES_SHOWN])}{', ...' if len(names) > NAMES_SHOWN else ''})"
                    for what, kind, names in (("lacks", "", missing), ("has", "unlisted ", extra)) if names]
        raise CheckpointError(f"{path}: {'; '.join(problems)}")
    for name, value in arrays.items():
        if name != MANIFEST and listing[name] != _array_signature(value):
            raise CheckpointError(f"{path}: array {name} has shape and dtype {_array_signature(value)}, "
                                  f"the manifest says {listing[name]}")
    shape = (n_items, config.model.row_width)
    weight, mask, done = arrays.get("server.item-weight"), arrays.get("server.item-mask"), arrays.get("server.round")
    if weight is None or mask is None or done is None:
        raise CheckpointError(f"{path}: lacks the server's item table, mask or round")
    if weight.shape != shape or weight.dtype != np.float32 or mask.shape != shape or mask.dtype != bool:
        raise CheckpointError(f"{path}: item table {weight.dtype} {weight.shape} and mask {mask.dtype} {mask.shape} "
                              f"do not fit this run (float32 and bool, {shape}: n_items x the row width of model.*)")
    if not np.isfinite(weight).all():
        raise CheckpointError(f"{path}: the item table holds non-finite values")
    if done.shape != (1,) or done.dtype.kind not in "iu" or int(done[0]) != manifest["round"] or done[0] < 0:
        raise CheckpointError(f"{path}: server.round {done.tolist()} does not match the manifest's round {manifest['round']}")
    for name in JSON_FIELDS:
        if f"json.{name}" not in arrays or not isinstance(_json_array(arrays, f"json.{name}", path), dict):
            raise CheckpointError(f"{path}: json.{name} must be a JSON object")
    return int(done[0])


def load_checkpoint(run_dir: Path, config: RunConfig, transport: Transport, n_items: int) -> RunState:
    """Read and validate ``checkpoint.npz``; device states go back into the transport when it can hold them."""
    path = run_dir / CHECKPOINT
    arrays = read_checkpoint(path)
    validate_checkpoint(arrays, path, config, n_items)
    arrays.pop(MANIFEST)
    device_states = {key.removeprefix("transport."): value for key, value in arrays.items() if key.startswith("transport.")}
    try:
        if hasattr(transport, "load_state_arrays"):
            transport.load_state_arrays(device_states)
        return RunState.from_arrays(config, arrays)
    except ValueError as exc:  # device states or the byte ledger: damaged, or written before their format
        raise CheckpointError(f"{path}: {exc}") from exc


def resumed_rounds(path: Path, checkpoint_round: int) -> list[dict[str, Any]]:
    """The rounds.jsonl records a resume keeps: exactly rounds 1..``checkpoint_round``, once each.

    Records past the checkpoint (appended before a crash prevented their checkpoint) are redone;
    ResultFileError when a round the checkpoint covers is missing or duplicated (never silently dropped).
    """
    records = read_jsonl(path)
    for line, record in enumerate(records, start=1):
        if isinstance(record.get("round"), bool) or not isinstance(record.get("round"), int):
            raise ResultFileError(f"{path}:{line}: the record has no integer 'round'")
    kept = [record for record in records if record["round"] <= checkpoint_round]
    problem = round_gaps(kept, checkpoint_round)
    if problem or [record["round"] for record in kept] != list(range(1, checkpoint_round + 1)):
        raise ResultFileError(f"{path}: the checkpoint is at round {checkpoint_round}, but the records up to it have "
                              f"{problem or 'rounds out of order'}; it was edited or written by two processes: "
                              "restore it before resuming")
    redone = len(records) - len(kept)
    if redone:
        log.warning("%s: %d record(s) after round %d predate no checkpoint and are redone", path, redone, checkpoint_round)
    return kept


def start_run(config: RunConfig, population: Population, transport: Transport, central_train=None) -> RunState:
    """NMF (when the policy needs it) and the initial server; ``totals["init_seconds"]`` times it."""
    started = time.perf_counter()
    totals: dict[str, float] = {"upload_bytes": 0, "download_bytes": 0, "eval_download_bytes": 0}
    meter = Meter(TrafficLedger(population.devices))
    item_factor, device_init = None, DeviceInit()
    if build_policy(config.sparse).settings.mask_init == "nmf":
        if config.fed.nmf_init == "central":
            users, item_factor = central_nmf_item_factor(config, central_train)
            device_init = DeviceInit(user_factors=users)
        else:
            item_factor, device_init, nmf_bytes = federated_nmf(config, population, transport, meter)
            totals.update(nmf_bytes)
    server = Server.create(config, population.n_items, item_factor, population.item_popularity)
    if device_init.user_factors is None and item_factor is not None:  # federated: devices fit p_u from the masked table
        table = server.item_weight.astype(np.float64)
        device_init.projection = table.T @ table
        totals["nmf_project_bytes_per_device"] = DeviceInitFields(  # once, in its first download
            projection=device_init.projection.astype(np.float32)).nbytes
    totals["init_seconds"] = time.perf_counter() - started
    source = f"{config.fed.nmf_init} NMF" if item_factor is not None else "no NMF"
    log.info("start phase done (%s mask), %.1f s", source, totals["init_seconds"])
    return RunState(server, device_init, totals, {}, {}, meter.ledger, population.unseen)


def run_federation(
    config: RunConfig,
    population: Population,
    transport: Transport,
    run_dir: Path,
    central_train=None,
    resume: bool = False,
    observer: UploadObserver | None = None,
    metadata: Mapping[str, Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run NMF (if the policy needs it) and ``num-server-rounds`` rounds; write rounds.jsonl and summary.json.

    ``central_train`` (the training CSR) is needed only for ``fed.nmf-init = central``, the oracle. With
    ``resume``, the run continues after the last round of ``run_dir/checkpoint.npz``; rounds.jsonl lines
    written after that checkpoint are dropped and redone. ``observer`` sees every accepted upload.
    ``metadata`` (dataset counts and checksum, ...) joins the code version and machine in config.json.
    ``on_round`` gets each round's record once it is saved (e.g. to advance a progress bar).
    The summary's ``best_validation_round`` is picked on validation sampled HR@10 under the sampled
    protocol (``data.split = loo`` or ``eval.candidates``), else on validation Recall@``eval.k``.
    """
    check_population(config, population)
    with run_dir_lock(run_dir):  # one writer per run directory: a second resume is refused, not interleaved
        return _run_locked(config, population, transport, run_dir, central_train, resume, observer, metadata, on_round)


TIMING_KEYS = ("seconds", "train_seconds", "evaluate_seconds")  # a round record's wall-clock times, which no two runs share


def _run_locked(
    config: RunConfig, population: Population, transport: Transport, run_dir: Path, central_train, resume: bool,
    observer: UploadObserver | None, metadata: Mapping[str, Any] | None, on_round: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """``run_federation`` once the run directory's lock is held."""
    if resume:
        check_resumable(config, run_dir)
    config = effective_config(config)
    started = time.perf_counter()
    if resume:
        state = load_checkpoint(run_dir, config, transport, population.n_items)
        if not np.array_equal(state.unseen, population.unseen):
            raise CheckpointError(
                f"{run_dir / CHECKPOINT}: the run held out {state.unseen.size} device(s) from training "
                f"({_ids(state.unseen)}), this federation would hold out {population.unseen.size} ({_ids(population.unseen)}): "
                "resume it on the same dataset and seed")
        kept = resumed_rounds(run_dir / "rounds.jsonl", state.server.round)
        atomic_write_text(run_dir / "rounds.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        log.info("resuming %s after round %d, to round %d", run_dir, state.server.round, config.num_server_rounds)
    else:
        state = start_run(config, population, transport, central_train)
        counts = {"devices": int(population.users.size), "n_users": population.n_users, "n_items": population.n_items}
        if population.unseen.size:
            counts["unseen_devices"] = int(population.unseen.size)
        write_json(run_dir / "config.json", {"config": config.to_flat(), "population": counts,
                                             **provenance(config.code_version), **(metadata or {})})
    # The best round: validation sampled HR@10 under the sampled protocol (a tie goes to the later round, as
    # in PFedRec), else validation Recall@k; the summary's best_test_* are that round's test metrics.
    sampled = uses_sampled_protocol(config)
    select_key = "validation_" + selection_key(sampled, config.eval.k)
    for server_round in range(state.server.round + 1, config.num_server_rounds + 1):
        record = train_round(config, population, transport, state, server_round, observer)
        record["train_seconds"] = time.perf_counter() - record["started"]  # training and aggregation
        personal = record.pop("personal_metrics")
        if config.fed.evaluate_model == "local-last":
            state.last_personal.update(personal)
        if is_evaluation_round(config, server_round):
            evaluation_started = time.perf_counter()
            if config.fed.evaluate_model != "global":  # the trained devices ranked with their own models
                reported = state.last_personal if config.fed.evaluate_model == "local-last" else personal
                metrics, eval_bytes = local_evaluation(
                    config, state.server, population, transport, state.device_init, server_round, reported, state.traffic)
                state.totals["eval_download_bytes"] += eval_bytes
            else:
                metrics, eval_bytes = evaluate_round(
                    config, state.server, population, transport, state.device_init, server_round, state.traffic)
                state.totals["eval_download_bytes"] += eval_bytes
            # Devices held out of training, on the server's table: reported apart, never read by the selection below.
            unseen, unseen_bytes = evaluate_unseen(
                config, state.server, population, transport, state.device_init, server_round, state.traffic)
            state.totals["eval_download_bytes"] += unseen_bytes
            metrics = {**metrics, **unseen}
            record.update(metrics, evaluate_seconds=time.perf_counter() - evaluation_started)
            state.last_metrics = metrics
            if select_key in metrics and improves(metrics[select_key], state.best.get(select_key, -1.0), sampled):
                state.best = {"round": server_round, **metrics}
        for measure in ("wire", "payload"):  # the whole run so far, start and evaluations included: curves of bytes
            record[f"{measure}_bytes_per_device_so_far"] = state.traffic.mean_per_device(measure)
            record[f"{measure}_evaluate_bytes_per_device_so_far"] = state.traffic.mean_per_device(measure, "evaluate")
        record["seconds"] = time.perf_counter() - record.pop("started")
        append_jsonl(run_dir / "rounds.jsonl", record)
        save_checkpoint(run_dir, state, transport)
        log.info(round_line(record, config.num_server_rounds))
        if on_round is not None:
            on_round(record)

    summary = {
        "rounds": state.server.round,  # the rounds behind these metrics (equals num-server-rounds: check_resumable)
        "policy": state.server.policy.name,
        "density": state.server.policy.settings.density,
        "item_active_entries": int(state.server.item_mask.sum()),
        "item_table_bytes": state.server.download(None).table.nbytes,  # the final masked table as the server stores it
        "best_validation_round": state.best.get("round"),
        "selection": f"best {select_key}",
        f"best_{select_key}": state.best.get(select_key),
        # the held-out devices' figures at that round (picked on the seen devices' validation) beside its test ones
        **{f"best_{key}": value for key, value in state.best.items() if key.startswith(("test_", "unseen_"))},
        **{f"total_{key}": value for key, value in state.totals.items()},
        **state.traffic.summary(),
        "seconds": time.perf_counter() - started,
        **{key: value for key, value in state.last_metrics.items()
           if key.startswith(("validation_", "unseen_")) or "_" not in key},
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def train_round(
    config: RunConfig,
    population: Population,
    transport: Transport,
    state: RunState,
    server_round: int,
    observer: UploadObserver | None = None,
) -> dict[str, Any]:
    """One training round, in the steps of docs/ARCHITECTURE.md ("One training round"): sampling, rows
    downlink, local training, validation, aggregation and bookkeeping. Returns the round's record, with
    ``started`` and ``personal_metrics`` still in it for ``run_federation`` to finish."""
    started = time.perf_counter()
    server = state.server
    arrived_items = server.reveal(server_round)
    present, chosen = sample_round(config, population.users, server_round)
    tally = RoundTally(clients=len(chosen))
    downlink = rows_downlink(config, population.n_items, transport, state, server_round, chosen, tally)
    settings = server.train_settings(server_round)
    if config.privacy.secure_aggregation and isinstance(transport, SecureTransport):  # Flower's SecAgg+: only the sum comes back
        replies, applied = secure_protocol_training(transport, server, server_round, downlink, settings, tally)
        tally.add_wire(Meter(state.traffic).secure(transport, "train", tally.traffic.download, tally.traffic.upload))
    else:
        replies = transport.send(TRAIN, server_round, downlink.messages, settings)  # local training
        meter = Meter(state.traffic)
        tally.add_wire(meter.exchange(transport, "train", TRAIN, server_round, downlink.messages, settings, replies))
        tally.traffic = RoundTraffic.measure(downlink, replies)
        accepted = validate_replies(config, server, server_round, downlink, replies, tally)
        applied = aggregate(config, server, server_round, accepted, observer)
    record = bookkeeping(state, server_round, started, tally, applied)
    record["personal_metrics"] = _personal_metrics(replies) if settings.get("evaluate") else {}
    if config.budget.widths:
        record.update(_per_class(tally.by_class))
    if config.budget.stream_stages:
        record.update({"present_users": int(present.size), "arrived_items": arrived_items,
                       "item_active_entries": int(server.item_mask.sum())})
    return record


def sample_round(config: RunConfig, users: np.ndarray, server_round: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 1, sampling: (the devices present this round, the ones chosen), int64 ids; the draw is seeded
    by (seed, round), so both engines choose the same devices."""
    present = arrived_users(config, users, server_round)
    return present, present[sample_clients(config.seed, server_round, present.size, clients_per_round(config, present.size))]


@dataclass(frozen=True)
class Downlink:
    """The round's training messages as they cross the wire (``TrainRequest`` arrays per device), each
    device's width, and the bytes of the row request each device sent first (``fed.downlink = rows``)."""

    messages: dict[int, Arrays]
    widths: dict[int, int]
    query_bytes: dict[int, int]


@dataclass(frozen=True)
class RoundTraffic:
    """Bytes each device received (``download``) and sent (``upload``, its row request included) in a
    round: ``wire.payload_bytes`` of the arrays that crossed, or under SecAgg+ every byte of the protocol
    as the transport counted it. A device that sent no reply has no upload."""

    download: dict[int, int]
    upload: dict[int, int]

    @classmethod
    def measure(cls, downlink: Downlink, replies: Mapping[int, Reply | str]) -> RoundTraffic:
        """Measure the training messages and the replies that came back."""
        download = {user: payload_bytes(message) for user, message in downlink.messages.items()}
        upload = {user: payload_bytes(reply.arrays) + downlink.query_bytes.get(user, 0)
                  for user, reply in replies.items() if user in downlink.messages and isinstance(reply, Reply)}
        return cls(download, upload)


@dataclass
class RoundTally:
    """What the round's steps report to its bookkeeping: devices that failed, replies dropped, the bytes,
    and per accepted device its memory and class (width)."""

    clients: int
    failed: int = 0
    dropped: int = 0
    traffic: RoundTraffic = field(default_factory=lambda: RoundTraffic({}, {}))
    wire_down: dict[int, int] = field(default_factory=dict)  # Flower's bytes per device, row request included
    wire_up: dict[int, int] = field(default_factory=dict)
    memory: list[float] = field(default_factory=list)
    by_class: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # width -> (upload bytes, memory bytes) accepted

    def add_wire(self, wire: tuple[Mapping[int, int], Mapping[int, int]]) -> None:
        """Add one exchange's wire bytes (down, up) per device."""
        for totals, counts in zip((self.wire_down, self.wire_up), wire, strict=True):
            for user, count in counts.items():
                totals[user] = totals.get(user, 0) + count

    def fail(self, server_round: int, user: int, reason: str | Exception, what: str = "device") -> None:
        """Count a device that sent no usable answer, logging why."""
        self.failed += 1
        log.warning("round %d: %s %d failed: %s", server_round, what, user, reason)


def rows_downlink(
    config: RunConfig, n_items: int, transport: Transport, state: RunState, server_round: int, chosen: np.ndarray,
    tally: RoundTally,
) -> Downlink:
    """Step 2, rows downlink: each chosen device's ``TrainRequest``, with the whole masked table or (``fed.downlink
    = rows``) only the rows it asked for in a "query"; a device whose request fails gets nothing and failed."""
    wanted: dict[int, np.ndarray | None] = {int(user): None for user in chosen}
    query_bytes: dict[int, int] = {}
    if config.fed.downlink == "rows":
        queries = {user: QueryRequest().to_arrays() for user in wanted}
        replies = transport.send(QUERY, server_round, queries, {})
        tally.add_wire(Meter(state.traffic).exchange(transport, "train", QUERY, server_round, queries, {}, replies))
        for user, reply in replies.items():
            try:
                arrays = _arrays_of(reply)
                wanted[user] = QueryReply.from_arrays(arrays, n_items).rows()
            except PayloadError as exc:
                wanted.pop(user)
                tally.fail(server_round, user, exc, "row request of device")
                continue
            query_bytes[user] = payload_bytes(arrays)
    widths = {user: device_width(config, user) for user in wanted}
    return Downlink(download_messages(TrainRequest, state.server, state.device_init, wanted, widths), widths, query_bytes)


def download_messages(
    request: type[TrainRequest] | type[EvaluateRequest], server: Server, device_init: DeviceInit,
    wanted: Mapping[int, np.ndarray | None], widths: Mapping[int, int], stateless: bool = False,
) -> dict[int, Arrays]:
    """Each device's training or evaluation message as wire arrays: the rows it wants (None = the whole
    masked table, encoded once per width and shared read-only) cut to its width, its NMF init fields (all of them every
    time for ``stateless`` devices, ``DeviceInit.fields``) and, in a NeuMF federation, the shared network (the
    same arrays for every device)."""
    tables: dict[int, RowsDownload] = {}
    messages = {}
    for user, rows in wanted.items():
        width = widths[user]
        if rows is None and width not in tables:
            tables[width] = server.download(None, width)
            for array in tables[width].table.to_arrays().values():  # one copy every device reads, none writes
                array.setflags(write=False)
        download = tables[width] if rows is None else server.download(rows, width)
        messages[user] = request(download, device_init.fields(user, stateless), server.network).to_arrays()
    return messages


def _arrays_of(reply: Reply | str) -> Arrays:
    """A reply's arrays; PayloadError carrying the reason when the device sent none."""
    if isinstance(reply, str):
        raise PayloadError(reply)
    return reply.arrays


@dataclass(frozen=True)
class Accepted:
    """A training reply that passed validation: its device and decoded upload."""

    user: int
    update: RowUpdate | SecureUpload


def validate_replies(
    config: RunConfig, server: Server, server_round: int, downlink: Downlink, replies: Mapping[int, Reply | str],
    tally: RoundTally,
) -> list[Accepted]:
    """Step 4, validation: decode each training reply against the server's mask (``server_state.validate_update``:
    shapes, dtypes, ranges, finiteness, ``robust.max-update-norm``) and check its metrics (``metrics_problem``).
    A reply that fails is dropped with its reason logged; the accepted ones come back in user order."""
    accepted = []
    for user in sorted(downlink.messages):
        reply = replies.get(user, "no reply")
        if isinstance(reply, str):
            tally.fail(server_round, user, reply)
            continue
        update, reason = validate_update(server, reply.arrays, config.privacy.secure_aggregation, downlink.widths[user])
        reason = reason or metrics_problem(reply.metrics)
        if reason or update is None:
            tally.dropped += 1
            log.warning("round %d: dropped the update of device %d: %s", server_round, user, reason)
            continue
        accepted.append(Accepted(user, update))
        tally.memory.append(reply.metrics.get("memory-bytes", 0.0))
        tally.by_class.setdefault(downlink.widths[user], []).append((tally.traffic.upload[user], tally.memory[-1]))
    return accepted


def aggregate(
    config: RunConfig, server: Server, server_round: int, accepted: list[Accepted], observer: UploadObserver | None,
) -> dict[str, Any]:
    """Step 5, aggregation: the observer sees each accepted sparse upload (before the round changes the
    server), then the server applies the per-row mean (or the sum of secure uploads, all SecAgg reveals)
    and explores its mask. Returns what the server reports, with the upload's reference points: per
    accepted sparse update its information floor (row ids + active values) and the same rows sent dense."""
    if config.privacy.secure_aggregation:  # a secure upload names no rows: no observation, no sparse references
        secure = [entry.update for entry in accepted if isinstance(entry.update, SecureUpload)]
        return {**server.apply_secure_round(server_round, secure), **NO_ROW_REFERENCES}
    updates = [entry.update for entry in accepted if isinstance(entry.update, RowUpdate)]
    if observer is not None:
        for update, entry in zip(updates, accepted, strict=True):
            observer.observe(server_round, entry.user, update, server)
    applied = server.apply_round(server_round, updates)
    dim = server.item_weight.shape[1]
    network = [update.network.nbytes if update.network is not None else 0 for update in updates]  # NeuMF only
    floors = [update.row_ids.nbytes + update.values.nbytes + extra for update, extra in zip(updates, network, strict=True)]
    dense_rows = [update.row_ids.nbytes + update.row_ids.size * dim * 4 + extra
                  for update, extra in zip(updates, network, strict=True)]
    return {**applied, "upload_floor_bytes_mean": float(np.mean(floors)) if floors else 0.0,
            "dense_rows_upload_bytes_mean": float(np.mean(dense_rows)) if dense_rows else 0.0}


NO_ROW_REFERENCES = {"upload_floor_bytes_mean": 0.0, "dense_rows_upload_bytes_mean": 0.0}


def secure_protocol_training(
    transport: SecureTransport, server: Server, server_round: int, downlink: Downlink, settings: Mapping[str, Any],
    tally: RoundTally,
) -> tuple[dict[int, Reply | str], dict[str, Any]]:
    """Steps 3 to 5 when only a secure-aggregation protocol sees the uploads: the transport's ``secure_train``
    returns the summed upload, per-device metrics or failures, and every byte of the protocol per device
    (key exchange included); the server validates the sum alone and applies it. Returns (replies, applied)."""
    total, replies, sent, received = transport.secure_train(server_round, downlink.messages, settings)
    tally.traffic = RoundTraffic(download=sent, upload=received)
    for user, reply in replies.items():
        if isinstance(reply, str):
            tally.fail(server_round, user, reply)
    tally.memory = [reply.metrics.get("memory-bytes", 0.0) for reply in replies.values() if isinstance(reply, Reply)]
    checked = None
    if total is not None:
        try:
            checked = server.decode_secure_reply(total.to_arrays())
        except PayloadError as exc:
            tally.dropped = 1
            log.warning("round %d: dropped the secure sum: %s", server_round, exc)
    summed = len(tally.memory)  # devices whose upload joined the sum
    applied = (server.apply_secure_sum(server_round, checked, summed) if checked is not None
               else server.apply_round(server_round, []))
    return replies, {**applied, **NO_ROW_REFERENCES}


def bookkeeping(state: RunState, server_round: int, started: float, tally: RoundTally, applied: dict[str, Any]) -> dict[str, Any]:
    """Step 6, bookkeeping: add the round's bytes to the run totals and build its rounds.jsonl record from
    the tally and what the server applied (``seconds`` added later); dense FedAvg of the whole item table is
    the third reference point of the upload."""
    server = state.server
    uploads, downloads = list(tally.traffic.upload.values()), list(tally.traffic.download.values())
    state.totals["upload_bytes"] += sum(uploads)
    state.totals["download_bytes"] += sum(downloads)
    return {
        "round": server_round,
        "started": started,
        "clients": tally.clients,
        "failed_clients": tally.failed,
        "dropped_updates": tally.dropped,
        **_summary_stats(uploads, "upload_bytes"),
        **_summary_stats(downloads, "download_bytes"),
        **_summary_stats(list(tally.wire_up.values()), "wire_upload_bytes"),
        **_summary_stats(list(tally.wire_down.values()), "wire_download_bytes"),
        **_summary_stats(tally.memory, "device_memory_bytes"),
        "dense_fedavg_upload_bytes": server.n_items * server.item_weight.shape[1] * 4 + (
            server.network.nbytes if server.network is not None else 0),
        **applied,
    }


def _per_class(by_class: Mapping[int, list[tuple[int, float]]]) -> dict[str, float]:
    """Mean upload and device memory bytes of each device class (keys suffixed ``_w<width>``)."""
    record = {}
    for width, pairs in sorted(by_class.items()):
        uploads, memory = zip(*pairs, strict=True)
        record[f"upload_bytes_mean_w{width}"] = float(np.mean(uploads))
        record[f"device_memory_bytes_mean_w{width}"] = float(np.mean(memory))
    return record


def evaluate_round(
    config: RunConfig, server: Server, population: Population, transport: Transport, device_init: DeviceInit, server_round: int,
    traffic: TrafficLedger | None = None,
) -> tuple[dict[str, float], int]:
    """Evaluate sampled devices on the full masked table; per-user means of every reported metric (the
    bytes go to ``traffic`` when given)."""
    chosen = evaluation_cohort(config, population, server_round)
    return _evaluate_devices(config, server, transport, device_init, server_round, chosen, traffic)


def evaluation_cohort(config: RunConfig, population: Population, server_round: int) -> np.ndarray:
    """The devices evaluated at ``server_round``: ``fed.eval-fraction`` of them, int64 ids. The same devices at every
    evaluation (keyed by the seed alone), so rounds are compared, and the best round picked, on one fixed validation
    population, not on a new random subset each time; under streaming, only those that have joined."""
    count = max(1, int(round(config.fed.eval_fraction * population.users.size)))
    chosen = population.users[sample_clients(config.seed, 0, population.users.size, count, "evaluate")]
    return np.intersect1d(chosen, arrived_users(config, population.users, server_round))


def local_evaluation(
    config: RunConfig, server: Server, population: Population, transport: Transport, device_init: DeviceInit,
    server_round: int, trained: Mapping[int, Mapping[str, float]], traffic: TrafficLedger | None = None,
) -> tuple[dict[str, float], int]:
    """``fed.evaluate-model = local``: every device trained this round reports its personal model right after local
    training (``trained``: its metrics, PFedRec's rule); the evaluation cohort's devices that did not train this
    round rank with their stored head on the server's current table. Under ``local-last`` ``trained`` holds every
    device's report from its last training round, PFedRec's code's rule: it scores each client with the model its
    last round left, which does not change until the client trains again, so the metrics it reported then are
    the ones that model scores now; only the cohort's devices that never trained rank on the current table. With
    every device in every round nobody is in the second group and no evaluation message is sent. Returns
    (per-user means over the evaluation cohort, payload bytes sent)."""
    cohort = evaluation_cohort(config, population, server_round)
    if config.fed.evaluate_model == "local-last":
        trained = {user: trained[int(user)] for user in cohort if int(user) in trained}
    rest = np.setdiff1d(cohort, np.fromiter(trained, dtype=np.int64))
    others: dict[int, Mapping[str, float]] = {}
    widths: dict[int, int] = {}
    sent = 0
    if rest.size:
        others, widths, sent = _device_metrics(config, server, transport, device_init, server_round, rest, traffic)
    widths.update({user: device_width(config, user) for user in trained})
    return mean_device_metrics(config, {**trained, **others}, widths), sent


def evaluate_unseen(
    config: RunConfig, server: Server, population: Population, transport: Transport, device_init: DeviceInit, server_round: int,
    traffic: TrafficLedger | None = None,
) -> tuple[dict[str, float], int]:
    """Evaluate every device held out of training (``fed.unseen-users``; streaming: those that have joined):
    each fits a fresh user row against the full masked table and keeps nothing (the ``unseen.UNSEEN``
    setting). Returns the per-user means of ``evaluate_round`` under ``unseen_`` keys (``unseen_recall@20``,
    ``unseen_sampled_hr@10``, ``unseen_validation_...``, ``unseen_evaluated_clients``) with ``unseen_users``,
    the number held out, and the bytes sent; ({}, 0) without held-out devices."""
    if population.unseen.size == 0:
        return {}, 0
    chosen = arrived_users(config, population.unseen, server_round)
    if chosen.size == 0:  # streaming: none has joined yet
        return {"unseen_users": int(population.unseen.size), "unseen_evaluated_clients": 0}, 0
    metrics, sent = _evaluate_devices(config, server, transport, device_init, server_round, chosen, traffic, True)
    return {"unseen_users": int(population.unseen.size), **{f"unseen_{key}": value for key, value in metrics.items()}}, sent


def _evaluate_devices(
    config: RunConfig, server: Server, transport: Transport, device_init: DeviceInit, server_round: int, chosen: np.ndarray,
    traffic: TrafficLedger | None, unseen: bool = False,
) -> tuple[dict[str, float], int]:
    """Send ``chosen`` the full masked table, cut to each device's width, and average what they report
    (``unseen``: devices held out of training, told to fit a fresh row and keep nothing); the bytes go to
    ``traffic`` when given. Returns (the means, the payload bytes sent)."""
    evaluated, widths, sent = _device_metrics(config, server, transport, device_init, server_round, chosen, traffic, unseen)
    return mean_device_metrics(config, evaluated, widths), sent


def _device_metrics(
    config: RunConfig, server: Server, transport: Transport, device_init: DeviceInit, server_round: int, chosen: np.ndarray,
    traffic: TrafficLedger | None, unseen: bool = False,
) -> tuple[dict[int, Mapping[str, float]], dict[int, int], int]:
    """What each of ``chosen`` reports for the full masked table (``_evaluate_devices``): (metrics per device that
    answered usably, each device's width, the payload bytes sent)."""
    widths = {int(u): device_width(config, int(u)) for u in chosen}
    messages = download_messages(EvaluateRequest, server, device_init, dict.fromkeys(widths), widths, stateless=unseen)
    settings = {UNSEEN: True} if unseen else {}
    replies = transport.send(EVALUATE, server_round, messages, settings)
    if traffic is not None:
        Meter(traffic).exchange(transport, "evaluate", EVALUATE, server_round, messages, settings, replies)
    evaluated: dict[int, Mapping[str, float]] = {}
    for user, reply in replies.items():
        if isinstance(reply, str) or (problem := _evaluation_problem(reply)):
            log.warning("round %d: evaluation on device %d failed: %s", server_round, user,
                        reply if isinstance(reply, str) else problem)
            continue
        evaluated[user] = reply.metrics
    return evaluated, widths, sum(payload_bytes(message) for message in messages.values())


def _evaluation_problem(reply: Reply) -> str | None:
    """Why an evaluation reply is unusable (arrays where an ``EvaluateReply`` has none, or a bad metric), or None."""
    try:
        EvaluateReply.from_arrays(reply.arrays)
    except PayloadError as exc:
        return str(exc)
    return metrics_problem(reply.metrics)


def _ids(users: np.ndarray) -> str:
    """A few device ids for a message: ``3, 17, 40, ...``."""
    return ", ".join(str(int(user)) for user in users[:NAMES_SHOWN]) + (", ..." if users.size > NAMES_SHOWN else "")


def _personal_metrics(replies: Mapping[int, Reply | str]) -> dict[int, dict[str, float]]:
    """``fed.evaluate-model = local``: what each replying device reported for its own model, per device."""
    return {user: {k: v for k, v in reply.metrics.items() if k.startswith(("validation-", "test-"))}
            for user, reply in replies.items() if isinstance(reply, Reply) and not metrics_problem(reply.metrics)}


def mean_device_metrics(
    config: RunConfig, per_device: Mapping[int, Mapping[str, float]], widths: Mapping[int, int]
) -> dict[str, float]:
    """Per-user means of every metric the devices reported (``validation-x`` -> ``validation_x``), per
    device class when there are several, with the test metrics also under their bare names (recall@20, ...)."""
    collected: dict[str, list[float]] = {}
    for user, reported in per_device.items():
        for name, value in reported.items():
            collected.setdefault(name, []).append(value)
            if config.budget.widths and name in (f"test-recall@{config.eval.k}",
                                                 f"test-ndcg@{config.eval.k}"):  # per device class
                collected.setdefault(f"{name}_w{widths[user]}", []).append(value)
    metrics = {name.replace("-", "_", 1): float(np.mean(values)) for name, values in sorted(collected.items())}
    # The headline keys (recall@20, ndcg@20, ...) are the test metrics.
    metrics.update({name.removeprefix("test_"): value for name, value in list(metrics.items()) if name.startswith("test_")})
    metrics["evaluated_clients"] = len(collected.get(f"test-recall@{config.eval.k}", []))
    return metrics
