"""What a Flower message takes on the wire, per device: the bytes of every distinct object of its tree.

Flower 1.42 sends a ``Message`` as content-addressed objects (``get_all_nested_objects``: Message,
RecordDict, records, Arrays, chunks); an object appearing twice in one message travels once. A message
to a supernode hosting several devices is shared: each object is split equally among the devices whose
records hold it (``arrays.<user>``, ``metrics.<user>``, ``error.<user>``), and objects of no device (the
envelope, the settings) among all of them. The shares sum to the message's bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

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
