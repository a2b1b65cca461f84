"""One user's device: its private state and its local round (train, upload, evaluate).

The device holds its interactions, its user embedding row (with its mask row and Adam moments) and
never sends any of them. Each round it receives item rows, trains MF-BPR locally on its positives
and sampled negatives, and returns only the deltas of the active entries of the item rows it touched
(plus, when asked, a top-k regrowth signal of inactive entries). With ``model.name = neumf`` (FedNCF)
its rows are NeuMF's GMF and MLP embeddings side by side and it also receives, trains and returns (as a
delta) the shared network (``fedsparse/federation/network.py``). Pure numpy/torch: the Flower client
and the in-process engine both call these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch

from fedsparse.central.losses import batch_loss, mf_batch_gradients, mf_user_row_gradient
from fedsparse.central.models import JoinedNeuMF, MatrixFactorization
from fedsparse.central.sampling import nth_outside
from fedsparse.config import AUTO, RunConfig, ranking_cutoffs, uses_sampled_protocol
from fedsparse.data.interactions import Interactions
from fedsparse.eval import metrics
from fedsparse.federation.compact_rows import (
    CompactRows,
    SignalHistory,
    compact_mf_gradients,
    compact_user_row_gradient,
)
from fedsparse.federation.device_classes import device_width
from fedsparse.federation.faults import DeviceError
from fedsparse.federation.network import local_model, network_of, network_parameters, read_only_tensor, uses_network
from fedsparse.federation.streaming import revealed_items
from fedsparse.federation.wire import NetworkWeights, RowsDownload, RowUpdate, signal_col_dtype, wire_row_ids
from fedsparse.privacy.defences import padding_count, sample_padding
from fedsparse.privacy.secure_rows import secure_round_rows
from fedsparse.rng import rng_for
from fedsparse.sparse.masked_training import MaskedAdam, MaskedSGD
from fedsparse.sparse.masks import budget, largest, prune_and_grow
from fedsparse.sparse.policies import build_policy


@dataclass(frozen=True)
class DeviceData:
    """A user's interactions, item ids int64 sorted: what the device trains on and is evaluated on.

    ``interacted`` is every item of the user (train, validation, test): never an evaluation negative, and
    never a training negative or fake positive under ``train.negatives-from = unrated``.
    ``validation_negatives`` / ``test_negatives`` (int64 [eval.sampled-negatives]) are the fixed negatives
    of a candidate file (``eval.candidates``), part of the device's own partition; None otherwise.
    """

    user_id: int
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    interacted: np.ndarray
    validation_negatives: np.ndarray | None = None
    test_negatives: np.ndarray | None = None

    @classmethod
    def of(cls, data: Interactions, user: int) -> DeviceData:
        """User ``user``'s partition of ``data``, with its candidate-file negatives when ``data`` has them."""
        device = cls.from_interactions(data.train, data.validation, data.test, user)
        if data.validation_negatives is None or data.test_negatives is None:
            return device
        return replace(
            device,
            validation_negatives=np.asarray(data.validation_negatives[user], dtype=np.int64),
            test_negatives=np.asarray(data.test_negatives[user], dtype=np.int64),
        )

    @classmethod
    def from_interactions(cls, train: sp.csr_matrix, validation: sp.csr_matrix, test: sp.csr_matrix, user: int) -> DeviceData:
        """Slice one user's rows out of the split matrices (the partition of user ``user``)."""
        def row(matrix: sp.csr_matrix) -> np.ndarray:
            return np.sort(matrix.indices[matrix.indptr[user] : matrix.indptr[user + 1]].astype(np.int64))

        train_items, validation_items, test_items = row(train), row(validation), row(test)
        interacted = np.unique(np.concatenate([train_items, validation_items, test_items]))
        return cls(user, train_items, validation_items, test_items, interacted)

    def not_sampled(self, negatives_from: str) -> np.ndarray:
        """Sorted items training may not draw as a negative or fake positive: the training items
        (``non-train``: held-out items stay drawable, as the device cannot know them) or every rated item
        (``unrated``)."""
        return self.interacted if negatives_from == "unrated" else self.train


@dataclass
class DeviceState:
    """Private, persistent across rounds: user row float32 [dim], its mask bool [dim], Adam moments and,
    with ``fed.user-bias``, the score bias float32 [1]."""

    user_row: np.ndarray
    user_mask: np.ndarray
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray
    steps: int = 0
    user_bias: np.ndarray | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to persist (Flower's ``context.state``)."""
        arrays = {
            "user-row": self.user_row,
            "user-mask": self.user_mask,
            "exp-avg": self.exp_avg,
            "exp-avg-sq": self.exp_avg_sq,
            "steps": np.asarray([self.steps], dtype=np.int64),
        }
        return arrays if self.user_bias is None else {**arrays, "user-bias": self.user_bias}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DeviceState:
        """Inverse of ``to_arrays``."""
        bias = arrays.get("user-bias")
        return cls(
            arrays["user-row"].astype(np.float32),
            arrays["user-mask"].astype(bool),
            arrays["exp-avg"].astype(np.float32),
            arrays["exp-avg-sq"].astype(np.float32),
            int(arrays["steps"][0]),
            None if bias is None else bias.astype(np.float32),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the private state the device keeps between rounds."""
        return sum(array.nbytes for array in self.to_arrays().values())


def init_device(config: RunConfig, user_id: int, nmf_factor: np.ndarray | None = None) -> DeviceState:
    """A fresh device: a user row of the device's width w (``model.dim`` unless its class holds fewer
    dimensions) masked to round(density * w) entries (``fed.user-density``, by default the policy's density).

    Values: normal(0, 0.1) from the device's own seed (``fed.user-init = normal``), or with
    ``shared-uniform`` the one row and bias every device starts from (``shared_head_init``). With an NMF user
    factor (rank = dim, cut to its first w entries), the mask row keeps the factor's largest entries (a
    per-row quota: each device decides alone) and, with ``sparse.nmf-values = factors``, starts from the
    factor's values; otherwise the mask is a seeded random choice.
    """
    dim = device_width(config, user_id)
    rng = rng_for(config.seed, "device-init", user_id)
    active = budget(user_row_density(config), 1, dim)
    if nmf_factor is not None:
        nmf_factor = np.asarray(nmf_factor)[:dim]
        columns = largest(nmf_factor, active)
    else:
        columns = np.sort(rng.choice(dim, size=active, replace=False))
    mask = np.zeros(dim, dtype=bool)
    mask[columns] = True
    values = rng.normal(0.0, 0.1, dim)
    bias = np.zeros(1, dtype=np.float32)
    if config.fed.user_init == "shared-uniform":
        shared_row, bias = shared_head_init(config)
        values = shared_row[:dim].astype(np.float64)
    if nmf_factor is not None and config.sparse.nmf_values == "factors":
        values = np.asarray(nmf_factor, dtype=np.float64)
    row = (values * mask).astype(np.float32)
    zeros = np.zeros(dim, dtype=np.float32)
    return DeviceState(row, mask, zeros.copy(), zeros.copy(), user_bias=bias if config.fed.user_bias else None)


def shared_head_init(config: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """The user row (``model.dim``,) and bias (1,) every device starts from under ``fed.user-init = shared-uniform``.

    PFedRec's code gives every client the score head ``torch.nn.Linear(dim, 1)`` of its global model at round 0:
    weight and bias uniform in ±1/sqrt(dim), one draw for all. Here that draw comes from the run's seed (public,
    like the initial item table), so each device makes the same row alone; nothing is sent."""
    rng = rng_for(config.seed, "shared-head-init")
    bound = 1.0 / np.sqrt(config.model.dim)
    row = rng.uniform(-bound, bound, config.model.dim).astype(np.float32)
    return row, rng.uniform(-bound, bound, 1).astype(np.float32)


def holds_compact_rows(config: RunConfig) -> bool:
    """Whether a device trains its touched item rows by their active entries (``compact_rows``): MF with a sparse
    item mask. A dense table would pay index bytes for nothing, and NeuMF's network needs dense rows."""
    return not uses_network(config) and build_policy(config.sparse).settings.density < 1.0


def user_row_density(config: RunConfig) -> float:
    """Active share of a device's user row: ``fed.user-density``, or the mask policy's density when auto."""
    if config.fed.user_density != AUTO:
        return config.fed.user_density
    return build_policy(config.sparse).settings.density


def round_item_subset(config: RunConfig, n_items: int, server_round: int) -> np.ndarray | None:
    """Sorted int64 ids of the items this round may train when they are not all of them (the public
    secure-aggregation subset unless ``privacy.secure-train-items = all``, or, streaming, the items that exist
    by this round); None for every item."""
    rows = secure_round_rows(config, n_items, server_round) if config.privacy.secure_train_items == "covered" else None
    return revealed_items(config, n_items, server_round) if rows is None else rows


def round_items(config: RunConfig, n_items: int, server_round: int) -> np.ndarray:
    """Sorted int64 ids of the items this round may train (``round_item_subset``, or every item)."""
    rows = round_item_subset(config, n_items, server_round)
    return np.arange(n_items, dtype=np.int64) if rows is None else rows


def round_view(config: RunConfig, data: DeviceData, n_items: int, server_round: int) -> DeviceData:
    """The device's data as this round trains it: its training items inside ``round_items`` (all of them
    unless secure aggregation covers a subset of rows or items are still to arrive); held-out and
    interacted items unchanged."""
    items = round_item_subset(config, n_items, server_round)
    return data if items is None else replace(data, train=np.intersect1d(data.train, items))


def round_padding(config: RunConfig, data: DeviceData, n_items: int, server_round: int) -> np.ndarray:
    """Fake items int64 sorted [round(padding-ratio * n_train)] this round trains as positives (empty
    without padding): never a training item of the user (never a rated one under ``train.negatives-from =
    unrated``), drawn from the device's own stream."""
    count = padding_count(config.privacy.padding_ratio, data.train.size)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    rng = rng_for(config.seed, "device-padding", server_round, data.user_id)
    return sample_padding(rng, round_items(config, n_items, server_round), data.not_sampled(config.train.negatives_from), count)


def round_negatives(config: RunConfig, data: DeviceData, n_items: int, server_round: int) -> np.ndarray:
    """Negatives int64 [local_epochs, n_train + n_fake, negatives] for this round, drawn from this device's
    own stream among this round's items that are neither this round's fake positives nor excluded by
    ``train.negatives-from`` (the user's training items, or every rated item).

    Known before training, so a device can ask for exactly the rows it will touch ("rows" downlink).
    """
    fakes = round_padding(config, data, n_items, server_round)
    rng = rng_for(config.seed, "device-negatives", server_round, data.user_id)
    shape = (config.fed.local_epochs, data.train.size + fakes.size, config.train.negatives)
    excluded = np.union1d(data.not_sampled(config.train.negatives_from), fakes)
    subset = round_item_subset(config, n_items, server_round)
    candidates = None if subset is None else np.setdiff1d(subset, excluded, assume_unique=True)
    count = n_items - excluded.size if candidates is None else candidates.size
    if count == 0:
        raise DeviceError(f"user {data.user_id}: no item is left to draw as a negative")
    drawn = rng.integers(0, count, size=shape)
    return nth_outside(drawn, excluded) if candidates is None else candidates[drawn]


def local_batches(
    config: RunConfig, data: DeviceData, server_round: int, n_train: int | None = None
) -> list[tuple[int, torch.Tensor]]:
    """(epoch, positions int64 [b]) of every local step: each epoch a seeded shuffle of the device's
    ``n_train`` positives (default: its training items) cut into ``fed.local-batch-size`` pieces, or all
    of them in one step when it is 0."""
    n_train = data.train.size if n_train is None else n_train
    size = config.fed.local_batch_size or n_train
    if size >= n_train:
        return [(epoch, torch.arange(n_train)) for epoch in range(config.fed.local_epochs)]
    rng = rng_for(config.seed, "device-batches", server_round, data.user_id)
    batches = []
    for epoch in range(config.fed.local_epochs):
        order = torch.from_numpy(rng.permutation(n_train))
        batches += [(epoch, order[start : start + size]) for start in range(0, n_train, size)]
    return batches


def rows_needed(data: DeviceData, negatives: np.ndarray, fakes: np.ndarray | None = None) -> np.ndarray:
    """Sorted unique item rows a round touches: the positives, the fake positives and the negatives."""
    rows = np.union1d(data.train, negatives.ravel())
    return rows if fakes is None else np.union1d(rows, fakes)


@dataclass(frozen=True)
class LocalRound:
    """What the server asks of one device's local round (``handle_train``'s settings, typed).

    ``send_signal``: upload a regrowth signal with the deltas; ``user_swap_fraction`` in [0, 1): share of
    the user row's active entries pruned and regrown after training (0 keeps its mask); ``evaluate``:
    rank with the personal model right after training (``fed.evaluate-model = local``).
    """

    server_round: int
    send_signal: bool = False
    user_swap_fraction: float = 0.0
    evaluate: bool = False


@dataclass(frozen=True)
class LocalResult:
    """What a local round produced: the new private state, the upload, and measured figures."""

    state: DeviceState
    update: RowUpdate
    loss: float
    memory_bytes: int  # bytes the device held during the round (state, download, working copies)
    evaluation: dict[str, float] | None = None  # ``validation-``/``test-`` metrics of the personal model, when asked


def local_train(
    config: RunConfig,
    state: DeviceState,
    data: DeviceData,
    download: RowsDownload,
    n_items: int,
    local_round: LocalRound,
    network: NetworkWeights | None = None,
) -> LocalResult:
    """Train MF-BPR on the device's positives against the downloaded item rows; upload the item deltas.

    With ``model.name = neumf`` (FedNCF) the model is NeuMF (``JoinedNeuMF``: rows [GMF | MLP]) with the
    received shared ``network``, which a fresh Adam at ``fed.network-lr`` trains on the real positives
    beside the rows; its delta joins the upload (``RowUpdate.network``).

    MF with a sparse item mask holds the touched rows by their active entries alone (``holds_compact_rows``,
    ``compact_rows``: memory in the mask's entries, not in rows x width). The round, step by step: plan the
    item rows it touches (positives, fake positives, negatives), load them with the user row into a local
    model, fit the user row alone (``fed.user-steps``), train user and item rows jointly while accumulating
    gradients of inactive entries, encode the upload, keep the new private state, explore the user row's
    mask, account the memory held, and evaluate if asked.

    With ``local_round.evaluate`` (``fed.evaluate-model = local``) the device also ranks with its personal
    model right after training: its user row and the downloaded table with its own trained rows (PFedRec's
    evaluation).

    With ``local_round.user_swap_fraction`` > 0 the device also explores its own user-row mask after
    training: ceil(fraction * active) smallest-magnitude entries are pruned and as many inactive ones grown
    by |accumulated gradient| (or at random for random-growth policies), starting at zero.

    Under ``fed.user-state = reconstruct`` (FedRecon) the caller passes a fresh row, which ``fit_user_row``
    fits with the items frozen; the joint steps then train the item rows only.

    The user row follows ``MaskedAdam`` (masked entries stay zero; its optimiser state persists) or, with
    ``fed.user-optimizer = sgd``, ``MaskedSGD`` on the mean loss; the item rows follow a fresh ``MaskedAdam``
    each round or, with ``fed.item-optimizer = sgd``, ``MaskedSGD`` on the summed loss (updates proportional
    to the gradient, as in MF-SGD and FedAvg). Gradients of inactive item entries are accumulated (signed
    sum) and, when ``local_round.send_signal``, each touched row reports its ``signal-topk`` largest |sums|
    among inactive entries.
    """
    rows = plan_round_rows(config, data, download, n_items, local_round.server_round)
    trained: TrainedRows | CompactTrainedRows
    if holds_compact_rows(config):
        trained = _train_compact_mf(config, state, data, download, rows, local_round)
    else:
        local = _load_local_model(config, state, download, rows, n_items, network)
        fit_user_row(config, local.model, local.user_opt, *rows.real_examples_of_first_epoch())
        steps = _train_joint_steps(config, data, rows, local, local_round.server_round)
        trained = _trained_rows(local, steps)
    return finish_round(config, DeviceRound(state, data, download, local_round, network), rows, trained, n_items)


@dataclass(frozen=True)
class DeviceRound:
    """One device's inputs to a local round: ``local_train``'s arguments but the config and the catalogue size."""

    state: DeviceState
    data: DeviceData
    download: RowsDownload
    local_round: LocalRound
    network: NetworkWeights | None = None


def finish_round(
    config: RunConfig, device: DeviceRound, rows: RoundRows, trained: TrainedRows | CompactTrainedRows, n_items: int
) -> LocalResult:
    """Everything a local round does after its steps, from what they left (``trained``): encode the upload,
    keep the new private state, explore the user row's mask, account the memory held, and evaluate if asked.
    Shared by ``local_train`` and the batched devices (``fedsparse.federation.batched``)."""
    local_round, data = device.local_round, device.data
    update = _encode_upload(config, rows, trained, device.download, n_items, local_round.send_signal)
    new_state = _trained_device_state(device.state, trained)
    if local_round.user_swap_fraction > 0:
        explore_user_row(config, new_state, trained.user_signal, local_round.user_swap_fraction, local_round.server_round,
                         data.user_id)
    memory = _round_memory_bytes(new_state, device.download, rows, trained)
    evaluation = _personal_evaluation(config, new_state, data, device.download, rows, trained) if local_round.evaluate else None
    return LocalResult(new_state, update, trained.loss, memory, evaluation)


@dataclass(frozen=True)
class RoundRows:
    """The item rows one local round trains, all known before training starts.

    ``touched`` int64 [r] sorted: every row the round reads and uploads; ``trained`` int64 [n_train +
    n_fake]: the real positives, then the fake ones; ``negatives`` int64 [local_epochs, n_train + n_fake,
    negatives]; ``n_real`` = n_train, the leading entries of ``trained`` that are real.
    """

    touched: np.ndarray
    trained: np.ndarray
    negatives: np.ndarray
    n_real: int

    def positions(self, items: np.ndarray) -> torch.Tensor:
        """int64, shaped as ``items``: each item's row in the local model (its position in ``touched``)."""
        return torch.from_numpy(np.searchsorted(self.touched, items))

    def real_examples_of_first_epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(positives, negatives) of the real positives with the first epoch's negatives: what the user row
        is fitted on (fake positives never reach the user row)."""
        real = slice(0, self.n_real)
        return self.positions(self.trained[real]), self.positions(self.negatives[0][real])


def plan_round_rows(config: RunConfig, data: DeviceData, download: RowsDownload, n_items: int, server_round: int) -> RoundRows:
    """This round's negatives, fake positives and touched rows; DeviceError when the device has nothing to
    train or the download lacks a row the round needs."""
    negatives = round_negatives(config, data, n_items, server_round)
    fakes = round_padding(config, data, n_items, server_round)
    touched = rows_needed(data, negatives, fakes)
    if data.train.size == 0:
        raise DeviceError(f"user {data.user_id} has no training interactions")
    if download.row_ids is not None and not _holds_rows(download.row_ids, touched):
        raise DeviceError(f"user {data.user_id}: the download lacks rows the round needs")
    return RoundRows(touched, np.concatenate([data.train, fakes]), negatives, data.train.size)


def _holds_rows(row_ids: np.ndarray, wanted: np.ndarray) -> bool:
    """Whether the sorted unique ``row_ids`` hold every one of the sorted ``wanted`` rows (a "rows" download
    usually holds exactly them)."""
    if row_ids.size == wanted.size:
        return bool(np.array_equal(row_ids, wanted))
    if row_ids.size == 0 or wanted.size == 0:
        return wanted.size == 0
    position = np.searchsorted(row_ids, wanted).clip(max=row_ids.size - 1)
    return bool((row_ids[position] == wanted).all())


@dataclass(frozen=True)
class _LocalModel:
    """The round's working copy: MF (or NeuMF) over the user row [1, w] and the touched item rows [r, w],
    their masks (``user_mask`` bool [1, w], ``item_mask`` bool [r, w]) and optimisers; ``item_start``
    float32 [r, w] holds the rows as downloaded (deltas are taken against it), ``decoded_nbytes`` its bytes;
    for NeuMF, ``network_start`` the shared network as received and ``network_opt`` its fresh Adam."""

    model: MatrixFactorization | JoinedNeuMF
    user_mask: torch.Tensor
    item_mask: torch.Tensor
    user_opt: MaskedAdam | MaskedSGD
    item_opt: MaskedAdam | MaskedSGD
    item_start: np.ndarray
    decoded_nbytes: int
    network_start: NetworkWeights | None = None
    network_opt: torch.optim.Adam | None = None


def round_item_rows(download: RowsDownload, rows: RoundRows, n_items: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode the touched rows alone from the compact download (the rest of the table stays compact): (item rows
    float32 [r, w], their mask bool [r, w], bytes of the decoded rows kept as downloaded; the mask is the local
    model's and counted with it)."""
    positions = rows.touched if download.row_ids is None else np.searchsorted(download.row_ids, rows.touched)
    start, mask = download.table.decode_rows(positions)
    return start, mask, start.nbytes


def _load_local_model(
    config: RunConfig, state: DeviceState, download: RowsDownload, rows: RoundRows, n_items: int,
    network: NetworkWeights | None = None,
) -> _LocalModel:
    """Copy the user row and the touched item rows of the decoded download (and the received network) into a
    local model, and set up the user row's optimiser (resumed from the device's state) and fresh ones for
    the item rows and the network."""
    item_start, item_mask_array, decoded_nbytes = round_item_rows(download, rows, n_items)
    model = local_model(config, state.user_row, item_start, network, state.user_bias)  # the device's width
    user_mask = torch.from_numpy(state.user_mask).view(1, -1)
    item_mask = torch.from_numpy(item_mask_array)
    user_opt = _user_optimizer(config, model.user_embedding.weight.data, user_mask, state)
    item_opt = _item_optimizer(config, model.item_embedding.weight.data, item_mask)
    network_opt = None
    if isinstance(model, JoinedNeuMF):
        network_opt = torch.optim.Adam(list(network_parameters(model).values()), lr=config.fed.network_lr)
    return _LocalModel(model, user_mask, item_mask, user_opt, item_opt, item_start, decoded_nbytes, network, network_opt)


@dataclass(frozen=True)
class _JointSteps:
    """What the joint steps leave besides the trained model: the mean loss per step and the gradients
    accumulated (signed sums) on inactive entries, items float32 [r, w] and user float32 [1, w]."""

    mean_loss: float
    item_signal: torch.Tensor
    user_signal: torch.Tensor


def _train_joint_steps(
    config: RunConfig, data: DeviceData, rows: RoundRows, local: _LocalModel, server_round: int
) -> _JointSteps:
    """Every local step over the round's batches: the padded loss's gradients (fake positives reach the
    item rows only), the inactive entries' gradients accumulated, the user row stepped (unless it is
    reconstructed) and the item rows."""
    model = local.model
    item_signal = torch.zeros(local.item_mask.shape)
    user_signal = torch.zeros(local.user_mask.shape)
    positives = rows.positions(rows.trained)
    total_loss = 0.0
    steps = 0
    for epoch, batch in local_batches(config, data, server_round, rows.trained.size):
        negative_rows = rows.positions(rows.negatives[epoch][batch.numpy()])
        step = _BatchStep(config, model, positives[batch], negative_rows, batch < rows.n_real)
        gradients = step.gradients()
        user_signal += gradients.user * ~local.user_mask
        if config.fed.user_state == "keep":
            local.user_opt.step(gradients.user)
            _step_user_bias(config, model, gradients.bias)
        if config.fed.step_order == "head-first":  # PFedRec: the item step sees the head it just stepped
            gradients = step.gradients()
        item_signal += gradients.items * ~local.item_mask
        if isinstance(local.item_opt, MaskedSGD):
            local.item_opt.step(gradients.items, scale=float(batch.numel()))
        else:
            local.item_opt.step(gradients.items)
        if local.network_opt is not None:  # NeuMF: the shared network, from the real positives' gradient
            local.network_opt.step()
        total_loss += float(gradients.loss)
        steps += 1
    return _JointSteps(total_loss / steps, item_signal, user_signal)


@dataclass(frozen=True)
class _StepGradients:
    """One batch's loss and gradients: user row float32 [1, w], score bias float32 [1] (None without one),
    item rows float32 [r, w]."""

    loss: torch.Tensor
    user: torch.Tensor
    bias: torch.Tensor | None
    items: torch.Tensor


@dataclass(frozen=True)
class _BatchStep:
    """One local batch (positives int64 [b], negatives int64 [b, n]: local rows; ``is_real`` bool [b]) whose
    gradients are taken at the model's current weights: MF's closed form (``mf_batch_gradients``, no
    autograd), or a backward for NeuMF, which also leaves the shared network's gradients for its optimiser."""

    config: RunConfig
    model: MatrixFactorization | JoinedNeuMF
    positives: torch.Tensor
    negatives: torch.Tensor
    is_real: torch.Tensor

    def gradients(self) -> _StepGradients:
        """The padded batch loss's gradients at the model's weights now."""
        model, train = self.model, self.config.train
        if isinstance(model, MatrixFactorization):
            bias = None if model.user_bias is None else model.user_bias.detach()
            closed = mf_batch_gradients(model.user_embedding.weight.detach()[0], model.item_embedding.weight.detach(),
                                        self.positives, self.negatives, self.is_real, train.loss, train.l2_reg, bias)
            return _StepGradients(closed.loss, closed.user.view(1, -1), closed.bias, closed.items)
        model.zero_grad(set_to_none=True)
        users = torch.zeros(self.positives.numel(), dtype=torch.int64)
        loss = _padded_step_backward(self.config, model, users, self.positives, self.negatives, self.is_real)
        return _StepGradients(loss, _gradient(model.user_embedding.weight), None, _gradient(model.item_embedding.weight))


def _step_user_bias(config: RunConfig, model: MatrixFactorization | JoinedNeuMF, gradient: torch.Tensor | None) -> None:
    """SGD on the device's score bias (``fed.user-bias``, MF only) at the user row's rate."""
    bias = getattr(model, "user_bias", None)
    if bias is not None and gradient is not None:
        bias.data.add_(gradient, alpha=-config.fed.local_lr)


@dataclass(frozen=True)
class TrainedRows:
    """What a device's local steps leave, all ``finish_round`` needs: the item rows as trained (float32 [r, w]),
    as downloaded and their mask (bool [r, w]); the user row float32 [w], its score bias float32 [1] (None
    without one) and its Adam moments and step count (None under SGD, which keeps none); the mean loss per
    step; the gradients accumulated on inactive entries (items float32 [r, w], user float32 [w]); bytes of
    the item rows' optimiser state and of the rows as decoded from the download; for NeuMF the network as received and as
    trained. A batch of devices trains rows dense however a device alone holds them: ``alone_working_nbytes``
    then says what the device alone would hold, so memory figures do not depend on how the simulator batches."""

    items: np.ndarray
    item_start: np.ndarray
    item_mask: np.ndarray
    user_row: np.ndarray
    user_bias: np.ndarray | None
    user_moments: tuple[np.ndarray, np.ndarray, int] | None
    loss: float
    item_signal: np.ndarray
    user_signal: np.ndarray
    item_opt_nbytes: int
    decoded_nbytes: int
    network_start: NetworkWeights | None = None
    network: NetworkWeights | None = None
    alone_working_nbytes: int | None = None  # set by a batch: what the device alone would hold (compact rows)

    @property
    def width(self) -> int:
        """The item rows' width w."""
        return int(self.items.shape[1])

    def delta_values(self) -> np.ndarray:
        """The active entries' deltas, float32 [K], row after row (the upload's order)."""
        return (self.items - self.item_start)[self.item_mask]

    def delta_rows(self) -> np.ndarray:
        """The rows' deltas float32 [r, w], zero off the mask."""
        return self.items - self.item_start

    def trained_items(self) -> np.ndarray:
        """The rows as trained, float32 [r, w]."""
        return self.items

    def top_signal(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the k inactive entries with the largest |accumulated gradient| (active entries rank after
        every inactive one: an inactive entry whose gradient is exactly zero would otherwise tie with them and
        lose to a lower active column): columns int64 [r, k'] and signed sums float32 [r, k'], k' = min(k, w)."""
        magnitude = np.where(self.item_mask, -1.0, np.abs(self.item_signal))
        order = np.argsort(-magnitude, axis=1, kind="stable")[:, : min(k, self.width)]
        return order, np.take_along_axis(self.item_signal, order, axis=1).astype(np.float32)

    def working_nbytes(self) -> int:
        """Bytes of the working item rows (trained copy, gradient, optimiser state, signal, mask) and, for NeuMF,
        the network (received copy, weights, gradient, Adam's two moments); a batch's rows report what the
        device would hold training alone (``alone_working_nbytes``)."""
        if self.alone_working_nbytes is not None:
            return self.alone_working_nbytes
        working = self.items.nbytes * 2 + self.item_opt_nbytes + self.item_signal.nbytes + self.item_mask.nbytes
        return int(working + (5 * self.network_start.nbytes if self.network_start is not None else 0))


@dataclass(frozen=True)
class CompactTrainedRows:
    """``TrainedRows`` of an MF round on compact rows (``compact_rows.CompactRows``): the rows' entries as
    trained (``rows.values``) and as downloaded (``start`` float32 [K]); the regrowth signal's factors
    (``history``, None when the round sends none); the user row, bias, moments, loss and user signal as there;
    bytes of the item optimiser's state."""

    rows: CompactRows
    start: torch.Tensor
    history: SignalHistory | None
    user_row: np.ndarray
    user_bias: np.ndarray | None
    user_moments: tuple[np.ndarray, np.ndarray, int] | None
    loss: float
    user_signal: np.ndarray
    item_opt_nbytes: int
    network_start: None = None
    network: None = None

    @property
    def width(self) -> int:
        return self.rows.width

    @property
    def decoded_nbytes(self) -> int:
        """Bytes of the rows' entries as read from the download (values kept to take deltas against)."""
        return int(self.start.nbytes)

    def delta_values(self) -> np.ndarray:
        return (self.rows.values - self.start).numpy()

    def delta_rows(self) -> np.ndarray:
        return self.rows.dense(self.rows.values - self.start)

    def trained_items(self) -> np.ndarray:
        return self.rows.dense()

    def top_signal(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.history is None:
            raise ValueError("this round kept no regrowth signal (the server asked for none)")
        return self.history.top_inactive(self.rows, k)

    def working_nbytes(self) -> int:
        """Bytes of the entries as trained and one step's gradient, their rows and columns, the optimiser's
        state and the signal's factors."""
        history = self.history.nbytes if self.history is not None else 0
        return int(self.rows.values.nbytes * 2 + self.rows.index_nbytes + self.item_opt_nbytes + history)


def _train_compact_mf(
    config: RunConfig, state: DeviceState, data: DeviceData, download: RowsDownload, rows: RoundRows,
    local_round: LocalRound,
) -> CompactTrainedRows:
    """The MF round on the touched rows' active entries (``compact_rows``): ``fit_user_row``'s steps, then the
    joint steps of ``_train_joint_steps`` (user row, its bias and the item entries; the step order, padding,
    optimisers and user state as there), keeping the regrowth signal's factors when the round sends it."""
    positions = rows.touched if download.row_ids is None else np.searchsorted(download.row_ids, rows.touched)
    items = CompactRows.from_table(download.table, positions)
    start = items.values.clone()
    user = torch.from_numpy(state.user_row.copy()).view(1, -1)
    bias = None if state.user_bias is None else torch.from_numpy(state.user_bias.copy())
    user_mask = torch.from_numpy(state.user_mask).view(1, -1)
    user_opt = _user_optimizer(config, user, user_mask, state)
    # Adam over the stored entries, every one of them active (a scalar mask broadcasts)
    item_opt = (MaskedAdam(items.values, torch.ones((), dtype=torch.bool), config.fed.local_lr)
                if config.fed.item_optimizer == "adam" else None)
    loss, l2_reg = config.train.loss, config.train.l2_reg
    fit_positives, fit_negatives = rows.real_examples_of_first_epoch()
    for _ in range(config.fed.user_steps):
        user_opt.step(compact_user_row_gradient(user[0], items, fit_positives, fit_negatives, loss, l2_reg).view(1, -1))
    history = SignalHistory([], []) if local_round.send_signal else None
    user_signal = torch.zeros(user_mask.shape)
    positives = rows.positions(rows.trained)
    total_loss, steps = 0.0, 0
    for epoch, batch in local_batches(config, data, local_round.server_round, rows.trained.size):
        examples = (positives[batch], rows.positions(rows.negatives[epoch][batch.numpy()]), batch < rows.n_real)
        step = compact_mf_gradients(user[0], items, *examples, loss, l2_reg, bias)
        user_signal += step.user.view(1, -1) * ~user_mask
        item_user = user[0].clone()  # the user row the item gradient is taken at
        if config.fed.user_state == "keep":
            user_opt.step(step.user.view(1, -1))
            if bias is not None and step.bias is not None:
                bias.add_(step.bias, alpha=-config.fed.local_lr)
        if config.fed.step_order == "head-first":  # PFedRec: the item step sees the head it just stepped
            step, item_user = compact_mf_gradients(user[0], items, *examples, loss, l2_reg, bias), user[0].clone()
        if history is not None:
            history.record(step.coef, item_user)
        if item_opt is None:  # SGD on the summed loss, as ``MaskedSGD``
            items.values.add_(step.values, alpha=-config.fed.item_lr * float(batch.numel()))
        else:
            item_opt.step(step.values)
        total_loss += float(step.loss)
        steps += 1
    moments = None
    if isinstance(user_opt, MaskedAdam):
        moments = (user_opt.exp_avg.view(-1).numpy().copy(), user_opt.exp_avg_sq.view(-1).numpy().copy(), user_opt.steps)
    item_opt_nbytes = 0 if item_opt is None else item_opt.exp_avg.nbytes + item_opt.exp_avg_sq.nbytes
    return CompactTrainedRows(items, start, history, user.view(-1).numpy(), None if bias is None else bias.numpy(), moments,
                              total_loss / steps, user_signal.view(-1).numpy(), item_opt_nbytes)


def _trained_rows(local: _LocalModel, steps: _JointSteps) -> TrainedRows:
    """``local_train``'s model and optimisers after the steps, as ``TrainedRows``."""
    user_opt = local.user_opt
    moments = None
    if isinstance(user_opt, MaskedAdam):
        moments = (user_opt.exp_avg.view(-1).numpy().copy(), user_opt.exp_avg_sq.view(-1).numpy().copy(), user_opt.steps)
    bias = getattr(local.model, "user_bias", None)
    return TrainedRows(
        local.model.item_embedding.weight.detach().numpy(), local.item_start, local.item_mask.numpy(),
        local.model.user_embedding.weight.detach().view(-1).numpy(), None if bias is None else bias.detach().numpy(),
        moments, steps.mean_loss, steps.item_signal.numpy(), steps.user_signal.view(-1).numpy(), local.item_opt.nbytes,
        local.decoded_nbytes, local.network_start,
        network_of(local.model) if isinstance(local.model, JoinedNeuMF) else None,
    )


def _encode_upload(
    config: RunConfig, rows: RoundRows, trained: TrainedRows | CompactTrainedRows, download: RowsDownload, n_items: int,
    send_signal: bool,
) -> RowUpdate:
    """The upload: deltas of the active entries of the touched rows (``fed.uplink = table``: of every row,
    zero where untrained, as FedAvg uploads the whole table), weighted by the examples trained, with the
    top-k regrowth signal of each touched row's inactive entries when ``send_signal`` and, for NeuMF, the
    shared network's delta."""
    touched_ids = wire_row_ids(rows.touched, n_items)
    signal = _top_signal(touched_ids, trained, config) if send_signal else ()
    if config.fed.uplink == "table":  # the download was the whole table (config check): every row goes back
        table_mask = download.table.mask()
        whole = np.zeros(table_mask.shape, dtype=np.float32)
        whole[rows.touched] = trained.delta_rows()
        delta, row_ids = whole[table_mask], wire_row_ids(np.arange(n_items), n_items)
    else:
        delta, row_ids = trained.delta_values(), touched_ids
    network = None
    if trained.network_start is not None and trained.network is not None:
        now, start = trained.network, trained.network_start
        network = NetworkWeights({name: now.arrays[name] - start.arrays[name] for name in start.arrays})
    update = RowUpdate(row_ids, delta.astype(np.float32), float(rows.trained.size), *signal)
    return update if network is None else replace(update, network=network)


def _trained_device_state(state: DeviceState, trained: TrainedRows | CompactTrainedRows) -> DeviceState:
    """The private state after training: the trained user row (mask unchanged) and, under Adam, its moments."""
    moments = trained.user_moments or (state.exp_avg.copy(), state.exp_avg_sq.copy(), state.steps)
    bias = None if trained.user_bias is None else trained.user_bias.astype(np.float32)
    return DeviceState(trained.user_row.astype(np.float32), state.user_mask.copy(), *moments, user_bias=bias)


def _round_memory_bytes(
    new_state: DeviceState, download: RowsDownload, rows: RoundRows, trained: TrainedRows | CompactTrainedRows
) -> int:
    """Bytes the device held while training: its state, the download (compact), the touched rows as read from
    it, the working item rows (``working_nbytes``), and the negatives. (Ranking every item for a personal
    evaluation, afterwards, decodes the whole table.)"""
    held = new_state.nbytes + download.nbytes + trained.decoded_nbytes
    return int(held + trained.working_nbytes() + rows.negatives.nbytes)


def _personal_evaluation(
    config: RunConfig, new_state: DeviceState, data: DeviceData, download: RowsDownload, rows: RoundRows,
    trained: TrainedRows | CompactTrainedRows,
) -> dict[str, float]:
    """``evaluate_splits`` of the personal model: the new user row and the downloaded table with the
    device's own trained rows (and, for NeuMF, its trained network; needs the full table, ``fed.downlink = full``)."""
    if download.row_ids is not None:
        raise ValueError("evaluating the personal model needs the full item table (fed.downlink = full)")
    personal, _ = download.table.decode()
    personal[rows.touched] = trained.trained_items()
    return evaluate_splits(config, new_state, data, personal, trained.network)


def _gradient(parameter: torch.Tensor) -> torch.Tensor:
    """The gradient the last backward left on ``parameter`` (every parameter of the loss gets one)."""
    if parameter.grad is None:
        raise RuntimeError("backward left no gradient on a parameter of the loss")
    return parameter.grad


def _user_optimizer(
    config: RunConfig, user_weight: torch.Tensor, user_mask: torch.Tensor, state: DeviceState
) -> MaskedAdam | MaskedSGD:
    """The user row's optimiser for this round (``fed.user-optimizer``): Adam resumed from the device's
    stored moments, or SGD on the mean loss (no state)."""
    if config.fed.user_optimizer == "sgd":
        return MaskedSGD(user_weight, user_mask, config.fed.local_lr)
    user_opt = MaskedAdam(user_weight, user_mask, config.fed.local_lr)
    user_opt.exp_avg.copy_(torch.from_numpy(state.exp_avg).view(1, -1))
    user_opt.exp_avg_sq.copy_(torch.from_numpy(state.exp_avg_sq).view(1, -1))
    user_opt.steps = state.steps
    return user_opt


def _item_optimizer(config: RunConfig, item_weight: torch.Tensor, item_mask: torch.Tensor) -> MaskedAdam | MaskedSGD:
    """The item rows' optimiser, fresh each round (``fed.item-optimizer``): SGD at ``fed.item-lr`` on the
    summed loss, or Adam at ``fed.local-lr``."""
    if config.fed.item_optimizer == "sgd":
        return MaskedSGD(item_weight, item_mask, config.fed.item_lr)
    return MaskedAdam(item_weight, item_mask, config.fed.local_lr)


def _padded_step_backward(
    config: RunConfig,
    model: MatrixFactorization | JoinedNeuMF,
    users: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    is_real: torch.Tensor,
) -> torch.Tensor:
    """Backward the batch's mean loss; fake positives (``~is_real``) reach the item rows only.

    Padding must make fake rows' deltas look real, but the private user row (and NeuMF's shared network)
    learns from real positives alone. Without fakes this is one plain backward of ``batch_loss``.
    """
    loss = torch.zeros(())
    bias = getattr(model, "user_bias", None)
    real_only = [model.user_embedding.weight, *network_parameters(model).values(), *([] if bias is None else [bias])]
    for part in (is_real, ~is_real):
        share = float(part.sum()) / part.numel()
        if share == 0:
            continue
        for parameter in real_only:
            parameter.requires_grad_(part is is_real)
        part_loss = share * batch_loss(
            model, users[part], positives[part], negatives[part], config.train.loss, config.train.l2_reg
        )
        part_loss.backward()
        loss = loss + part_loss.detach()
    for parameter in real_only:
        parameter.requires_grad_(True)
    return loss


def fit_user_row(
    config: RunConfig,
    model: MatrixFactorization | JoinedNeuMF,
    user_opt: MaskedAdam | MaskedSGD,
    positives: torch.Tensor,
    negatives: torch.Tensor,
) -> None:
    """``fed.user-steps`` steps on the user row alone against the downloaded item rows (frozen, as is
    NeuMF's network), before the joint steps: the private row catches up with a table that moved since the
    device last took part (FedRecon's local reconstruction, kept across rounds here). positives int64 [b],
    negatives int64 [b, n]: rows of the local model. For MF the gradient is its closed form
    (``mf_user_row_gradient``), O(b * n * dim) per step with no backward through the tables; NeuMF has none,
    so its steps backward through the network with everything but the user row frozen.
    """
    if config.fed.user_steps == 0:
        return
    if isinstance(model, JoinedNeuMF):
        _fit_neumf_user_row(config, model, user_opt, positives, negatives)
        return
    item_weight = model.item_embedding.weight.detach()
    positive_rows, negative_rows = item_weight[positives], item_weight[negatives]
    user_weight = model.user_embedding.weight.data  # [1, w], stepped in place by the optimiser
    for _ in range(config.fed.user_steps):
        gradient = mf_user_row_gradient(user_weight[0], positive_rows, negative_rows, config.train.loss, config.train.l2_reg)
        user_opt.step(gradient.view(1, -1))


def _fit_neumf_user_row(
    config: RunConfig, model: JoinedNeuMF, user_opt: MaskedAdam | MaskedSGD, positives: torch.Tensor, negatives: torch.Tensor
) -> None:
    """``fit_user_row`` for NeuMF: ``fed.user-steps`` backwards of ``batch_loss`` with the item rows and the
    shared network frozen, each stepping the user row."""
    frozen = [model.item_embedding.weight, *network_parameters(model).values()]
    users = torch.zeros(positives.shape[0], dtype=torch.int64)
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        for _ in range(config.fed.user_steps):
            loss = batch_loss(model, users, positives, negatives, config.train.loss, config.train.l2_reg)
            model.zero_grad(set_to_none=True)
            loss.backward()
            user_opt.step(_gradient(model.user_embedding.weight))
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


def reconstruct_user_row(
    config: RunConfig, state: DeviceState, data: DeviceData, item_weights: np.ndarray, network: NetworkWeights | None = None
) -> DeviceState:
    """FedRecon's evaluation: the user row fitted by ``fed.user-steps`` steps against ``item_weights`` float32
    [n_items, dim] (frozen, as is NeuMF's ``network``) on the device's training positives and the negatives
    of stream round 0. A device without training positives has nothing to fit: its row stays as it is (a
    loss over no examples would be NaN)."""
    if data.train.size == 0:
        return state
    n_items = item_weights.shape[0]
    negatives = round_negatives(config, data, n_items, 0)[0]
    touched = rows_needed(data, negatives)
    model = local_model(config, state.user_row, item_weights[touched, : state.user_row.size], network)
    user_mask = torch.from_numpy(state.user_mask).view(1, -1)
    user_opt = _user_optimizer(config, model.user_embedding.weight.data, user_mask, state)
    positives = torch.from_numpy(np.searchsorted(touched, data.train))
    fit_user_row(config, model, user_opt, positives, torch.from_numpy(np.searchsorted(touched, negatives)))
    return replace(state, user_row=model.user_embedding.weight.detach().view(-1).numpy().astype(np.float32))


def set_user_prefix(config: RunConfig, state: DeviceState, share: float, server_round: int, user_id: int) -> None:
    """Make the user row active on its first round(share * width) dimensions (at least one), in place: entries
    leaving the prefix are zeroed with their moments, entries joining it start at normal(0, amgp-grow-std)."""
    width = state.user_row.size
    prefix = np.arange(width) < max(1, round(share * width))
    grown = prefix & ~state.user_mask
    for array in (state.user_row, state.exp_avg, state.exp_avg_sq):
        array[~prefix | grown] = 0.0
    rng = rng_for(config.seed, "device-grow", server_round, user_id)
    state.user_row[grown] = rng.normal(0.0, config.sparse.amgp_grow_std, int(grown.sum())).astype(np.float32)
    state.user_mask = prefix


def explore_user_row(
    config: RunConfig, state: DeviceState, signal: np.ndarray, fraction: float, server_round: int, user_id: int
) -> None:
    """Prune and regrow the user row's mask in place (the row's budget is unchanged; a fully active row
    has nothing to swap)."""
    active = int(state.user_mask.sum())
    if active == state.user_mask.size:
        return
    if build_policy(config.sparse).settings.grow_score == "random":
        score = rng_for(config.seed, "device-explore", server_round, user_id).random(signal.shape)
    else:
        score = np.abs(signal)
    update = prune_and_grow(state.user_row[None, :], state.user_mask[None, :], score[None, :], math.ceil(fraction * active))
    changed = np.concatenate([update.pruned, update.grown])
    state.user_mask = update.mask[0]
    for array in (state.user_row, state.exp_avg, state.exp_avg_sq):
        array[changed] = 0.0


def _top_signal(
    rows: np.ndarray, trained: TrainedRows | CompactTrainedRows, config: RunConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per touched row (wire ids ``rows``), the ``signal-topk`` inactive entries with the largest |accumulated
    gradient| (``top_signal``): the upload's signal rows, columns and signed sums."""
    order, values = trained.top_signal(config.fed.signal_topk)
    return rows.copy(), order.astype(signal_col_dtype(trained.width)), values


def evaluate_splits(
    config: RunConfig, state: DeviceState, data: DeviceData, item_weights: np.ndarray, network: NetworkWeights | None = None
) -> dict[str, float]:
    """``evaluate_device`` on validation and test, keys prefixed ``validation-`` / ``test-`` (splits the
    user has no held-out item in are left out)."""
    metrics: dict[str, float] = {}
    for split in ("validation", "test"):
        result = evaluate_device(config, state, data, item_weights, split, network)
        if result is not None:
            metrics.update({f"{split}-{name}": value for name, value in result.items()})
    return metrics


ItemScores = Callable[[np.ndarray], torch.Tensor]  # item ids int64 [1, c] -> the user's scores float32 [1, c]


def device_scorer(
    config: RunConfig, state: DeviceState, item_weights: np.ndarray, network: NetworkWeights | None = None
) -> tuple[torch.Tensor, ItemScores]:
    """How the device scores items with its user row and ``item_weights`` float32 [n_items, w'] (its first w
    dimensions, the user row's width): (scores of every item float32 [n_items], scores of some items).
    MF scores by the dot product; NeuMF (given the shared ``network``) by its network (``JoinedNeuMF``)."""
    width = state.user_row.size
    if network is None:
        user = torch.from_numpy(state.user_row)
        items = read_only_tensor(np.ascontiguousarray(item_weights[:, :width]))
        return items @ user, lambda ids: items[torch.as_tensor(ids)] @ user
    model = local_model(config, state.user_row, item_weights[:, :width], network)
    user_ids = torch.zeros(1, dtype=torch.int64)
    with torch.no_grad():
        every = model.score_all(user_ids)[0]

    def some(ids: np.ndarray) -> torch.Tensor:
        items = torch.as_tensor(ids).view(-1, np.shape(ids)[-1])  # [b, c], every row this user's
        with torch.no_grad():
            return model.score(user_ids.expand(items.shape[0]), items)

    return every, some


def evaluate_device(
    config: RunConfig,
    state: DeviceState,
    data: DeviceData,
    item_weights: np.ndarray,
    split: str = "test",
    network: NetworkWeights | None = None,
) -> dict[str, float] | None:
    """Full-ranking metrics of this user on ``split`` ("validation" or "test"); None without held-out items.

    ``item_weights`` float32 [n_items, dim] is the masked item table, of which a device of width w uses
    the first w dimensions; the user's training items (and validation items when testing) are excluded
    from the ranking. ``network``: NeuMF's shared network (None for MF), see ``device_scorer``.
    """
    held_out = data.test if split == "test" else data.validation
    if held_out.size == 0:
        return None
    n_items = item_weights.shape[0]
    excluded = data.train if split == "validation" else np.union1d(data.train, data.validation)

    def one_row(items: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(items.size, dtype=np.float32), items, [0, items.size]), shape=(1, n_items))

    every, some = device_scorer(config, state, item_weights, network)
    cutoffs = ranking_cutoffs(config, n_items)
    _, per_user = metrics.full_ranking_per_user(
        lambda _: every.view(1, -1), one_row(held_out), [one_row(excluded)], cutoffs, 1
    )
    result = {name: float(values[0]) for name, values in per_user.items()}
    if uses_sampled_protocol(config) and held_out.size == 1:
        result.update(sampled_protocol(config, data, some, n_items, held_out, split))
    return result


def sampled_protocol(
    config: RunConfig, data: DeviceData, score: ItemScores, n_items: int, held_out: np.ndarray, split: str
) -> dict[str, float]:
    """Leave-one-out + ``eval.sampled-negatives`` protocol on the device: HR@10 and NDCG@10 of the held-out
    item among negatives it never interacted with: the candidate file's (``eval.candidates``, carried in
    the device's partition), else drawn from the device's own seeded stream. ``score`` gives the user's
    scores of some items (``device_scorer``)."""
    fixed = data.validation_negatives if split == "validation" else data.test_negatives
    if fixed is not None:
        negatives = fixed[None, :]
    elif config.eval.candidates:
        raise ValueError(f"user {data.user_id}: eval.candidates is set but the device's partition holds no candidate negatives")
    else:
        candidates = np.setdiff1d(np.arange(n_items, dtype=np.int64), data.interacted, assume_unique=True)
        count = min(config.eval.sampled_negatives, candidates.size)
        rng = rng_for(config.seed, "device-eval-negatives", split, data.user_id)
        negatives = np.sort(rng.choice(candidates, size=count, replace=False))[None, :]
    _, per_user = metrics.sampled_per_user(
        lambda _, candidates_of: score(candidates_of),
        sp.csr_matrix((np.ones(1, dtype=np.float32), held_out, [0, 1]), shape=(1, n_items)),
        negatives,
        np.zeros(1, dtype=np.int64),
        metrics.SAMPLED_PROTOCOL_K,
    )
    return {f"sampled_{name}": float(values[0]) for name, values in per_user.items()}
