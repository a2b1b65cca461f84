"""Which user devices a transport node hosts: partition p hosts users [p * g, (p + 1) * g).

With g = 1 (the default) every supernode is one user's device; a larger g shares one supernode's
transport among g devices, each keeping its own state, accounting and upload.
"""

from __future__ import annotations

import math


def users_of_partition(partition: int, clients_per_node: int, n_users: int) -> list[int]:
    """User ids hosted by ``partition``."""
    start = partition * clients_per_node
    return list(range(start, min(start + clients_per_node, n_users)))


def partition_of_user(user: int, clients_per_node: int) -> int:
    """The partition hosting ``user``."""
    return user // clients_per_node


def partitions_needed(n_users: int, clients_per_node: int) -> int:
    """Supernodes a federation of ``n_users`` devices needs."""
    return math.ceil(n_users / clients_per_node)
