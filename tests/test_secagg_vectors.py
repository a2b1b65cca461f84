"""SecureUpload <-> SecAgg+ vectors: the server recovers the exact sum from the mean SecAgg+ reveals."""

import numpy as np
import pytest

from fedsparse.federation.secagg_vectors import SECAGG_CLIPPING_RANGE, from_secagg_mean, to_secagg_vectors
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
