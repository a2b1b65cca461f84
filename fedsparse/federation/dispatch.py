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
from fedsparse.federation.device import DeviceData, DeviceRound
from fedsparse.federation.faults import DEVICE_FAILURES, DeviceCrash
from fedsparse.federation.messages import EVALUATE, QUERY, START, TRAIN
from fedsparse.federation.protocol import (
    DeviceReply,
    finish_train,
    handle_evaluate,
    handle_nmf,
    handle_query,
    handle_train,
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
    """``serve`` on every call in order; training messages ``device_batch`` at a time with their local steps
    batched (``serve_train_batch``) when it is above 1 (``batched.device_batch_size`` gives it)."""
    if kind != TRAIN or device_batch <= 1:
        return [serve(kind, call, message) for call, message in calls]
    return [outcome for start in range(0, len(calls), device_batch)
            for outcome in serve_train_batch(calls[start : start + device_batch])]


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


def _attempt(step: Callable[[], Done]) -> Done | Outcome:
    """Run one device's step: its result, or the ``Outcome`` of the device failure it raised; a bug propagates."""
    try:
        return step()
    except DeviceCrash as exc:
        return Outcome(None, exc, lost_state=True)
    except DEVICE_FAILURES as exc:
        return Outcome(None, exc)
