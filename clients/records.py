"""Translation between Flower records and the plain arrays/dicts of the core."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

STATE_PREFIX = "device."


def to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a dict of numpy arrays."""
    return {key: value.numpy() for key, value in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A dict of numpy arrays as an ArrayRecord."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def load_state(context: Context, user: int) -> dict[str, np.ndarray]:
    """The private state of ``user``'s device from ``context.state`` (empty on first contact)."""
    key = f"{STATE_PREFIX}{user}"
    return to_arrays(context.state[key]) if key in context.state else {}


def save_state(context: Context, user: int, state: dict[str, np.ndarray]) -> None:
    """Persist ``user``'s private state in ``context.state`` (it never leaves the node)."""
    if state:
        context.state[f"{STATE_PREFIX}{user}"] = to_record(state)


def forget_state(context: Context, user: int) -> None:
    """Drop ``user``'s private state from ``context.state`` (its device crashed and lost its memory)."""
    context.state.pop(f"{STATE_PREFIX}{user}", None)


def reply_content(results: dict[int, tuple[dict, dict] | str]) -> RecordDict:
    """Per-user replies: ``arrays.<u>`` and ``metrics.<u>``, or ``error.<u>`` with the reason."""
    content = RecordDict()
    for user, result in results.items():
        if isinstance(result, str):
            content[f"error.{user}"] = ConfigRecord({"reason": result})
            continue
        arrays, metrics = result
        content[f"arrays.{user}"] = to_record(arrays)
        content[f"metrics.{user}"] = MetricRecord({key: float(value) for key, value in metrics.items()})
    return content
