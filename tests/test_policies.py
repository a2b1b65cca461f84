"""One suite every mask policy must pass: exact budgets, zeros stay zero, determinism, resets."""

import numpy as np
import pytest
import torch

from fedsparse.central.losses import batch_loss
from fedsparse.central.models import build_model
from fedsparse.central.sampling import NegativeSampler, training_pairs
from fedsparse.config import RunConfig
from fedsparse.data.interactions import binary_csr
from fedsparse.sparse.masked_training import SparseEmbeddingTraining
from fedsparse.sparse.masks import budget
from fedsparse.sparse.policies import POLICIES, build_policy

N_USERS, N_ITEMS, DIM, STEPS, BATCH = 40, 30, 8, 24, 32


def toy_train(seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(N_USERS), 6)
    items = np.concatenate([rng.choice(N_ITEMS, 6, replace=False) for _ in range(N_USERS)])
    return binary_csr(users, items, N_USERS, N_ITEMS)


# Knobs a policy cannot run without (size-bet applies an allocation a search produced).
REQUIRED_KNOBS = {"size-bet": {"sparse.size-groups": 4, "sparse.group-sizes": "4,3,2,1"}}
FIXED_MASK_POLICIES = ("dense", "static", "size-frequency", "size-scall", "size-bet")


def make_training(policy, density=0.25, seed=0, **sparse):
    flat = {"seed": seed, "model.dim": DIM, "train.lr": 0.05, "sparse.policy": policy, "sparse.density": density,
            "sparse.update-every": 3, "sparse.nmf-iterations": 20, **REQUIRED_KNOBS.get(policy, {}), **sparse}
    config = RunConfig.from_flat(flat)
    train = toy_train()
    model = build_model(config.model, N_USERS, N_ITEMS, torch.Generator().manual_seed(seed))
    return SparseEmbeddingTraining(model, config, train, STEPS), train, config


def run_steps(training, train, steps, check=None):
    sampler = NegativeSampler(train)
    users, items = training_pairs(train)
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        batch = rng.choice(len(users), BATCH, replace=False)
        negatives = sampler.sample(rng, users[batch], 1)
        training.begin_step(users[batch], np.concatenate([items[batch], negatives.ravel()]), rng)
        loss = batch_loss(training.model, torch.from_numpy(users[batch]), torch.from_numpy(items[batch]),
                          torch.from_numpy(negatives), "bpr", 1e-4)
        training.step(loss)
        if check:
            check(step)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_active_count_is_exact_after_every_step(name):
    training, train, _ = make_training(name)
    policy = training.policy

    def check(step):
        for table, mask in training.masks.items():
            rows, dim = mask.shape
            last_update = step - step % policy.settings.update_every if name == "magnitude" else step
            expected = policy.active_target(rows, dim, last_update if name == "magnitude" else step, STEPS)
            assert int(mask.sum()) == expected, (table, step)

    check(0)
    run_steps(training, train, STEPS, check)
    if name not in FIXED_MASK_POLICIES:
        assert training.accounting.mask_updates > 0
    for mask in training.masks.values():
        assert int(mask.sum()) == policy.final_budget(*mask.shape) or name == "dense"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_inactive_weights_and_moments_stay_exactly_zero(name):
    training, train, _ = make_training(name)

    def check(step):
        for table, embedding in training.tables.items():
            inactive = ~training.masks[table]
            assert (embedding.weight.detach()[inactive] == 0).all(), (table, step)
            if not training.unmasked:
                optimizer = training.optimizers[table]
                assert (optimizer.exp_avg[inactive] == 0).all() and (optimizer.exp_avg_sq[inactive] == 0).all()

    run_steps(training, train, STEPS, check)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_same_seed_gives_same_masks_and_weights(name):
    first, train, _ = make_training(name)
    again, _, _ = make_training(name)
    run_steps(first, train, STEPS)
    run_steps(again, train, STEPS)
    for table in first.masks:
        assert torch.equal(first.masks[table], again.masks[table])
        assert torch.equal(first.tables[table].weight, again.tables[table].weight)


@pytest.mark.parametrize("name", ["set", "rigl", "dsl", "sparserec"])
def test_grown_entries_start_at_zero_and_statistics_reset(name):
    training, train, config = make_training(name)
    run_steps(training, train, 2)  # accumulate some gradient, no update yet (update-every = 3)
    policy = training.policy
    before = {table: mask.clone() for table, mask in training.masks.items()}
    training.step_count = 3  # the first scheduled update step
    training.update_masks()
    for table, mask in training.masks.items():
        grown = mask & ~before[table]
        assert grown.any(), table
        assert (training.tables[table].weight.detach()[grown] == 0).all()
        assert int(mask.sum()) == int(before[table].sum())
    if policy.settings.grow_score in ("signed-sum", "abs-sum", "ema"):
        assert all(not accumulator.any() for accumulator in policy._accumulators.values())


def test_policy_defaults_follow_the_methods():
    config = RunConfig().sparse
    rigl = build_policy(config.__class__(policy="rigl", density=0.1)).settings
    dsl = build_policy(config.__class__(policy="dsl", density=0.1)).settings
    sparserec = build_policy(config.__class__(policy="sparserec", density=0.1)).settings
    assert (rigl.drop_fraction, rigl.drop_fraction_min, rigl.end_fraction, rigl.grow_score) == (0.3, 0.0, 0.75, "last-batch")
    assert (dsl.drop_fraction, dsl.drop_fraction_min, dsl.end_fraction, dsl.sparse_grad) == (0.5, 0.005, 1.0, False)
    assert (sparserec.mask_init, sparserec.grow_score, sparserec.sparse_grad) == ("nmf", "signed-sum", True)
    assert build_policy(config.__class__(policy="dense", density=0.1)).settings.density == 1.0


def test_nmf_mask_has_exact_density_per_table():
    training, _, _ = make_training("sparserec", density=0.3)
    for mask in training.masks.values():
        assert int(mask.sum()) == budget(0.3, *mask.shape)
        assert (mask.sum(dim=1) >= 1).all()  # nmf-min-per-row = 1


def test_per_row_nmf_quotas_hold_through_every_mask_update():
    training, train, _ = make_training("sparserec", density=0.25, **{"sparse.nmf-select": "per-row"})
    start = {table: mask.sum(dim=1).clone() for table, mask in training.masks.items()}
    changed = []

    def check(step):
        for table, mask in training.masks.items():
            assert torch.equal(mask.sum(dim=1), start[table]), (table, step)
            assert int(mask.sum()) == budget(0.25, *mask.shape)
        pairs = zip(training.masks.values(), masks_at_start, strict=True)
        changed.append(any(not torch.equal(m, initial) for m, initial in pairs))

    masks_at_start = [mask.clone() for mask in training.masks.values()]
    run_steps(training, train, STEPS, check)
    assert changed[-1], "exploration never moved an entry: the test would not see a broken quota"
