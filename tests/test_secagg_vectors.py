"""SecureUpload <-> SecAgg+ vectors: the server recovers the exact sum from the mean SecAgg+ reveals."""

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod, parameters_subtraction

from fedsparse.federation.secagg_vectors import (
    MAX_QUANTIZATION_RANGE,
    MIN_NARROW_LEVELS,
    NARROW_MODULUS,
    SECAGG_CLIPPING_RANGE,
    WIDE_MODULUS,
    from_secagg_mean,
    narrow_masked,
    secagg_ranges,
    to_secagg_vectors,
)
from fedsparse.federation.wire import SecureUpload

WEIGHT_BOUND = 1000.0


def random_upload(rng, signal: bool, with_weights: bool = True) -> SecureUpload:
    weights = np.where(rng.random(20) < 0.3, rng.integers(1, 50, 20), 0).astype(np.float32)
    values = (rng.normal(0, 0.05, 60) * np.repeat(weights, 3)).astype(np.float32)
    return SecureUpload(values, weights if with_weights else None,
                        rng.normal(0, 0.1, (20, 4)).astype(np.float32) if signal else None)


@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("signal", [False, True])
def test_the_sum_is_recovered_from_the_mean_of_the_vectors(signal, with_weights):
    rng = np.random.default_rng(0)
    uploads = [random_upload(rng, signal, with_weights) for _ in range(7)]
    vectors = [to_secagg_vectors(upload, WEIGHT_BOUND) for upload in uploads]
    assert len(vectors[0]) == 1 + with_weights + signal
    assert all(np.abs(v).max() <= SECAGG_CLIPPING_RANGE for vs in vectors for v in vs)  # nothing SecAgg+ would clip
    mean = [np.mean([vs[i] for vs in vectors], axis=0) for i in range(len(vectors[0]))]
    total = from_secagg_mean(mean, len(uploads), WEIGHT_BOUND, with_weights)
    np.testing.assert_allclose(total.values, np.sum([u.values for u in uploads], axis=0), rtol=1e-5, atol=1e-5)
    if with_weights:
        np.testing.assert_allclose(total.weights, np.sum([u.weights for u in uploads], axis=0), rtol=1e-5)
    else:
        assert total.weights is None
    if signal:
        np.testing.assert_allclose(total.signal, np.sum([u.signal for u in uploads], axis=0), rtol=1e-5, atol=1e-5)
    else:
        assert total.signal is None


def test_quantisation_noise_on_untouched_rows_is_not_mistaken_for_a_weight():
    mean = [np.zeros(3), np.array([1e-9, -1e-9, 0.01])]
    total = from_secagg_mean(mean, 5, WEIGHT_BOUND)
    assert total.weights.tolist() == [0.0, 0.0, pytest.approx(50.0)]


def test_an_empty_aggregate_is_rejected():
    with pytest.raises(ValueError):
        from_secagg_mean([np.zeros(3)], 0, WEIGHT_BOUND)


@pytest.mark.parametrize("cohort", [1, 2, 3, 5, 9, 604, 4095, 4096, 6040, 29858, 2**18 - 1])
def test_the_ranges_leave_room_for_the_cohorts_sum_and_map_zero_exactly(cohort):
    levels, modulus = secagg_ranges(cohort)
    assert cohort * levels < modulus and levels <= MAX_QUANTIZATION_RANGE and levels % 2 == 0
    assert modulus == (NARROW_MODULUS if cohort < 4096 else WIDE_MODULUS)  # 4096 devices would leave 2**20 - 2
    assert levels >= MIN_NARROW_LEVELS
    if modulus == NARROW_MODULUS:  # the most levels the narrow modulus allows: one more pair would overflow
        assert cohort * (levels + 2) >= modulus or levels == MAX_QUANTIZATION_RANGE


def test_a_cohort_beyond_the_wide_modulus_or_an_empty_one_is_refused():
    with pytest.raises(ValueError, match="overflows"):
        secagg_ranges(2**18)
    with pytest.raises(ValueError, match="at least one device"):
        secagg_ranges(0)


@pytest.mark.parametrize("cohort", [2, 7, 604])
def test_narrow_masked_vectors_sum_to_what_flowers_int64_vectors_sum_to(cohort):
    """Masked vectors sent as uint32 and summed the way SecAggPlusWorkflow sums them (numpy, then the modulus)
    unmask to exactly the sum of the devices' quantised vectors, as the int64 vectors Flower sends would."""
    levels, modulus = secagg_ranges(cohort)
    rng = np.random.default_rng(cohort)
    quantised = rng.integers(0, levels + 1, size=(cohort, 50))  # Flower's quantiser maps [-C, C] to [0, levels]
    masks = rng.integers(0, modulus, size=(cohort, 50))
    masked = [[(q + m) % modulus] for q, m in zip(quantised, masks, strict=True)]  # int64, as secaggplus_mod sends
    narrowed = [[bytes_to_ndarray(ndarray_to_bytes(narrow_masked(v[0], modulus)))] for v in masked]
    assert narrowed[0][0].dtype == np.uint32 and len(ndarray_to_bytes(narrowed[0][0])) < len(ndarray_to_bytes(masked[0][0]))
    for vectors in (masked, narrowed):
        total = vectors[0]
        for vector in vectors[1:]:
            total = parameters_addition(total, vector)
        total = parameters_mod(total, modulus)
        for mask in masks:  # the unmasking stage removes every device's mask with int64 arithmetic
            total = parameters_subtraction(total, [mask])
        np.testing.assert_array_equal(parameters_mod(total, modulus)[0], quantised.sum(axis=0))


def test_a_masked_vector_outside_the_modulus_is_refused_and_a_wide_one_kept():
    with pytest.raises(ValueError, match="outside"):
        narrow_masked(np.array([0, NARROW_MODULUS]), NARROW_MODULUS)
    wide = np.array([0, WIDE_MODULUS - 1])
    assert narrow_masked(wide, WIDE_MODULUS) is wide
