"""Many devices' private states as a few arrays per state key, for the in-process engine's checkpoint.

A state is a dict of 1-D arrays (user row, mask, optimiser moments, step count, ...). One archive entry per
device and key would make a checkpoint of a million devices five million zip entries; packed, a key is
three arrays whatever the population: ``<key>.users`` int64 [n] (the devices holding it, ascending),
``<key>.values`` (their arrays concatenated) and ``<key>.sizes`` int64 [n] (each one's length).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

USERS, VALUES, SIZES = "users", "values", "sizes"


def pack_states(states: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{<key>.users, <key>.values, <key>.sizes}`` for every key any state holds. ValueError when a value
    is not 1-D or one key's values differ in dtype across devices."""
    by_key: dict[str, list[tuple[int, np.ndarray]]] = {}
    for user in sorted(states):
        for key, value in states[user].items():
            value = np.asarray(value)
            if value.ndim != 1:
                raise ValueError(f"device state {key!r} of user {user} has shape {value.shape}; only 1-D states are packed")
            by_key.setdefault(key, []).append((user, value))
    packed: dict[str, np.ndarray] = {}
    for key, entries in by_key.items():
        dtypes = {value.dtype for _, value in entries}
        if len(dtypes) != 1:
            raise ValueError(f"device state {key!r} has values of several dtypes ({', '.join(sorted(map(str, dtypes)))})")
        packed[f"{key}.{USERS}"] = np.fromiter((user for user, _ in entries), dtype=np.int64, count=len(entries))
        packed[f"{key}.{SIZES}"] = np.fromiter((value.size for _, value in entries), dtype=np.int64, count=len(entries))
        packed[f"{key}.{VALUES}"] = np.concatenate([value for _, value in entries])
    return packed


def unpack_states(arrays: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """The states ``pack_states`` packed, each value a copy of its own. ValueError naming the key when its
    three arrays are missing, misshapen or disagree (sizes that do not add up to the values, repeated users)."""
    keys = {name.rsplit(".", 1)[0] for name in arrays}
    states: dict[int, dict[str, np.ndarray]] = {}
    for key in sorted(keys):
        parts = {part: arrays.get(f"{key}.{part}") for part in (USERS, VALUES, SIZES)}
        missing = [part for part, value in parts.items() if value is None]
        if missing:
            raise ValueError(f"device state {key!r} lacks {', '.join(f'{key}.{part}' for part in missing)}")
        users, values, sizes = (np.asarray(parts[part]) for part in (USERS, VALUES, SIZES))
        if users.ndim != 1 or sizes.shape != users.shape or values.ndim != 1 or users.dtype.kind not in "iu" \
                or sizes.dtype.kind not in "iu":
            raise ValueError(f"device state {key!r}: users and sizes must be integer arrays of one length and values 1-D")
        if (sizes < 0).any() or int(sizes.sum()) != values.size:
            raise ValueError(f"device state {key!r}: sizes add up to {int(sizes.sum())}, values hold {values.size}")
        if np.unique(users).size != users.size:
            raise ValueError(f"device state {key!r} lists a device more than once")
        for user, value in zip(users.tolist(), np.split(values, np.cumsum(sizes)[:-1]), strict=True):
            states.setdefault(int(user), {})[key] = value.copy()
    return states


__all__ = ["pack_states", "unpack_states"]
