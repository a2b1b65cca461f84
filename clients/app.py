"""The ClientApp: each supernode hosts one user's device (or a group of them, ``fed.clients-per-node``).

Every handler unpacks the message, serves each hosted user through the core's one handler table
(``fedsparse.federation.dispatch.serve_all``, which the in-process engine uses too; training messages
``fed.device-batch`` at a time with the devices' local steps batched), persists that user's private state in
``context.state`` and replies with arrays and metrics.
"""

from __future__ import annotations

import os
import socket
import sys
from functools import lru_cache

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from clients.records import forget_state, load_state, reply_content, save_state, to_arrays
from clients.secagg_reply import narrow_masked_reply
from fedsparse.config import RunConfig
from fedsparse.data import Interactions, load_run_data
from fedsparse.experiments.deploy import PLACEMENT_ENV
from fedsparse.federation.batched import device_batch_size
from fedsparse.federation.device import DeviceData
from fedsparse.federation.dispatch import DeviceCall, Outcome, serve, serve_all
from fedsparse.federation.grouping import users_of_partition
from fedsparse.federation.messages import EVALUATE, QUERY, START, TRAIN
from fedsparse.federation.secagg_vectors import to_secagg_vectors, weight_bound
from fedsparse.federation.threads import device_threads

app = ClientApp()



@lru_cache(maxsize=1)
def _dataset(flat_items: tuple) -> Interactions:
    """The dataset, loaded once per worker process (the device keeps only its own rows of it)."""
    config = RunConfig.from_flat(dict(flat_items))
    return load_run_data(config)


def _config_and_data(context: Context) -> tuple[RunConfig, Interactions]:
    """The run's config and its dataset (cached per worker process)."""
    config = RunConfig.from_flat(context.run_config)
    return config, _dataset(tuple(sorted(config.to_flat().items())))


def _serve(kind: str, context: Context, config: RunConfig, data: Interactions, user: int, incoming: dict, server_round: int,
           settings: dict) -> Outcome:
    """Serve one hosted user's message through the core's handler table with ``fed.torch-threads`` threads,
    keeping its state in ``context.state`` (dropped when the device crashed); a bug raises out of the ClientApp."""
    call = DeviceCall(config, DeviceData.of(data, user), load_state(context, user), data.n_items, server_round, settings)
    with device_threads(config):
        return _keep_state(context, user, serve(kind, call, incoming))


def _keep_state(context: Context, user: int, outcome: Outcome) -> Outcome:
    """Persist what ``outcome`` says of ``user``'s private state (its new state, or forget a crashed device's)."""
    if outcome.lost_state:
        forget_state(context, user)
    if outcome.reply is not None:
        save_state(context, user, outcome.reply.state)
    return outcome


def _handle(message: Message, context: Context, kind: str) -> Message:
    """Serve every hosted user's message (training and evaluation ones ``fed.device-batch`` at a time, their
    local steps or rankings batched)."""
    config, data = _config_and_data(context)
    settings = dict(message.content["settings"])
    server_round = int(settings["server-round"])
    hosted = set(users_of_partition(int(context.node_config["partition-id"]), config.fed.clients_per_node, data.n_users))
    results: dict[int, tuple[dict, dict] | str] = {}
    calls: dict[int, tuple[DeviceCall, dict]] = {}
    for key in message.content.array_records:
        user = int(key.removeprefix("arrays."))
        if user not in hosted:
            results[user] = f"user {user} is not hosted on this node"
            continue
        call = DeviceCall(config, DeviceData.of(data, user), load_state(context, user), data.n_items, server_round, settings)
        calls[user] = (call, to_arrays(message.content[key]))
    with device_threads(config):
        outcomes = serve_all(kind, list(calls.values()), device_batch_size(config))
    for user, outcome in zip(calls, outcomes, strict=True):
        reply = _keep_state(context, user, outcome).reply
        results[user] = outcome.reason if reply is None else (reply.message.to_arrays(), reply.metrics)
    content = reply_content(results)
    if os.environ.get(PLACEMENT_ENV) == "1":
        content["placement"] = _placement(context)
    return Message(content, reply_to=message)


def _placement(context: Context) -> ConfigRecord:
    """Where this message was served: the supernode's partition, host, process id and, inside a Ray actor
    (Flower's simulation runtime), the Ray node id. Ray is only looked up, never imported: a flower-supernode
    runs its ClientApp without it."""
    ray = sys.modules.get("ray")
    ray_node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    return ConfigRecord({"partition-id": int(context.node_config["partition-id"]), "host": socket.gethostname(),
                         "pid": os.getpid(), "ray-node": ray_node})


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    """Tell the server which partition this node hosts (it addresses devices by node id)."""
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition})}), reply_to=message)


@app.query("nmf")
def start(message: Message, context: Context) -> Message:
    """A round of the NMF start outside SecAgg+ (each hosted device's start vector in the clear)."""
    return _handle(message, context, START)


@app.query("rows")
def rows(message: Message, context: Context) -> Message:
    """The item rows each hosted device will train on this round ("rows" downlink)."""
    return _handle(message, context, QUERY)


@app.train()
def train(message: Message, context: Context) -> Message:
    """A local training round on the hosted devices; under secure aggregation, one stage of Flower's
    SecAgg+ protocol (its mod runs the key exchange and masks what ``_secure_train`` returns; the masked
    vectors leave as ``narrow_masked_reply`` encodes them)."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return narrow_masked_reply(secaggplus_mod(message, context, _secure_train), context)
    return _handle(message, context, TRAIN)


def _secure_train(message: Message, context: Context) -> Message:
    """Train the node's one device on a legacy FitIns and return its SecureUpload as SecAgg+ vectors; in a
    round of the NMF start, its start vector instead. A failed device leaves the SecAgg+ round the only way
    the protocol offers, by raising its failure (its state handled first, as in ``_handle``)."""
    config, data = _config_and_data(context)
    fitins = recorddict_to_fitins(message.content, keep_input=True)
    settings = dict(fitins.config)
    incoming = dict(zip(str(settings.pop("array-keys")).split(","), parameters_to_ndarrays(fitins.parameters), strict=True))
    (user,) = users_of_partition(int(context.node_config["partition-id"]), config.fed.clients_per_node, data.n_users)
    start = bool(settings.pop("secure-start", 0))  # a round of the NMF start: its one vector, scaled by the public bound
    bound = float(settings.pop("secure-bound", 1.0))
    outcome = _serve(START if start else TRAIN, context, config, data, user, incoming, int(settings["server-round"]), settings)
    if outcome.reply is None:
        raise outcome.failure
    if start:
        vectors = [np.asarray(outcome.reply.message.vector, dtype=np.float64) / bound]
        metrics = {}
    else:
        vectors = to_secagg_vectors(outcome.reply.message, weight_bound(config))
        metrics = {key: float(value) for key, value in outcome.reply.metrics.items()}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vectors), 1, metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Full-ranking evaluation on the hosted devices."""
    return _handle(message, context, EVALUATE)
