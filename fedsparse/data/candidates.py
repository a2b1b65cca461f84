"""Fixed evaluation candidates: each user's validation and test item and the negatives each is ranked among.

The peer protocol of PFedRec, FedMF, FedNCF and FedRecon papers is leave-one-out with 99 sampled
negatives. To compare numbers with a peer, or with another fedsparse run, both must rank the same item
among the same negatives. A candidate file fixes both; ``eval.candidates`` makes a run use one.

The file is a CSV with the header ``user,val_item,test_item,val_negatives,test_negatives`` and one row
per user of the dataset, in the dataset's ORIGINAL ids (as in the raw file, e.g. ml-100k ``u.data``).
Each negatives field holds ``eval.sampled-negatives`` space-separated item ids::

    user,val_item,test_item,val_negatives,test_negatives
    1,117,272,4 8 15 ...,16 23 42 ...

``write_candidates`` builds such a file with PFedRec's rules (latest interaction = test, second-latest =
validation, ``data.loo-ties`` between equal timestamps; 2 x N distinct never-interacted negatives per
user, the first N for validation and the last N for test, so the two sets are disjoint), seeded by
``rng_for(seed, "eval-candidates", user)``. For a dataset without timestamps, ``holdout = "random"``
holds out a seeded uniformly random validation and test item per user instead (random leave-one-out,
``rng_for(seed, "eval-holdout", user)``); the negatives are drawn the same way. ``read_candidates``
checks a file against a dataset and names the file and line of the first problem; ``apply_candidates``
re-splits the dataset by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fedsparse.config import HOLDOUTS, ConfigError, DataConfig
from fedsparse.data.errors import DataFormatError
from fedsparse.data.interactions import Interactions, binary_csr
from fedsparse.data.splits import TEST, VALIDATION, leave_one_out_split
from fedsparse.data.transforms import remap_ids
from fedsparse.rng import rng_for
from fedsparse.run_files import atomic_write_text

HEADER = ("user", "val_item", "test_item", "val_negatives", "test_negatives")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_UNSAFE = re.compile(r"[,\s]")  # an id holding one of these cannot be written to the CSV


@dataclass(frozen=True)
class Candidates:
    """Per user, remapped ids (row u = user u): ``validation_items``, ``test_items`` int64 [n_users];
    ``validation_negatives``, ``test_negatives`` int64 [n_users, n_negatives]."""

    validation_items: np.ndarray
    test_items: np.ndarray
    validation_negatives: np.ndarray
    test_negatives: np.ndarray


class _Ids:
    """Original id (as written in a file) -> remapped index, for ids read as int64 or as strings."""

    def __init__(self, originals: np.ndarray) -> None:
        self.integer = np.issubdtype(np.asarray(originals).dtype, np.integer)
        keys = [int(v) for v in originals] if self.integer else [str(v) for v in originals]
        self.index = {key: position for position, key in enumerate(keys)}

    def get(self, token: str) -> int | None:
        """The remapped index of ``token``, or None when the dataset has no such id."""
        if self.integer:
            if _INTEGER.fullmatch(token) is None:
                return None
            return self.index.get(int(token))
        return self.index.get(token)


def read_candidates(path: str | Path, data: Interactions, n_negatives: int) -> Candidates:
    """Read and check a candidate file against ``data`` (whose ``user_ids``/``item_ids`` give the mapping
    from original to remapped ids).

    Every user of ``data`` must have exactly one row. Per row: known user and items; validation item
    different from the test item, both interactions of the user, and at least one other interaction
    left to train on; exactly ``n_negatives`` distinct negatives per field, none an interaction of the
    user (train, validation or test), and no item in both fields.

    Raises
    ------
    DataFormatError naming ``path`` and the 1-based line of the first problem (a missing user: the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark from a spreadsheet is not part of the header
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError.at(path, None, f"cannot read the candidate file: {exc}") from exc
    lines = text.splitlines()
    header = tuple(field.strip() for field in lines[0].split(",")) if lines else ()
    if header != HEADER:
        raise DataFormatError.at(path, 1, f"expected the header {','.join(HEADER)!r}, found {lines[0] if lines else ''!r}")
    users, items = _Ids(data.user_ids), _Ids(data.item_ids)
    interacted = (data.train + data.validation + data.test).tocsr()
    interacted.sort_indices()
    shape = (data.n_users, n_negatives)
    validation_items = np.full(data.n_users, -1, dtype=np.int64)
    test_items = np.full(data.n_users, -1, dtype=np.int64)
    validation_negatives = np.empty(shape, dtype=np.int64)
    test_negatives = np.empty(shape, dtype=np.int64)
    line_of: dict[int, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue

        fail = partial(DataFormatError.at, path, number)
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(HEADER):
            raise fail(f"expected {len(HEADER)} comma-separated fields ({','.join(HEADER)}), found {len(fields)}")
        user_token, validation_token, test_token, validation_field, test_field = fields
        user = users.get(user_token)
        if user is None:
            raise fail(f"unknown user {user_token!r}: not a user of {data.name}")
        if user in line_of:
            raise fail(f"user {user_token!r} already has a row (line {line_of[user]})")
        line_of[user] = number
        positives = interacted.indices[interacted.indptr[user] : interacted.indptr[user + 1]]
        held_out = []
        for column, token in (("val_item", validation_token), ("test_item", test_token)):
            item = items.get(token)
            if item is None:
                raise fail(f"{column}: unknown item {token!r}: not an item of {data.name}")
            if not _member(positives, item):
                raise fail(f"{column} {token!r} is not an interaction of user {user_token!r}: a held-out item must be a positive")
            held_out.append(item)
        if held_out[0] == held_out[1]:
            raise fail(f"val_item and test_item are the same item {validation_token!r}")
        if positives.size < 3:
            raise fail(f"user {user_token!r} has {positives.size} interactions: none would be left to train on")
        validation_items[user], test_items[user] = held_out
        for column, field, out in (("val_negatives", validation_field, validation_negatives),
                                   ("test_negatives", test_field, test_negatives)):
            tokens = field.split()
            if len(tokens) != n_negatives:
                raise fail(f"{column} holds {len(tokens)} items, expected eval.sampled-negatives = {n_negatives}")
            row = np.empty(n_negatives, dtype=np.int64)
            for position, token in enumerate(tokens):
                item = items.get(token)
                if item is None:
                    raise fail(f"{column}: unknown item {token!r}: not an item of {data.name}")
                row[position] = item
            unique, counts = np.unique(row, return_counts=True)
            if unique.size != n_negatives:
                raise fail(f"{column} repeats item {_plain(data.item_ids[unique[counts > 1][0]])!r}")
            positive = np.flatnonzero(np.isin(row, positives))
            if positive.size:
                raise fail(f"{column} holds item {tokens[positive[0]]!r}, an interaction of user {user_token!r} "
                           "(negatives must be never-interacted items)")
            out[user] = row
        shared = np.intersect1d(validation_negatives[user], test_negatives[user])
        if shared.size:
            raise fail(f"item {_plain(data.item_ids[shared[0]])!r} is in both val_negatives and test_negatives "
                       "(they must be disjoint)")
    missing = np.flatnonzero(validation_items < 0)
    if missing.size:
        raise DataFormatError.at(
            path, None, f"{missing.size} of the {data.n_users} users of {data.name} have no row; "
            f"first: user {_plain(data.user_ids[missing[0]])!r}"
        )
    return Candidates(validation_items, test_items, validation_negatives, test_negatives)


def apply_candidates(data: Interactions, candidates: Candidates) -> Interactions:
    """``data`` re-split by the candidate file: per user its validation and test item held out, every other
    interaction in train, and the file's negatives attached (``validation_negatives``, ``test_negatives``)."""
    everything = (data.train + data.validation + data.test).tocoo()
    users, items = everything.row.astype(np.int64), everything.col.astype(np.int64)
    held_out = (items == candidates.validation_items[users]) | (items == candidates.test_items[users])
    shape = (data.n_users, data.n_items)
    every_user = np.arange(data.n_users, dtype=np.int64)
    return Interactions(
        name=data.name,
        train=binary_csr(users[~held_out], items[~held_out], *shape),
        validation=binary_csr(every_user, candidates.validation_items, *shape),
        test=binary_csr(every_user, candidates.test_items, *shape),
        user_ids=data.user_ids,
        item_ids=data.item_ids,
        repairs=data.repairs,
        validation_negatives=candidates.validation_negatives,
        test_negatives=candidates.test_negatives,
    )


def make_candidates(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray | None,
    n_users: int,
    n_items: int,
    ties: str,
    n_negatives: int,
    seed: int,
    user_keys: np.ndarray | None = None,
    holdout: str = "latest",
) -> Candidates:
    """Leave-one-out candidates from interaction rows (remapped ids, file order).

    ``holdout = "latest"`` (PFedRec's rule): latest row = test, second-latest = validation, equal timestamps
    by ``ties`` (``data.loo-ties``). ``holdout = "random"`` (random leave-one-out, for data without
    timestamps; ``timestamps`` and ``ties`` are not read): two distinct items of the user drawn uniformly
    from ``rng_for(seed, "eval-holdout", key)``, the first for validation, the second for test. Per user,
    2 * ``n_negatives`` distinct items the user never interacted with, drawn from
    ``rng_for(seed, "eval-candidates", key)`` (``key`` = ``user_keys[u]``, the original id, so a user's
    draws do not depend on the other users): the first half for validation, the second for test, each
    sorted.

    Raises
    ------
    ValueError naming the first user with fewer than 3 interactions or too few never-interacted items, or
    an unknown ``holdout`` / missing timestamps for ``latest``.
    """
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout must be one of {HOLDOUTS}, got {holdout!r}")
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    per_user = np.bincount(users, minlength=n_users)
    short = np.flatnonzero(per_user < 3)
    if short.size:
        key = _plain(short[0] if user_keys is None else user_keys[short[0]])
        raise ValueError(
            f"{short.size} users have fewer than 3 interactions (first: user {key!r} with {per_user[short[0]]}); "
            "leave-one-out needs a validation, a test and a training item per user (try data.k-core 3)"
        )
    interacted = binary_csr(users, items, n_users, n_items)
    validation_items = np.empty(n_users, dtype=np.int64)
    test_items = np.empty(n_users, dtype=np.int64)
    if holdout == "latest":
        if timestamps is None:
            raise ValueError("holdout 'latest' needs timestamps")
        labels = leave_one_out_split(users, np.asarray(timestamps), True, ties, items)
        validation_items[users[labels == VALIDATION]] = items[labels == VALIDATION]
        test_items[users[labels == TEST]] = items[labels == TEST]
    validation_negatives = np.empty((n_users, n_negatives), dtype=np.int64)
    test_negatives = np.empty((n_users, n_negatives), dtype=np.int64)
    for user in range(n_users):
        seen = interacted.indices[interacted.indptr[user] : interacted.indptr[user + 1]]
        key = _plain(user if user_keys is None else user_keys[user])
        if holdout == "random":  # drawn from the sorted item set: the draw does not depend on row order
            validation_items[user], test_items[user] = rng_for(seed, "eval-holdout", key).choice(seen, size=2, replace=False)
        drawn = _never_interacted(rng_for(seed, "eval-candidates", key), seen, n_items, 2 * n_negatives, key)
        validation_negatives[user] = np.sort(drawn[:n_negatives])
        test_negatives[user] = np.sort(drawn[n_negatives:])
    return Candidates(validation_items, test_items, validation_negatives, test_negatives)


def _never_interacted(rng: np.random.Generator, seen: np.ndarray, n_items: int, count: int, key: object) -> np.ndarray:
    """``count`` distinct items outside the sorted ``seen``, uniformly, in draw order: int64 [count]."""
    if n_items - seen.size < count:
        raise ValueError(f"user {key!r} has only {n_items - seen.size} never-interacted items, {count} negatives needed")
    pool = np.setdiff1d(np.arange(n_items, dtype=np.int64), seen, assume_unique=True)
    return rng.choice(pool, size=count, replace=False)


def write_candidates(
    config: DataConfig, out: str | Path, seed: int, ties: str, n_negatives: int, holdout: str = "latest"
) -> tuple[Path, int]:
    """Write the candidate file of dataset ``config`` (read as a run with ``eval.candidates`` reads it,
    ``load_candidate_table``) to ``out``, atomically. Returns (the file, the number of users).

    ``holdout``: ``latest`` (by timestamp, ``ties`` between equal ones) or ``random`` (seeded random
    leave-one-out, see ``make_candidates``).

    Raises
    ------
    ConfigError for ``latest`` on a dataset without timestamps (the message suggests ``random``) or ids
    that cannot be written to a CSV field; ValueError for users with too few interactions (see
    ``make_candidates``).
    """
    from fedsparse.data.load import load_candidate_table

    if holdout not in HOLDOUTS:
        raise ConfigError(f"--holdout must be one of {HOLDOUTS}, got {holdout!r}")
    table, source = load_candidate_table(config)
    if holdout == "latest" and "timestamp" not in table:
        raise ConfigError(
            f"{source} has no timestamps, so --holdout latest (the latest interaction as the test item) cannot split "
            "it; use --holdout random for a seeded random leave-one-out (easier than time-based, its figures are "
            "not comparable with time-based ones)")
    ids = remap_ids(table)
    for name, originals in (("user", ids.user_ids), ("item", ids.item_ids)):
        unsafe = [value for value in originals if _UNSAFE.search(str(value))]
        if unsafe:
            raise ConfigError(f"{source}: {name} id {_plain(unsafe[0])!r} holds a comma or a space "
                              "and cannot be written to a candidate file")
    timestamps = table["timestamp"].to_numpy() if holdout == "latest" else None
    candidates = make_candidates(
        ids.users, ids.items, timestamps, len(ids.user_ids), len(ids.item_ids), ties, n_negatives, seed,
        ids.user_ids, holdout,
    )
    item = ids.item_ids

    def joined(row: np.ndarray) -> str:
        return " ".join(str(value) for value in item[row])

    rows = [",".join(HEADER)]
    for user, original in enumerate(ids.user_ids):
        rows.append(f"{original},{item[candidates.validation_items[user]]},{item[candidates.test_items[user]]},"
                    f"{joined(candidates.validation_negatives[user])},{joined(candidates.test_negatives[user])}")
    out = Path(out)
    atomic_write_text(out, "\n".join(rows) + "\n")
    return out, len(ids.user_ids)


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds (``5``, not ``np.int64(5)``), for messages and seeds."""
    return value.item() if isinstance(value, np.generic) else value


def _member(sorted_items: np.ndarray, item: int) -> bool:
    position = np.searchsorted(sorted_items, item)
    return bool(position < sorted_items.size and sorted_items[position] == item)


__all__ = ["HEADER", "Candidates", "read_candidates", "apply_candidates", "make_candidates", "write_candidates"]
