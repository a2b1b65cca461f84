"""What a Flower message takes on the wire, per device: the bytes of every distinct object of its tree.

Flower 1.42 sends a ``Message`` as content-addressed objects (``get_all_nested_objects``: Message,
RecordDict, records, Arrays, chunks); an object appearing twice in one message travels once. A message
to a supernode hosting several devices is shared: each object is split equally among the devices whose
records hold it (``arrays.<user>``, ``metrics.<user>``, ``error.<user>``), and objects of no device (the
envelope, the settings) among all of them. The shares sum to the message's bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.app import ConfigRecord as FlowerConfigRecord
from flwr.app import MetricRecord as FlowerMetricRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

from fedsparse.federation.wire_format import ConfigRecord, Envelope, MetricRecord, Record, wire_bytes_per_device

DEVICE_RECORDS = ("arrays", "metrics", "error")  # record name prefixes "<prefix>.<user>" that belong to one device


def message_bytes(message: Message) -> int:
    """Bytes of every distinct object of ``message``'s tree, as Flower deflates them."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def bytes_per_device(message: Message, users: Iterable[int]) -> dict[int, int]:
    """``message``'s bytes split among the devices ``users`` it carries (see the module docstring)."""
    users = sorted(int(user) for user in users)
    owners: dict[str, set[int]] = {}
    with no_object_id_recompute():  # each object's id hashed once (as Flower does when it pushes a message)
        if message.has_content():
            for name, record in message.content.items():
                prefix, _, user = name.partition(".")
                if prefix in DEVICE_RECORDS and user.lstrip("-").isdigit():
                    for object_id in get_all_nested_objects(record):
                        owners.setdefault(object_id, set()).add(int(user))
        objects = get_all_nested_objects(message)
    shares = dict.fromkeys(users, 0)
    for object_id, obj in objects.items():
        holders = sorted(owners.get(object_id) or users)
        size = len(obj.deflate())
        for index, user in enumerate(holders):
            shares[user] = shares.get(user, 0) + size // len(holders) + (1 if index < size % len(holders) else 0)
    return shares


def envelope_of(message: Message) -> Envelope:
    """The metadata Flower serialises with ``message`` (as sent: its ids, reply id, ttl and creation time)."""
    meta = message.metadata
    return Envelope(meta.message_type, meta.group_id, meta.run_id, meta.src_node_id, meta.dst_node_id,
                    meta.src_task_id, meta.dst_task_id, meta.reply_to_message_id, meta.ttl, meta.created_at)


def owners_of(names: Iterable[str]) -> dict[str, int]:
    """The device of each record name ``<prefix>.<user>`` that belongs to one (``DEVICE_RECORDS``)."""
    owners = {}
    for name in names:
        prefix, _, user = name.partition(".")
        if prefix in DEVICE_RECORDS and user.lstrip("-").isdigit():
            owners[name] = int(user)
    return owners


def sent_bytes_per_device(message: Message, records: Mapping[str, Record], users: Iterable[int]) -> dict[int, int]:
    """``bytes_per_device`` of a message the server built from ``records`` (its content before Flower wrapped it,
    arrays as ``to_record`` gives them), counted from the records (``wire_format.wire_bytes_per_device``)."""
    return wire_bytes_per_device(records, envelope_of(message), owners_of(records), list(users))


def reply_records(message: Message) -> dict[str, Record] | None:
    """A reply's records read back as arrays and scalars (what ``wire_bytes_per_device`` counts), or None when
    it holds anything else (an error, another record type, a value or Array that does not decode: a node's
    code is not trusted)."""
    if not message.has_content():
        return None
    records: dict[str, Record] = {}
    try:
        for name, record in message.content.items():
            if isinstance(record, ArrayRecord):
                records[name] = {key: np.ascontiguousarray(value.numpy()) for key, value in record.items()}
            elif isinstance(record, FlowerMetricRecord):
                records[name] = MetricRecord(dict(record))
            elif isinstance(record, FlowerConfigRecord):
                records[name] = ConfigRecord(dict(record))
            else:
                return None
    except (TypeError, ValueError, EOFError):
        return None
    return records


def received_bytes_per_device(
    message: Message, users: Iterable[int], records: Mapping[str, Record] | None = None
) -> dict[int, int]:
    """``bytes_per_device`` of a reply, counted from ``records`` (``reply_records``, read here when not given);
    a reply that cannot be read so is measured on Flower's objects instead."""
    users = list(users)
    records = records if records is not None else reply_records(message)
    if records is None:
        return bytes_per_device(message, users)
    try:
        return wire_bytes_per_device(records, envelope_of(message), owners_of(records), users)
    except TypeError:  # a scalar the count cannot encode (Flower accepted it)
        return bytes_per_device(message, users)
