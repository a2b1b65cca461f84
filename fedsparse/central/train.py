"""Centralised trainer: MF / NeuMF with BPR or BCE under any mask policy, validation early stopping.

With the ``dense`` policy this is the 100 % line every sparse and federated result is compared with.
A run writes ``config.json``, one ``metrics.jsonl`` line per epoch and ``summary.json`` into a new run
directory.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedsparse.central.losses import batch_loss
from fedsparse.central.models import EmbeddingRecommender, MostPopular, Recommender, build_model
from fedsparse.central.sampling import NegativeSampler, negative_exclusions, training_pairs
from fedsparse.config import RunConfig, ranking_cutoffs, uses_sampled_protocol
from fedsparse.data import Interactions, load_run_data
from fedsparse.eval import metrics
from fedsparse.rng import rng_for, torch_generator_for
from fedsparse.run_files import append_jsonl, new_run_dir, provenance, write_json
from fedsparse.sparse.masked_training import SparseEmbeddingTraining
from fedsparse.sparse.policies import build_policy


@dataclass(frozen=True)
class TrainResult:
    """Where a run wrote its files and what it measured."""

    run_dir: Path
    summary: dict[str, Any]


def evaluate(model: Recommender, data: Interactions, config: RunConfig, split: str) -> dict[str, float]:
    """Full-ranking metrics on ``split`` ("validation" or "test"), excluding the user's known items."""
    model.eval()
    target = getattr(data, split)
    exclude = [data.train] if split == "validation" else [data.train, data.validation]
    result = metrics.full_ranking_metrics(
        lambda users: model.score_all(torch.as_tensor(users)),
        target,
        exclude,
        ranking_cutoffs(config, data.n_items),
        config.eval.batch_users,
    )
    model.train()
    return result


def evaluate_sampled(model: Recommender, data: Interactions, config: RunConfig, split: str) -> dict[str, float]:
    """Leave-one-out protocol: rank each held-out item among ``eval.sampled-negatives`` never-seen items.

    The negatives are the candidate file's (``data.validation_negatives`` / ``test_negatives``) when the
    run has one, else drawn from ``rng_for(seed, "eval-negatives", split)``.
    """
    model.eval()
    held_out = getattr(data, split)
    users = np.flatnonzero(np.diff(held_out.indptr) > 0)
    fixed = data.validation_negatives if split == "validation" else data.test_negatives
    if fixed is not None:
        negatives = fixed[users]
    elif config.eval.candidates:
        raise ValueError(f"eval.candidates is set but {data.name} carries no candidate negatives (load it with load_run_data)")
    else:
        interacted = (data.train + data.validation + data.test).tocsr()
        negatives = metrics.sample_eval_negatives(
            rng_for(config.seed, "eval-negatives", split), interacted, users, config.eval.sampled_negatives
        )
    with torch.no_grad():
        result = metrics.sampled_metrics(
            lambda u, items: model.score(torch.as_tensor(u), torch.as_tensor(items)),
            held_out,
            negatives,
            users,
            k=metrics.SAMPLED_PROTOCOL_K,
            batch_users=config.eval.batch_users,
        )
    model.train()
    return {f"sampled_{key}": value for key, value in result.items()}


def most_popular_run(config: RunConfig, data: Interactions, run_dir: Path, started: float) -> TrainResult:
    """Score the most-popular ranking (items by training interactions, nothing trained) with the same
    evaluations as a trained model, and write its summary into ``run_dir``."""
    counts = torch.from_numpy(np.asarray(data.train.sum(axis=0)).ravel())
    model = MostPopular(counts)
    summary: dict[str, Any] = {"dataset": data.name, "model": "popular", "seed": config.seed, "epochs_run": 0,
                               "selection": "none (nothing is trained)"}
    for split in ("validation", "test") if data.validation.nnz else ("test",):
        prefix = "validation_" if split == "validation" else ""
        summary.update({prefix + key: value for key, value in evaluate(model, data, config, split).items()})
        if uses_sampled_protocol(config):
            summary.update({prefix + key: value for key, value in evaluate_sampled(model, data, config, split).items()})
    summary["total_seconds"] = time.perf_counter() - started
    write_json(run_dir / "summary.json", summary)
    return TrainResult(run_dir=run_dir, summary=summary)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_centralised(config: RunConfig, data: Interactions | None = None, show_progress: bool | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data`` centrally and write a run directory under ``results_dir``.

    The best epoch is chosen on validation (never on test): sampled HR@10 under the sampled protocol
    (``data.split = loo`` or ``eval.candidates``; a tie goes to the later epoch), else Recall@``eval.k``;
    without a validation split the last epoch is used. The test metrics are those of the best epoch.
    ``show_progress=None`` shows a progress bar only on a terminal.
    """
    started = time.perf_counter()
    if data is None:
        data = load_run_data(config)
    run_dir = _open_run_dir(config, data)
    if config.model.name == "popular":
        return most_popular_run(config, data, run_dir, started)
    run = _prepare_run(config, data)
    epochs = _train_epochs(config, data, run, run_dir, show_progress)
    summary = _summary_at_best_epoch(config, data, run, epochs)
    summary["total_seconds"] = time.perf_counter() - started
    summary["peak_rss_bytes"] = peak_rss_bytes()
    write_json(run_dir / "summary.json", summary)
    return TrainResult(run_dir=run_dir, summary=summary)


def _open_run_dir(config: RunConfig, data: Interactions) -> Path:
    """A new run directory holding ``config.json``: the flat config with the policy's effective density,
    the dataset's counts, checksum and repairs, and the code's provenance."""
    run_dir = new_run_dir(config.results_dir, f"train-{data.name}-{config.model.name}")
    as_run = replace(config, sparse=replace(config.sparse, density=build_policy(config.sparse).settings.density))  # dense: 1.0
    described = {"config": as_run.to_flat(), "dataset": data.counts(), "dataset_checksum": data.checksum(),
                 "repairs": data.repairs}
    write_json(run_dir / "config.json", {**described, **provenance()})
    return run_dir


@dataclass(frozen=True)
class _CentralRun:
    """What every epoch uses: the model and its sparse training, the (user, positive) pairs int64 [n] and
    the negative sampler, and how the best epoch is selected (``select_key`` among validation metrics)."""

    model: EmbeddingRecommender
    training: SparseEmbeddingTraining
    pair_users: np.ndarray
    pair_items: np.ndarray
    sampler: NegativeSampler
    sampled: bool
    select_key: str
    has_validation: bool


def _prepare_run(config: RunConfig, data: Interactions) -> _CentralRun:
    """Build the seeded model, its masked training over ``train.epochs`` epochs of batches, the training pairs
    and the negative sampler (``train.negatives-from``)."""
    model = build_model(config.model, data.n_users, data.n_items, torch_generator_for(config.seed, "model-init"))
    pair_users, pair_items = training_pairs(data.train)
    steps_per_epoch = -(-len(pair_users) // config.train.batch_size)
    training = SparseEmbeddingTraining(model, config, data.train, steps_per_epoch * config.train.epochs)
    sampler = NegativeSampler(negative_exclusions(data.train, data.validation, data.test, config.train.negatives_from))
    sampled = uses_sampled_protocol(config)
    select_key = metrics.selection_key(sampled, config.eval.k)
    return _CentralRun(model, training, pair_users, pair_items, sampler, sampled, select_key, data.validation.nnz > 0)


@dataclass
class _BestEpoch:
    """The best validation score so far, its epoch (0: none yet) and the model's weights then."""

    score: float
    epoch: int
    state: dict[str, Any]


@dataclass(frozen=True)
class _EpochsRun:
    """What the epoch loop leaves: epochs run, seconds spent training (evaluation excluded), the best epoch."""

    epochs_run: int
    train_seconds: float
    best: _BestEpoch


def _train_epochs(
    config: RunConfig, data: Interactions, run: _CentralRun, run_dir: Path, show_progress: bool | None
) -> _EpochsRun:
    """Train epoch after epoch, validating every ``train.eval-every`` epochs and at the last one, and append
    one ``metrics.jsonl`` record per epoch; stop after ``train.patience`` validations without a gain."""
    best = _BestEpoch(-np.inf, 0, copy.deepcopy(run.model.state_dict()))
    evaluations_without_gain = 0
    train_seconds = 0.0
    epochs_run = 0
    progress = tqdm(range(1, config.train.epochs + 1), desc=f"train {data.name}", unit="epoch", disable=_quiet(show_progress))
    for epoch in progress:
        epoch_started = time.perf_counter()
        mean_loss = _train_one_epoch(config, run, epoch)
        epoch_seconds = time.perf_counter() - epoch_started
        train_seconds += epoch_seconds
        epochs_run = epoch
        record: dict[str, Any] = {"epoch": epoch, "loss": mean_loss, "epoch_seconds": epoch_seconds}
        if run.has_validation and (epoch % config.train.eval_every == 0 or epoch == config.train.epochs):
            validation = _validation_metrics(config, data, run)
            record.update({f"validation_{key}": value for key, value in validation.items()})
            if metrics.improves(validation[run.select_key], best.score, run.sampled):
                best = _BestEpoch(validation[run.select_key], epoch, copy.deepcopy(run.model.state_dict()))
                evaluations_without_gain = 0
            else:
                evaluations_without_gain += 1
            progress.set_postfix({run.select_key: f"{validation[run.select_key]:.4f}"})
        append_jsonl(run_dir / "metrics.jsonl", record)
        if config.train.patience and evaluations_without_gain >= config.train.patience:
            break
    return _EpochsRun(epochs_run, train_seconds, best)


def _train_one_epoch(config: RunConfig, run: _CentralRun, epoch: int) -> float:
    """One pass over the training pairs in a seeded order, ``train.negatives`` sampled negatives per pair;
    returns the mean loss per pair."""
    rng = rng_for(config.seed, "train-epoch", epoch)
    order = rng.permutation(len(run.pair_users))
    total_loss = 0.0
    for start in range(0, len(order), config.train.batch_size):
        batch = order[start : start + config.train.batch_size]
        users, positives = run.pair_users[batch], run.pair_items[batch]
        negatives = run.sampler.sample(rng, users, config.train.negatives)
        run.training.begin_step(users, np.concatenate([positives, negatives.ravel()]), rng)
        loss = batch_loss(
            run.model,
            torch.from_numpy(users),
            torch.from_numpy(positives),
            torch.from_numpy(negatives),
            config.train.loss,
            config.train.l2_reg,
        )
        run.training.step(loss)
        total_loss += loss.item() * len(batch)
    return total_loss / max(1, len(order))


def _validation_metrics(config: RunConfig, data: Interactions, run: _CentralRun) -> dict[str, float]:
    """Full-ranking validation metrics, plus the sampled protocol's when it selects the best epoch."""
    validation = evaluate(run.model, data, config, "validation")
    if run.sampled:
        validation.update(evaluate_sampled(run.model, data, config, "validation"))
    return validation


def _summary_at_best_epoch(
    config: RunConfig, data: Interactions, run: _CentralRun, epochs: _EpochsRun
) -> dict[str, Any]:
    """Restore the best epoch's weights (the last epoch's without validation) and describe the run: the
    selection, time, model and sparse-training bytes, and the test metrics of that epoch (timing totals
    are added by the caller)."""
    best, training = epochs.best, run.training
    selected = run.has_validation and best.epoch > 0
    if selected:
        run.model.load_state_dict(best.state)
    summary: dict[str, Any] = {
        "dataset": data.name,
        "model": config.model.name,
        "dim": config.model.dim,
        "loss": config.train.loss,
        "seed": config.seed,
        "epochs_run": epochs.epochs_run,
        "best_epoch": best.epoch if selected else epochs.epochs_run,
        "selection": "best validation " + run.select_key if run.has_validation else "last epoch (no validation split)",
        "train_seconds": epochs.train_seconds,
        "seconds_per_epoch": epochs.train_seconds / max(1, epochs.epochs_run),
        "model_bytes": sum(p.numel() * p.element_size() for p in run.model.parameters()),
        "policy": training.policy.name,
        "density": training.policy.settings.density,
        "active_entries": training.active_entries(),
        "stored_model_bytes": training.stored_model_bytes(),
        "peak_grad_bytes": training.accounting.peak_grad_bytes,
        "training_state_bytes": training.state_nbytes(),
        "mask_updates": training.accounting.mask_updates,
        "entries_swapped": training.accounting.entries_swapped,
        "mask_update_seconds": training.accounting.mask_update_seconds,
        "mask_init_seconds": training.accounting.mask_init_seconds,
    }
    if run.has_validation:
        summary["validation_" + run.select_key] = float(best.score)
    summary.update(evaluate(run.model, data, config, "test"))
    if run.sampled:
        summary.update(evaluate_sampled(run.model, data, config, "test"))
    return summary


def _quiet(show_progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal (CI, pipes)."""
    return None if show_progress is None else not show_progress
