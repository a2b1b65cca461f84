"""Flower's wire format, re-derived without importing flwr, to count what a message takes on the wire.

Flower 1.42 sends a ``Message`` as a tree of content-addressed objects (Message -> RecordDict ->
ArrayRecord / ConfigRecord / MetricRecord -> Array -> ArrayChunk); each object travels as
``"<Class> <child ids, comma-joined> <body length>\\0<body>"`` and its id is the SHA-256 of those bytes,
so identical objects inside one message travel once. ``message_wire_bytes`` rebuilds every object's
bytes exactly (array bodies are ``np.save`` output, record bodies JSON or protobuf) and sums the
distinct ones. ``tests/test_wire_format.py`` checks it byte for byte against Flower's own ``deflate``
for every record kind the engine sends.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_CHUNK_BYTES = 5_242_880  # Flower's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE: an Array's data is cut into chunks of this size
NUMPY_STYPE = "numpy.ndarray"  # Flower's SType of an Array built from a numpy array
DEFAULT_TTL_SECONDS = 43200.0  # Flower's DEFAULT_TTL: a message's time to live unless the sender sets one
INT64_MAX = 2**63 - 1  # larger ints travel as uint64, smaller ones as zigzag sint64
REPLY_ID_CHARS = 64  # a reply names the message it answers by its SHA-256 id (64 hex characters)

ArrayRecordContent = Mapping[str, np.ndarray]
ScalarRecordContent = Mapping[str, Any]


@dataclass(frozen=True)
class ConfigRecord:
    """Scalars (bool, int, float, str, bytes, or lists of one of them) as a Flower ConfigRecord."""

    values: ScalarRecordContent


@dataclass(frozen=True)
class MetricRecord:
    """Numbers (int, float, or lists of one of them) as a Flower MetricRecord."""

    values: ScalarRecordContent


Record = ArrayRecordContent | ConfigRecord | MetricRecord


@dataclass(frozen=True)
class Envelope:
    """The metadata Flower serialises with a message (its message id excluded: that is the hash).

    Ids are Flower's random unsigned 64-bit integers; protobuf stores them as varints, so an id's size
    (1-10 bytes) depends on its value. ``worst_case`` uses ids of the largest size.
    """

    message_type: str
    group_id: str = ""
    run_id: int = 0
    src_node_id: int = 0
    dst_node_id: int = 0
    src_task_id: int = 0
    dst_task_id: int = 0
    reply_to_message_id: str = ""
    ttl: float = DEFAULT_TTL_SECONDS
    created_at: float = 0.0

    @classmethod
    def worst_case(cls, message_type: str, group_id: str, reply: bool) -> Envelope:
        """An envelope whose ids take the full 10 varint bytes (what the in-process engine counts)."""
        largest = 2**64 - 1
        return cls(
            message_type, group_id, largest, largest, largest, largest, largest,
            "0" * REPLY_ID_CHARS if reply else "", DEFAULT_TTL_SECONDS, 1.0,
        )


ArrayCache = dict[int, tuple[str, dict[str, int]]]  # id(array) -> its Array id and objects (arrays alive while cached)


def message_wire_bytes(records: Mapping[str, Record], envelope: Envelope, cache: ArrayCache | None = None) -> int:
    """Bytes of every distinct object of a message holding ``records`` (a RecordDict by name).

    A plain mapping of arrays is an ArrayRecord; ``ConfigRecord`` and ``MetricRecord`` wrap scalars.
    ``cache`` reuses the objects of an array object already measured (messages sharing one table); the
    caller keeps those arrays alive and unchanged while the cache is in use.
    """
    counted = _counted_wire_bytes(records, envelope)
    if counted is not None:
        return counted
    objects: dict[str, int] = {}
    record_ids = {}
    for name, record in records.items():
        record_ids[name] = _record_object(record, objects, cache)
    content_id = _add(objects, "RecordDict", list(dict.fromkeys(record_ids.values())), json.dumps(record_ids).encode())
    _add(objects, "Message", [content_id], _message_body(envelope))
    return sum(objects.values())


def _counted_wire_bytes(records: Mapping[str, Record], envelope: Envelope) -> int | None:
    """``message_wire_bytes`` without hashing: an object's size depends only on its body's length and its
    children's count (ids are 64 hex characters), an array's on its dtype, shape and order, so only which
    objects are identical needs the content: arrays of one signature are compared byte for byte. None where
    that shortcut does not hold (an array of several chunks, two records of one kind); tests hold it to the
    hashing path."""
    if len({type(record) for record in records.values()}) != len(records):
        return None
    total = 0
    for record in records.values():
        if isinstance(record, ConfigRecord | MetricRecord):
            body = _scalar_record_body(record.values, config=isinstance(record, ConfigRecord))
            total += _object_bytes(type(record).__name__, 0, len(body))
            continue
        by_signature: dict[tuple[np.dtype, tuple[int, ...], bool], list[np.ndarray]] = {}
        for array in map(np.asarray, record.values()):
            fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)  # the order np.save writes
            by_signature.setdefault((array.dtype, array.shape, fortran), []).append(array)
        children = 0
        for (dtype, shape, fortran), arrays in by_signature.items():
            size = _array_object_bytes(dtype, shape, fortran)
            if size is None:
                return None
            # Only arrays sharing a signature can be identical; a lone one (a shared table) is never copied.
            distinct = len(arrays) if len(arrays) == 1 else len({a.tobytes(order="F" if fortran else "C") for a in arrays})
            children += distinct
            total += distinct * size
        total += _object_bytes("ArrayRecord", children, _listing_bytes(tuple(record)))
    total += _object_bytes("RecordDict", len(records), _listing_bytes(tuple(records)))
    return total + _object_bytes("Message", 1, len(_message_body(envelope)))


_ID_PLACEHOLDER = "0" * REPLY_ID_CHARS  # an object id as JSON holds it: 64 hex characters, never escaped


@functools.lru_cache(maxsize=65536)
def _listing_bytes(names: tuple[str, ...]) -> int:
    """Bytes of a record's body listing its children by name (``{"<name>": "<64-hex id>", ...}`` as JSON)."""
    return len(json.dumps(dict.fromkeys(names, _ID_PLACEHOLDER)))


def _object_bytes(kind: str, children: int, body_bytes: int) -> int:
    """Bytes of one object: ``"<kind> <children's ids, comma-joined> <body length>\\0"`` and its body."""
    ids = children * REPLY_ID_CHARS + max(children - 1, 0)
    return len(kind) + 1 + ids + 1 + len(str(body_bytes)) + 1 + body_bytes


def _array_object_bytes(dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> int | None:
    """Bytes of the objects of an Array with this signature (its own and its one chunk's); None when its
    ``np.save`` output spans several chunks (identical chunks would travel once)."""
    sizes = _array_sizes(dtype, shape, fortran)
    return None if sizes is None else sum(sizes)


ObjectKey = tuple  # what makes two objects of a message identical (their content), hashable


def wire_bytes_per_device(
    records: Mapping[str, Record], envelope: Envelope, owners: Mapping[str, int], users: Sequence[int]
) -> dict[int, int]:
    """``message_wire_bytes`` of a message carrying several devices' records, split among ``users``: each
    distinct object equally among the devices whose records (``owners``: record name -> device) hold it, the
    remainder bytes to the lowest ids; objects of no device (the envelope, the settings) among all of them.
    The split of ``server.wire_bytes.bytes_per_device`` over Flower's own objects, counted (sizes from
    signatures, identity from content) instead of hashed; ``tests/test_wire_format.py`` holds the two equal."""
    objects: dict[ObjectKey, tuple[int, set[int]]] = {}
    seen: dict[int, tuple[np.ndarray, ObjectKey, list[tuple[ObjectKey, int]]]] = {}
    record_keys: dict[str, ObjectKey] = {}
    for name, record in records.items():
        record_keys[name], parts = _record_parts(record, seen)
        for key, size in parts:
            holders = objects.setdefault(key, (size, set()))[1]
            if name in owners:
                holders.add(owners[name])
    listing = _listing_bytes(tuple(records))
    objects[("RecordDict", tuple(record_keys.items()))] = (
        _object_bytes("RecordDict", len(set(record_keys.values())), listing), set())
    objects[("Message",)] = (_object_bytes("Message", 1, len(_message_body(envelope))), set())
    everyone = sorted(users)
    shares = dict.fromkeys(everyone, 0)
    for size, holders in objects.values():
        group = sorted(holders) or everyone
        for index, user in enumerate(group):
            shares[user] = shares.get(user, 0) + size // len(group) + (1 if index < size % len(group) else 0)
    return shares


def _record_parts(record: Record, seen: dict) -> tuple[ObjectKey, list[tuple[ObjectKey, int]]]:
    """A record's identity and its objects (the record's, its arrays' and their chunks') with their bytes."""
    if isinstance(record, ConfigRecord | MetricRecord):
        kind = type(record).__name__
        body = _scalar_record_body(record.values, config=isinstance(record, ConfigRecord))
        return (kind, body), [((kind, body), _object_bytes(kind, 0, len(body)))]
    parts: list[tuple[ObjectKey, int]] = []
    array_keys = []
    for array in record.values():
        key, own = _array_parts(array, seen)
        array_keys.append(key)
        parts += own
    record_key = ("ArrayRecord", tuple(zip(record, array_keys, strict=True)))
    listing = _listing_bytes(tuple(record))
    return record_key, [*parts, (record_key, _object_bytes("ArrayRecord", len(set(array_keys)), listing))]


def _array_parts(array: np.ndarray, seen: dict) -> tuple[ObjectKey, list[tuple[ObjectKey, int]]]:
    """An array's identity and its objects with their bytes; an array object met before (a table every device
    of the message received) is looked up, not copied again."""
    known = seen.get(id(array))
    if known is not None and known[0] is array:
        return known[1], known[2]
    value = np.asarray(array)
    fortran = bool(value.flags.f_contiguous and not value.flags.c_contiguous)
    sizes = _array_sizes(value.dtype, value.shape, fortran)
    if sizes is not None:
        key: ObjectKey = ("Array", value.dtype.str, value.shape, fortran, value.tobytes(order="F" if fortran else "C"))
        parts = [(("ArrayChunk", key), sizes[0]), (key, sizes[1])]
    else:  # several chunks, which may repeat: Flower's objects, hashed
        hashed: dict[str, int] = {}
        key = ("Array", _array_object(value, hashed))
        parts = [(("hashed", object_id), size) for object_id, size in hashed.items()]
    seen[id(array)] = (array, key, parts)
    return key, parts


@functools.lru_cache(maxsize=4096)
def _array_sizes(dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> tuple[int, int] | None:
    """(chunk bytes, Array object bytes) of an array with this signature, measured once on a stand-in; None
    when its ``np.save`` output spans several chunks."""
    stand_in = np.zeros(shape, dtype=dtype, order="F" if fortran else "C")
    objects: dict[str, int] = {}
    _array_object(stand_in, objects)
    if len(objects) != 2:
        return None
    chunk, whole = objects.values()  # _array_object adds the chunk first
    return chunk, whole


def request_records(user: int, server_round: int, arrays: ArrayRecordContent, settings: ScalarRecordContent) -> dict[str, Record]:
    """What the Flower transport sends one device: the round's settings and the device's arrays."""
    return {"settings": ConfigRecord({"server-round": server_round, **settings}), f"arrays.{user}": arrays}


def reply_records(user: int, arrays: ArrayRecordContent, metrics: ScalarRecordContent) -> dict[str, Record]:
    """What the ClientApp sends back for one device: its arrays and its metrics."""
    return {f"arrays.{user}": arrays, f"metrics.{user}": MetricRecord(metrics)}


def request_wire_bytes(
    message_type: str, server_round: int, user: int, arrays: ArrayRecordContent, settings: ScalarRecordContent,
    cache: ArrayCache | None = None,
) -> int:
    """Wire bytes of the message to one device (a supernode per device), ids at their largest."""
    envelope = Envelope.worst_case(message_type, str(server_round), reply=False)
    return message_wire_bytes(request_records(user, server_round, arrays, settings), envelope, cache)


def reply_wire_bytes(
    message_type: str, server_round: int, user: int, arrays: ArrayRecordContent, metrics: ScalarRecordContent
) -> int:
    """Wire bytes of one device's reply (it names the message it answers), ids at their largest."""
    envelope = Envelope.worst_case(message_type, str(server_round), reply=True)
    return message_wire_bytes(reply_records(user, arrays, metrics), envelope)


def record_wire_bytes(record: Record) -> int:
    """Bytes of one record's distinct objects (the record and everything under it)."""
    objects: dict[str, int] = {}
    _record_object(record, objects)
    return sum(objects.values())


def _record_object(record: Record, objects: dict[str, int], cache: ArrayCache | None = None) -> str:
    """Add ``record``'s objects to ``objects`` (id -> bytes); returns the record's id."""
    if isinstance(record, ConfigRecord):
        return _add(objects, "ConfigRecord", [], _scalar_record_body(record.values, config=True))
    if isinstance(record, MetricRecord):
        return _add(objects, "MetricRecord", [], _scalar_record_body(record.values, config=False))
    array_ids = {name: _cached_array_object(array, objects, cache) for name, array in record.items()}
    return _add(objects, "ArrayRecord", list(dict.fromkeys(array_ids.values())), json.dumps(array_ids).encode())


def _cached_array_object(array: np.ndarray, objects: dict[str, int], cache: ArrayCache | None) -> str:
    if cache is None:
        return _array_object(np.asarray(array), objects)
    if id(array) not in cache:
        own: dict[str, int] = {}
        cache[id(array)] = (_array_object(np.asarray(array), own), own)
    array_id, own = cache[id(array)]
    objects.update(own)
    return array_id


def _array_object(array: np.ndarray, objects: dict[str, int]) -> str:
    """An Array and its chunks: the data is ``np.save`` output cut into ``MAX_CHUNK_BYTES`` pieces."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = memoryview(buffer.getvalue())
    starts = range(0, len(data), MAX_CHUNK_BYTES)
    chunk_ids = [_add(objects, "ArrayChunk", [], data[start : start + MAX_CHUNK_BYTES]) for start in starts]
    unique = list(dict.fromkeys(chunk_ids))
    metadata = {"dtype": str(array.dtype), "shape": list(array.shape), "stype": NUMPY_STYPE,
                "arraychunk_ids": [unique.index(chunk) for chunk in chunk_ids]}
    return _add(objects, "Array", unique, json.dumps(metadata).encode())


def _add(objects: dict[str, int], kind: str, children: list[str], body: bytes | memoryview) -> str:
    """Record one object's bytes under its id (the SHA-256 of header and body); returns the id."""
    content = f"{kind} {','.join(children)} {len(body)}".encode() + b"\x00" + bytes(body)
    object_id = hashlib.sha256(content).hexdigest()
    objects[object_id] = len(content)
    return object_id


@functools.lru_cache(maxsize=64)
def _message_body(envelope: Envelope) -> bytes:
    """``Message{metadata}`` as protobuf, fields in number order, defaults omitted (proto3)."""
    e = envelope
    metadata = b"".join([
        _uint_field(1, e.run_id),
        _uint_field(3, e.src_node_id),
        _uint_field(4, e.dst_node_id),
        _string_field(5, e.reply_to_message_id.encode()),
        _string_field(6, e.group_id.encode()),
        _double_field(7, e.ttl),
        _string_field(8, e.message_type.encode()),
        _double_field(9, e.created_at),
        _uint_field(10, e.src_task_id),
        _uint_field(11, e.dst_task_id),
    ])
    return _length_delimited(1, metadata)


def _scalar_record_body(values: ScalarRecordContent, config: bool) -> bytes:
    """``{Config,Metric}Record{repeated Item{key, value}}`` as protobuf."""
    allowed: tuple[type, ...] = (bool, int, float, str, bytes) if config else (int, float)
    items = [_length_delimited(2, _record_value(key, value, allowed)) for key, value in values.items()]
    entries = [_string_field(1, key.encode()) + item for key, item in zip(values, items, strict=True)]
    return b"".join(_length_delimited(1, entry) for entry in entries)


def _record_value(key: str, value: Any, allowed: tuple[type, ...]) -> bytes:
    """One ``*RecordValue``: a oneof, so even a zero travels. Lists are the ``*_list`` fields (21-26)."""
    for kind in allowed:
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return _scalar(kind, value)
        if isinstance(value, list) and all(isinstance(item, kind) for item in value):
            return _scalar_list(kind, value)
    raise TypeError(f"record value {key!r} = {value!r} is not one of {[kind.__name__ for kind in allowed]} or a list of one")


def _scalar(kind: type, value: Any) -> bytes:
    if kind is float:
        return _tag(1, 1) + struct.pack("<d", value)
    if kind is int:
        return _tag(3, 0) + _varint(value) if value > INT64_MAX else _tag(2, 0) + _varint(_zigzag(value))
    if kind is bool:
        return _tag(4, 0) + _varint(int(value))
    if kind is str:
        return _string_field(5, value.encode(), always=True)
    return _string_field(6, bytes(value), always=True)


def _scalar_list(kind: type, values: list[Any]) -> bytes:
    """A ``*List`` message: numbers packed into field 1, strings and bytes repeated in it."""
    if kind is float:
        field, inner = 21, _packed(b"".join(struct.pack("<d", v) for v in values))
    elif kind is int and any(v > INT64_MAX for v in values):
        field, inner = 23, _packed(b"".join(_varint(v) for v in values))
    elif kind is int:
        field, inner = 22, _packed(b"".join(_varint(_zigzag(v)) for v in values))
    elif kind is bool:
        field, inner = 24, _packed(b"".join(_varint(int(v)) for v in values))
    else:
        field = 25 if kind is str else 26
        inner = b"".join(_string_field(1, v.encode() if kind is str else bytes(v), always=True) for v in values)
    return _length_delimited(field, inner)


def _packed(payload: bytes) -> bytes:
    """A packed repeated field 1 (omitted when empty, as protobuf does)."""
    return _length_delimited(1, payload) if payload else b""


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def _uint_field(field: int, value: int) -> bytes:
    return _tag(field, 0) + _varint(value) if value else b""


def _double_field(field: int, value: float) -> bytes:
    return _tag(field, 1) + struct.pack("<d", value) if value else b""


def _string_field(field: int, value: bytes, always: bool = False) -> bytes:
    return _tag(field, 2) + _varint(len(value)) + value if value or always else b""


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(payload)) + payload
