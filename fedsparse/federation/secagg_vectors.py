"""A ``SecureUpload`` as the float vectors Flower's SecAgg+ masks, and the sum recovered from what it reveals.

SecAgg+ reveals the num_examples-weighted mean of the devices' vectors, each clipped to
±``SECAGG_CLIPPING_RANGE`` and quantised. Every device reports num_examples = 1, so the mean is plain
over the n devices whose masked vectors were collected, and divides its arrays by the public weight
bound W (a device's weight never exceeds it) so that weights land in [0, 1] and weighted deltas in
[-|delta|, |delta|]. The server recovers the sum as mean * n * W.
"""

from __future__ import annotations

import numpy as np

from fedsparse.federation.wire import SecureUpload

SECAGG_CLIPPING_RANGE = 4.0  # |value| bound of every masked entry (deltas are far smaller)
SECAGG_QUANTIZATION_RANGE = 2**30  # quantisation levels over [-C, C]: a step of 7.5e-9 (int32 in Flower)
SECAGG_MODULUS_RANGE = 2**48  # masks' modulus: room for the sum of 2**18 devices' quantised vectors
MIN_ROW_WEIGHT = 0.5  # a touched row's summed weight is at least 1 (one example, or 1 per device when uniform)


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
        weights[weights < MIN_ROW_WEIGHT] = 0.0  # quantisation noise on rows nobody touched (about n * W * 7.5e-9)
    return SecureUpload(values, weights, rest[0] if rest else None)
