"""server.exchange.send_and_receive: every reply collected however the pulls split them, and a timeout returns
what arrived (a lost node must not block the ServerApp)."""

from types import SimpleNamespace

from server.exchange import send_and_receive


class SlowGrid:
    """A Grid whose replies arrive one per pull; ``lost`` message ids are never answered."""

    def __init__(self, lost: frozenset[str] = frozenset()) -> None:
        self.lost = lost
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{index}" for index, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        answerable = sorted(set(message_ids) - self.lost)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=answerable[0]))] if answerable else []


def test_every_reply_is_collected_across_pulls():
    grid = SlowGrid()
    replies = send_and_receive(grid, [object()] * 3, timeout=None)
    assert sorted(reply.metadata.reply_to_message_id for reply in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3


def test_a_timeout_returns_the_replies_that_arrived():
    grid = SlowGrid(lost=frozenset({"m1"}))
    replies = send_and_receive(grid, [object()] * 3, timeout=0.3)
    assert sorted(reply.metadata.reply_to_message_id for reply in replies) == ["m0", "m2"]
