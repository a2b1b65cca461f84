"""Randomness derived from meaning, not call order.

``rng_for(seed, "negatives", epoch)`` always yields the same stream for the same seed and keys, so a
parallel Flower run and a sequential in-process run draw the same numbers for the same purpose.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _entropy(seed: int, keys: tuple[object, ...]) -> list[int]:
    """Stable 128-bit entropy from the seed and keys (str/int), independent of PYTHONHASHSEED."""
    text = "\x1f".join([str(int(seed))] + [str(k) for k in keys]).encode()
    digest = hashlib.blake2b(text, digest_size=16).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A numpy Generator whose stream depends only on ``seed`` and ``keys``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(seed, keys))))


def torch_generator_for(seed: int, *keys: object) -> torch.Generator:
    """A CPU torch.Generator seeded from ``seed`` and ``keys`` (same derivation as ``rng_for``)."""
    generator = torch.Generator()
    generator.manual_seed(int(rng_for(seed, *keys).integers(0, 2**63 - 1)))
    return generator
