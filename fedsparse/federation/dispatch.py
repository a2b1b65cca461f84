"""One table from message kind to device handler, and the one rule for what counts as a failed device.

Both transports deliver through ``serve``: the in-process engine (``fedsparse.federation.inprocess``) and
the Flower ClientApp (``clients/app.py``, plain and SecAgg+ rounds alike). A handler that raises
``PayloadError`` (a malformed message), ``faults.DeviceError`` (a device that cannot serve it) or an
injected fault is a failed device; a ``DeviceCrash`` also loses the device's private state. Any other
exception is a bug: it propagates and fails the run with its traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.federation.device import DeviceData
from fedsparse.federation.faults import DEVICE_FAILURES, DeviceCrash
from fedsparse.federation.messages import EVALUATE, QUERY, START, TRAIN
from fedsparse.federation.protocol import DeviceReply, handle_evaluate, handle_nmf, handle_query, handle_train
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
    try:
        return Outcome(HANDLERS[kind](call, message))
    except DeviceCrash as exc:
        return Outcome(None, exc, lost_state=True)
    except DEVICE_FAILURES as exc:
        return Outcome(None, exc)
