"""One table from message kind to device handler, and the one rule for what counts as a failed device.

Both transports deliver through ``serve``: the in-process engine (``fedsparse.federation.inprocess``) and
the Flower ClientApp (``clients/app.py``, plain and SecAgg+ rounds alike). A handler that raises
``PayloadError`` (a malformed message), ``faults.DeviceError`` (a device that cannot serve it) or an
injected fault is a failed device; a ``DeviceCrash`` also loses the device's private state. Any other
exception is a bug: it propagates and fails the run with its traceback. ``serve_all`` can serve a group of
training messages with the devices' local steps batched (``serve_train_batch``), under the same rule per device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.federation.batched import local_train_batch
from fedsparse.federation.batched_evaluation import evaluate_splits_batch
from fedsparse.federation.device import DeviceData, DeviceRound, evaluate_splits
from fedsparse.federation.faults import DEVICE_FAILURES, DeviceCrash
from fedsparse.federation.messages import EVALUATE, QUERY, START, TRAIN
from fedsparse.federation.protocol import (
    DecodedTables,
    DeviceReply,
    EvaluationJob,
    finish_evaluate,
    finish_train,
    handle_evaluate,
    handle_nmf,
    handle_query,
    handle_train,
    prepare_evaluate,
    prepare_train,
)
from fedsparse.federation.wire import Arrays


@dataclass(frozen=True)
class DeviceCall:
    """Everything a device has when one message reaches it: the run's config, its own data and private
    state, the table size, the round and the scalar settings that came with the message."""

    config: RunConfig
    data: DeviceData
    state: dict[str, np.ndarray]
    n_items: int
    server_round: int
    settings: Mapping[str, Any] = field(default_factory=dict)


Handler = Callable[[DeviceCall, Arrays], DeviceReply]
Done = TypeVar("Done")


def _start(call: DeviceCall, message: Arrays) -> DeviceReply:
    return handle_nmf(call.config, call.state, call.data, message, call.n_items)


def _query(call: DeviceCall, message: Arrays) -> DeviceReply:
    return handle_query(call.config, call.data, message, call.n_items, call.server_round)


def _train(call: DeviceCall, message: Arrays) -> DeviceReply:
    return handle_train(call.config, call.state, call.data, message, call.n_items, call.server_round, call.settings)


def _evaluate(call: DeviceCall, message: Arrays) -> DeviceReply:
    return handle_evaluate(call.config, call.state, call.data, message, call.n_items, call.settings)


HANDLERS: dict[str, Handler] = {START: _start, QUERY: _query, TRAIN: _train, EVALUATE: _evaluate}


@dataclass(frozen=True)
class Outcome:
    """What came of one message on one device: its reply, or the failure (``reply`` None) that stopped it;
    ``lost_state``: the device crashed and the transport must forget what it kept for it."""

    reply: DeviceReply | None
    failure: Exception | None = None
    lost_state: bool = False

    @property
    def reason(self) -> str:
        """The failure as the server logs it (``<exception type>: <message>``)."""
        return f"{type(self.failure).__name__}: {self.failure}"


def serve(kind: str, call: DeviceCall, message: Arrays) -> Outcome:
    """Run the handler of ``kind`` on one device; a device failure becomes an ``Outcome``, a bug propagates.
    An unknown kind is a bug too (ValueError)."""
    if kind not in HANDLERS:
        raise ValueError(f"unknown message kind {kind!r} (known: {', '.join(HANDLERS)})")
    reply = _attempt(partial(HANDLERS[kind], call, message))
    return reply if isinstance(reply, Outcome) else Outcome(reply)


def serve_all(kind: str, calls: Sequence[tuple[DeviceCall, Arrays]], device_batch: int = 1) -> list[Outcome]:
    """``serve`` on every call in order; when ``device_batch`` is above 1 (``batched.device_batch_size`` gives
    it), training and evaluation messages that many at a time, their local steps or rankings batched
    (``serve_train_batch``, ``serve_evaluate_batch``)."""
    batched = {TRAIN: serve_train_batch, EVALUATE: serve_evaluate_batch}.get(kind)
    if batched is None or device_batch <= 1:
        return [serve(kind, call, message) for call, message in calls]
    return [outcome for start in range(0, len(calls), device_batch)
            for outcome in batched(calls[start : start + device_batch])]


def serve_train_batch(calls: Sequence[tuple[DeviceCall, Arrays]]) -> list[Outcome]:
    """``serve(TRAIN, ...)`` for several devices of one run and round with their local steps trained together
    (``batched.local_train_batch``; the caller checks ``batched.batching_unsupported`` first): each device's
    ``Outcome`` in order, a failure (in decoding, planning or finishing) failing that device alone."""
    outcomes: dict[int, Outcome] = {}
    jobs: dict[int, DeviceRound] = {}
    for index, (call, message) in enumerate(calls):
        prepared = _attempt(partial(prepare_train, call.config, call.state, call.data, message, call.n_items,
                                    call.server_round, call.settings))
        if isinstance(prepared, DeviceRound):
            jobs[index] = prepared
        else:
            outcomes[index] = prepared if isinstance(prepared, Outcome) else Outcome(prepared)
    if jobs:
        first = calls[next(iter(jobs))][0]
        results = local_train_batch(first.config, list(jobs.values()), first.n_items)
        for (index, job), result in zip(jobs.items(), results, strict=True):
            call = calls[index][0]
            if isinstance(result, Exception):
                outcomes[index] = Outcome(None, result)
                continue
            reply = _attempt(partial(finish_train, call.config, call.state, job, result, call.n_items))
            outcomes[index] = reply if isinstance(reply, Outcome) else Outcome(reply)
    return [outcomes[index] for index in range(len(calls))]


def serve_evaluate_batch(calls: Sequence[tuple[DeviceCall, Arrays]]) -> list[Outcome]:
    """``serve(EVALUATE, ...)`` for several devices of one run and round: a table the devices received as the
    very same arrays is decoded once (``protocol.DecodedTables``), and the MF rankings of devices of one width
    reading one table are computed together (``batched_evaluation.evaluate_splits_batch``); every other device
    is ranked alone. Each device's ``Outcome`` in order, a failure failing that device alone."""
    tables = DecodedTables()
    outcomes: dict[int, Outcome] = {}
    jobs: dict[int, EvaluationJob] = {}
    for index, (call, message) in enumerate(calls):
        prepared = _attempt(partial(prepare_evaluate, call.config, call.state, call.data, message, call.n_items,
                                    call.settings, tables))
        if isinstance(prepared, EvaluationJob):
            jobs[index] = prepared
        else:
            outcomes[index] = prepared
    groups: dict[tuple[int, int], list[int]] = {}
    for index, job in jobs.items():
        if job.batchable:
            groups.setdefault((id(job.item_weights), job.device.user_row.size), []).append(index)
    ranked: dict[int, dict[str, float]] = {}
    for members in groups.values():
        config = calls[members[0]][0].config
        batch = evaluate_splits_batch(config, [jobs[i].device for i in members], [jobs[i].data for i in members],
                                      jobs[members[0]].item_weights)
        ranked.update(zip(members, batch, strict=True))
    for index, job in jobs.items():
        config = calls[index][0].config
        reply = _attempt(partial(_finish_evaluate, config, job, ranked.get(index)))
        outcomes[index] = reply if isinstance(reply, Outcome) else Outcome(reply)
    return [outcomes[index] for index in range(len(calls))]


def _finish_evaluate(config: RunConfig, job: EvaluationJob, ranked: dict[str, float] | None) -> DeviceReply:
    """The device's reply from its batched rankings, or from ranking it alone when it had none."""
    metrics = ranked if ranked is not None else evaluate_splits(config, job.device, job.data, job.item_weights, job.network)
    return finish_evaluate(config, job, metrics)


def _attempt(step: Callable[[], Done]) -> Done | Outcome:
    """Run one device's step: its result, or the ``Outcome`` of the device failure it raised; a bug propagates."""
    try:
        return step()
    except DeviceCrash as exc:
        return Outcome(None, exc, lost_state=True)
    except DEVICE_FAILURES as exc:
        return Outcome(None, exc)
