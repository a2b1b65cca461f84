"""The wire-format re-derivation against Flower's own serialiser, object by object.

``fedsparse.federation.wire_format`` counts a message's bytes without importing flwr; here Flower
builds the same messages and deflates them, and the two must agree exactly.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from flwr.app import ConfigRecord as FlowerConfigRecord
from flwr.app import MetricRecord as FlowerMetricRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from fedsparse.federation import wire_format
from fedsparse.federation.wire_format import ConfigRecord, Envelope, MetricRecord, message_wire_bytes


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps run, node and task ids on every Message it builds; give it some (of every size)."""
    saved = {name: getattr(TaskIdentity, f"_{name}", None) for name in ("run_id", "node_id", "task_id")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 2**64 - 3, 1, 2**40 + 7
    yield
    for name, value in saved.items():
        setattr(TaskIdentity, f"_{name}", value)


def flower_bytes(message: Message) -> int:
    """What Flower sends for ``message``: the bytes of each distinct object of its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def flower_records(records):
    content = RecordDict()
    for name, record in records.items():
        if isinstance(record, ConfigRecord):
            content[name] = FlowerConfigRecord(dict(record.values))
        elif isinstance(record, MetricRecord):
            content[name] = FlowerMetricRecord(dict(record.values))
        else:
            content[name] = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in record.items()})
    return content


def envelope_of(message: Message) -> Envelope:
    meta = message.metadata
    return Envelope(meta.message_type, meta.group_id, meta.run_id, meta.src_node_id, meta.dst_node_id,
                    meta.src_task_id, meta.dst_task_id, meta.reply_to_message_id, meta.ttl, meta.created_at)


RNG = np.random.default_rng(0)
MESSAGES = {
    "a train download (settings and rows)": {
        "settings": ConfigRecord({"server-round": 3, "explore": True, "lr": 0.05, "kind": "train", "negative": -4}),
        "arrays.17": {"row-ids": np.arange(40, dtype=np.int32), "values": RNG.random(520, dtype=np.float32),
                      "row-counts": np.full(40, 13, dtype=np.uint8)},
    },
    "a train reply (arrays and metrics) for two devices": {
        "arrays.3": {"row-ids": np.arange(290, dtype=np.int64), "values": RNG.random((290, 64), dtype=np.float32),
                     "weight": np.array([3.0], dtype=np.float32)},
        "metrics.3": MetricRecord({"loss": 0.5, "examples": 12, "big": 2**63 + 1, "zero": 0.0}),
        "arrays.4": {"row-ids": np.arange(290, dtype=np.int64), "weight": np.array([3.0], dtype=np.float32)},
        "metrics.4": MetricRecord({"loss": 0.25, "curve": [0.1, 0.2], "counts": [1, -2]}),
    },
    "an error reply and an empty array": {
        "error.9": ConfigRecord({"reason": "device 9: payload row ids out of range", "codes": ["a", "b"], "flags": [True, False],
                                 "raw": b"\x00\x01", "blobs": [b"x"], "empty": [], "ids": [2**64 - 1]}),
        "arrays.9": {"nothing": np.zeros(0, dtype=np.float32), "twice": np.ones(3), "again": np.ones(3)},
    },
    "a reply whose arrays repeat (counted without hashing)": {
        "arrays.5": {"signal-rows": np.zeros(0, dtype=np.int32), "signal-cols": np.zeros(0, dtype=np.int32),
                     "zero": np.zeros(2, dtype=np.float32), "negative zero": -np.zeros(2, dtype=np.float32),
                     "row-ids": np.arange(7, dtype=np.int32), "same ids": np.arange(7, dtype=np.int32), "é": np.ones((2, 3))},
        "metrics.5": MetricRecord({"loss": 0.5, "examples": 12}),
    },
    "a table larger than one chunk": {
        "arrays.1": {"table": np.zeros((wire_format.MAX_CHUNK_BYTES // 4 + 10,), dtype=np.float32)},
    },
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_instruction_bytes_equal_flowers_serialiser(name):
    records = MESSAGES[name]
    message = Message(flower_records(records), dst_node_id=2**63 + 5, message_type="train", group_id="12")
    assert message_wire_bytes(records, envelope_of(message)) == flower_bytes(message)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_reply_bytes_equal_flowers_serialiser(name):
    records = MESSAGES[name]
    instruction = Message(RecordDict(), dst_node_id=7, message_type="evaluate", group_id="2")
    reply = Message(flower_records(records), reply_to=instruction)
    assert message_wire_bytes(records, envelope_of(reply)) == flower_bytes(reply)


def test_the_worst_case_envelope_bounds_every_id_size():
    records = MESSAGES["a train download (settings and rows)"]
    small = Message(flower_records(records), dst_node_id=1, message_type="train", group_id="12")
    worst = message_wire_bytes(records, Envelope.worst_case("train", "12", reply=False))
    assert flower_bytes(small) < worst <= flower_bytes(small) + 4 * 9 + 8  # four ids of 1 vs 10 bytes, created_at


def test_identical_arrays_travel_once():
    one = message_wire_bytes({"arrays.1": {"a": np.ones(1000)}}, Envelope("train"))
    two = message_wire_bytes({"arrays.1": {"a": np.ones(1000), "b": np.ones(1000)}}, Envelope("train"))
    assert two - one < 200  # a second name and reference, not a second copy of 8 KB


def hashed_wire_bytes(records, envelope, monkeypatch):
    """``message_wire_bytes`` by hashing every object, the counted shortcut switched off."""
    with monkeypatch.context() as patch:
        patch.setattr(wire_format, "_counted_wire_bytes", lambda records, envelope: None)
        return message_wire_bytes(records, envelope)


def test_counted_bytes_equal_hashed_bytes_for_random_messages(monkeypatch):
    """The shortcut (sizes from signatures, identical arrays found by content) against hashing every object:
    random dtypes, shapes (0-d, empty, Fortran order, strided views), names and repeated contents."""
    rng = np.random.default_rng(7)
    dtypes = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]
    counted = 0
    for trial in range(200):
        arrays = {}
        for index in range(int(rng.integers(0, 6))):
            dtype = dtypes[int(rng.integers(len(dtypes)))]
            shape = tuple(int(n) for n in rng.integers(0, 4, size=int(rng.integers(0, 3))))
            array = (rng.integers(0, 2, size=shape) * rng.choice([1, -1])).astype(dtype)
            if array.ndim == 2 and rng.random() < 0.3:
                array = np.asfortranarray(array) if rng.random() < 0.5 else array[:, ::2]
            arrays[f"{'é' if index % 2 else 'a'}rray-{index}"] = array
        if arrays and rng.random() < 0.5:  # a name whose array repeats another's
            arrays["copy"] = next(iter(arrays.values())).copy()
        scalars = MetricRecord({"loss": float(rng.random()), "examples": int(rng.integers(-5, 10**6))})
        records = {f"arrays.{trial}": arrays, f"metrics.{trial}": scalars}
        envelope = Envelope.worst_case("train", str(trial), reply=bool(trial % 2))
        assert wire_format._counted_wire_bytes(records, envelope) is not None
        assert message_wire_bytes(records, envelope) == hashed_wire_bytes(records, envelope, monkeypatch), trial
        counted += 1
    assert counted == 200


def test_messages_the_shortcut_cannot_count_are_hashed():
    two_tables = {"arrays.1": {"a": np.ones(3)}, "arrays.2": {"a": np.ones(3)}}
    assert wire_format._counted_wire_bytes(two_tables, Envelope("train")) is None
    large = MESSAGES["a table larger than one chunk"]
    assert wire_format._counted_wire_bytes(large, Envelope("train")) is None


def test_an_unsupported_value_is_named():
    with pytest.raises(TypeError, match="'when'"):
        message_wire_bytes({"settings": ConfigRecord({"when": None})}, Envelope("train"))


def test_a_shared_message_is_split_among_its_devices_and_sums_to_its_bytes():
    from server.wire_bytes import bytes_per_device, message_bytes

    table = {"values": RNG.random(300, dtype=np.float32)}  # the same table for both devices: it travels once
    records = {"settings": ConfigRecord({"server-round": 1}), "arrays.1": table, "arrays.2": table,
               "arrays.3": {"row-ids": np.arange(5, dtype=np.int32)}}
    message = Message(flower_records(records), dst_node_id=9, message_type="train", group_id="1")
    shares = bytes_per_device(message, [1, 2, 3])
    assert sum(shares.values()) == message_bytes(message) == message_wire_bytes(records, envelope_of(message))
    assert shares[1] == pytest.approx(shares[2], abs=8) and shares[1] > shares[3]  # remainders go to the first
    alone = Message(flower_records({"settings": records["settings"], "arrays.1": table}), dst_node_id=9,
                    message_type="train", group_id="1")
    assert bytes_per_device(alone, [1]) == {1: message_bytes(alone)}


def grouped_records():
    """A supernode's message for devices 1-4: one table object shared by two, equal arrays sent apart, equal
    metrics, a device's error, a table of several chunks shared by two, and records of no device."""
    table = {"values": RNG.random(300, dtype=np.float32), "row-counts": np.full(30, 10, dtype=np.uint8)}
    big = np.zeros(wire_format.MAX_CHUNK_BYTES // 4 + 10, dtype=np.float32)  # its second chunk repeats nothing
    return {
        "settings": ConfigRecord({"server-round": 4, "explore": True}),
        "arrays.1": table, "arrays.2": table,
        "metrics.1": MetricRecord({"loss": 0.5, "examples": 3}), "metrics.2": MetricRecord({"loss": 0.5, "examples": 3}),
        "arrays.3": {"row-ids": np.arange(7, dtype=np.int32), "values": np.ones(7, dtype=np.float32), "big": big},
        "arrays.4": {"row-ids": np.arange(7, dtype=np.int32), "big": big, "empty": np.zeros(0, dtype=np.int32)},
        "error.5": ConfigRecord({"reason": "device 5: no training interactions"}),
        "placement": ConfigRecord({"host": "node-a", "pid": 12}),
    }


def test_counted_shares_equal_flowers_objects_split_among_devices():
    from server.wire_bytes import bytes_per_device, owners_of, received_bytes_per_device, reply_records, sent_bytes_per_device

    records = grouped_records()
    users = [1, 2, 3, 4, 5]
    sent = Message(flower_records(records), dst_node_id=2**63 + 5, message_type="train", group_id="4")
    expected = bytes_per_device(sent, users)
    assert wire_format.wire_bytes_per_device(records, envelope_of(sent), owners_of(records), users) == expected
    assert sent_bytes_per_device(sent, records, users) == expected
    assert sum(expected.values()) == message_wire_bytes(records, envelope_of(sent))
    assert expected[1] == pytest.approx(expected[2], abs=8) and expected[5] < expected[1]  # the shared table, halved
    instruction = Message(RecordDict(), dst_node_id=7, message_type="train", group_id="4")
    reply = Message(flower_records(records), reply_to=instruction)
    assert received_bytes_per_device(reply, users) == bytes_per_device(reply, users)
    assert reply_records(reply)["arrays.3"]["row-ids"].tolist() == list(range(7))
    failed = Message(Error(code=3, reason="lost"), reply_to=instruction)
    assert reply_records(failed) is None and received_bytes_per_device(failed, users) == bytes_per_device(failed, users)


def test_what_flower_adds_to_a_reply_per_array_and_per_message():
    """The sizes the README quotes: about 440 bytes per array and about 600 per reply, beyond the payload."""
    envelope = Envelope.worst_case("train", "3", reply=True)

    def overhead(n_arrays: int) -> int:
        arrays = {f"a{i}": np.arange(10 * (i + 1), dtype=np.float32) for i in range(n_arrays)}
        records = {"arrays.17": arrays, "metrics.17": MetricRecord({"loss": 0.5})}
        return message_wire_bytes(records, envelope) - sum(array.nbytes for array in arrays.values())

    per_array = [overhead(n + 1) - overhead(n) for n in range(1, 5)]
    assert all(420 <= added <= 460 for added in per_array), per_array
    assert 550 <= overhead(1) - per_array[0] <= 650
