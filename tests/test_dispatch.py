"""One handler table for both transports: every message kind reaches the device through
``dispatch.HANDLERS`` in process and in the Flower ClientApp, and both count the same exceptions as a
failed device."""

from __future__ import annotations

import types

import numpy as np
import pytest

from fedsparse.config import RunConfig
from fedsparse.data import load_run_data
from fedsparse.federation.dispatch import HANDLERS, DeviceCall, serve
from fedsparse.federation.faults import DeviceCrash, DeviceError, InjectedFault
from fedsparse.federation.inprocess import InProcessTransport
from fedsparse.federation.messages import EVALUATE, KINDS, QUERY, START, TRAIN, QueryReply
from fedsparse.federation.protocol import DeviceReply
from fedsparse.federation.wire import PayloadError

SYNTHETIC = {"data.dataset": "synthetic", "data.synthetic-users": 30, "data.synthetic-items": 40}
USER, ROUND = 3, 2


def recording_handler(kind: str, calls: list):
    """A handler that records who called it and answers with a recognisable reply."""
    def handler(call: DeviceCall, message: dict) -> DeviceReply:
        calls.append((kind, call.data.user_id, call.server_round))
        return DeviceReply(QueryReply(np.asarray([USER], dtype=np.uint16)), {"seen": np.ones(1, np.float32)}, {"seen": 1.0})
    return handler


def test_the_table_covers_every_kind_and_the_flower_transport_names_a_message_type_for_each() -> None:
    assert set(HANDLERS) == set(KINDS)
    pytest.importorskip("flwr")
    from server.transport import MESSAGE_TYPES

    assert set(MESSAGE_TYPES) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_both_transports_route_every_kind_through_the_one_table(kind: str, monkeypatch) -> None:
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Context, RecordDict

    import clients.app as client_app
    from clients.records import to_record

    calls: list = []
    monkeypatch.setitem(HANDLERS, kind, recording_handler(kind, calls))
    config = RunConfig.from_flat(SYNTHETIC)
    in_process = InProcessTransport(config, load_run_data(config))
    reply = in_process.send(kind, ROUND, {USER: {}}, {})[USER]
    assert reply.metrics == {"seen": 1.0} and in_process.states[USER]["seen"].tolist() == [1.0]

    content = RecordDict({"settings": ConfigRecord({"server-round": ROUND}), f"arrays.{USER}": to_record({})})
    message = types.SimpleNamespace(content=content)  # a received message: only its content is read
    context = Context(run_id=1, node_id=1, node_config={"partition-id": USER}, state=RecordDict(), run_config=SYNTHETIC)
    monkeypatch.setattr(client_app, "Message", lambda reply, reply_to: reply)  # the reply's content, unsent
    route = {START: client_app.start, QUERY: client_app.rows, TRAIN: client_app.train, EVALUATE: client_app.evaluate}[kind]
    flower_reply = route(message, context)
    assert dict(flower_reply[f"metrics.{USER}"]) == {"seen": 1.0}
    assert calls == [(kind, USER, ROUND), (kind, USER, ROUND)]  # once per transport, the same table entry


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("failure", [PayloadError("bad"), DeviceError("no item"), InjectedFault("drawn"), DeviceCrash("lost")])
def test_device_failures_of_every_kind_are_outcomes_and_only_a_crash_loses_the_state(kind, failure, monkeypatch) -> None:
    def raiser(call, message):
        raise failure
    monkeypatch.setitem(HANDLERS, kind, raiser)
    config = RunConfig.from_flat(SYNTHETIC)
    call = DeviceCall(config, types.SimpleNamespace(user_id=USER), {}, 40, ROUND)
    outcome = serve(kind, call, {})
    assert outcome.reply is None and outcome.reason == f"{type(failure).__name__}: {failure}"
    assert outcome.lost_state == isinstance(failure, DeviceCrash)


@pytest.mark.parametrize("bug", [ValueError("operands could not be broadcast"), KeyError("item-weight"), TypeError("bad call")])
def test_any_other_exception_is_a_bug_that_propagates(bug, monkeypatch) -> None:
    def raiser(call, message):
        raise bug
    monkeypatch.setitem(HANDLERS, TRAIN, raiser)
    call = DeviceCall(RunConfig.from_flat(SYNTHETIC), types.SimpleNamespace(user_id=USER), {}, 40, ROUND)
    with pytest.raises(type(bug)):
        serve(TRAIN, call, {})
    with pytest.raises(ValueError, match="unknown message kind 'rows'"):
        serve("rows", call, {})


@pytest.mark.parametrize("kind", [START, TRAIN])
def test_the_clientapps_secagg_rounds_use_the_same_table_and_raise_a_failed_device_out_of_the_protocol(kind, monkeypatch) -> None:
    """Under SecAgg+ a device leaves the round only by raising: its failure is raised after the state is handled."""
    pytest.importorskip("flwr")
    from flwr.app import Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    import clients.app as client_app
    from fedsparse.federation.messages import StartContribution
    from fedsparse.federation.wire import SecureUpload

    settings = {"server-round": ROUND, "array-keys": "x", **({"secure-start": 1, "secure-bound": 2.0} if kind == START else {})}
    message = types.SimpleNamespace(content=fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(1)]), settings), True))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": USER}, state=RecordDict(), run_config=SYNTHETIC)
    monkeypatch.setattr(client_app, "Message", lambda reply, reply_to: reply)
    calls: list = []
    vector = np.ones(4, np.float32)
    upload = SecureUpload(vector, np.ones(2, np.float32))

    def handler(call: DeviceCall, arrays: dict) -> DeviceReply:
        calls.append((call.data.user_id, call.server_round, sorted(arrays)))
        return DeviceReply(StartContribution(vector) if kind == START else upload, {}, {})
    monkeypatch.setitem(HANDLERS, kind, handler)
    assert client_app._secure_train(message, context) is not None
    assert calls == [(USER, ROUND, ["x"])]

    def crash(call, arrays):
        raise DeviceCrash("lost")
    monkeypatch.setitem(HANDLERS, kind, crash)
    with pytest.raises(DeviceCrash):
        client_app._secure_train(message, context)
