"""BET-style search for a table-level size allocation under an exact budget (docs/methods.md#size-bet), simplified.

BET (Qu et al., WSDM 2024) scores candidate allocations with a fitness predictor trained on a few
measured ones and runs an evolutionary search on the predictor, so only promising candidates pay for
training. Here a candidate is one relative size per popularity group (``sparse.size-groups``); every
candidate is turned into row sizes that meet the budget exactly (``fit_sizes``), so the budget holds for
whatever the search proposes. The predictor is ridge regression on the candidate's per-group mean sizes
and their squares (BET's DeepSets encoder over a set of sizes pools to such per-group statistics when
rows are grouped); ``evaluate`` is the expensive measurement (e.g. a short training's validation recall).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedsparse.sparse.embedding_sizes import fit_sizes, popularity_groups


@dataclass(frozen=True)
class BetSettings:
    """Search effort: measured candidates, evolutionary generations and population on the predictor."""

    initial_measured: int = 6  # random allocations measured before the first predictor fit
    search_rounds: int = 2  # predictor fit -> evolution -> measure the best predicted, repeated
    measured_per_round: int = 2  # predicted-best candidates measured after each round's evolution
    generations: int = 30
    population: int = 32
    mutation_std: float = 0.3  # std of the log-normal factor a mutation multiplies one group's size by
    spread: float = 0.5  # std of log relative sizes of random candidates (around the uniform allocation)
    ridge: float = 1e-2  # L2 penalty of the fitness predictor


@dataclass
class BetResult:
    """The best measured allocation (relative sizes per group), its score and every measurement."""

    best: np.ndarray
    best_score: float
    measured: list[tuple[np.ndarray, float]] = field(default_factory=list)
    predictor_rmse: float = float("nan")  # in-sample error of the last predictor fit, in score units


def group_mean_sizes(candidate: np.ndarray, groups: np.ndarray, total: int, dim: int, min_size: int) -> np.ndarray:
    """float [G] mean row size per group once ``candidate`` is fitted to the exact budget, as a share of dim."""
    sizes = fit_sizes(np.asarray(candidate, dtype=np.float64)[groups], total, dim, min_size)
    counts = np.bincount(groups, minlength=candidate.size)
    return np.bincount(groups, weights=sizes, minlength=candidate.size) / np.maximum(counts, 1) / dim


def _features(means: np.ndarray) -> np.ndarray:
    """Predictor inputs [n, 2G + 1]: per-group mean sizes, their squares, a bias."""
    return np.hstack([means, means**2, np.ones((means.shape[0], 1))])


def fit_predictor(means: np.ndarray, scores: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge weights [2G + 1] predicting scores from per-group mean sizes (closed form)."""
    x = _features(means)
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ scores)


def predict(weights: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Predicted scores [n] of candidates given as per-group mean sizes [n, G]."""
    return _features(means) @ weights


def bet_search(
    evaluate: Callable[[np.ndarray], float],
    popularity: np.ndarray,
    total: int,
    dim: int,
    groups: int,
    rng: np.random.Generator,
    settings: BetSettings = BetSettings(),
    min_size: int = 1,
) -> BetResult:
    """Search relative group sizes [groups] for the table whose rows have ``popularity`` and budget ``total``.

    ``evaluate(candidate)`` returns a score to maximise (it is called initial_measured + search_rounds *
    measured_per_round times, plus once for the uniform allocation, which is always measured first).
    """
    group_of = popularity_groups(popularity, groups)

    def means_of(candidates: np.ndarray) -> np.ndarray:
        return np.stack([group_mean_sizes(c, group_of, total, dim, min_size) for c in candidates])

    def key(candidate: np.ndarray) -> tuple:
        return tuple(np.round(group_mean_sizes(candidate, group_of, total, dim, min_size) * dim).astype(int))

    measured: list[tuple[np.ndarray, float]] = []
    seen: set[tuple] = set()

    def measure(candidate: np.ndarray) -> None:
        seen.add(key(candidate))
        measured.append((candidate, float(evaluate(candidate))))

    def random_candidates(count: int) -> np.ndarray:
        return np.exp(rng.normal(0.0, settings.spread, (count, groups)))

    measure(np.ones(groups))
    for candidate in random_candidates(settings.initial_measured):
        measure(candidate)
    weights = np.zeros(2 * groups + 1)
    for _ in range(settings.search_rounds):
        candidates = np.stack([c for c, _ in measured])
        scores = np.array([s for _, s in measured])
        weights = fit_predictor(means_of(candidates), scores, settings.ridge)
        population = np.vstack([candidates, random_candidates(settings.population)])
        for _ in range(settings.generations):
            parents = population[rng.integers(0, len(population), (settings.population, 2))]
            crossover = np.where(rng.random((settings.population, groups)) < 0.5, parents[:, 0], parents[:, 1])
            mutated = crossover.copy()
            chosen = rng.integers(0, groups, settings.population)
            mutated[np.arange(settings.population), chosen] *= np.exp(rng.normal(0.0, settings.mutation_std, settings.population))
            pool = np.vstack([population, mutated])
            population = pool[np.argsort(-predict(weights, means_of(pool)), kind="stable")[: settings.population]]
        fresh = [c for c in population if key(c) not in seen]
        for candidate in fresh[: settings.measured_per_round]:
            measure(candidate)
    candidates = np.stack([c for c, _ in measured])
    scores = np.array([s for _, s in measured])
    rmse = float(np.sqrt(np.mean((predict(weights, means_of(candidates)) - scores) ** 2)))
    best = int(np.argmax(scores))
    return BetResult(candidates[best] / candidates[best].max(), float(scores[best]), measured, rmse)
