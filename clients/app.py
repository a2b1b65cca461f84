"""The ClientApp: each supernode hosts one user's device (or a group of them, ``fed.clients-per-node``).

Every handler decodes the message, calls one core function per hosted user, persists that user's
private state in ``context.state`` and replies with arrays and metrics.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.records import STATE_PREFIX, load_state, reply_content, save_state, to_arrays
from fedsparse.config import RunConfig
from fedsparse.data import Interactions, load_dataset
from fedsparse.device import DeviceData
from fedsparse.faults import DeviceCrash
from fedsparse.grouping import users_of_partition
from fedsparse.protocol import handle_evaluate, handle_nmf, handle_query, handle_train

app = ClientApp()


@lru_cache(maxsize=1)
def _dataset(flat_items: tuple) -> Interactions:
    """The dataset, loaded once per worker process (the device keeps only its own rows of it)."""
    config = RunConfig.from_flat(dict(flat_items))
    return load_dataset(config.data, config.seed)


def _handle(message: Message, context: Context, kind: str) -> Message:
    config = RunConfig.from_flat(context.run_config)
    data = _dataset(tuple(sorted(config.to_flat().items())))
    settings = message.content["settings"]
    server_round = int(settings["server-round"])
    hosted = set(users_of_partition(int(context.node_config["partition-id"]), config.fed.clients_per_node, data.n_users))
    results: dict[int, tuple[dict, dict] | str] = {}
    for key in message.content.array_records:
        user = int(key.removeprefix("arrays."))
        if user not in hosted:
            results[user] = f"user {user} is not hosted on this node"
            continue
        device = DeviceData.from_interactions(data.train, data.validation, data.test, user)
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
            context.state.pop(f"{STATE_PREFIX}{user}", None)
            results[user] = f"{type(exc).__name__}: {exc}"
            continue
        except ValueError as exc:
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


@app.query("nmf")
def nmf(message: Message, context: Context) -> Message:
    """One federated NMF round on the hosted devices."""
    return _handle(message, context, "nmf")


@app.query("rows")
def rows(message: Message, context: Context) -> Message:
    """The item rows each hosted device will train on this round ("rows" downlink)."""
    return _handle(message, context, "rows")


@app.train()
def train(message: Message, context: Context) -> Message:
    """A local training round on the hosted devices."""
    return _handle(message, context, "train")


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Full-ranking evaluation on the hosted devices."""
    return _handle(message, context, "evaluate")
