"""A ``SecureUpload`` as the float vectors Flower's SecAgg+ masks, and the sum recovered from what it reveals.

SecAgg+ reveals the num_examples-weighted mean of the devices' vectors, each clipped to
±``SECAGG_CLIPPING_RANGE`` and quantised. Every device reports num_examples = 1, so the mean is plain
over the n devices whose masked vectors were collected, and divides its arrays by the public weight
bound W (``weight_bound``: a device's weight never exceeds it; 1 unless ``fed.aggregation`` weights by
examples) so that weights land in [0, 1] and weighted deltas in [-|delta|, |delta|]. The server recovers
the sum as mean * n * W.

The ranges are set per round from the cohort size n (``secagg_ranges``): the masks' modulus must exceed the sum
of n quantised vectors, and a modulus of 2**32 lets each masked entry travel as 4 bytes (``narrow_masked``)
where Flower's default sends 8.
"""

from __future__ import annotations

import numpy as np

from fedsparse.config import RunConfig
from fedsparse.federation.wire import SecureUpload

SECAGG_CLIPPING_RANGE = 4.0  # |value| bound of every masked entry (deltas are far smaller)
MAX_QUANTIZATION_RANGE = 2**30  # most quantisation levels over [-C, C] (Flower rounds into int32): a step of 7.5e-9
NARROW_MODULUS = 2**32  # masks' modulus when the cohort leaves enough levels: a masked entry fits a uint32
WIDE_MODULUS = 2**48  # otherwise (int64 on the wire): room for the sum of 2**18 devices at the most levels
SECAGG_STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")  # a SecAgg+ round's exchanges, in order
MIN_NARROW_LEVELS = 2**20  # fewest levels the narrow modulus may leave a device: a step of 7.6e-6 of C = 4
MIN_ROW_WEIGHT = 0.5  # a touched row's summed weight is at least 1 (one example, or 1 per device when uniform)


def weight_bound(config: RunConfig) -> float:
    """The public bound W on a device's weight in a secure round: ``privacy.secure-weight-bound`` under the
    examples-weighted rule, 1 under the others (every device weighs 1), so that a delta keeps its full
    scale against SecAgg+'s quantisation step."""
    return config.privacy.secure_weight_bound if config.fed.aggregation == "weighted" else 1.0


def secagg_ranges(cohort: int) -> tuple[int, int]:
    """(quantisation range, modulus) for a SecAgg+ round of ``cohort`` devices: the narrow modulus with the
    most even number of levels whose sum over the cohort stays below it (an even range maps a zero entry
    exactly, so untouched rows carry no rounding noise), unless that leaves fewer than ``MIN_NARROW_LEVELS``;
    then the wide modulus with the most levels."""
    if cohort < 1:
        raise ValueError(f"a SecAgg+ round needs at least one device, got {cohort}")
    levels = min(MAX_QUANTIZATION_RANGE, (NARROW_MODULUS - 1) // cohort) & ~1
    if levels >= MIN_NARROW_LEVELS:
        return levels, NARROW_MODULUS
    if cohort * MAX_QUANTIZATION_RANGE >= WIDE_MODULUS:
        raise ValueError(f"a SecAgg+ round of {cohort} devices overflows the modulus 2**48")
    return MAX_QUANTIZATION_RANGE, WIDE_MODULUS


def narrow_masked(vector: np.ndarray, modulus: int) -> np.ndarray:
    """A masked vector (integers in [0, modulus)) in the narrowest dtype that holds them: uint32 under the
    narrow modulus (the server's numpy sum of uint32 vectors wraps modulo 2**32, the masks' own modulus, so
    the unmasked sum is unchanged), as it came otherwise."""
    if modulus > NARROW_MODULUS:
        return vector
    if vector.size and (vector.min() < 0 or vector.max() >= modulus):
        raise ValueError(f"a masked vector holds entries outside [0, {modulus})")
    return vector.astype(np.uint32)


def to_secagg_vectors(upload: SecureUpload, weight_bound: float) -> list[np.ndarray]:
    """[values(, weights)(, signal)] divided by ``weight_bound``, float64, in this fixed order (weights only
    when the round's rule needs them, ``aggregation.needs_row_weights``)."""
    arrays = [upload.values, *[a for a in (upload.weights, upload.signal) if a is not None]]
    return [np.asarray(array, dtype=np.float64) / weight_bound for array in arrays]


def from_secagg_mean(vectors: list[np.ndarray], devices: int, weight_bound: float, with_weights: bool = True) -> SecureUpload:
    """The summed ``SecureUpload`` of ``devices`` devices from the mean SecAgg+ revealed; ``with_weights``:
    whether the devices sent row weights (the second vector)."""
    arity = (2, 3) if with_weights else (1, 2)
    if devices < 1 or len(vectors) not in arity:
        raise ValueError(f"expected {arity[0]} or {arity[1]} aggregated vectors from at least one device, "
                         f"got {len(vectors)} from {devices}")
    sums = [(np.asarray(vector, dtype=np.float64) * devices * weight_bound).astype(np.float32) for vector in vectors]
    values, rest = sums[0], sums[1:]
    weights = rest.pop(0) if with_weights else None
    if weights is not None:
        weights[weights < MIN_ROW_WEIGHT] = 0.0  # rounding noise on rows nobody touched (below n * W * 2C / levels)
    return SecureUpload(values, weights, rest[0] if rest else None)
