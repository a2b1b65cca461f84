"""One typed, frozen run configuration built from Flower's flat ``run_config`` mapping.

Flat keys are kebab-case, prefixed by their section (``train.batch-size``); top-level keys have no
prefix (``seed``). ``RunConfig.from_flat`` is the only bridge from flat keys to Python, and it rejects
unknown keys and wrongly typed values before any work starts.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import io
import math
import re
import sys
import tokenize
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

SPLITS = ("auto", "provided", "random", "loo")
POLICY_NAMES = (
    "dense", "static", "magnitude", "set", "rigl", "dsl", "sparserec",
    "size-frequency", "size-scall", "size-bet", "size-ciess", "amgp",
)
MASK_INITS = ("auto", "random", "nmf")
GROW_SCORES = ("auto", "last-batch", "signed-sum", "abs-sum", "ema", "random")
SPARSE_GRAD = ("auto", "on", "off")
GRAD_ROWS = ("batch", "degree", "norm", "uniform")
NMF_METHODS = ("sklearn", "multiplicative")
NMF_SELECT = ("global", "per-row")
NMF_VALUES = ("random", "factors")
DOWNLINKS = ("full", "rows")
UPLINKS = ("rows", "table")
NMF_INITS = ("federated", "central", "none")
NMF_STARTS = ("range", "svd", "mu")
AGGREGATIONS = ("weighted", "uniform", "sum", "client-mean")
SERVER_OPTIMIZERS = ("avg", "adam")
ITEM_OPTIMIZERS = ("adam", "sgd")
USER_OPTIMIZERS = ("adam", "sgd")
USER_STATES = ("keep", "reconstruct")
STEP_ORDERS = ("joint", "head-first")
USER_INITS = ("normal", "shared-uniform")
EVALUATE_MODELS = ("global", "local", "local-last")
SECURE_TRAIN_ITEMS = ("covered", "all")
LDP_MECHANISMS = ("none", "gaussian", "laplace")
FAULT_MODES = ("exception", "crash", "timeout")
ROBUST_AGGREGATORS = ("mean", "median", "trimmed-mean")
AUTO = -1.0  # a float knob set to this takes the policy's own default
MODELS = ("mf", "neumf", "popular")
LOSSES = ("bpr", "bce")
NEGATIVE_RULES = ("non-train", "unrated")
LOO_TIES = ("file-last", "file-first", "item")
HOLDOUTS = ("latest", "random")  # candidate files: latest = by timestamp (PFedRec); random = a seeded random pair per user


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where to find it, and how to split it."""

    dataset: str = "ml-100k"  # a registered name (`fedsparse data list`); ml-100k and synthetic need no manual download
    data_dir: str = ""  # folder holding <dataset>/ ("" = $FEDSPARSE_DATA, then the user cache, then download)
    split: str = "auto"  # auto = the files' own train/test split if they have one, else random; loo on request
    test_ratio: float = 0.2  # per-user share held out for test by the random split
    validation_ratio: float = 0.1  # per-user share of training data held out for validation
    rating_threshold: float = 0.0  # implicit conversion: keep ratings >= threshold (0 keeps all)
    k_core: int = 0  # iterative k-core filter on users and items (0 = off)
    synthetic_users: int = 2000  # synthetic: users generated
    synthetic_items: int = 1000  # synthetic: items generated
    synthetic_interactions_per_user: int = 20  # synthetic: mean interactions per user
    path: str = ""  # your own interaction file (CSV, TSV or Parquet), read instead of data.dataset; runs are named after it
    user_column: str = "user"  # data.path: the user id column, a header name or a 0-based position ("0")
    item_column: str = "item"  # data.path: the item id column, a header name or a 0-based position ("1")
    rating_column: str = ""  # data.path: a numeric rating column, for data.rating-threshold ("" = none)
    timestamp_column: str = ""  # data.path: a numeric timestamp column, needed by data.split = loo ("" = none)
    separator: str = ","  # data.path: field separator of a text file; "tab" (or "\t") for tabs, "space" for runs of blanks
    header: bool = True  # data.path: the first line names the columns (false: data starts on line 1, columns by position)
    loo_ties: str = "file-last"  # loo, equal timestamps: file-last = the later row in the file is later;
    # file-first = the earlier (PFedRec); item = the larger item id


@dataclass(frozen=True)
class ModelConfig:
    """Recommender architecture on user and item embedding tables."""

    name: str = "mf"  # matrix factorisation, NeuMF (GMF + MLP tower; in a federation FedNCF), or popular
    # (most-popular ranking, centralised trainer)
    dim: int = 64  # embedding width of users and items (NeuMF: of the GMF embeddings)
    mlp_layers: str = "64,32,16"  # NeuMF MLP tower widths, comma-separated; its embeddings are half the first width

    @property
    def mlp_widths(self) -> tuple[int, ...]:
        """The MLP tower widths as integers."""
        return tuple(int(w) for w in self.mlp_layers.split(",") if w.strip())

    @property
    def row_width(self) -> int:
        """Width of one user or item row as a federation stores, sends and masks it: ``dim`` for MF; for
        NeuMF the GMF and MLP embeddings side by side, dim + ``mlp_embedding_width``."""
        return self.dim + mlp_embedding_width(self.mlp_widths) if self.name == "neumf" else self.dim


def mlp_embedding_width(widths: tuple[int, ...]) -> int:
    """Width of NeuMF's MLP embeddings: half the tower's first width (at least 1), so [user; item] feeds it."""
    return max(1, widths[0] // 2)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the centralised reference trainer."""

    epochs: int = 30  # passes over the training interactions (centralised trainer)
    batch_size: int = 2048  # positives per optimiser step
    lr: float = 0.001  # Adam learning rate
    l2_reg: float = 1e-4  # L2 penalty on the embeddings in each batch, LightGCN's `decay` (not Adam weight decay)
    loss: str = "bpr"  # pairwise BPR, or pointwise binary cross-entropy
    negatives: int = 1  # sampled negatives per positive
    negatives_from: str = "non-train"  # negative and padding pool: non-train items (held-out ones too),
    # or unrated (PFedRec's rule)
    patience: int = 5  # evaluations without validation improvement before stopping (0 = never stop)
    eval_every: int = 1  # epochs between validation evaluations


@dataclass(frozen=True)
class SparseConfig:
    """Dynamic sparse training of the embedding tables: the mask policy and its knobs.

    "auto" / -1 values take the policy's own default (see ``fedsparse/sparse/policies``); docs/methods.md#sparserec
    lists the SparseRec choices these flags ablate.
    """

    policy: str = "sparserec"  # mask policy of the item (and user) tables; dense = every entry active
    density: float = 0.2  # active share of each embedding table, exact: K = round(density * rows * dim)
    update_every: int = 300  # optimiser steps between mask updates (Delta T); chosen by the ml-1m study
    drop_fraction: float = AUTO  # rho_0, share of K swapped at the first update
    drop_fraction_min: float = AUTO  # rho_min, the floor of the cosine annealing
    end_fraction: float = AUTO  # share of training after which the mask stops changing
    mask_init: str = "auto"  # initial mask: random, or from NMF factors; auto = the policy's own choice
    grow_score: str = "auto"  # what ranks inactive entries for growth; auto = the policy's own choice
    ema_decay: float = 0.9  # for grow-score "ema"
    regrow_pruned: bool = True  # may an entry pruned in an update be grown back in the same update
    sparse_grad: str = "auto"  # on = only the selected rows receive gradients (sparse backward)
    grad_rows: str = "batch"  # which batch rows get gradients when they exceed the row budget
    grad_row_budget: float = 0.0  # cap on rows * dim per step as a multiple of K (0 = no cap)
    nmf_method: str = "sklearn"  # centralised NMF for the mask: scikit-learn, or the multiplicative updates the federation runs
    nmf_iterations: int = 50  # NMF iterations of the centralised mask start
    nmf_select: str = "global"  # global = top-K over the table; per-row = equal quotas, kept by every later update
    nmf_rescale: bool = True  # balance the NMF factors' column norms before ranking entries
    nmf_min_per_row: int = 1  # active entries every row keeps from the NMF mask
    nmf_values: str = "factors"  # initial values: the rebalanced NMF factors, or random (only the mask from NMF)
    size_min: int = 1  # embedding-size policies: fewest leading dimensions a row keeps
    size_exponent: float = 0.5  # size-frequency and size-ciess start: sizes proportional to (popularity + 1) ** exponent
    size_groups: int = 8  # size-bet: equal-count popularity groups that share one size each
    group_sizes: str = ""  # size-bet: the searched table-level allocation, one relative size per group ("48,32,...")
    ciess_step: float = 0.5  # size-ciess: largest move of a row's continuous size per update, as a share of dim
    ciess_noise: float = 0.05  # size-ciess: std of the random-walk exploration of continuous sizes, as a share of dim
    amgp_cycles: int = 2  # amgp: prune-then-grow cycles over training (the last phase is full-size)
    amgp_sparse_share: float = 0.75  # amgp: share of each cycle trained pruned, at sparse.density of the dimensions
    amgp_grow_std: float = 0.01  # amgp: std of the normal values regrown dimensions start from (zero would stay zero)


@dataclass(frozen=True)
class FedConfig:
    """The federation: participation, local training on each device, aggregation and transport."""

    clients_per_round: int = 0  # sampled devices per training round (0 = use fraction-train)
    fraction_train: float = 0.1  # share of devices sampled per round when clients-per-round is 0
    local_epochs: int = 1  # passes over the device's positives per round
    local_batch_size: int = 0  # positives per local Adam step (0 = the whole local set in one step)
    user_steps: int = 5  # steps on the user row alone (items frozen) before the joint steps, each round (catch-up with the table)
    user_density: float = AUTO  # active share of each device's user row (private, never sent); auto = the policy's
    # density (sparse.density; 1 for dense). 1 keeps a dense row, as PFedRec's score head
    user_bias: bool = False  # a private score bias per device (PFedRec's head bias), stepped with the user row by sgd;
    # it never changes a device's ranking, only its training
    user_init: str = "normal"  # normal: each device's row from normal(0, 0.1) of its own seed, bias 0; shared-uniform:
    # one row and bias for every device from uniform(-1/sqrt(dim), 1/sqrt(dim)) (PyTorch's Linear init, PFedRec's head)
    step_order: str = "joint"  # joint: one gradient steps user row and item rows; head-first: the user row (and bias)
    # steps on the batch, then the batch's loss is recomputed for the item step (PFedRec's order)
    user_state: str = "keep"  # keep: the device stores its user row; reconstruct:
    # FedRecon, fit afresh by user-steps each round and evaluation
    local_lr: float = 0.05  # learning rate of the user row's optimiser (and of the item rows with item-optimizer = adam)
    user_optimizer: str = "adam"  # the user row's optimiser: adam (moments kept on the device),
    # or sgd on the mean loss (PFedRec's head)
    item_optimizer: str = "sgd"  # the device's optimiser of its item-row copy: sgd, or adam (fresh each round: sign steps)
    item_lr: float = 0.01  # sgd: step per training example on the item rows (gradient of the summed loss)
    item_init_std: float = 0.1  # std of the normal values the server's item rows start from without an NMF start
    network_lr: float = 0.001  # model.name = neumf: Adam step of the device's copy of the shared network
    # (MLP tower, output layer), fresh each round; the server takes the example-weighted mean (FedNCF)
    server_optimizer: str = "avg"  # avg = add server-lr * mean delta (FedAvg); adam = Adam on the mean deltas (FCF, FedAdam)
    server_lr: float = 1.0  # avg: scale of the mean delta; adam: the step size (try 0.001-0.01)
    server_beta1: float = 0.9  # adam: decay of the first moment of each item entry's mean delta
    server_beta2: float = 0.999  # adam: decay of the second moment
    server_eps: float = 1e-8  # adam: added to the root of the second moment
    aggregation: str = "sum"  # per-row mean over contributors (weighted by examples, or uniform), sum (FedMF),
    # client-mean (FedAvg)
    downlink: str = "full"  # full = the whole masked item table; rows = only the rows a device trains on
    uplink: str = "rows"  # rows = the deltas of the rows a device trained; table = of every row (FedAvg's upload)
    explore_every: int = 5  # rounds between item-mask updates (the policy's Delta T in rounds)
    signal_topk: int = 4  # inactive entries per touched row a device reports as regrowth signal
    signal_every_round: bool = False  # accumulate signals from every round (costs bytes) or send them only at exploration rounds
    nmf_init: str = "federated"  # where the NMF mask comes from, when the policy uses one
    nmf_rounds: int = 3  # nmf-start = mu: secure multiplicative-update rounds before training
    nmf_start: str = "range"  # federated start: range (seeded range finder, NNDSVD, nmf-refine rounds), svd (the same,
    # signed factors, no refinement) or mu (secure multiplicative updates)
    nmf_cohort: float = 0.1  # share of devices in the federated start's secure sums (a public seeded sample,
    # at least SecAgg+'s threshold of 5)
    nmf_power: int = 0  # nmf-start = range: power passes after the seeded one (each sends an [n_items, dim] basis and sums A V)
    nmf_sketch: int = 0  # nmf-start = range/svd: columns of the seeded test matrix (0 = model.dim;
    # more = oversampling, a longer vector)
    nmf_refine: int = 1  # nmf-start = range: secure multiplicative refinements of the item factor after it (devices fit p_u,
    # none keeps it)
    eval_every: int = 1  # rounds between evaluations (the last round is always evaluated)
    eval_fraction: float = 0.2  # share of devices evaluated
    evaluate_model: str = "global"  # global: rank with the server's table; local: each
    # trained device ranks with its own copy after training (PFedRec); the evaluation cohort's devices that did not
    # train that round rank with their stored head on the server's table; local-last: PFedRec's code's rule, each
    # device counts with the personal model of its last training round (a device not trained yet as under local)
    unseen_users: float = 0.0  # share of devices held out of training (a seeded draw) and evaluated apart at every
    # evaluation, as FedRecon evaluates users it never trained on: each fits a fresh user row against the table (0 = off)
    unseen_steps: int = 0  # steps that fit an unseen device's user row, items frozen (0 = fed.user-steps)
    clients_per_node: int = 1  # user devices hosted by one Flower supernode (transport only)
    device_batch: int = 0  # devices whose local steps train together as one batched computation, in process and on a
    # supernode hosting several (0 or 1 = one at a time); NeuMF and budget.device-widths train one at a time and say so
    memory_limit_gib: float = 0.0  # a run whose estimated memory exceeds this is refused up front
    # (0 = the memory available on this machine when the run starts; federation/memory_estimate.py)
    round_timeout: float = 0.0  # seconds the server waits for one round's replies; later ones count as failed (0 = no limit)
    torch_threads: int = 1  # torch intra-op threads of the process training devices (in process; each ClientApp
    # worker): a device's tensors are small, so more threads only contend with the simulation's own parallelism
    # (0 = torch's default, one per core)


@dataclass(frozen=True)
class BudgetConfig:
    """Heterogeneous devices (each class's embedding width, fedsparse/federation/device_classes.py) and streaming arrivals of
    items and users under a fixed item-table budget (fedsparse/federation/streaming.py)."""

    device_widths: str = ""  # leading dimensions per device class, e.g. "16,32,64" ("" = every device holds model.dim)
    device_shares: str = ""  # share of devices in each class, e.g. "0.3,0.4,0.3" ("" = equal shares)
    stream_stages: int = 0  # streaming: items and users arrive in this many stages over the rounds (0 = all present)
    stream_start: float = 0.5  # streaming: share of items and users present at round 1

    @property
    def widths(self) -> tuple[int, ...]:
        """The class widths as integers (empty for homogeneous devices)."""
        return tuple(int(w) for w in self.device_widths.split(",") if w.strip())

    @property
    def shares(self) -> tuple[float, ...]:
        """The class shares (equal when not given)."""
        given = tuple(float(s) for s in self.device_shares.split(",") if s.strip())
        return given or tuple(1.0 / len(self.widths) for _ in self.widths)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol settings."""

    k: int = 20  # cut-off of the full-ranking metrics
    batch_users: int = 1024  # users scored at once; bounds memory to batch_users * n_items floats
    sampled_negatives: int = 99  # negatives per held-out item in the sampled (leave-one-out) protocol
    candidates: str = ""  # CSV of each user's validation and test item and their negatives, original ids (replaces the split;
    # "" = off)


@dataclass(frozen=True)
class PrivacyConfig:
    """Device-side defences of the uploads (see fedsparse/privacy)."""

    padding_ratio: float = 0.0  # fake items per real positive, trained as positives (FedRec's hybrid filling)
    ldp: str = "none"  # local DP on the uploaded values: none, gaussian or laplace
    clip_norm: float = 1.0  # bound on the norm of one upload's values (L2 for gaussian, L1 for laplace)
    noise_multiplier: float = 1.0  # noise scale / clip-norm (std for gaussian, b for laplace)
    delta: float = 1e-5  # the delta at which epsilon is reported
    secure_aggregation: bool = False  # devices upload dense masked vectors; the server sees only their sum
    secure_row_fraction: float = 1.0  # with secure aggregation: share of rows each round covers (a public random subset)
    secure_row_bias: float = 0.0  # with a secure row subset: 0 = rows drawn uniformly; b > 0 = with probability
    # proportional to (the row's active entries in the public item mask)^b, so popular rows are covered more often
    secure_train_items: str = "covered"  # with a secure row subset: covered = devices train only their items among the
    # round's rows (FedSubAvg-style); all = every item of theirs trains the user row, only the covered rows' deltas go up
    secure_weight_bound: float = 10000.0  # with secure aggregation and fed.aggregation = weighted: public cap
    # on a device's weight (Flower's SecAgg+ scales by it)


@dataclass(frozen=True)
class FaultConfig:
    """Injected device faults in training rounds, to check that the federation survives them."""

    failure_rate: float = 0.0  # share of sampled devices that fail each training round (seeded per round and device)
    failure_mode: str = "exception"  # exception: the device's handler raises; crash: no reply and its private state is lost;
    # timeout: the device answers only after straggler-seconds (dropped when that exceeds fed.round-timeout)
    straggler_seconds: float = 2.0  # how late a "timeout" device answers


@dataclass(frozen=True)
class RobustConfig:
    """Server-side defences against hostile or poisoned updates (see fedsparse/federation/robust.py)."""

    max_update_norm: float = 0.0  # reject an upload whose delta values have a larger L2 norm (0 = no limit)
    clip_norm: float = 0.0  # scale each device's per-row delta down to this L2 norm before aggregation (0 = off)
    aggregator: str = "mean"  # per-row combination of the contributors' deltas: mean, median or trimmed-mean
    trim_fraction: float = 0.1  # trimmed-mean: share of contributors cut at each end, per entry


@dataclass(frozen=True)
class PoisonConfig:
    """An item-promotion attack by malicious devices (see fedsparse/federation/poisoning.py); off by default."""

    target_item: int = -1  # the item the attacker promotes (-1 = no attack, no exposure metric)
    fraction: float = 0.0  # share of devices the attacker controls (seeded per device)
    boost: float = 1.0  # factor on a malicious device's uploaded delta of the target row


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; build it with ``from_flat`` or ``RunConfig()`` for the defaults."""

    seed: int = 0  # seeds every random stream (sampling, splits, initialisation, faults)
    results_dir: str = "results"  # folder that receives one run directory per run
    num_server_rounds: int = 3  # federated training rounds (after the NMF start)
    resume_dir: str = ""  # a run directory to continue from its checkpoint, under the same settings ("" = start a new run)
    code_version: str = ""  # git commit of the launcher, "+modified" with local changes ("" = ask git where the run executes)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from flat kebab-case keys; missing keys take defaults, unknown keys raise ConfigError."""
        known = dict(flat_defaults())
        unknown = sorted(set(flat) - set(known))
        if unknown:
            named = ", ".join(key + did_you_mean(key, known) for key in unknown)
            raise ConfigError(f"unknown config key(s): {named}; `fedsparse simulate --help` lists every key")
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            expected = type(known[key])
            value = _coerce(key, value, expected)
            if "." in key:
                section, name = key.split(".", 1)
                sections.setdefault(section, {})[_snake(name)] = value
            else:
                top[_snake(key)] = value
        base = cls()
        nested = {name: replace(getattr(base, name), **values) for name, values in sections.items()}
        config = replace(base, **top, **nested)
        config.validate()
        return config

    def to_flat(self) -> dict[str, Any]:
        """The inverse of ``from_flat``: flat kebab-case keys to plain values."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value):
                for sub in fields(value):
                    flat[f"{_kebab(f.name)}.{_kebab(sub.name)}"] = getattr(value, sub.name)
            else:
                flat[_kebab(f.name)] = value
        return flat

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A copy with some flat keys replaced (validated like ``from_flat``)."""
        return RunConfig.from_flat({**self.to_flat(), **overrides})

    def validate(self) -> None:
        """Raise ConfigError naming the first out-of-range value."""
        for key, value in self.to_flat().items():  # also for configs built with dataclasses.replace, not from_flat
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        d, m, t, e, s, f, p = self.data, self.model, self.train, self.eval, self.sparse, self.fed, self.privacy
        faults, robust, poison = self.faults, self.robust, self.poison
        checks = [
            (d.split in SPLITS, "data.split", f"must be one of {SPLITS}"),
            (0.0 < d.test_ratio < 1.0, "data.test-ratio", "must be in (0, 1)"),
            (0.0 <= d.validation_ratio < 1.0, "data.validation-ratio", "must be in [0, 1)"),
            (d.k_core >= 0, "data.k-core", "must be >= 0"),
            (d.synthetic_users > 0 and d.synthetic_items > 0, "data.synthetic-users/items", "must be > 0"),
            (d.synthetic_interactions_per_user > 0, "data.synthetic-interactions-per-user", "must be > 0"),
            (d.loo_ties in LOO_TIES, "data.loo-ties", f"must be one of {LOO_TIES}"),
            (not e.candidates or d.split in ("auto", "loo"), "eval.candidates",
             "replaces the split: data.split must be auto or loo with it (the file names each user's validation and test item)"),
            (m.name in MODELS, "model.name", f"must be one of {MODELS}"),
            (m.dim > 0, "model.dim", "must be > 0"),
            (t.epochs >= 0, "train.epochs", "must be >= 0"),
            (t.batch_size > 0, "train.batch-size", "must be > 0"),
            (t.lr > 0, "train.lr", "must be > 0"),
            (t.l2_reg >= 0, "train.l2-reg", "must be >= 0"),
            (t.loss in LOSSES, "train.loss", f"must be one of {LOSSES}"),
            (t.negatives >= 1, "train.negatives", "must be >= 1"),
            (t.negatives_from in NEGATIVE_RULES, "train.negatives-from", f"must be one of {NEGATIVE_RULES}"),
            (t.patience >= 0, "train.patience", "must be >= 0"),
            (t.eval_every >= 1, "train.eval-every", "must be >= 1"),
            (s.policy in POLICY_NAMES, "sparse.policy", f"must be one of {POLICY_NAMES}"),
            (0.0 < s.density <= 1.0, "sparse.density", "must be in (0, 1]"),
            (s.update_every >= 1, "sparse.update-every", "must be >= 1"),
            (s.drop_fraction == AUTO or 0.0 <= s.drop_fraction <= 1.0, "sparse.drop-fraction", "must be in [0, 1] or -1"),
            (s.drop_fraction_min == AUTO or 0.0 <= s.drop_fraction_min <= 1.0, "sparse.drop-fraction-min",
             "must be in [0, 1] or -1"),
            (s.end_fraction == AUTO or 0.0 <= s.end_fraction <= 1.0, "sparse.end-fraction", "must be in [0, 1] or -1"),
            (s.mask_init in MASK_INITS, "sparse.mask-init", f"must be one of {MASK_INITS}"),
            (s.grow_score in GROW_SCORES, "sparse.grow-score", f"must be one of {GROW_SCORES}"),
            (0.0 <= s.ema_decay < 1.0, "sparse.ema-decay", "must be in [0, 1)"),
            (s.sparse_grad in SPARSE_GRAD, "sparse.sparse-grad", f"must be one of {SPARSE_GRAD}"),
            (s.grad_rows in GRAD_ROWS, "sparse.grad-rows", f"must be one of {GRAD_ROWS}"),
            (s.grad_row_budget >= 0.0, "sparse.grad-row-budget", "must be >= 0"),
            (s.nmf_method in NMF_METHODS, "sparse.nmf-method", f"must be one of {NMF_METHODS}"),
            (s.nmf_iterations >= 1, "sparse.nmf-iterations", "must be >= 1"),
            (s.nmf_select in NMF_SELECT, "sparse.nmf-select", f"must be one of {NMF_SELECT}"),
            (s.nmf_min_per_row >= 0, "sparse.nmf-min-per-row", "must be >= 0"),
            (s.nmf_values in NMF_VALUES, "sparse.nmf-values", f"must be one of {NMF_VALUES}"),
            (0 <= s.size_min <= m.dim, "sparse.size-min", "must be in [0, model.dim]"),
            (math.isfinite(s.size_exponent), "sparse.size-exponent", "must be finite"),
            (s.size_groups >= 1, "sparse.size-groups", "must be >= 1"),
            (s.ciess_step >= 0 and s.ciess_noise >= 0, "sparse.ciess-step/noise", "must be >= 0"),
            (s.amgp_cycles >= 1, "sparse.amgp-cycles", "must be >= 1"),
            (0 < s.amgp_sparse_share < 1, "sparse.amgp-sparse-share", "must be in (0, 1)"),
            (s.amgp_grow_std > 0, "sparse.amgp-grow-std", "must be > 0"),
            (self.num_server_rounds >= 0, "num-server-rounds", "must be >= 0"),
            (f.clients_per_round >= 0, "fed.clients-per-round", "must be >= 0"),
            (f.memory_limit_gib >= 0, "fed.memory-limit-gib", "must be >= 0"),
            (0.0 < f.fraction_train <= 1.0, "fed.fraction-train", "must be in (0, 1]"),
            (f.local_epochs >= 1, "fed.local-epochs", "must be >= 1"),
            (f.local_batch_size >= 0, "fed.local-batch-size", "must be >= 0 (0 = full local batch)"),
            (f.user_steps >= 0, "fed.user-steps", "must be >= 0"),
            (f.user_density == AUTO or 0.0 < f.user_density <= 1.0, "fed.user-density", "must be in (0, 1] or -1 (auto)"),
            (f.local_lr > 0, "fed.local-lr", "must be > 0"),
            (f.server_lr > 0, "fed.server-lr", "must be > 0"),
            (f.server_optimizer in SERVER_OPTIMIZERS, "fed.server-optimizer", f"must be one of {SERVER_OPTIMIZERS}"),
            (f.item_optimizer in ITEM_OPTIMIZERS, "fed.item-optimizer", f"must be one of {ITEM_OPTIMIZERS}"),
            (f.item_lr > 0, "fed.item-lr", "must be > 0"),
            (f.user_optimizer in USER_OPTIMIZERS, "fed.user-optimizer", f"must be one of {USER_OPTIMIZERS}"),
            (f.user_state in USER_STATES, "fed.user-state", f"must be one of {USER_STATES}"),
            (f.step_order in STEP_ORDERS, "fed.step-order", f"must be one of {STEP_ORDERS}"),
            (f.user_init in USER_INITS, "fed.user-init", f"must be one of {USER_INITS}"),
            (not f.user_bias or (f.user_optimizer == "sgd" and f.user_steps == 0 and f.user_state == "keep"
                                 and self.model.name == "mf"), "fed.user-bias",
             "needs PFedRec's head: model.name = mf, fed.user-optimizer = sgd, fed.user-steps = 0, fed.user-state = keep"),
            (f.user_state == "keep" or f.user_steps >= 1, "fed.user-state",
             "reconstruct needs fed.user-steps >= 1 (the steps that fit the fresh user row)"),
            (f.item_init_std > 0, "fed.item-init-std", "must be > 0"),
            (f.network_lr > 0, "fed.network-lr", "must be > 0"),
            (f.evaluate_model in EVALUATE_MODELS, "fed.evaluate-model", f"must be one of {EVALUATE_MODELS}"),
            (0.0 <= f.unseen_users < 1.0, "fed.unseen-users", "must be in [0, 1)"),
            (f.unseen_steps >= 0, "fed.unseen-steps", "must be >= 0 (0 = fed.user-steps)"),
            (f.unseen_users == 0 or f.unseen_steps >= 1 or f.user_steps >= 1, "fed.unseen-users",
             "> 0 needs fed.unseen-steps >= 1 or fed.user-steps >= 1 (the steps that fit an unseen device's user row)"),
            (f.evaluate_model == "global" or f.downlink == "full", "fed.evaluate-model",
             "local needs fed.downlink = full (a device ranks every item with its own copy of the table)"),
            (0 <= f.server_beta1 < 1 and 0 <= f.server_beta2 < 1, "fed.server-beta1/2", "must be in [0, 1)"),
            (f.server_eps > 0, "fed.server-eps", "must be > 0"),
            (f.aggregation in AGGREGATIONS, "fed.aggregation", f"must be one of {AGGREGATIONS}"),
            (f.downlink in DOWNLINKS, "fed.downlink", f"must be one of {DOWNLINKS}"),
            (f.uplink in UPLINKS, "fed.uplink", f"must be one of {UPLINKS}"),
            (f.uplink == "rows" or (f.downlink == "full" and not p.secure_aggregation), "fed.uplink",
             "table needs fed.downlink = full and no privacy.secure-aggregation (secure uploads are dense already)"),
            (f.explore_every >= 1, "fed.explore-every", "must be >= 1"),
            (f.signal_topk >= 0, "fed.signal-topk", "must be >= 0"),
            (f.nmf_init in NMF_INITS, "fed.nmf-init", f"must be one of {NMF_INITS}"),
            (f.nmf_rounds >= 1, "fed.nmf-rounds", "must be >= 1"),
            (f.nmf_start in NMF_STARTS, "fed.nmf-start", f"must be one of {NMF_STARTS}"),
            (0 < f.nmf_cohort <= 1, "fed.nmf-cohort", "must be in (0, 1]"),
            (f.nmf_power >= 0, "fed.nmf-power", "must be >= 0"),
            (f.nmf_refine >= 0, "fed.nmf-refine", "must be >= 0"),
            (f.nmf_sketch >= 0, "fed.nmf-sketch", "must be >= 0 (0 = model.dim)"),
            (f.eval_every >= 1, "fed.eval-every", "must be >= 1"),
            (0.0 < f.eval_fraction <= 1.0, "fed.eval-fraction", "must be in (0, 1]"),
            (f.clients_per_node >= 1, "fed.clients-per-node", "must be >= 1"),
            (f.device_batch >= 0, "fed.device-batch", "must be >= 0 (0 or 1 = devices train one at a time)"),
            (f.round_timeout >= 0, "fed.round-timeout", "must be >= 0 (0 = no limit)"),
            (f.torch_threads >= 0, "fed.torch-threads", "must be >= 0 (0 = torch's default)"),
            (e.k >= 1, "eval.k", "must be >= 1"),
            (e.batch_users >= 1, "eval.batch-users", "must be >= 1"),
            (e.sampled_negatives >= 1, "eval.sampled-negatives", "must be >= 1"),
            (p.padding_ratio >= 0, "privacy.padding-ratio", "must be >= 0"),
            (p.ldp in LDP_MECHANISMS, "privacy.ldp", f"must be one of {LDP_MECHANISMS}"),
            (p.clip_norm > 0, "privacy.clip-norm", "must be > 0"),
            (p.noise_multiplier >= 0, "privacy.noise-multiplier", "must be >= 0"),
            (0 < p.delta < 1, "privacy.delta", "must be in (0, 1)"),
            (not p.secure_aggregation or f.downlink == "full", "privacy.secure-aggregation",
             "needs fed.downlink = full (a rows download request names the device's rows)"),
            (0 < p.secure_row_fraction <= 1, "privacy.secure-row-fraction", "must be in (0, 1]"),
            (p.secure_row_fraction == 1 or p.secure_aggregation, "privacy.secure-row-fraction",
             "< 1 needs privacy.secure-aggregation"),
            (p.secure_train_items in SECURE_TRAIN_ITEMS, "privacy.secure-train-items", f"must be one of {SECURE_TRAIN_ITEMS}"),
            (p.secure_row_bias >= 0, "privacy.secure-row-bias", "must be >= 0"),
            (p.secure_row_bias == 0 or (p.secure_row_fraction < 1 and p.secure_train_items == "all"),
             "privacy.secure-row-bias", "> 0 needs privacy.secure-row-fraction < 1 and privacy.secure-train-items = all "
             "(the round's rows are drawn from the mask a device receives)"),
            (p.secure_weight_bound >= 1, "privacy.secure-weight-bound", "must be >= 1 (a weight counts examples)"),
            (0 <= faults.failure_rate < 1, "faults.failure-rate", "must be in [0, 1)"),
            (faults.failure_mode in FAULT_MODES, "faults.failure-mode", f"must be one of {FAULT_MODES}"),
            (faults.straggler_seconds >= 0, "faults.straggler-seconds", "must be >= 0"),
            (robust.max_update_norm >= 0, "robust.max-update-norm", "must be >= 0 (0 = no limit)"),
            (robust.clip_norm >= 0, "robust.clip-norm", "must be >= 0 (0 = off)"),
            (robust.aggregator in ROBUST_AGGREGATORS, "robust.aggregator", f"must be one of {ROBUST_AGGREGATORS}"),
            (0 <= robust.trim_fraction < 0.5, "robust.trim-fraction", "must be in [0, 0.5)"),
            (not p.secure_aggregation or (robust.aggregator == "mean" and robust.clip_norm == 0 and robust.max_update_norm == 0),
             "robust.*", "needs each device's delta, which privacy.secure-aggregation hides: use the defaults with it"),
            (poison.target_item >= -1, "poison.target-item", "must be an item id, or -1 for no attack"),
            (0 <= poison.fraction <= 1, "poison.fraction", "must be in [0, 1]"),
            (math.isfinite(poison.boost), "poison.boost", "must be finite"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key} {message}")
        self._validate_budget()
        try:
            widths = m.mlp_widths
        except ValueError as exc:
            raise ConfigError(f"model.mlp-layers must be comma-separated integers, got {m.mlp_layers!r}") from exc
        if not widths or min(widths) <= 0:
            raise ConfigError("model.mlp-layers must list at least one positive width")


    def _validate_budget(self) -> None:
        """Size allocations and device classes: parseable lists of the right lengths and ranges."""
        s, b = self.sparse, self.budget
        try:
            group_sizes = [float(v) for v in s.group_sizes.split(",") if v.strip()]
        except ValueError as exc:
            raise ConfigError(f"sparse.group-sizes must be comma-separated numbers, got {s.group_sizes!r}") from exc
        if s.policy == "size-bet" and len(group_sizes) != s.size_groups:
            raise ConfigError(f"sparse.group-sizes must give sparse.size-groups = {s.size_groups} sizes for size-bet "
                              f"(the allocation a BET search found, see fedsparse/sparse/bet.py), got {s.group_sizes!r}")
        if group_sizes and (min(group_sizes) < 0 or not all(math.isfinite(v) for v in group_sizes)):
            raise ConfigError("sparse.group-sizes must be finite and >= 0")
        try:
            widths, shares = b.widths, b.shares
        except ValueError as exc:
            raise ConfigError(f"budget.device-widths/shares must be comma-separated numbers: {exc}") from exc
        if b.device_shares.strip() and len(shares) != len(widths):
            raise ConfigError(f"budget.device-shares must give one share per width ({len(widths)}), got {b.device_shares!r}")
        if any(not 1 <= w <= self.model.dim for w in widths):
            raise ConfigError(f"budget.device-widths must lie in [1, model.dim = {self.model.dim}], got {b.device_widths!r}")
        if shares and (min(shares) < 0 or not math.isclose(sum(shares), 1.0, abs_tol=1e-6)):
            raise ConfigError(f"budget.device-shares must be >= 0 and sum to 1, got {b.device_shares!r}")
        if widths and self.privacy.secure_aggregation:
            raise ConfigError(
                "budget.device-widths cannot be combined with privacy.secure-aggregation (secure vectors are full width)"
            )
        if b.stream_stages < 0 or not 0 < b.stream_start <= 1:
            raise ConfigError("budget.stream-stages must be >= 0 and budget.stream-start in (0, 1]")
        if b.stream_stages and self.privacy.secure_aggregation:
            raise ConfigError("budget.stream-stages cannot be combined with privacy.secure-aggregation")
        if widths and self.robust.aggregator != "mean":
            raise ConfigError("budget.device-widths needs robust.aggregator = mean (per-entry contributors differ by width)")


def uses_sampled_protocol(config: RunConfig) -> bool:
    """Whether the sampled protocol (HR@10 / NDCG@10 among ``eval.sampled-negatives``) is reported and picks
    the best epoch or round: under leave-one-out, or with a candidate file."""
    return config.data.split == "loo" or bool(config.eval.candidates)


def read_toml(path: Path, kind: str) -> tuple[dict[str, Any], str]:
    """(the parsed document, its text) of a TOML ``kind`` file ("config file", "sweep file"); ConfigError
    names the file and the fix (not UTF-8, not TOML)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{kind} {path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          "save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} {path}: {exc.strerror}") from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read {kind} {path}: not valid TOML: {exc}") from exc


def check_flat_keys(flat: Mapping[str, Any], path: Path, text: str) -> None:
    """Raise ConfigError when a flat-key table holds a nested table: an unquoted dotted key such as
    ``sparse.density = 0.1`` is a TOML table ``sparse`` with key ``density``; flat keys must be quoted."""
    for key, value in flat.items():
        if not isinstance(value, dict):
            continue
        parts = [key]
        while isinstance(value, dict) and value:
            inner, value = next(iter(value.items()))
            parts.append(inner)
        dotted = ".".join(parts)
        pattern = re.compile(r"^\s*" + r"\s*\.\s*".join(re.escape(part) for part in parts) + r"\s*=", re.MULTILINE)
        found = pattern.search(text)
        where = f"{path}:{text.count(chr(10), 0, found.start()) + 1}" if found else str(path)
        raise ConfigError(f"{where}: {dotted} is read by TOML as a nested table, not the flat key {dotted!r}: "
                          f"quote it, \"{dotted}\" = ...")


def ranking_cutoffs(config: RunConfig, n_items: int) -> list[int]:
    """The K values every evaluation reports: 10, 20 and ``eval.k``, none above the catalogue size."""
    return sorted({min(k, n_items) for k in (10, 20, config.eval.k)})


def flat_defaults() -> dict[str, Any]:
    """The default value of every flat key (what pyproject's [tool.flwr.app.config] mirrors)."""
    return RunConfig().to_flat()


TOP_SECTION = "run"  # the section of the keys without a prefix (seed, results-dir, ...)
# Values no key accepts, used to make validate() say in its own words what a key does accept.
_PROBES: dict[type, Any] = {str: "\0", int: -(2**62), float: -1e300}


@dataclass(frozen=True)
class KeyHelp:
    """What ``--help`` says about one flat key, all of it read from this file so it cannot drift."""

    section: str  # the key's prefix ("sparse"), or TOP_SECTION
    description: str  # the trailing comment of the key's field (and comment lines right below it)
    accepted: str  # validate()'s message for a value out of range ("must be in (0, 1]"); "" = any value of the type
    default: Any


@functools.cache
def key_help() -> dict[str, KeyHelp]:
    """Help for every flat key, in field order: description from the field's comment, accepted values
    from ``validate`` itself (probed with a value no key accepts)."""
    comments = _field_comments()
    base = RunConfig()
    helps: dict[str, KeyHelp] = {}
    for f in fields(base):
        value = getattr(base, f.name)
        members = [(f"{_kebab(f.name)}.{_kebab(sub.name)}", type(value).__name__, sub.name, getattr(value, sub.name))
                   for sub in fields(value)] if is_dataclass(value) else [(_kebab(f.name), "RunConfig", f.name, value)]
        for key, owner, name, default in members:
            section = key.split(".", 1)[0] if "." in key else TOP_SECTION
            helps[key] = KeyHelp(section, comments.get((owner, name), ""), _accepted(key, default), default)
    return helps


def section_help() -> dict[str, str]:
    """The first docstring paragraph of each section's dataclass, by section prefix."""
    base = RunConfig()
    sections = {TOP_SECTION: "Seed, paths and number of rounds."}
    sections.update({_kebab(f.name): _first_paragraph(type(getattr(base, f.name)).__doc__)
                     for f in fields(base) if is_dataclass(getattr(base, f.name))})
    return sections


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` naming the known word most like ``word`` (a typo, an abbreviation), or ""."""
    matches = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]}?)" if matches else ""


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the field's trailing comment, joined with the comment-only lines right below it."""
    source = inspect.getsource(sys.modules[__name__])
    comments: dict[tuple[str, str], str] = {}
    owner, current, last_row, previous = "", None, -1, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row, column = token.start
        if previous is not None and previous.string == "class" and previous.start[1] == 0:
            owner = token.string
        elif previous is not None and token.string == ":" and previous.type == tokenize.NAME and previous.start == (row, 4):
            current, last_row = (owner, previous.string), row  # a field: "    name: type = default"
        elif token.type == tokenize.COMMENT and current is not None and (row == last_row or (row, column) == (last_row + 1, 4)):
            text = token.string.lstrip("#").strip()
            comments[current] = f"{comments[current]} {text}" if current in comments else text
            last_row = row
        if token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            previous = token
    return comments


def _accepted(key: str, default: Any) -> str:
    """validate()'s own words for the values ``key`` accepts, or "" when no check names it."""
    if type(default) not in _PROBES:
        return ""
    try:
        RunConfig.from_flat({key: _PROBES[type(default)]})
    except ConfigError as exc:
        named, _, rest = str(exc).partition(" ")
        if key in _named_keys(named):
            return rest.split(", got ")[0].split(": ")[0]  # without the probe value or the parser's complaint about it
    return ""


def _named_keys(named: str) -> list[str]:
    """The keys a check message names: ``fed.server-beta1/2`` -> fed.server-beta1, fed.server-beta2;
    ``sparse.ciess-step/noise`` -> sparse.ciess-step, sparse.ciess-noise."""
    first, *others = named.split("/")
    keys = [first]
    for other in others:
        stem = first.rstrip("0123456789") if other.isdigit() else first.rsplit("-", 1)[0] + "-"
        keys.append(stem + other)
    return keys


def _coerce(key: str, value: Any, expected: type) -> Any:
    """Convert a flat value to the field's type, or raise ConfigError naming the key."""
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif expected is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        elif isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif expected is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):  # no float key gives inf or nan a meaning: they drop updates or crash mid-round
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return number
    elif expected is str and isinstance(value, str):
        return value
    raise ConfigError(f"config key {key!r} expects {expected.__name__}, got {value!r}")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "SparseConfig", "FedConfig", "EvalConfig", "PrivacyConfig",
    "FaultConfig", "RobustConfig", "PoisonConfig", "BudgetConfig", "RunConfig", "flat_defaults",
]
