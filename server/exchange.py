"""One exchange of messages with the supernodes, polled often enough for small runs."""

from __future__ import annotations

import time

from flwr.app import Message
from flwr.serverapp import Grid

REPLY_POLL_SECONDS = 0.05  # between pulls of replies (Flower's own send_and_receive sleeps 3 s between pulls)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """``Grid.send_and_receive`` with a short poll: push ``messages``, then pull replies until every message is
    answered or ``timeout`` seconds pass (None: no limit). Flower's waits 3 s between pulls, which made
    every exchange of a small run (the supernodes' hello, each round's messages) last seconds longer than its work."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(REPLY_POLL_SECONDS)
    return replies
