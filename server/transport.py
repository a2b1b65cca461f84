"""Flower messages as a ``fedsparse.federation.engine.Transport``: one message per node, per-user records inside."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from clients.records import to_arrays, to_record
from fedsparse.federation.engine import Reply
from fedsparse.federation.grouping import partition_of_user
from fedsparse.federation.messages import MESSAGE_TYPES
from fedsparse.federation.wire import SecureUpload
from fedsparse.federation.wire_format import ConfigRecord as CountedConfig
from fedsparse.federation.wire_format import Record
from server.exchange import send_and_receive
from server.secagg import secure_sum_round, secure_train_round
from server.wire_bytes import received_bytes_per_device, reply_records, sent_bytes_per_device

log = logging.getLogger("fedsparse")

# Flower errors that mean the ClientApp's code raised (or could not load): clients/app.py returns every device
# error as an error.<user> record, so these are bugs and stop the run; a lost or crashed node is a failed device.
CODE_ERRORS = (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.LOAD_CLIENT_APP_EXCEPTION)


class FlowerTransport:
    """Sends each kind of message to the nodes hosting the addressed users and unpacks the replies."""

    def __init__(
        self, grid: Grid, node_of_partition: dict[int, int], clients_per_node: int, timeout: float | None,
        context: Context | None = None, secure_weight_bound: float = 1.0, placement_log: Path | None = None,
        secure_row_weights: bool = True, stage_log: Path | None = None,
    ) -> None:
        self.grid = grid
        self.node_of_partition = node_of_partition
        self.clients_per_node = clients_per_node
        # Seconds to wait for the replies of any send (NMF, rows, training, evaluation; None = no limit): a
        # lost node must not block the ServerApp outside training rounds either.
        self.timeout = timeout
        self.context = context  # the ServerApp's context, which SecAgg+'s legacy workflow needs
        self.secure_weight_bound = secure_weight_bound
        self.secure_row_weights = secure_row_weights  # whether secure uploads carry row weights (the rule needs them)
        self._wire: tuple[dict[int, int], dict[int, int]] | None = None  # the last exchange's wire bytes per user
        # Replies that say where they were served (clients/app.py, PLACEMENT_ENV) are appended here, one JSON line each.
        self.placement_log = placement_log
        self.stage_log = stage_log  # each SecAgg+ round's wire bytes per stage, one JSON line a round

    def secure_train(
        self, server_round: int, messages: Mapping[int, dict[str, np.ndarray]], settings: Mapping[str, Any]
    ) -> tuple[SecureUpload | None, dict[int, Reply | str], dict[int, int], dict[int, int]]:
        """A training round through Flower's SecAgg+ (one device per supernode): the summed upload (or
        None), each user's reply metrics or failure, and the bytes each device received and sent."""
        nodes = {user: self.node_of_partition.get(partition_of_user(user, 1)) for user in messages}
        node_of_user = {user: node for user, node in nodes.items() if node is not None}
        *result, self._wire, stages = secure_train_round(
            self.grid, self.context, node_of_user, server_round, messages, settings, self.secure_weight_bound, self.timeout,
            self.secure_row_weights,
        )
        self._log_stages("train", server_round, len(node_of_user), stages)
        return result[0], result[1], result[2], result[3]

    def secure_sum(
        self, server_round: int, messages: Mapping[int, dict[str, np.ndarray]], bound: float, length: int
    ) -> tuple[np.ndarray | None, dict[int, Reply | str], dict[int, int], dict[int, int]]:
        """A round of the NMF start through Flower's SecAgg+ (one device per supernode): the summed
        vector float64 [length] (or None), each user's reply or failure, and every byte per device."""
        nodes = {user: self.node_of_partition.get(partition_of_user(user, 1)) for user in messages}
        node_of_user = {user: node for user, node in nodes.items() if node is not None}
        *result, self._wire, stages = secure_sum_round(
            self.grid, self.context, node_of_user, server_round, messages, bound, length, self.timeout
        )
        self._log_stages("start", server_round, len(node_of_user), stages)
        return result[0], result[1], result[2], result[3]

    def _log_stages(self, phase: str, server_round: int, devices: int, stages: Mapping[str, Mapping[str, float]]) -> None:
        """Append a SecAgg+ round's mean wire bytes per device and stage to ``stage_log`` (where the bytes go)."""
        if self.stage_log is not None:
            with self.stage_log.open("a") as handle:
                handle.write(json.dumps({"phase": phase, "round": server_round, "devices": devices, "stages": stages}) + "\n")

    def take_wire(self) -> tuple[dict[int, int], dict[int, int]] | None:
        """Wire bytes (down, up) per user of the last exchange, as Flower serialised its messages; then forgotten."""
        wire, self._wire = self._wire, None
        return wire

    def send(
        self, kind: str, server_round: int, messages: Mapping[int, dict[str, np.ndarray]], settings: Mapping[str, Any]
    ) -> dict[int, Reply | str]:
        by_node: dict[int, RecordDict] = {}
        records_of_node: dict[int, dict[str, Record]] = {}  # the same content, as the wire count reads it
        users_of_node: dict[int, list[int]] = {}
        replies: dict[int, Reply | str] = {}
        for user, arrays in messages.items():
            node = self.node_of_partition.get(partition_of_user(user, self.clients_per_node))
            if node is None:
                replies[user] = "no supernode hosts this user"
                continue
            if node not in by_node:
                by_node[node] = RecordDict({"settings": ConfigRecord({"server-round": server_round, **settings})})
                records_of_node[node] = {"settings": CountedConfig({"server-round": server_round, **settings})}
                users_of_node[node] = []
            contiguous = {key: np.ascontiguousarray(value) for key, value in arrays.items()}  # what to_record holds
            by_node[node][f"arrays.{user}"] = to_record(contiguous)
            records_of_node[node][f"arrays.{user}"] = contiguous
            users_of_node[node].append(user)
        outgoing = {
            node: Message(content, dst_node_id=node, message_type=MESSAGE_TYPES[kind], group_id=str(server_round))
            for node, content in by_node.items()
        }
        answered: set[int] = set()
        incoming = send_and_receive(self.grid, list(outgoing.values()), self.timeout)
        down: dict[int, int] = {}
        up: dict[int, int] = {}
        for node, message in outgoing.items():
            down.update(sent_bytes_per_device(message, records_of_node[node], users_of_node[node]))
        decoded: dict[int, dict[str, Record] | None] = {}  # each reply's records read once, for the count and the replies
        for reply in incoming:
            decoded[reply.metadata.src_node_id] = reply_records(reply)
            up.update(received_bytes_per_device(reply, users_of_node.get(reply.metadata.src_node_id, []),
                                                decoded[reply.metadata.src_node_id]))
        self._wire = (down, up)
        self._log_placement(kind, server_round, incoming, users_of_node)
        for reply in incoming:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                if reply.error.code in CODE_ERRORS:  # device errors come back as error.<user> records, not as this
                    raise RuntimeError(f"the ClientApp on node {node} raised (a bug, not a failed device; its traceback is "
                                       f"in the ClientApp log): {reply.error.reason}")
                for user in users_of_node.get(node, []):
                    replies[user] = f"node {node} error: {reply.error.reason}"
                continue
            for user in users_of_node.get(node, []):
                replies[user] = _decode_reply(reply.content, user, node, decoded.get(node))
        for node, users in users_of_node.items():
            if node not in answered:
                for user in users:
                    replies[user] = f"node {node} did not reply in time"
        return replies

    def _log_placement(self, kind: str, server_round: int, incoming: list[Message], users_of_node: dict[int, list[int]]) -> None:
        """Append where each reply was served (partition, host, pid, Ray node) to ``placement_log``, for replies
        that say (clients/app.py adds the record when PLACEMENT_ENV is set where the ClientApp runs)."""
        if self.placement_log is None:
            return
        lines = []
        for reply in incoming:
            if reply.has_error() or "placement" not in reply.content.config_records:
                continue
            where = reply.content.config_records["placement"]
            node = reply.metadata.src_node_id
            pid, partition = where.get("pid"), where.get("partition-id")
            lines.append(json.dumps({"round": server_round, "kind": kind, "node": node, "users": users_of_node.get(node, []),
                                     "partition": partition if isinstance(partition, int) else -1,
                                     "host": str(where.get("host", "")), "pid": pid if isinstance(pid, int) else -1,
                                     "ray_node": str(where.get("ray-node", ""))}))
        if lines:
            with self.placement_log.open("a") as handle:
                handle.write("\n".join(lines) + "\n")


def _decode_reply(content: RecordDict, user: int, node: int, records: Mapping[str, Record] | None = None) -> Reply | str:
    """One user's arrays and metrics from a node's reply, or why they cannot be read (a missing record,
    a record of the wrong kind, an array that does not decode); the engine then validates the arrays and
    metric values as for any reply. ``records``: the reply already read (``wire_bytes.reply_records``)."""
    try:
        if f"error.{user}" in content:
            return str(content[f"error.{user}"]["reason"])
        if f"arrays.{user}" not in content:
            return f"node {node} sent no record for user {user}"
        arrays, metrics = content[f"arrays.{user}"], content.get(f"metrics.{user}", {})
        if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, (MetricRecord, dict)):
            return (f"user {user}: expected an ArrayRecord and a MetricRecord, "
                    f"got {type(arrays).__name__}, {type(metrics).__name__}")
        decoded = records.get(f"arrays.{user}") if records is not None else None
        return Reply(dict(decoded) if isinstance(decoded, Mapping) else to_arrays(arrays), dict(metrics))
    except (KeyError, TypeError, ValueError, EOFError) as exc:  # a malformed record or Array from the node
        return f"node {node}: the reply of user {user} does not decode: {type(exc).__name__}: {exc}"


def discover_partitions(grid: Grid, expected_nodes: int, wait_seconds: float, poll_seconds: float) -> dict[int, int]:
    """Wait until ``expected_nodes`` supernodes registered, then ask each for its partition id."""
    deadline = time.monotonic() + wait_seconds
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected_nodes and time.monotonic() < deadline:
        time.sleep(poll_seconds)
        nodes = list(grid.get_node_ids())
    if len(nodes) < expected_nodes:
        log.warning("only %d of %d supernodes registered after %.0f s", len(nodes), expected_nodes, wait_seconds)
    hello = [Message(RecordDict(), dst_node_id=node, message_type="query.hello") for node in nodes]
    mapping: dict[int, int] = {}
    for reply in send_and_receive(grid, hello, wait_seconds):  # a node lost after registering must not block
        try:
            if not reply.has_error():
                mapping[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("node %d answered hello with an unreadable record (%s): not used", reply.metadata.src_node_id, exc)
    return mapping
