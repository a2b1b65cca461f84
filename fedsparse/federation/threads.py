"""Torch's intra-op threads while devices train (``fed.torch-threads``), the same rule for both engines.

A device's tensors are a few hundred rows, so extra intra-op threads add synchronisation rather than speed,
and they compete with the simulation's own parallelism (Ray actors, other runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedsparse.config import RunConfig


@contextmanager
def device_threads(config: RunConfig) -> Iterator[int]:
    """Run the block with ``fed.torch-threads`` intra-op threads (0: torch's default) and restore the
    previous count after it; yields the count in use."""
    before = torch.get_num_threads()
    if config.fed.torch_threads:
        torch.set_num_threads(config.fed.torch_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
