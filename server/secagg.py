"""One secure training round through Flower's SecAgg+ (legacy workflow): the server learns only the sum.

The devices' ``SecureUpload``s become SecAgg+ vectors (``fedsparse.federation.secagg_vectors``); the
workflow runs its four stages (setup, key sharing, masked vectors, unmasking) over the Grid, and a
one-round legacy strategy keeps the mean it reveals. Every byte of every stage is counted per device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedsparse.federation.engine import Reply
from fedsparse.federation.secagg_vectors import (
    SECAGG_CLIPPING_RANGE,
    SECAGG_STAGES,
    from_secagg_mean,
    secagg_ranges,
)
from fedsparse.federation.wire import SecureUpload
from server.exchange import send_and_receive
from server.wire_bytes import message_bytes

WireBytes = tuple[dict[int, int], dict[int, int]]  # per user: bytes its node received, bytes it sent
StageBytes = dict[str, dict[str, float]]  # stage -> {"down": mean wire bytes per device, "up": ...}

NEIGHBOURS = 9  # SecAgg+'s sparse graph: each device shares its keys with 8 others (all of them in a smaller round)
RECONSTRUCTION_THRESHOLD = 5  # shares that must survive to unmask a device: a majority of its neighbourhood


def _value_bytes(value: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(item) for item in value)
    return 8  # an int, float or bool travels as 8 bytes


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: array data, config and metric values (keys and framing not counted)."""
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    total += sum(_value_bytes(value) for record in content.config_records.values() for value in record.values())
    return total + sum(_value_bytes(value) for record in content.metric_records.values() for value in record.values())


class CountingGrid:
    """A Grid that counts the bytes sent to and received from each node: payload (``content_bytes``) and
    wire (``wire_bytes.message_bytes``: every object Flower sends)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.sent_wire: dict[int, int] = {}
        self.received_wire: dict[int, int] = {}
        self.exchanges: list[tuple[int, int]] = []  # per send_and_receive: wire bytes sent to and received from all nodes

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        replies = send_and_receive(self.grid, list(messages), timeout)
        down = up = 0
        for message in messages:
            node, wire = message.metadata.dst_node_id, message_bytes(message)
            self.sent[node] = self.sent.get(node, 0) + content_bytes(message.content)
            self.sent_wire[node] = self.sent_wire.get(node, 0) + wire
            down += wire
        for reply in replies:
            node, wire = reply.metadata.src_node_id, message_bytes(reply)
            self.received_wire[node] = self.received_wire.get(node, 0) + wire
            up += wire
            if not reply.has_error():
                self.received[node] = self.received.get(node, 0) + content_bytes(reply.content)
        self.exchanges.append((down, up))
        return replies

    def stage_bytes(self, devices: int) -> StageBytes:
        """Mean wire bytes per device of each SecAgg+ stage this grid carried (``SECAGG_STAGES``; fewer when the
        protocol halted), over the round's ``devices``."""
        return {stage: {"down": down / max(devices, 1), "up": up / max(devices, 1)}
                for stage, (down, up) in zip(SECAGG_STAGES, self.exchanges, strict=False)}

    def wire_of(self, user_of_node: Mapping[int, int]) -> tuple[dict[int, int], dict[int, int]]:
        """Wire bytes each user's node received and sent (every stage of the protocol)."""
        down = {user: self.sent_wire.get(node, 0) for node, user in user_of_node.items()}
        return down, {user: self.received_wire.get(node, 0) for node, user in user_of_node.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class OneRoundStrategy:
    """The legacy strategy SecAgg+ drives for one round: it hands out prepared FitIns and keeps the revealed mean."""

    def __init__(self, fitins: list[tuple[GridClientProxy, FitIns]]) -> None:
        self.fitins = fitins
        self.mean: list[np.ndarray] | None = None
        self.metrics: dict[int, dict[str, Any]] = {}

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[GridClientProxy, FitIns]]:
        return self.fitins

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        if results:  # every result carries the same aggregate: the unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.metrics = {proxy.node_id: dict(fitres.metrics) for proxy, fitres in results}
        return None, {}


def _run_secaggplus(
    grid: Grid,
    context: Context,
    node_of_user: Mapping[int, int],
    server_round: int,
    messages: Mapping[int, dict[str, np.ndarray]],
    settings: Mapping[str, Any],
    timeout: float | None,
) -> tuple[OneRoundStrategy, dict[int, int], CountingGrid]:
    """One SecAgg+ round of the legacy workflow over the users' nodes: (strategy holding the revealed mean
    and per-node metrics, node -> user, the counting grid)."""
    counting = CountingGrid(grid)
    user_of_node = {node_of_user[user]: user for user in messages if user in node_of_user}
    fitins = []
    for node, user in user_of_node.items():
        arrays = messages[user]
        keys = sorted(arrays)
        config = {"server-round": server_round, "array-keys": ",".join(keys), **settings}
        fitins.append((GridClientProxy(node, counting, context.run_id),
                       FitIns(ndarrays_to_parameters([arrays[k] for k in keys]), config)))
    strategy = OneRoundStrategy(fitins)
    legacy = LegacyContext(context, ServerConfig(num_rounds=1), strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    levels, modulus = secagg_ranges(max(len(user_of_node), 1))  # Flower refuses fewer than 2 itself
    workflow = SecAggPlusWorkflow(
        NEIGHBOURS, RECONSTRUCTION_THRESHOLD, max_weight=1.0, clipping_range=SECAGG_CLIPPING_RANGE,
        quantization_range=levels, modulus_range=modulus, timeout=timeout,
    )
    workflow(counting, legacy)
    return strategy, user_of_node, counting


def _replies_and_bytes(
    messages: Mapping[int, Any], user_of_node: Mapping[int, int], strategy: OneRoundStrategy, counting: CountingGrid
) -> tuple[dict[int, Reply | str], dict[int, int], dict[int, int]]:
    """Per-user reply metrics or failure, and the bytes each user's node received and sent in every stage."""
    replies: dict[int, Reply | str] = {user: "no supernode hosts this user"
                                       for user in messages if user not in user_of_node.values()}
    for node, user in user_of_node.items():
        metrics = strategy.metrics.get(node)
        replies[user] = (Reply({}, metrics) if metrics is not None
                         else f"node {node} left the SecAgg+ round before its vector counted")
    sent = {user: counting.sent.get(node, 0) for node, user in user_of_node.items()}
    received = {user: counting.received.get(node, 0) for node, user in user_of_node.items()}
    return replies, sent, received


def secure_sum_round(
    grid: Grid,
    context: Context,
    node_of_user: Mapping[int, int],
    server_round: int,
    messages: Mapping[int, dict[str, np.ndarray]],
    bound: float,
    length: int,
    timeout: float | None,
) -> tuple[np.ndarray | None, dict[int, Reply | str], dict[int, int], dict[int, int], WireBytes, StageBytes]:
    """One SecAgg+ round of the NMF start: each device's ``secure-sum`` vector divided by the public
    ``bound`` is masked, and the server learns only the sum (None when no usable sum came back). The last
    two elements are the wire bytes (down, up) per user and each stage's mean wire bytes per device."""
    settings = {"secure-start": 1, "secure-bound": float(bound)}
    strategy, user_of_node, counting = _run_secaggplus(grid, context, node_of_user, server_round, messages, settings, timeout)
    replies, sent, received = _replies_and_bytes(messages, user_of_node, strategy, counting)
    total = None
    if strategy.mean is not None and len(strategy.mean) == 1 and np.shape(strategy.mean[0]) == (length,):
        total = np.asarray(strategy.mean[0], dtype=np.float64) * len(strategy.metrics) * bound
    return total, replies, sent, received, counting.wire_of(user_of_node), counting.stage_bytes(len(user_of_node))


def secure_train_round(
    grid: Grid,
    context: Context,
    node_of_user: Mapping[int, int],
    server_round: int,
    messages: Mapping[int, dict[str, np.ndarray]],
    settings: Mapping[str, Any],
    weight_bound: float,
    timeout: float | None,
    with_weights: bool = True,
) -> tuple[SecureUpload | None, dict[int, Reply | str], dict[int, int], dict[int, int], WireBytes, StageBytes]:
    """Run one SecAgg+ training round: (summed upload or None, per-user reply or failure, payload bytes down,
    payload bytes up, wire bytes (down, up), each stage's mean wire bytes per device)."""
    strategy, user_of_node, counting = _run_secaggplus(grid, context, node_of_user, server_round, messages, settings, timeout)
    replies, sent, received = _replies_and_bytes(messages, user_of_node, strategy, counting)
    total = (from_secagg_mean(strategy.mean, len(strategy.metrics), weight_bound, with_weights)
             if strategy.mean is not None else None)
    return total, replies, sent, received, counting.wire_of(user_of_node), counting.stage_bytes(len(user_of_node))
