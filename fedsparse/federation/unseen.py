"""Devices held out of training and evaluated apart (``fed.unseen-users``), as FedRecon evaluates users it
never trained on (docs/methods.md#fedrecon).

FedRecon's code (google-research/federated, ``reconstruction/movielens/movielens_dataset.py::split_tf_datasets``)
splits MovieLens by user: a seeded shuffle of the users, the first ``int(n * train_fraction)`` train and
the rest only evaluate, each by fitting its user row on its own data against the frozen global item table
with the same reconstruction steps as in training. fedsparse holds out a share of the devices the same way:
a held-out device is never sampled for the start or for training and receives nothing before its first
evaluation; at every evaluation it fits a fresh user row from its training interactions against the
received table (``fed.unseen-steps``, by default ``fed.user-steps``, FedRecon's reconstruction), is scored
on its validation and test items, and keeps nothing. Under a stored-user-row method (``fed.user-state =
keep``) the device has no row of its own either, so it is fitted the same way.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsparse.config import ConfigError, RunConfig
from fedsparse.rng import rng_for

UNSEEN = "unseen"  # the evaluate setting that tells a device it was held out of training: fit a fresh row, keep nothing


def split_unseen(config: RunConfig, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seen, unseen): sorted int64 ids of ``users`` that train, and of those held out (``fed.unseen-users``).

    As FedRecon's ``split_tf_datasets``: a seeded shuffle (``rng_for(seed, "unseen-users")``), the first
    ``int(n * (1 - share))`` train and the rest (at least one when the share is > 0) are held out. The draw
    depends on the seed and the device ids only, so both engines and a resumed run hold out the same devices.

    Raises
    ------
    ConfigError when the share leaves no device to train.
    """
    users = np.sort(np.asarray(users, dtype=np.int64))
    share = config.fed.unseen_users
    if share == 0:
        return users, np.zeros(0, dtype=np.int64)
    train = min(int(users.size * (1.0 - share)), users.size - 1)
    if train < 1:
        raise ConfigError(f"fed.unseen-users = {share} holds out all {users.size} devices of this dataset: "
                          "no device is left to train (lower it)")
    order = rng_for(config.seed, "unseen-users").permutation(users.size)
    return np.sort(users[order[:train]]), np.sort(users[order[train:]])


def unseen_steps(config: RunConfig) -> int:
    """Steps that fit an unseen device's user row: ``fed.unseen-steps``, or ``fed.user-steps`` when it is 0."""
    return config.fed.unseen_steps or config.fed.user_steps


def fit_config(config: RunConfig) -> RunConfig:
    """``config`` with ``fed.user-steps`` set to ``unseen_steps``: what ``device.reconstruct_user_row`` fits an
    unseen device's row with (the run's user optimiser and learning rate, items frozen)."""
    return replace(config, fed=replace(config.fed, user_steps=unseen_steps(config)))


__all__ = ["UNSEEN", "fit_config", "split_unseen", "unseen_steps"]
