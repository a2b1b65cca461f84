"""Privacy core: leakage metrics, attacks (near perfect on undefended uploads, near random on noise),
defences (padding never a positive, noise at the configured scale) and the accountant against dp-accounting."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld
from sklearn.metrics import roc_auc_score

from fedsparse.config import RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.device import (
    DeviceData,
    LocalRound,
    init_device,
    local_train,
    round_negatives,
    round_padding,
    rows_needed,
)
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.federation.observer import UploadLog
from fedsparse.federation.protocol import privatize
from fedsparse.federation.wire import RowsDownload, RowUpdate
from fedsparse.privacy.accounting import ldp_epsilon
from fedsparse.privacy.attacks import ValueAttack, imia_guess, row_id_guess
from fedsparse.privacy.defences import clip_and_noise, padding_count, sample_padding
from fedsparse.privacy.evaluate import evaluate_attacks
from fedsparse.privacy.leakage import (
    AttackGuess,
    matched_auc,
    membership_metrics,
    popularity_strata,
    random_guess_metrics,
)
from fedsparse.privacy.observe import ObservedUpload
from fedsparse.run_files import read_jsonl
from fedsparse.sparse.storage import CompactTable

N_ITEMS, DIM = 200, 8


# ---------------------------------------------------------------- leakage metrics


def test_membership_metrics_by_hand() -> None:
    scores = np.zeros(10)
    scores[[1, 2, 3]] = [0.9, 0.8, 0.1]
    guess = AttackGuess(scores, np.array([1, 2]))
    metrics = membership_metrics(guess, members=np.array([1, 3, 5]), uploaded=np.array([1, 2, 3]))
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(0.4)
    # Members 1, 3, 5 score 0.9, 0.1, 0; seven non-members score 0.8 once and 0 six times.
    assert metrics["auc"] == pytest.approx((1 + 6 / 7 + 3 / 7) / 3)
    assert metrics["auc_uploaded"] == pytest.approx(0.5)  # among rows 1, 2, 3: member 1 > 2 > member 3


def _matched_auc_by_pairs(labels: np.ndarray, scores: np.ndarray, strata: np.ndarray) -> float:
    """Slow reference: every member/non-member pair of one stratum, a win 1, a tie 1/2."""
    wins = pairs = 0.0
    for member in np.flatnonzero(labels):
        for other in np.flatnonzero(~labels & (strata == strata[member])):
            pairs += 1
            wins += 1.0 if scores[member] > scores[other] else 0.5 if scores[member] == scores[other] else 0.0
    return wins / pairs if pairs else float("nan")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matched_auc_equals_the_pairwise_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    labels = rng.random(n) < 0.3
    scores = rng.integers(0, 5, size=n).astype(np.float64)  # many ties
    strata = rng.integers(0, 4, size=n)
    assert matched_auc(labels, scores, strata) == pytest.approx(_matched_auc_by_pairs(labels, scores, strata))
    one_stratum = np.zeros(n, dtype=np.int64)  # a single stratum: the plain ROC-AUC
    assert matched_auc(labels, scores, one_stratum) == pytest.approx(roc_auc_score(labels, scores))


def test_matched_auc_reads_a_popularity_score_as_chance() -> None:
    """Members drawn in proportion to popularity: ranking by popularity scores a high plain AUC, but within
    strata of equal popularity it says nothing of the user (0.5 exactly when each stratum has one count)."""
    rng = np.random.default_rng(0)
    counts = np.repeat(np.arange(1, 21), 10).astype(np.float64)  # 20 popularity levels of 10 items
    strata = popularity_strata(counts, strata=20)
    assert np.array_equal(strata, np.repeat(np.arange(20), 10))
    aucs, matched = [], []
    for _ in range(50):
        members = rng.choice(counts.size, size=30, replace=False, p=counts**2 / (counts**2).sum())
        labels = np.zeros(counts.size, dtype=bool)
        labels[members] = True
        aucs.append(roc_auc_score(labels, counts))
        matched.append(matched_auc(labels, counts, strata))
    assert np.mean(aucs) > 0.75
    assert np.allclose(matched, 0.5)
    guess = AttackGuess(counts, np.zeros(0, dtype=np.int64))
    assert np.isnan(membership_metrics(guess, members, np.arange(counts.size))["auc_matched"])  # no strata given
    assert membership_metrics(guess, members, np.arange(counts.size), strata)["auc_matched"] == pytest.approx(0.5)


def test_popularity_strata_are_equal_sized_by_rank() -> None:
    counts = np.array([5.0, 1.0, 3.0, 3.0, 9.0, 0.0, 2.0, 4.0, 8.0, 7.0, 6.0, 2.0, 0.0, 1.0, 5.0])
    assert popularity_strata(counts, strata=3).tolist() == [1, 0, 1, 1, 2, 0, 0, 1, 2, 2, 2, 1, 0, 0, 2]
    # At most one stratum per MIN_ITEMS_PER_STRATUM items: 15 items hold 3 strata, however many are asked.
    assert np.array_equal(popularity_strata(counts, strata=100), popularity_strata(counts, strata=3))
    with pytest.raises(ValueError, match="at least 1"):
        popularity_strata(counts, strata=0)


def test_random_guess_baseline() -> None:
    baseline = random_guess_metrics(n_items=100, members=10, predicted=20)
    assert baseline["precision"] == pytest.approx(0.1)
    assert baseline["recall"] == pytest.approx(0.2)
    assert baseline["auc"] == 0.5 and baseline["auc_matched"] == 0.5


# ---------------------------------------------------------------- attacks


def synthetic_upload(rng: np.random.Generator, user: int, informative: bool) -> tuple[ObservedUpload, np.ndarray]:
    """An upload of 20 member and 20 non-member rows: deltas +-u (one BPR step) or pure noise."""
    rows = np.sort(rng.choice(N_ITEMS, size=40, replace=False))
    members = rng.choice(rows, size=20, replace=False)
    items = np.abs(rng.normal(0.3, 0.1, (40, DIM)))
    items[np.isin(rows, members)] *= 1.5  # the user's items are the popular, longer rows
    if informative:
        user_row = np.abs(rng.normal(0.5, 0.2, DIM))
        sign = np.where(np.isin(rows, members), 1.0, -1.0)
        deltas = sign[:, None] * rng.uniform(0.2, 1.0, (40, 1)) * user_row[None, :] * 0.01
    else:
        deltas = rng.normal(0.0, 0.01, (40, DIM))
    return ObservedUpload(1, user, rows, deltas.astype(np.float32), items.astype(np.float32), N_ITEMS), np.sort(members)


def attack_all(uploads: list[tuple[ObservedUpload, np.ndarray]]) -> dict[str, float]:
    """Mean auc_uploaded of the value attack (trained on the first half) and IMIA on the second half."""
    shadow, targets = uploads[: len(uploads) // 2], uploads[len(uploads) // 2 :]
    value = ValueAttack().fit([u for u, _ in shadow], [m for _, m in shadow])
    rng = np.random.default_rng(0)
    return {
        "value": float(np.mean([membership_metrics(value.guess(u), m, u.rows)["auc_uploaded"] for u, m in targets])),
        "imia": float(np.mean([membership_metrics(imia_guess(u, rng), m, u.rows)["auc_uploaded"] for u, m in targets])),
    }


def test_attacks_find_members_in_informative_uploads() -> None:
    rng = np.random.default_rng(1)
    scores = attack_all([synthetic_upload(rng, user, informative=True) for user in range(40)])
    assert scores["value"] > 0.95
    assert scores["imia"] > 0.9


def test_attacks_are_random_on_uploads_of_pure_noise() -> None:
    rng = np.random.default_rng(2)
    uploads = [synthetic_upload(rng, user, informative=False) for user in range(80)]
    for upload, _ in uploads:  # noise deltas carry no information, and neither do the item rows
        upload.item_rows[:] = np.abs(rng.normal(0.3, 0.1, upload.item_rows.shape))
    scores = attack_all(uploads)
    assert scores == {"value": pytest.approx(0.5, abs=0.06), "imia": pytest.approx(0.5, abs=0.06)}


def test_row_id_attack_is_exact_on_positives_only_uploads() -> None:
    rows = np.array([3, 7, 11])
    upload = ObservedUpload(1, 0, rows, np.ones((3, DIM), np.float32), np.ones((3, DIM), np.float32), N_ITEMS)
    metrics = membership_metrics(row_id_guess(upload), rows, rows)
    assert (metrics["precision"], metrics["recall"], metrics["auc"]) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------- defences


def test_padding_never_includes_an_item_of_the_user() -> None:
    rng = np.random.default_rng(3)
    interacted = np.sort(rng.choice(N_ITEMS, size=150, replace=False))
    fakes = sample_padding(rng, np.arange(N_ITEMS), interacted, 50)
    assert fakes.size == 50 and np.unique(fakes).size == 50
    assert not np.isin(fakes, interacted).any()
    every_other_item = sample_padding(rng, np.arange(N_ITEMS), interacted, 51)  # only 50 are not the user's
    assert np.array_equal(every_other_item, np.setdiff1d(np.arange(N_ITEMS), interacted))
    assert [padding_count(ratio, 10) for ratio in (0.0, 0.25, 0.5, 1.0, 2.0)] == [0, 3, 5, 10, 20]


@pytest.mark.parametrize("negatives_from", ["non-train", "unrated"])
def test_round_padding_follows_the_negative_rule(negatives_from: str) -> None:
    """Fake positives avoid the training items; held-out items only under ``unrated`` (training never
    knows them under the default)."""
    config = RunConfig.from_flat({"privacy.padding-ratio": 4.0, "train.negatives-from": negatives_from})
    train, held_out = np.arange(0, 10, dtype=np.int64), np.arange(10, 20, dtype=np.int64)
    data = DeviceData(3, train, held_out[:5], held_out[5:], np.arange(20, dtype=np.int64))
    drawn = np.unique(np.concatenate([round_padding(config, data, 25, server_round) for server_round in range(1, 40)]))
    assert not np.isin(drawn, train).any()
    assert np.isin(held_out, drawn).all() == (negatives_from == "non-train")
    assert np.isin(held_out, drawn).any() == (negatives_from == "non-train")


@pytest.mark.parametrize("mechanism, spread", [("gaussian", np.std), ("laplace", lambda x: np.abs(x).mean())])
def test_noise_scale_follows_the_noise_multiplier(mechanism, spread) -> None:
    rng = np.random.default_rng(4)
    noised = clip_and_noise(np.zeros(200_000, np.float32), mechanism, clip_norm=0.5, noise_multiplier=3.0, rng=rng)
    assert spread(noised) == pytest.approx(1.5, rel=0.02)  # std (gaussian) or b = E|x| (laplace)


def test_clipping_bounds_the_norm_and_keeps_small_uploads() -> None:
    rng = np.random.default_rng(5)
    values = np.array([3.0, -4.0], np.float32)
    assert np.linalg.norm(clip_and_noise(values, "gaussian", 1.0, 0.0, rng)) == pytest.approx(1.0)
    assert np.abs(clip_and_noise(values, "laplace", 1.0, 0.0, rng)).sum() == pytest.approx(1.0)
    np.testing.assert_allclose(clip_and_noise(values, "gaussian", 10.0, 0.0, rng), values)


def test_privatize_noises_values_and_signal_and_keeps_rows() -> None:
    config = RunConfig.from_flat({"privacy.ldp": "gaussian", "privacy.clip-norm": 1.0, "privacy.noise-multiplier": 0.5})
    update = RowUpdate(np.array([1, 4], np.uint16), np.ones(6, np.float32), 3.0, np.array([1, 4], np.uint16),
                       np.zeros((2, 2), np.uint8), np.ones((2, 2), np.float32))
    private = privatize(config, update, 2, 7)
    np.testing.assert_array_equal(private.row_ids, update.row_ids)
    assert private.values.shape == (6,) and private.signal_values.shape == (2, 2)
    assert not np.allclose(private.values, update.values) and not np.allclose(private.signal_values, update.signal_values)
    assert privatize(RunConfig(), update, 2, 7) is update


def test_padded_round_trains_fake_rows_like_positives_and_uploads_them() -> None:
    config = RunConfig.from_flat({"model.dim": DIM, "sparse.policy": "dense", "sparse.density": 1.0, "train.negatives": 1,
                                  "privacy.padding-ratio": 1.0, "fed.item-optimizer": "sgd", "train.l2-reg": 0.0})
    rng = np.random.default_rng(6)
    train = np.sort(rng.choice(N_ITEMS, size=10, replace=False))
    data = DeviceData(3, train, np.zeros(0, np.int64), np.zeros(0, np.int64), train)
    fakes = round_padding(config, data, N_ITEMS, 1)
    negatives = round_negatives(config, data, N_ITEMS, 1)
    assert fakes.size == 10 and not np.isin(fakes, train).any()
    assert negatives.shape == (1, 20, 1) and not np.isin(negatives, np.union1d(train, fakes)).any()
    weight = rng.normal(0, 0.1, (N_ITEMS, DIM)).astype(np.float32)
    download = RowsDownload(None, CompactTable.encode(weight, np.ones_like(weight, dtype=bool)))
    state = init_device(config, 3)
    result = local_train(config, state, data, download, N_ITEMS, LocalRound(1, False))
    np.testing.assert_array_equal(result.update.row_ids, rows_needed(data, negatives, fakes))
    deltas = result.update.values.reshape(-1, DIM)
    along_user = deltas @ state.user_row
    is_positive = np.isin(result.update.row_ids, np.union1d(train, fakes))
    assert (along_user[is_positive] > 0).all() and (along_user[~is_positive] < 0).all()
    # The private user row learns from the real positives only: the fakes leave it as without them.
    unpadded = config.with_overrides({"privacy.padding-ratio": 0.0})
    plain = local_train(unpadded, state, data, download, N_ITEMS, LocalRound(1, False))
    real_negatives = negatives[0, : train.size, 0]
    if np.array_equal(real_negatives, round_negatives(unpadded, data, N_ITEMS, 1)[0, :, 0]):
        np.testing.assert_allclose(result.state.user_row, plain.state.user_row, rtol=1e-5)


# ---------------------------------------------------------------- accounting


@pytest.mark.parametrize("uploads", [1, 10])
def test_gaussian_epsilon_matches_dp_accounting(uploads: int) -> None:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(2.0 / 2), uploads)  # noise / replace-sensitivity 2C
    assert ldp_epsilon("gaussian", 2.0, uploads, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)


def test_laplace_epsilon_is_the_pure_dp_composition() -> None:
    # Laplace with b = 4C on a 2C-sensitive upload is 0.5-DP; ten uploads compose to 5 (a hair less at delta > 0).
    assert ldp_epsilon("laplace", 4.0, 10, 1e-5) == pytest.approx(5.0, abs=0.02)
    assert ldp_epsilon("gaussian", 1.0, 0, 1e-5) == 0.0
    assert ldp_epsilon("gaussian", 0.0, 3, 1e-5) == float("inf")


# ---------------------------------------------------------------- end to end


def test_attacks_on_a_real_in_process_run(tmp_path) -> None:
    config = RunConfig.from_flat({
        "results-dir": str(tmp_path), "num-server-rounds": 2, "data.dataset": "synthetic", "data.synthetic-users": 40,
        "data.synthetic-items": 120, "data.synthetic-interactions-per-user": 15, "model.dim": 8, "sparse.density": 0.5,
        "fed.fraction-train": 1.0, "fed.item-optimizer": "sgd", "fed.item-lr": 0.2,
        "fed.nmf-start": "mu", "fed.nmf-cohort": 1.0,  # the attacks are under test here, not the start
    })
    data = load_dataset(config.data, config.seed)
    log = UploadLog(per_user=1)
    run_inprocess(config, data, observer=log)
    members = {user: np.sort(data.train.indices[data.train.indptr[user] : data.train.indptr[user + 1]]) for user in log.uploads}
    summary = evaluate_attacks(config, log.all(), members)
    assert summary["row-id"]["recall"] == 1.0  # every positive is uploaded
    assert summary["row-id"]["auc"] > 0.8
    assert summary["value"]["auc_uploaded"] > 0.9
    assert summary["random"]["auc"] == 0.5


def test_privacy_frontier_script_writes_table_and_plot(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    script = Path(__file__).resolve().parents[1] / "simulations" / "privacy_frontier.py"
    settings = ["data.synthetic-users=40", "data.synthetic-items=120", "data.synthetic-interactions-per-user=15", "model.dim=8",
                "fed.item-optimizer=sgd", "fed.nmf-rounds=2"]
    command = [sys.executable, str(script), "--dataset", "synthetic", "--rounds", "2", "--fraction", "0.5", "--densities", "0.5",
               "--defences", "pad:1,ldp:1,secagg,secagg-all:0.3:1+fixed", "--watch", "30", "--out", str(tmp_path),
               *[f"--set={item}" for item in settings]]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    frame = pd.read_csv(tmp_path / "privacy-synthetic.csv").set_index("defence")
    assert list(frame.index) == ["none", "pad:1", "ldp:1", "secagg", "secagg-all:0.3:1+fixed"]
    biased = frame.loc["secagg-all:0.3:1+fixed"]
    assert np.isnan(biased["value_auc"]) and np.isfinite(biased["recall@20"]) and np.isfinite(biased["differencing_auc"])
    config = json.loads((Path(biased["run_dir"]) / "config.json").read_text())["config"]
    assert (config["privacy.secure-row-bias"], config["privacy.secure-train-items"], config["sparse.drop-fraction"]) == (
        1.0, "all", 0.0)
    assert frame.loc["secagg", "upload_vs_undefended"] > 1.5 and np.isnan(frame.loc["secagg", "value_auc"])
    assert frame.loc["none", "upload_vs_undefended"] == 1.0
    assert frame.loc["pad:1", "upload_vs_undefended"] > 1.2  # fake rows (and their negatives) cost bytes
    assert np.isinf(frame.loc["none", "epsilon_max"]) and 0 < frame.loc["ldp:1", "epsilon_max"] < np.inf
    assert frame.loc["ldp:1", "clip_norm"] == pytest.approx(frame.loc["none", "median_norm"])
    assert (tmp_path / "privacy-synthetic.png").stat().st_size > 0
    table = (tmp_path / "privacy-synthetic.md").read_text()
    assert "| synthetic" in table and "sums_advantage" in table and "--set data.synthetic-users=40" in table
    # Every cell has a matched AUC on what the server saw (the start's sums at least); the undefended cell's is
    # its strongest per-upload attack's, and row ids leak there whatever the popularity.
    assert frame["start_auc_matched"].notna().all() and frame.loc["none", "row-id_auc_matched"] > 0.6
    assert "strongest_auc_matched" in table and "meets_target" in table


# ---------------------------------------------------------------- secure aggregation


def test_secure_aggregation_trains_like_sparse_uploads_costs_dense_bytes_and_hides_devices(tmp_path) -> None:
    flat = {
        "results-dir": str(tmp_path), "num-server-rounds": 3, "data.dataset": "synthetic", "data.synthetic-users": 30,
        "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 10, "model.dim": 8, "sparse.density": 0.5,
        "fed.fraction-train": 0.5, "fed.explore-every": 2, "fed.nmf-rounds": 2, "fed.item-optimizer": "sgd",
    }
    plain_config = RunConfig.from_flat(flat)
    secure_config = RunConfig.from_flat({**flat, "privacy.secure-aggregation": True})
    data = load_dataset(plain_config.data, plain_config.seed)
    _, plain = run_inprocess(plain_config, data)
    log = UploadLog()
    secure_dir, secure = run_inprocess(secure_config, data, observer=log)
    assert secure["recall@20"] == pytest.approx(plain["recall@20"], abs=1e-4)  # the same means, summed differently
    assert not log.uploads and not log.counts  # the server never sees one device's upload
    n_items = data.n_items
    assert secure["item_active_entries"] == round(0.5 * n_items * 8)
    dense = 4 * secure["item_active_entries"]  # a value per active entry; the sum rule needs no row weights
    records = {record["round"]: record for record in read_jsonl(secure_dir / "rounds.jsonl")}
    assert records[1]["upload_bytes_mean"] == records[1]["upload_bytes_max"] == dense  # no signal asked for
    assert records[2]["upload_bytes_mean"] == dense + 4 * n_items * 8  # exploration round: the signal, dense too


def test_secure_aggregation_needs_the_full_downlink() -> None:
    from fedsparse.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.secure-aggregation"):
        RunConfig.from_flat({"privacy.secure-aggregation": True, "fed.downlink": "rows"})


def test_secure_row_subsets_are_public_seeded_and_sized() -> None:
    from fedsparse.privacy.secure_rows import secure_round_rows

    config = RunConfig.from_flat({"privacy.secure-aggregation": True, "privacy.secure-row-fraction": 0.25})
    rows = secure_round_rows(config, 100, 3)
    assert rows.size == 25 and np.array_equal(rows, np.unique(rows))
    np.testing.assert_array_equal(rows, secure_round_rows(config, 100, 3))
    assert not np.array_equal(rows, secure_round_rows(config, 100, 4))
    assert secure_round_rows(RunConfig.from_flat({"privacy.secure-aggregation": True}), 100, 3) is None
    from fedsparse.config import ConfigError

    with pytest.raises(ConfigError, match="needs privacy.secure-aggregation"):
        RunConfig.from_flat({"privacy.secure-row-fraction": 0.5})


def test_biased_secure_rows_follow_the_public_mask() -> None:
    """``privacy.secure-row-bias``: rows drawn in proportion to (active entries)^b of the mask every device
    receives: seeded, exactly sized, never a row without entries, rows with more entries covered more often."""
    from fedsparse.config import ConfigError
    from fedsparse.privacy.secure_rows import secure_round_rows

    flat = {"privacy.secure-aggregation": True, "privacy.secure-row-fraction": 0.1, "privacy.secure-train-items": "all",
            "privacy.secure-row-bias": 1.0}
    config = RunConfig.from_flat(flat)
    mask = np.zeros((100, 8), dtype=bool)
    mask[:50, :1] = True  # rows 0-49: one entry; 50-89: eight; 90-99: none
    mask[50:90] = True
    rows = secure_round_rows(config, 100, 3, mask)
    assert rows.size == 10 and np.array_equal(rows, np.unique(rows)) and rows.max() < 90
    np.testing.assert_array_equal(rows, secure_round_rows(config, 100, 3, mask.copy()))
    covered = np.zeros(100)
    for server_round in range(1, 401):
        covered[secure_round_rows(config, 100, server_round, mask)] += 1
    assert covered[90:].sum() == 0
    assert covered[50:90].mean() > 4 * covered[:50].mean()  # 8x the weight (less: drawn without replacement)
    uniform = RunConfig.from_flat({**flat, "privacy.secure-row-bias": 0.0})
    np.testing.assert_array_equal(secure_round_rows(uniform, 100, 3), secure_round_rows(uniform, 100, 3, mask))
    with pytest.raises(ValueError, match="item mask"):
        secure_round_rows(config, 100, 3)
    with pytest.raises(ConfigError, match="secure-row-bias"):
        RunConfig.from_flat({**flat, "privacy.secure-train-items": "covered"})
    with pytest.raises(ConfigError, match="secure-row-bias"):
        RunConfig.from_flat({**flat, "privacy.secure-row-bias": -1.0})


@pytest.mark.parametrize("rows", ["uniform", "biased"])
def test_secure_aggregation_over_row_subsets_costs_their_share_and_every_device_uploads(tmp_path, rows: str) -> None:
    """Devices and server draw the same rows every round (no upload refused), biased by the mask or not."""
    from fedsparse.privacy.secure_rows import secure_round_rows

    flat = {
        "results-dir": str(tmp_path), "num-server-rounds": 3, "data.dataset": "synthetic", "data.synthetic-users": 30,
        "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 10, "model.dim": 8, "sparse.density": 0.5,
        "fed.fraction-train": 0.5, "fed.explore-every": 2, "fed.nmf-rounds": 2, "privacy.secure-aggregation": True,
        "privacy.secure-row-fraction": 0.2,
    }
    if rows == "biased":
        flat.update({"privacy.secure-train-items": "all", "privacy.secure-row-bias": 2.0})
    config = RunConfig.from_flat(flat)
    data = load_dataset(config.data, config.seed)
    run_dir, summary = run_inprocess(config, data)
    records = {record["round"]: record for record in read_jsonl(run_dir / "rounds.jsonl")}
    assert all(record["failed_clients"] == 0 and record["dropped_updates"] == 0 for record in records.values())
    covered = secure_round_rows(config, data.n_items, 1, np.ones((data.n_items, 1), dtype=bool))
    # Round 1 uses the mask the federated NMF set: read it back from what a device's secure values must fill.
    first = records[1]
    assert first["upload_bytes_mean"] == first["upload_bytes_max"]  # one shape for every device
    assert first["upload_bytes_mean"] < 0.35 * (4 * summary["item_active_entries"] + 4 * data.n_items)
    assert first["upload_bytes_mean"] >= 4 * covered.size  # at least the per-row weights of the covered rows
    assert np.isfinite(summary["recall@20"])


# ---------------------------------------------------------------- attacks on the sums the server holds


def test_differencing_attack_isolates_a_device_from_overlapping_cohort_sums() -> None:
    from fedsparse.privacy.attacks import differencing_guess
    from fedsparse.privacy.observe import ObservedSum

    n_items = 40
    items = {user: np.arange(5 * user, 5 * user + 5) for user in range(8)}
    sums = []
    for server_round in range(1, 9):  # consecutive cohorts of 4 devices share 3
        cohort = np.array([(server_round + k) % 8 for k in range(4)])
        mass = np.zeros(n_items)
        for user in cohort:
            mass[items[int(user)]] += 1.0
        sums.append(ObservedSum("train", server_round, np.sort(cohort), mass))
    guess = differencing_guess(sums, 3, 5)
    metrics = membership_metrics(guess, items[3], np.arange(n_items))
    assert metrics["auc"] == pytest.approx(1.0) and metrics["f1"] == pytest.approx(1.0)
    assert differencing_guess(sums[:1], 7, 5) is None  # device 7 joined no sum here: no guess


def test_the_sum_attack_learns_its_direction_on_shadow_devices() -> None:
    """Where members carry less mass in the sums they joined (here each device removes its items' mass), raw
    differencing scores below 0.5; the attacker learns the sign on its shadow half and separates the targets."""
    from fedsparse.privacy.attacks import differencing_guess
    from fedsparse.privacy.evaluate import shadow_split, sum_attack
    from fedsparse.privacy.observe import ObservedSum

    n_items, n_users = 80, 16
    items = {user: np.arange(5 * user, 5 * user + 5) for user in range(n_users)}
    sums = []
    for server_round in range(1, 17):
        cohort = np.sort(np.array([(server_round + k) % n_users for k in range(6)]))
        mass = np.full(n_items, 10.0)
        for user in cohort:
            mass[items[int(user)]] -= 1.0
        sums.append(ObservedSum("train", server_round, cohort, mass))
    raw = sum_attack(sums, items, n_items, 5, seed=0)
    assert raw["sign"] == -1.0 and raw["auc"] == pytest.approx(1.0)
    targets = [user for user in range(n_users) if user not in shadow_split(0, np.arange(n_users))]
    unoriented = np.mean([membership_metrics(differencing_guess(sums, user, 5), items[user], np.arange(n_items))["auc"]
                          for user in targets])
    assert unoriented == pytest.approx(0.0)  # the same scores, read the wrong way round
    assert np.isnan(raw["auc_outside"])  # every device joined a sum: no control group
    # The control reads each target's scores against the items of a device that joined no sum (here items no
    # member holds, whose mass never moves): near chance, while the members read 1.0.
    wider = [ObservedSum("train", item.server_round, item.users, np.concatenate([item.row_mass, np.full(10, 10.0)]))
             for item in sums]
    controlled = sum_attack(wider, {**items, n_users: np.arange(n_items, n_items + 5)}, n_items + 10, 5, seed=0)
    assert controlled["auc"] == pytest.approx(1.0) and abs(controlled["auc_outside"] - 0.5) < 0.1
    rising = [ObservedSum("train", item.server_round, item.users, 20.0 - item.row_mass) for item in sums]
    assert sum_attack(rising, items, n_items, 5, seed=0)["sign"] == 1.0
    assert np.isnan(sum_attack([], items, n_items, 5, seed=0)["auc"])


def test_a_sum_of_everyone_reads_popularity_not_membership() -> None:
    """A start-like sum over every device holds each item's popularity: its plain AUC is high, but among items
    of equal popularity it cannot tell a device's items from others (matched AUC 0.5: what the target reads)."""
    from fedsparse.privacy.evaluate import sum_attack
    from fedsparse.privacy.observe import ObservedSum

    rng = np.random.default_rng(0)
    n_items, n_users = 120, 60
    weight = np.linspace(1.0, 12.0, n_items) ** 2
    items = {user: np.sort(rng.choice(n_items, size=12, replace=False, p=weight / weight.sum())) for user in range(n_users)}
    counts = np.zeros(n_items)
    for user_items in items.values():
        counts[user_items] += 1
    same_count = np.unique(counts, return_inverse=True)[1]  # strata of exactly equal popularity
    result = sum_attack([ObservedSum("start", 0, np.arange(n_users), counts)], items, n_items, 12, seed=0,
                        strata=same_count)
    assert result["auc"] > 0.75
    assert result["auc_matched"] == pytest.approx(0.5)


def test_the_server_s_sums_are_recorded_in_every_phase_and_attacked(tmp_path) -> None:
    from fedsparse.federation.engine import run_federation
    from fedsparse.federation.inprocess import InProcessTransport, population_of
    from fedsparse.federation.observer import ObservingTransport
    from fedsparse.privacy.attacks import differencing_guess

    config = RunConfig.from_flat({
        "results-dir": str(tmp_path), "num-server-rounds": 4, "data.dataset": "synthetic", "data.synthetic-users": 30,
        "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 10, "model.dim": 8, "sparse.density": 0.5,
        "fed.fraction-train": 0.3, "privacy.secure-aggregation": True,
    })
    data = load_dataset(config.data, config.seed)
    transport = ObservingTransport(InProcessTransport(config, data), config, data.n_items)
    (tmp_path / "run").mkdir()
    run_federation(config, population_of(data, config), transport, tmp_path / "run", data.train)
    phases = [item.phase for item in transport.sums]
    assert phases[:2] == ["start", "start"] and phases.count("train") == 4  # the seeded pass, one refinement, 4 rounds
    assert all(item.row_mass.shape == (data.n_items,) and np.isfinite(item.row_mass).all() for item in transport.sums)
    train = [item for item in transport.sums if item.phase == "train"]
    aucs = []
    for user in sorted({int(u) for item in train for u in item.users}):
        members = data.train.indices[data.train.indptr[user] : data.train.indptr[user + 1]]
        aucs.append(membership_metrics(differencing_guess(train, user, 10), members, np.arange(data.n_items))["auc"])
    assert np.isfinite(np.nanmean(aucs)) and np.nanmean(aucs) > 0.5  # a number, not "nan": sums of overlapping cohorts leak


@pytest.mark.parametrize("rule", ["sum", "uniform"])
def test_a_training_sum_is_read_as_the_rule_reveals_it(tmp_path, rule: str) -> None:
    """Under the sum rule no secure upload carries row weights and the server's record of a round is the norm of
    each row's summed delta; under a per-row mean the devices' weights are sent and their sum counts the devices
    that touched each row. Checked against the replies themselves."""
    from fedsparse.federation.engine import run_federation
    from fedsparse.federation.inprocess import InProcessTransport, population_of
    from fedsparse.federation.messages import TRAIN
    from fedsparse.federation.observer import ObservingTransport
    from fedsparse.federation.wire import RowsDownload

    config = RunConfig.from_flat({
        "results-dir": str(tmp_path), "num-server-rounds": 2, "data.dataset": "synthetic", "data.synthetic-users": 30,
        "data.synthetic-items": 60, "data.synthetic-interactions-per-user": 10, "model.dim": 8, "sparse.density": 0.5,
        "fed.fraction-train": 0.3, "privacy.secure-aggregation": True, "fed.aggregation": rule,
    })
    data = load_dataset(config.data, config.seed)
    inner = InProcessTransport(config, data)
    exchanges = []

    class Capturing:
        def __getattr__(self, name):
            return getattr(inner, name)

        def send(self, kind, server_round, messages, settings):
            replies = inner.send(kind, server_round, messages, settings)
            if kind == TRAIN:
                exchanges.append((dict(messages), replies))
            return replies

    transport = ObservingTransport(Capturing(), config, data.n_items)
    (tmp_path / "run").mkdir()
    run_federation(config, population_of(data, config), transport, tmp_path / "run", data.train)
    train = [item for item in transport.sums if item.phase == "train"]
    assert len(train) == len(exchanges) == 2
    for observed, (messages, replies) in zip(train, exchanges, strict=True):
        arrays = [reply.arrays for reply in replies.values()]
        assert all(("secure-weights" in a) == (rule == "uniform") for a in arrays)
        if rule == "uniform":
            expected = np.sum([a["secure-weights"] for a in arrays], axis=0)
            np.testing.assert_array_equal(observed.row_mass, expected)
            assert set(np.unique(expected)) <= set(range(len(arrays) + 1))  # devices per row, one vote each
        else:
            message = next(iter(messages.values()))
            table = {key: value for key, value in message.items() if key.startswith("table.")}
            _, mask = RowsDownload.from_arrays(table, data.n_items, 8).table.decode()
            summed = np.zeros(mask.shape)
            summed[mask] = np.sum([a["secure-values"].astype(np.float64) for a in arrays], axis=0)
            np.testing.assert_allclose(observed.row_mass, np.sqrt((summed**2).sum(axis=1)), rtol=1e-6, atol=1e-9)
