"""Server-side defences (norm bound, per-row clipping, median / trimmed mean) and the poisoning attack."""

import numpy as np
import pytest

from fedsparse.config import ConfigError, RobustConfig, RunConfig
from fedsparse.federation.device import DeviceData
from fedsparse.federation.poisoning import boost_target, is_malicious, poisoned_view, target_exposed
from fedsparse.federation.robust import clip_rows, robust_aggregate, row_delta_norms
from fedsparse.federation.server_state import Server, validate_update
from fedsparse.federation.wire import RowUpdate, scatter_active, wire_row_ids

N_ITEMS, DIM = 12, 6


def random_mask(rng) -> np.ndarray:
    mask = rng.random((N_ITEMS, DIM)) < 0.5
    mask[:, 0] = True
    mask[3] = False  # a row with no active entry
    return mask


def random_update(rng, mask, scale=1.0) -> RowUpdate:
    rows = np.sort(rng.choice(N_ITEMS, size=5, replace=False))
    values = (scale * rng.standard_normal(int(mask[rows].sum()))).astype(np.float32)
    return RowUpdate(wire_row_ids(rows, N_ITEMS), values, float(rng.integers(1, 5)))


def dense_rows(update, mask) -> np.ndarray:
    return scatter_active(update.values, mask[update.row_ids]).astype(np.float64)


def test_row_norms_and_clipping_match_a_dense_reference():
    rng = np.random.default_rng(0)
    mask = random_mask(rng)
    update = random_update(rng, mask, scale=3.0)
    dense = dense_rows(update, mask)
    assert np.allclose(row_delta_norms(update, mask), np.linalg.norm(dense, axis=1))
    clipped = dense_rows(clip_rows(update, mask, 1.5), mask)
    norms = np.linalg.norm(dense, axis=1, keepdims=True)
    expected = dense * np.minimum(1.0, 1.5 / np.maximum(norms, 1e-300))
    assert np.allclose(clipped, expected, atol=1e-6)
    assert np.all(np.linalg.norm(clipped, axis=1) <= 1.5 + 1e-5)


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_robust_aggregators_match_a_per_row_reference(aggregator):
    rng = np.random.default_rng(1)
    mask = random_mask(rng)
    updates = [random_update(rng, mask) for _ in range(7)]
    settings = RobustConfig(aggregator=aggregator, trim_fraction=0.2)
    merged = robust_aggregate(updates, mask, settings, "weighted")
    for row, delta in zip(merged.rows, merged.deltas, strict=True):
        contributions = np.stack([dense_rows(u, mask)[list(u.row_ids).index(row)] for u in updates if row in u.row_ids])
        if aggregator == "median":
            expected = np.median(contributions, axis=0)
        else:
            cut = int(np.floor(0.2 * len(contributions)))
            expected = np.sort(contributions, axis=0)[cut : len(contributions) - cut].mean(axis=0)
        assert np.allclose(delta, expected * mask[row], atol=1e-6)


def test_the_median_ignores_one_huge_delta_that_the_mean_follows():
    rng = np.random.default_rng(2)
    mask = np.ones((N_ITEMS, DIM), dtype=bool)
    honest = [RowUpdate(wire_row_ids(np.array([4]), N_ITEMS), rng.normal(0, 0.1, DIM).astype(np.float32), 1.0) for _ in range(4)]
    attacker = RowUpdate(wire_row_ids(np.array([4]), N_ITEMS), np.full(DIM, 100.0, dtype=np.float32), 1.0)
    mean = robust_aggregate([*honest, attacker], mask, RobustConfig(), "weighted").deltas[0]
    median = robust_aggregate([*honest, attacker], mask, RobustConfig(aggregator="median"), "weighted").deltas[0]
    clipped = robust_aggregate([*honest, attacker], mask, RobustConfig(clip_norm=0.5), "weighted").deltas[0]
    assert mean.min() > 15 and np.abs(median).max() < 0.5 and np.linalg.norm(clipped) < 0.5


def test_an_enormous_update_is_rejected_and_leaves_the_server_unchanged():
    config = RunConfig.from_flat({"model.dim": DIM, "sparse.density": 0.5, "sparse.policy": "sparserec",
                                  "sparse.mask-init": "random", "robust.max-update-norm": 10.0})
    server = Server.create(config, N_ITEMS)
    before = {key: value.copy() for key, value in server.state_arrays().items()}
    rows = np.array([1, 2])
    huge = RowUpdate(wire_row_ids(rows, N_ITEMS), np.full(int(server.item_mask[rows].sum()), 1e6, dtype=np.float32), 1.0)
    update, reason = validate_update(server, huge.to_arrays())
    assert update is None and "robust.max-update-norm" in reason
    server.apply_round(1, [])
    small = RowUpdate(huge.row_ids, np.full_like(huge.values, 0.01), 1.0)
    assert validate_update(server, small.to_arrays())[0] is not None
    after = server.state_arrays()
    assert np.array_equal(after["item-weight"], before["item-weight"]) and np.array_equal(after["item-mask"], before["item-mask"])


def test_robust_defences_cannot_be_combined_with_secure_aggregation():
    with pytest.raises(ConfigError, match="robust"):
        RunConfig.from_flat({"privacy.secure-aggregation": True, "robust.aggregator": "median"})


def poison_config(**overrides) -> RunConfig:
    poison = {"poison.target-item": 7, "poison.fraction": 0.3, "poison.boost": 5.0}
    return RunConfig.from_flat({"model.dim": DIM, **poison, **overrides})


def test_malicious_devices_are_seeded_with_the_configured_share():
    config = poison_config()
    share = np.mean([is_malicious(config, user) for user in range(3000)])
    assert abs(share - 0.3) < 0.03
    assert not any(is_malicious(poison_config(**{"poison.target-item": -1}), user) for user in range(100))


def test_a_malicious_device_trains_on_the_target_and_boosts_only_its_row():
    config = poison_config()
    user = next(u for u in range(100) if is_malicious(config, u))
    data = DeviceData(user, np.array([1, 3]), np.array([5]), np.array([9]), np.array([1, 3, 5, 9]))
    assert list(poisoned_view(config, data).train) == [1, 3, 7]
    benign = next(u for u in range(100) if not is_malicious(config, u))
    device = DeviceData(benign, data.train, data.validation, data.test, data.interacted)
    assert poisoned_view(config, device).train.tolist() == [1, 3]
    rng = np.random.default_rng(3)
    mask = random_mask(rng)
    rows = np.array([1, 3, 7])
    update = RowUpdate(wire_row_ids(rows, N_ITEMS), rng.standard_normal(int(mask[rows].sum())).astype(np.float32), 2.0)
    boosted = dense_rows(boost_target(config, user, update, mask[rows]), mask)
    original = dense_rows(update, mask)
    assert np.allclose(boosted[2], 5.0 * original[2]) and np.array_equal(boosted[:2], original[:2])


def test_exposure_counts_the_target_in_a_benign_users_top_ten():
    data = DeviceData(0, np.array([0, 1]), np.array([2]), np.array([3]), np.array([0, 1, 2, 3]))
    scores = -np.arange(30, dtype=np.float64)  # item 0 best; training items 0 and 1 are not ranked

    def exposed(target, item_scores=scores):
        return target_exposed(poison_config(**{"poison.fraction": 0.0, "poison.target-item": target}), data, item_scores)

    assert exposed(7) == 1.0 and exposed(11) == 1.0  # 5th and 10th among the ranked items
    assert exposed(12) == 0.0  # 11th
    assert exposed(7, np.where(np.arange(30) == 7, -100.0, scores)) == 0.0
    assert exposed(3) is None  # the user interacted with it (a test item): not counted in ER


@pytest.mark.parametrize("mode, scale", [("weighted", 1.0), ("sum", 3.0), ("client-mean", 3.0 / 4.0)])
def test_a_robust_statistic_is_scaled_like_the_aggregation_mode(mode: str, scale: float) -> None:
    """The median stands for one contributor's delta: ``sum`` multiplies it by the row's contributors,
    ``client-mean`` by contributors over the round's devices."""
    mask = np.ones((4, 2), dtype=bool)
    row = np.array([1], dtype=np.int64)
    updates = [RowUpdate(row, np.array([v, -v], np.float32), 1.0) for v in (1.0, 2.0, 9.0)]
    updates.append(RowUpdate(np.array([3], dtype=np.int64), np.array([5.0, 5.0], np.float32), 1.0))
    merged = robust_aggregate(updates, mask, RobustConfig(aggregator="median"), mode)
    np.testing.assert_allclose(merged.deltas[0], [2.0 * scale, -2.0 * scale])
