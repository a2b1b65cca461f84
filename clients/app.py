"""The ClientApp: each supernode hosts one user's device (or a group of them, ``fed.clients-per-node``).

Every handler decodes the message, calls one core function per hosted user, persists that user's
private state in ``context.state`` and replies with arrays and metrics.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from clients.records import forget_state, load_state, reply_content, save_state, to_arrays
from fedsparse.config import RunConfig
from fedsparse.data import Interactions, load_run_data
from fedsparse.federation.device import DeviceData
from fedsparse.federation.faults import DEVICE_FAILURES, DeviceCrash
from fedsparse.federation.grouping import users_of_partition
from fedsparse.federation.protocol import handle_evaluate, handle_nmf, handle_query, handle_train
from fedsparse.federation.secagg_vectors import to_secagg_vectors
from fedsparse.federation.secure_start import SECURE_SUM
from fedsparse.federation.wire import SecureUpload

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


def _handle(message: Message, context: Context, kind: str) -> Message:
    config, data = _config_and_data(context)
    settings = message.content["settings"]
    server_round = int(settings["server-round"])
    hosted = set(users_of_partition(int(context.node_config["partition-id"]), config.fed.clients_per_node, data.n_users))
    results: dict[int, tuple[dict, dict] | str] = {}
    for key in message.content.array_records:
        user = int(key.removeprefix("arrays."))
        if user not in hosted:
            results[user] = f"user {user} is not hosted on this node"
            continue
        device = DeviceData.of(data, user)
        incoming = to_arrays(message.content[key])
        state = load_state(context, user)
        try:
            if kind == "nmf":
                reply = handle_nmf(config, state, device, incoming, data.n_items)
            elif kind == "rows":
                reply = handle_query(config, device, data.n_items, server_round)
            elif kind == "train":
                reply = handle_train(config, state, device, incoming, data.n_items, server_round, dict(settings))
            else:
                reply = handle_evaluate(config, state, device, incoming, data.n_items)
        except DeviceCrash as exc:  # the device lost its memory: drop what this node kept for it
            forget_state(context, user)
            results[user] = f"{type(exc).__name__}: {exc}"
            continue
        except DEVICE_FAILURES as exc:  # anything else is a bug: it fails the ClientApp loudly, with its traceback
            results[user] = f"{type(exc).__name__}: {exc}"
            continue
        save_state(context, user, reply.state)
        results[user] = (reply.arrays, reply.metrics)
    return Message(reply_content(results), reply_to=message)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    """Tell the server which partition this node hosts (it addresses devices by node id)."""
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition})}), reply_to=message)


@app.query("rows")
def rows(message: Message, context: Context) -> Message:
    """The item rows each hosted device will train on this round ("rows" downlink)."""
    return _handle(message, context, "rows")


@app.train()
def train(message: Message, context: Context) -> Message:
    """A local training round on the hosted devices; under secure aggregation, one stage of Flower's
    SecAgg+ protocol (its mod runs the key exchange and masks what ``_secure_train`` returns)."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, _secure_train)
    return _handle(message, context, "train")


def _secure_train(message: Message, context: Context) -> Message:
    """Train the node's one device on a legacy FitIns and return its SecureUpload as SecAgg+ vectors; in a
    round of the NMF start, its start vector instead."""
    config, data = _config_and_data(context)
    fitins = recorddict_to_fitins(message.content, keep_input=True)
    settings = dict(fitins.config)
    incoming = dict(zip(str(settings.pop("array-keys")).split(","), parameters_to_ndarrays(fitins.parameters)))
    (user,) = users_of_partition(int(context.node_config["partition-id"]), config.fed.clients_per_node, data.n_users)
    device = DeviceData.of(data, user)
    if settings.pop("secure-start", 0):  # a round of the NMF start: its one vector, scaled by the public bound
        bound = float(settings.pop("secure-bound"))
        reply = handle_nmf(config, load_state(context, user), device, incoming, data.n_items)
        save_state(context, user, reply.state)
        vectors = [np.asarray(reply.arrays[SECURE_SUM], dtype=np.float64) / bound]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vectors), 1, {})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=message)
    try:
        reply = handle_train(config, load_state(context, user), device, incoming, data.n_items, int(settings["server-round"]), settings)
    except DeviceCrash:
        forget_state(context, user)
        raise
    save_state(context, user, reply.state)
    upload = SecureUpload(reply.arrays["secure-values"], reply.arrays["secure-weights"], reply.arrays.get("secure-signal"))
    vectors = to_secagg_vectors(upload, config.privacy.secure_weight_bound)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vectors), 1, {k: float(v) for k, v in reply.metrics.items()})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Full-ranking evaluation on the hosted devices."""
    return _handle(message, context, "evaluate")
