"""The federated NMF start as production runs it (``engine.federated_nmf`` + ``protocol.handle_nmf``):
against central multiplicative updates, what each device's start reply carries, and refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.optimize

from fedsparse.config import RunConfig
from fedsparse.data import load_run_data
from fedsparse.federation.engine import Reply, federated_nmf, start_run
from fedsparse.federation.inprocess import InProcessTransport, population_of
from fedsparse.federation.protocol import NMF_FACTOR
from fedsparse.federation.secure_start import (
    SECURE_SUM,
    StartRefused,
    nndsvd_item_factor,
    nystrom_svd,
    project_user_factor,
    sketch_matrix,
)
from fedsparse.rng import rng_for
from fedsparse.sparse.nmf import multiplicative_init, multiplicative_update


def config(**overrides) -> RunConfig:
    return RunConfig.from_flat({
        "data.dataset": "synthetic", "data.synthetic-users": 16, "data.synthetic-items": 30,
        "data.synthetic-interactions-per-user": 6, "model.dim": 4, "sparse.policy": "sparserec",
        "sparse.density": 0.5, **overrides,
    })


class Recording(InProcessTransport):
    """The in-process transport, keeping every start message and reply; ``corrupt`` rewrites some replies."""

    def __init__(self, cfg: RunConfig, data, corrupt=None) -> None:
        super().__init__(cfg, data)
        self.sent: list[tuple[int, dict]] = []
        self.replies: list[tuple[int, Reply | str]] = []
        self.corrupt = corrupt or {}

    def send(self, kind, server_round, messages, settings):
        replies = super().send(kind, server_round, messages, settings)
        for user in list(replies):
            if user in self.corrupt and not isinstance(replies[user], str):
                replies[user] = Reply(self.corrupt[user](dict(replies[user].arrays)), {})
        self.sent += list(messages.items())
        self.replies += list(replies.items())
        return replies


def test_mu_start_over_every_device_equals_central_multiplicative_updates() -> None:
    cfg = config(**{"fed.nmf-start": "mu", "fed.nmf-cohort": 1.0, "fed.nmf-rounds": 3})
    data = load_run_data(cfg)
    population = population_of(data, cfg)
    transport = InProcessTransport(cfg, data)
    item_factor, init, accounting = federated_nmf(cfg, population, transport)
    R = data.train.astype(np.float64)
    rank = cfg.model.dim
    mean = R.nnz / (data.n_users * data.n_items)
    # The central reference from the same seeded start: Q as the server draws it, each p_u as its device does.

    _, Q = multiplicative_init(data.n_users, data.n_items, rank, cfg.seed, mean)
    scale = np.sqrt(mean / rank)
    P = np.stack([scale * np.abs(rng_for(cfg.seed, "nmf-init", u).standard_normal(rank)) for u in range(data.n_users)])
    for _ in range(3):
        P, Q = multiplicative_update(R, P, Q)
    # the server's Q is balanced by the column scale it sends; undone, it is central MU's Q (float32 on the wire)
    np.testing.assert_allclose(item_factor * init.column_scale, Q, rtol=2e-4, atol=1e-7)
    for user in population.users:  # each device kept its own p_u, equal to central MU's row
        np.testing.assert_allclose(transport.states[int(user)][NMF_FACTOR], P[user], rtol=2e-4, atol=1e-7)
    assert accounting["nmf_rounds"] == 3 and accounting["nmf_cohort"] == population.users.size


START_SETTINGS = [{"fed.nmf-start": "mu", "fed.nmf-cohort": 1.0}, {"fed.nmf-start": "range", "fed.nmf-power": 1}]


@pytest.mark.parametrize("overrides", START_SETTINGS, ids=["mu", "range-power-refine"])
def test_no_start_reply_carries_item_ids_or_the_user_factor(overrides) -> None:
    cfg = config(**{"fed.downlink": "rows", **overrides})
    data = load_run_data(cfg)
    transport = Recording(cfg, data)
    federated_nmf(cfg, population_of(data, cfg), transport)
    lengths = set()
    assert transport.replies
    for _user, reply in transport.replies:
        # One dense vector, the input of the secure sum: no "rows", no "user-factor", no "gram" field. (Its
        # plaintext holds p_u on the device's item rows; only SecAgg+'s masked form of it leaves a device
        # under Flower, and the in-process engine adds it straight into the sum.)
        assert list(reply.arrays) == [SECURE_SUM]
        vector = reply.arrays[SECURE_SUM]
        assert vector.dtype == np.float32 and vector.ndim == 1
        lengths.add(vector.size)
    # every round's vectors have one length per kind of round (public sizes), whatever a device's item count
    assert len(lengths) <= 2
    for _user, message in transport.sent:  # the start's downlink names no rows: no row request, no row ids
        assert "row-ids" not in message and "rows" not in message


def test_range_start_sends_only_a_seed_first() -> None:
    cfg = config(**{"fed.nmf-refine": 0})
    data = load_run_data(cfg)
    transport = Recording(cfg, data)
    _, init, accounting = federated_nmf(cfg, population_of(data, cfg), transport)
    assert {key for _, message in transport.sent for key in message} == {"nmf-sketch"}
    assert accounting["nmf_download_bytes"] == 16 * accounting["nmf_cohort"]
    assert accounting["nmf_upload_bytes"] == 4 * data.n_items * cfg.model.dim * accounting["nmf_cohort"]


def test_bad_vectors_are_dropped_with_a_logged_reason(caplog) -> None:
    cfg = config(**{"fed.nmf-cohort": 1.0, "fed.nmf-refine": 0})
    data = load_run_data(cfg)
    users = population_of(data, cfg).users
    corrupt = {
        int(users[0]): lambda arrays: {SECURE_SUM: arrays[SECURE_SUM][:-1]},
        int(users[1]): lambda arrays: {SECURE_SUM: arrays[SECURE_SUM].astype(np.float64)},
        int(users[2]): lambda arrays: {SECURE_SUM: np.full_like(arrays[SECURE_SUM], np.nan)},
        int(users[3]): lambda arrays: {**arrays, "rows": np.arange(3)},
    }
    clean = federated_nmf(cfg, population_of(data, cfg), InProcessTransport(cfg, data))[0]
    with caplog.at_level(logging.WARNING, logger="fedsparse"):
        dropped = federated_nmf(cfg, population_of(data, cfg), Recording(cfg, data, corrupt))[0]
    reasons = [record.getMessage() for record in caplog.records if "dropped the vector" in record.getMessage()]
    assert len(reasons) == 4
    assert any("non-finite" in reason for reason in reasons) and any("float64" in reason for reason in reasons)
    assert not np.allclose(clean, dropped)  # the four devices are missing from the sum


def test_a_cohort_below_the_secagg_threshold_is_refused() -> None:
    small = config(**{"data.synthetic-users": 4})
    data = load_run_data(small)
    with pytest.raises(StartRefused, match="at least 5"):
        federated_nmf(small, population_of(data, small), InProcessTransport(small, data))
    cfg = config(**{"fed.nmf-cohort": 0.1})  # cohort of 5: one bad vector leaves 4
    data = load_run_data(cfg)
    truncate = {int(u): (lambda arrays: {SECURE_SUM: arrays[SECURE_SUM][:3]}) for u in population_of(data, cfg).users}
    transport = Recording(cfg, data, truncate)
    with pytest.raises(StartRefused, match="below SecAgg"):
        federated_nmf(cfg, population_of(data, cfg), transport)


def test_nystrom_recovers_the_svd_of_a_low_rank_matrix() -> None:
    rng = rng_for(0, "test-nystrom")
    R = rng.random((40, 5)) @ rng.random((5, 25))
    test = sketch_matrix(3, 25, 8).astype(np.float64)
    W, sigma = nystrom_svd(test, R.T @ (R @ test), 5)
    exact = np.linalg.svd(R, compute_uv=False)[:5]
    np.testing.assert_allclose(sigma, exact, rtol=1e-6)
    _, _, Vt = np.linalg.svd(R, full_matrices=False)
    np.testing.assert_allclose(np.abs(W.T @ Vt[:5].T), np.eye(5), atol=1e-6)  # the same directions, up to sign
    Q = nndsvd_item_factor(W, sigma)
    assert (Q >= 0).all() and np.allclose(np.linalg.norm(Q[:, 0]), np.sqrt(sigma[0]))  # the Perron vector is one-signed


def test_projected_user_factor_is_the_nonnegative_least_squares_fit() -> None:
    rng = rng_for(0, "test-project")
    Q = rng.random((30, 4))
    items = np.array([1, 4, 7, 20])
    r = np.zeros(30)
    r[items] = 1
    p_u = project_user_factor(Q[items], Q.T @ Q, iterations=3000)
    reference, _ = scipy.optimize.nnls(Q, r)
    np.testing.assert_allclose(p_u, reference, atol=1e-3)


def test_devices_fit_their_start_row_from_the_first_download_only() -> None:
    cfg = config()
    data = load_run_data(cfg)
    population = population_of(data, cfg)
    state = start_run(cfg, population, InProcessTransport(cfg, data))
    user = int(population.users[0])
    first, second = state.device_init.fields(user).to_arrays(), state.device_init.fields(user).to_arrays()
    assert set(first) == {"nmf-project"} and first["nmf-project"].shape == (4, 4) and second == {}
    table = state.server.item_weight.astype(np.float64)
    np.testing.assert_allclose(first["nmf-project"], table.T @ table, rtol=1e-6)


def test_projection_ignores_columns_the_gram_says_are_empty() -> None:
    # Streaming grows rows (random signed values) after the gram was sent: a column empty in the gram, or a
    # negative sum, must not divide by nothing (it did: inf and NaN in the device's first update).
    rows = np.array([[0.5, 0.2, 0.3], [0.1, -0.9, 0.4]])
    gram = np.diag([1.0, 0.5, 0.0])
    p_u = project_user_factor(rows, gram)
    assert np.isfinite(p_u).all() and (p_u >= 0).all()
    assert p_u[2] == 0.0 and p_u[1] == 0.0 and p_u[0] > 0


def test_the_item_solve_ignores_secaggplus_noise_on_an_unused_column() -> None:
    from fedsparse.federation.secure_start import solve_item_factor

    rng = rng_for(0, "test-solve-noise")
    P = rng.random((20, 3))
    P[:, 2] = 0.0  # no device's p_u uses column 2
    R = (rng.random((20, 15)) < 0.3).astype(float)
    Q = rng.random((15, 3))
    noise = lambda shape: rng.uniform(-3e-7, 3e-7, shape)  # noqa: E731  (SecAgg+'s rounding, summed)
    solved = solve_item_factor(Q, R.T @ P + noise((15, 3)), P.T @ P + noise((3, 3)))
    assert np.isfinite(solved).all() and (solved >= 0).all()
    np.testing.assert_array_equal(solved[:, 2], Q[:, 2])  # kept, not divided by noise
    exact = solve_item_factor(Q, R.T @ P, P.T @ P)
    np.testing.assert_allclose(solved[:, :2], exact[:, :2], rtol=1e-3, atol=1e-5)


def test_a_cohort_delivered_in_batches_gives_the_same_start_and_one_observed_sum_per_round(monkeypatch) -> None:
    """In process the start's vectors are summed batch by batch (memory); the sum, and what the observer
    says the server holds (one sum per round over the whole cohort), must not depend on the batch size."""
    from fedsparse.federation import engine
    from fedsparse.federation.observer import ObservingTransport

    cfg = config(**{"fed.nmf-start": "range", "fed.nmf-cohort": 1.0, "fed.nmf-refine": 1})
    data = load_run_data(cfg)
    whole = ObservingTransport(InProcessTransport(cfg, data), cfg, data.n_items)
    item_factor, _, accounting = federated_nmf(cfg, population_of(data, cfg), whole)
    monkeypatch.setattr(engine, "START_BATCH_DEVICES", 3)
    batched = ObservingTransport(InProcessTransport(cfg, data), cfg, data.n_items)
    batched_factor, _, batched_accounting = federated_nmf(cfg, population_of(data, cfg), batched)
    np.testing.assert_allclose(batched_factor, item_factor, rtol=1e-9, atol=1e-12)
    assert batched_accounting == accounting
    assert [(s.phase, s.server_round, s.users.tolist()) for s in batched.sums] == \
        [(s.phase, s.server_round, s.users.tolist()) for s in whole.sums]
    for one, other in zip(batched.sums, whole.sums, strict=True):
        np.testing.assert_allclose(one.row_mass, other.row_mass, rtol=1e-9)
