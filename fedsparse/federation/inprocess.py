"""The in-process engine: the federated loop with devices called directly, no Flower or Ray.

For fast sweeps and for federations too large for one Ray actor call per device. Devices' private
state lives in a dict keyed by user id (the counterpart of Flower's ``context.state``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedsparse.config import RunConfig
from fedsparse.data import Interactions, load_run_data
from fedsparse.federation.batched import device_batch_size
from fedsparse.federation.device import DeviceData
from fedsparse.federation.device_states import pack_states, unpack_states
from fedsparse.federation.dispatch import DeviceCall, Outcome, serve_all
from fedsparse.federation.engine import Arrays, Population, Reply, UploadObserver, check_population, run_federation
from fedsparse.federation.faults import SIMULATED_TIME, straggler_delay
from fedsparse.federation.messages import TRAIN
from fedsparse.federation.threads import device_threads
from fedsparse.federation.unseen import split_unseen
from fedsparse.run_files import new_run_dir

log = logging.getLogger("fedsparse")


def population_of(data: Interactions, config: RunConfig) -> Population:
    """Every user with at least one training interaction is a device; ``fed.unseen-users`` of them are held
    out of training (``unseen.split_unseen``), and the counts the server is handed (interactions, item
    popularity) are those of the devices that train. ConfigError when no device is left to train."""
    devices = np.flatnonzero(np.diff(data.train.indptr) > 0).astype(np.int64)
    users, unseen = split_unseen(config, devices)
    train = data.train if unseen.size == 0 else data.train[users]
    popularity = np.bincount(train.indices, minlength=data.n_items).astype(np.float64)
    return Population(users, data.n_users, data.n_items, int(train.nnz), popularity, unseen)


class InProcessTransport:
    """Delivers messages through the device handlers' table (``dispatch.serve``, as the ClientApp does).

    Devices run one after another here, or ``fed.device-batch`` of a training round's devices at a time with
    their local steps batched (``dispatch.serve_all``; one at a time, said once in the log, for what
    ``batched.batching_unsupported`` names). Their time is simulated, not measured: an honest device
    answers at once, a straggler (``faults.failure-mode = timeout``) after ``faults.straggler-seconds``.
    ``fed.round-timeout`` drops a reply later than that (its private state still advances, as on a real
    device that finished after the server stopped waiting), so a seeded run drops the same devices on a
    loaded machine as on an idle one."""

    def __init__(self, config: RunConfig, data: Interactions) -> None:
        self.config = config
        self.data = data
        self.states: dict[int, dict[str, np.ndarray]] = {}
        self.device_batch = device_batch_size(config)  # training messages served together

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every device's private state, packed a few arrays per key (``device_states.pack_states``), for the
        engine's checkpoint."""
        return pack_states(self.states)

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what ``state_arrays`` returned (ValueError naming a damaged key)."""
        self.states = unpack_states(arrays)

    def device_data(self, user: int) -> DeviceData:
        """The user's partition of the interactions (with its candidate-file negatives, if any)."""
        return DeviceData.of(self.data, user)

    def send(
        self, kind: str, server_round: int, messages: Mapping[int, Arrays], settings: Mapping[str, Any]
    ) -> dict[int, Reply | str]:
        replies: dict[int, Reply | str] = {}
        timeout = self.config.fed.round_timeout if kind == TRAIN else 0.0
        if kind == TRAIN:
            settings = {**settings, SIMULATED_TIME: True}
        calls = [(DeviceCall(self.config, self.device_data(user), self.states.get(user, {}), self.data.n_items,
                             server_round, settings), message) for user, message in messages.items()]
        for user, outcome in zip(messages, serve_all(kind, calls, self.device_batch), strict=True):
            replies[user] = self._receive(user, server_round, outcome, timeout)
        return replies

    def _receive(self, user: int, server_round: int, outcome: Outcome, timeout: float) -> Reply | str:
        """Keep what the device's outcome says of its private state; its reply, or why none arrived in time."""
        if outcome.lost_state:
            self.states.pop(user, None)
        if outcome.reply is None:
            return outcome.reason
        if outcome.reply.state:
            self.states[user] = outcome.reply.state
        if timeout and straggler_delay(self.config, server_round, user) > timeout:
            return f"device {user} did not reply within {timeout:g} s"
        return Reply(outcome.reply.message.to_arrays(), outcome.reply.metrics)


def run_inprocess(
    config: RunConfig,
    data: Interactions | None = None,
    resume_dir: Path | None = None,
    observer: UploadObserver | None = None,
    show_progress: bool | None = False,
) -> tuple[Path, dict[str, Any]]:
    """Run a federation in this process (or resume the one in ``resume_dir``, default ``config.resume_dir``);
    returns (run dir, summary).

    ``observer`` records what the server sees of every accepted upload (the privacy study's attacker).
    ``show_progress``: a bar over rounds (None = only on a terminal, so CI logs stay quiet)."""
    data = data if data is not None else load_run_data(config)
    population = population_of(data, config)
    check_population(config, population)
    resume_dir = resume_dir or (Path(config.resume_dir) if config.resume_dir else None)
    run_dir = resume_dir or new_run_dir(config.results_dir, f"fed-{data.name}-{config.sparse.policy}")
    transport = InProcessTransport(config, data)
    disable = None if show_progress is None else not show_progress
    with (device_threads(config) as threads,
          tqdm(total=config.num_server_rounds, desc=f"rounds {data.name}", unit="round", disable=disable) as progress):
        def advance(record: dict[str, Any]) -> None:
            progress.n = record["round"]
            progress.set_postfix({"recall@20": f"{record['recall@20']:.4f}"} if "recall@20" in record else {})

        summary = run_federation(
            config, population, transport, run_dir, data.train, resume=resume_dir is not None, observer=observer,
            metadata={"engine": "inprocess", "torch_threads": threads, "dataset": data.counts(),
                      "dataset_checksum": data.checksum()}, on_round=advance,
        )
    return run_dir, summary
