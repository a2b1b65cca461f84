"""Injected device faults: which sampled devices fail in a training round, and how.

The draw depends only on (seed, round, user), so the Flower and in-process engines fail the same
devices, and the server learns of a failure only the way a real server would: no usable reply.
"""

from __future__ import annotations

import time

from fedsparse.config import RunConfig
from fedsparse.federation.wire import PayloadError
from fedsparse.rng import rng_for


class DeviceError(ValueError):
    """A device cannot serve the message it got (no training data, no negative item left, a download
    without the rows it needs): the transport reports that device as failed. Any other exception in a
    device handler is a bug and fails the run with its traceback."""


class InjectedFault(RuntimeError):
    """The device's handler failed ("exception" mode): the transport reports an error, no reply."""


class DeviceCrash(RuntimeError):
    """The device crashed ("crash" mode): no reply, and the transport discards its private state."""


SIMULATED_TIME = "simulated-time"  # training setting the in-process transport adds: devices' latency is simulated

# What a transport turns into a failed device (DeviceCrash, which also drops the device's state, aside).
DEVICE_FAILURES = (PayloadError, DeviceError, InjectedFault)


def device_fails(config: RunConfig, server_round: int, user: int) -> bool:
    """Whether ``user``'s device fails in training round ``server_round`` (probability ``faults.failure-rate``)."""
    rate = config.faults.failure_rate
    return rate > 0 and bool(rng_for(config.seed, "fault", server_round, user).random() < rate)


def straggler_delay(config: RunConfig, server_round: int, user: int) -> float:
    """Seconds ``user``'s device answers late in training round ``server_round``: ``faults.straggler-seconds``
    for a device drawn to fail in "timeout" mode, else 0."""
    late = config.faults.failure_mode == "timeout" and device_fails(config, server_round, user)
    return config.faults.straggler_seconds if late else 0.0


def inject_fault(config: RunConfig, server_round: int, user: int, simulated_time: bool = False) -> None:
    """Act out this device's fault for the round, if it has one: raise, or (timeout mode) answer late.

    With ``simulated_time`` (the in-process engine) a late device does not sleep: the transport compares
    its ``straggler_delay`` with the round timeout, so a seeded run drops the same devices however loaded
    the machine is."""
    if not device_fails(config, server_round, user):
        return
    mode = config.faults.failure_mode
    reason = f"injected {mode} of device {user} in round {server_round}"
    if mode == "exception":
        raise InjectedFault(reason)
    if mode == "crash":
        raise DeviceCrash(reason)
    if not simulated_time:
        time.sleep(straggler_delay(config, server_round, user))
