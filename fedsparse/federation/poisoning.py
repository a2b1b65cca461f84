"""Item-promotion poisoning by malicious devices, and the exposure it buys (``poison.*``).

A malicious device (a seeded ``poison.fraction`` of all devices) adds the target item to its training
positives every round (fake interactions; this also puts the target row in its "rows" download
request) and multiplies the target row's uploaded delta by ``poison.boost`` (explicit boosting, as in
model-replacement attacks). Exposure ER@10 is the share of benign users, among those who never
interacted with the target, whose top 10 (training items excluded) contains it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.federation.device import DeviceData
from fedsparse.federation.wire import RowUpdate
from fedsparse.rng import rng_for

EXPOSURE_K = 10  # the cut-off of ER@K, as in the item-promotion literature (PipAttack, FedRecAttack)


def is_malicious(config: RunConfig, user: int) -> bool:
    """Whether ``user``'s device is controlled by the attacker (never, without a target item)."""
    settings = config.poison
    if settings.target_item < 0 or settings.fraction <= 0:
        return False
    return bool(rng_for(config.seed, "malicious", user).random() < settings.fraction)


def poisoned_view(config: RunConfig, data: DeviceData) -> DeviceData:
    """The training data a malicious device uses: its own positives plus the target item (unchanged
    for a benign device)."""
    if not is_malicious(config, data.user_id):
        return data
    target = np.asarray([config.poison.target_item], dtype=np.int64)
    return replace(data, train=np.union1d(data.train, target), interacted=np.union1d(data.interacted, target))


def boost_target(config: RunConfig, user: int, update: RowUpdate, row_masks: np.ndarray) -> RowUpdate:
    """A malicious device's upload with the target row's delta multiplied by ``poison.boost``.

    ``row_masks`` bool [r, dim] are the masks of ``update.row_ids`` (the values' layout)."""
    target = config.poison.target_item
    if not is_malicious(config, user) or target not in update.row_ids:
        return update
    index = int(np.searchsorted(update.row_ids, target))
    counts = row_masks.sum(axis=1)
    start = int(counts[:index].sum())
    values = update.values.copy()
    values[start : start + int(counts[index])] *= config.poison.boost
    return replace(update, values=values)


def target_exposed(config: RunConfig, data: DeviceData, scores: np.ndarray) -> float | None:
    """1.0 when the target is in this benign user's top ``EXPOSURE_K`` (training items excluded), 0.0 when
    not; None for users who interacted with the target or are malicious (they do not count in ER)."""
    target = config.poison.target_item
    if target < 0 or target in data.interacted or is_malicious(config, data.user_id):
        return None
    scores = scores.astype(np.float64).copy()
    scores[data.train] = -np.inf
    return float(np.count_nonzero(scores > scores[target]) < EXPOSURE_K)
