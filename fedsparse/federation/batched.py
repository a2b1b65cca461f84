"""Devices in batches: many devices' local MF steps as one ragged computation (issue 20, in process).

``local_train_batch`` gives each of G devices the round ``device.local_train`` gives it alone. Each device's
rows are planned and its round finished by the per-device code (``plan_round_rows``, ``finish_round``); only
the steps in between run together. The devices' touched item rows are concatenated, without padding, into
one tensor [R = sum r_g, w] with offsets, their user rows stacked into [G, w]. Every stacked row belongs to
one device, so one product per row gives every score a step needs (row r against its device's user row),
and MF's closed-form gradients (as in ``central.losses.mf_batch_gradients`` / ``mf_user_row_gradient``)
reduce to one coefficient per row, the sum of the weights of the examples using it (``index_add_``): the
item gradient is that coefficient times the device's user row, the user gradient each device's sum of its
rows times their coefficients (a block-diagonal product). The masked optimisers step elementwise with
per-device step counts. With ``fed.local-batch-size`` devices take
different numbers of steps: step s runs the devices that still have a batch s (lockstep), and only their
rows move. What this does not cover (``batching_unsupported``) trains one device at a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from fedsparse.config import RunConfig
from fedsparse.federation.compact_rows import compact_working_nbytes
from fedsparse.federation.device import (
    DeviceRound,
    LocalResult,
    RoundRows,
    TrainedRows,
    finish_round,
    holds_compact_rows,
    local_batches,
    plan_round_rows,
    round_item_rows,
)
from fedsparse.federation.faults import DeviceError
from fedsparse.federation.network import uses_network
from fedsparse.sparse.masked_training import ADAM_BETAS, ADAM_EPS

log = logging.getLogger("fedsparse")


def batching_unsupported(config: RunConfig) -> str | None:
    """Why devices of this run cannot train in batches (they train one at a time), or None when they can."""
    if uses_network(config):
        return "model.name = neumf backwards through the shared network per device"
    if config.budget.widths:
        return "budget.device-widths gives devices user and item rows of different widths"
    return None


@functools.cache
def device_batch_size(config: RunConfig) -> int:
    """Training messages a transport serves together (``fed.device-batch``, at least 1): 1, said once per
    process in the log, when ``batching_unsupported`` names a reason."""
    size = max(1, config.fed.device_batch)
    reason = batching_unsupported(config) if size > 1 else None
    if reason:
        log.info("fed.device-batch = %d: devices train one at a time instead, as %s", size, reason)
        return 1
    return size


def local_train_batch(config: RunConfig, devices: Sequence[DeviceRound], n_items: int) -> list[LocalResult | DeviceError]:
    """``local_train`` of every device in ``devices`` (all of width w), their steps run together; per device its
    result, or the ``DeviceError`` that stopped it (nothing to train, a download lacking rows), in order.
    ValueError when the run's configuration is not batched (``batching_unsupported``)."""
    reason = batching_unsupported(config)
    if reason:
        raise ValueError(f"devices cannot train in batches: {reason}")
    results: list[LocalResult | DeviceError | None] = [None] * len(devices)
    planned: list[tuple[int, RoundRows]] = []
    for index, device in enumerate(devices):
        try:
            rows = plan_round_rows(config, device.data, device.download, n_items, device.local_round.server_round)
            planned.append((index, rows))
        except DeviceError as exc:
            results[index] = exc
    if planned:
        batch = _Batch(config, [devices[index] for index, _ in planned], [rows for _, rows in planned], n_items)
        batch.fit_user_rows()
        batch.train_joint_steps()
        for member, (index, rows) in enumerate(planned):
            results[index] = finish_round(config, devices[index], rows, batch.trained(member), n_items)
    return [result for result in results if result is not None]


@dataclass(frozen=True)
class _Examples:
    """One step's training examples of the devices in it: ``positives`` int64 [B] and ``negatives`` int64 [B, n]
    (rows of the concatenated item tensor), ``device`` int64 [B] (each example's device), ``real`` bool [B]
    (not a fake positive) and ``sizes`` float32 [G] (each device's examples in this step, 0 if it sits out)."""

    positives: torch.Tensor
    negatives: torch.Tensor
    device: torch.Tensor
    real: torch.Tensor
    sizes: torch.Tensor


@dataclass(frozen=True)
class _Gradients:
    """One step's per-device losses float32 [G] and gradients: user rows [G, w], score biases [G] (None without
    them) and item rows [R, w] (zero on the rows of devices outside the step)."""

    loss: torch.Tensor
    user: torch.Tensor
    bias: torch.Tensor | None
    items: torch.Tensor


class _Batch:
    """G devices' working copies, stacked: item rows [R, w] (device g's at ``offsets[g]:offsets[g + 1]``), their
    masks and optimiser moments, user rows [G, w] with masks, Adam moments and per-device step counts, score
    biases [G], and the accumulated gradients of inactive entries."""

    def __init__(self, config: RunConfig, devices: Sequence[DeviceRound], rows: Sequence[RoundRows], n_items: int) -> None:
        """Stack the devices' planned rows (decoded from each download) and private states."""
        self.config = config
        self.devices = devices
        self.rows = rows
        loaded = [round_item_rows(device.download, row, n_items) for device, row in zip(devices, rows, strict=True)]
        self.item_start = [start for start, _, _ in loaded]
        self.item_mask_arrays = [mask for _, mask, _ in loaded]
        self.decoded_nbytes = [nbytes for _, _, nbytes in loaded]
        counts = np.array([row.touched.size for row in rows], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.row_device = torch.from_numpy(np.repeat(np.arange(len(devices)), counts))
        self.items = torch.from_numpy(np.concatenate(self.item_start))
        item_mask = torch.from_numpy(np.concatenate(self.item_mask_arrays))
        self.item_float_mask = item_mask.to(torch.float32)
        self.item_inactive = 1.0 - self.item_float_mask
        self.row_index = np.arange(self.items.shape[0])
        self.user_rows = torch.empty_like(self.items)  # each row's device's user row; refilled by _row_scores
        self.item_gradient = torch.empty_like(self.items)  # refilled by _gradients
        states = [device.state for device in devices]
        self.users = torch.from_numpy(np.stack([state.user_row for state in states]).astype(np.float32))
        user_mask = torch.from_numpy(np.stack([state.user_mask for state in states]))
        self.user_float_mask = user_mask.to(torch.float32)
        self.user_inactive = ~user_mask
        self.user_exp_avg = torch.from_numpy(np.stack([state.exp_avg for state in states]).astype(np.float32))
        self.user_exp_avg_sq = torch.from_numpy(np.stack([state.exp_avg_sq for state in states]).astype(np.float32))
        self.user_steps = np.array([state.steps for state in states], dtype=np.int64)
        biases = [state.user_bias for state in states if state.user_bias is not None]  # all or none (fed.user-bias)
        self.bias = torch.from_numpy(np.concatenate(biases).astype(np.float32)) if len(biases) == len(states) else None
        self.item_exp_avg = torch.zeros_like(self.items) if config.fed.item_optimizer == "adam" else None
        self.item_exp_avg_sq = torch.zeros_like(self.items) if config.fed.item_optimizer == "adam" else None
        self.item_signal = torch.zeros_like(self.items)
        self.user_signal = torch.zeros_like(self.users)
        self.losses = np.zeros(len(devices))
        self.step_counts = np.zeros(len(devices), dtype=np.int64)
        # Each device's trained positives (real, then fake) and negatives [epochs, t, n] as rows of ``items``.
        starts = self.offsets[:-1]
        self.positives = [start + np.searchsorted(row.touched, row.trained) for start, row in zip(starts, rows, strict=True)]
        self.negatives = [start + np.searchsorted(row.touched, row.negatives) for start, row in zip(starts, rows, strict=True)]

    def _examples(self, picks: Sequence[tuple[int, int, np.ndarray]]) -> _Examples:
        """The examples of (device, epoch, positions into its trained positives) of every device in a step."""
        positives = [self.positives[g][positions] for g, _, positions in picks]
        negatives = [self.negatives[g][epoch][positions] for g, epoch, positions in picks]
        real = [positions < self.rows[g].n_real for g, _, positions in picks]
        sizes = np.zeros(len(self.devices), dtype=np.float32)
        for g, _, positions in picks:
            sizes[g] = positions.size
        device = np.repeat(np.array([g for g, _, _ in picks], dtype=np.int64), [positions.size for _, _, positions in picks])
        return _Examples(torch.from_numpy(np.concatenate(positives)), torch.from_numpy(np.concatenate(negatives)),
                         torch.from_numpy(device), torch.from_numpy(np.concatenate(real)), torch.from_numpy(sizes))

    def fit_user_rows(self) -> None:
        """``device.fit_user_row`` for every device: ``fed.user-steps`` steps of the user rows alone against the
        downloaded item rows (frozen), on each device's real positives with its first epoch's negatives."""
        config = self.config
        if config.fed.user_steps == 0:
            return
        examples = self._examples([(g, 0, np.arange(row.n_real)) for g, row in enumerate(self.rows)])
        sizes = examples.sizes[examples.device]
        n_negatives = examples.negatives.shape[1]
        for _ in range(config.fed.user_steps):
            scores = self._row_scores(with_bias=False)  # mf_user_row_gradient scores without the bias
            positive_scores, negative_scores = scores[examples.positives], scores[examples.negatives]
            if config.train.loss == "bpr":
                scale = 1.0 / (sizes * n_negatives)
                negative_weights = torch.sigmoid(negative_scores - positive_scores[:, None]) * scale[:, None]
                positive_weights = -negative_weights.sum(1)
            else:
                scale = 1.0 / (sizes * (1 + n_negatives))
                positive_weights = (torch.sigmoid(positive_scores) - 1.0) * scale
                negative_weights = torch.sigmoid(negative_scores) * scale[:, None]
            gradient = self._device_sums(self._row_weights(examples, positive_weights, negative_weights))
            self._step_users(gradient + config.train.l2_reg * self.users, None)

    def train_joint_steps(self) -> None:
        """``device._train_joint_steps`` for every device, step s over the devices that have a batch s."""
        config = self.config
        batches = [local_batches(config, device.data, device.local_round.server_round, row.trained.size)
                   for device, row in zip(self.devices, self.rows, strict=True)]
        self.step_counts = np.array([len(device_batches) for device_batches in batches], dtype=np.int64)
        for step in range(int(self.step_counts.max())):
            members = np.flatnonzero(self.step_counts > step)
            picks = [(int(g), batches[g][step][0], batches[g][step][1].numpy()) for g in members]
            examples = self._examples(picks)
            active = None if members.size == len(self.devices) else torch.from_numpy(members)
            gradients = self._gradients(examples)
            self.user_signal += gradients.user * self.user_inactive
            if config.fed.user_state == "keep":
                self._step_users(gradients.user, active)
                if self.bias is not None and gradients.bias is not None:
                    self.bias.sub_(config.fed.local_lr * gradients.bias)
            if config.fed.step_order == "head-first":  # PFedRec: the item step sees the head it just stepped
                gradients = self._gradients(examples)
            self.item_signal.addcmul_(gradients.items, self.item_inactive)
            self._step_items(gradients.items, examples.sizes, step + 1, active)
            self.losses[members] += gradients.loss.numpy()[members]

    def _gradients(self, examples: _Examples) -> _Gradients:
        """The padded batch loss's closed-form gradients of every device in the step (``mf_batch_gradients``,
        its sums taken per device): fake positives reach the item rows only. The item gradient lives in a
        buffer the next call overwrites."""
        train = self.config.train
        items, device = self.items, examples.device
        scores = self._row_scores(with_bias=True)
        positive_scores, negative_scores = scores[examples.positives], scores[examples.negatives]
        sizes = examples.sizes[device]
        n_negatives = negative_scores.shape[1]
        if train.loss == "bpr":  # every part's mean over its b_p * n pairs, times b_p / b: a sum over b * n
            margins = negative_scores - positive_scores[:, None]
            scale = 1.0 / (sizes * n_negatives)
            per_example = F.softplus(margins).sum(1) * scale
            negative_weights = torch.sigmoid(margins) * scale[:, None]
            positive_weights = -negative_weights.sum(1)
        else:
            scale = 1.0 / (sizes * (1 + n_negatives))
            per_example = (F.softplus(-positive_scores) + F.softplus(negative_scores).sum(1)) * scale
            positive_weights = (torch.sigmoid(positive_scores) - 1.0) * scale
            negative_weights = torch.sigmoid(negative_scores) * scale[:, None]
        n_devices = self.users.shape[0]
        real = examples.real.to(torch.float32)
        real_positive, real_negative = positive_weights * real, negative_weights * real[:, None]
        batch_sizes = examples.sizes.clamp(min=1.0)  # devices outside the step have no example: 0 / 1
        real_share = torch.zeros(n_devices).index_add_(0, device, real) / batch_sizes
        user = self._device_sums(self._row_weights(examples, real_positive, real_negative))
        user += train.l2_reg * real_share[:, None] * self.users
        used = torch.cat([examples.positives, examples.negatives.reshape(-1)])
        uses = torch.bincount(used, minlength=items.shape[0]).to(torch.float32)
        row_weights = self._row_weights(examples, positive_weights, negative_weights)
        item_gradient = torch.mul(self.user_rows, row_weights[:, None], out=self.item_gradient)
        item_gradient.addcmul_((train.l2_reg * uses / batch_sizes[self.row_device])[:, None], items)
        row_l2 = torch.zeros(n_devices).index_add_(0, self.row_device, uses * _row_dots(items, items))
        l2 = 0.5 * self.users.pow(2).sum(1) + 0.5 * row_l2 / batch_sizes
        loss = torch.zeros(n_devices).index_add_(0, device, per_example) + train.l2_reg * l2
        bias = None
        if self.bias is not None:
            bias = torch.zeros(n_devices).index_add_(0, device, real_positive + real_negative.sum(1))
        return _Gradients(loss, user, bias, item_gradient)

    def _row_scores(self, with_bias: bool) -> torch.Tensor:
        """Every stacked item row's score against its device's user row (plus the device's score bias when
        ``with_bias``), float32 [R]; leaves each row's user row in ``user_rows``."""
        torch.index_select(self.users, 0, self.row_device, out=self.user_rows)
        scores = _row_dots(self.items, self.user_rows)
        return scores + self.bias[self.row_device] if with_bias and self.bias is not None else scores

    def _row_weights(self, examples: _Examples, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Each stacked row's summed weight over the examples using it (as positive [B] or negative [B, n]):
        float32 [R]."""
        weights = torch.zeros(self.items.shape[0]).index_add_(0, examples.positives, positive)
        return weights.index_add_(0, examples.negatives.reshape(-1), negative.reshape(-1))

    def _device_sums(self, row_weights: torch.Tensor) -> torch.Tensor:
        """Each device's sum of its item rows times ``row_weights`` float32 [R]: float32 [G, w], one
        block-diagonal sparse product (far cheaper than a scatter of [R, w])."""
        shape = (len(self.devices), self.row_index.size)
        blocks = sp.csr_matrix((row_weights.numpy(), self.row_index, self.offsets), shape=shape)
        return torch.from_numpy(np.asarray(blocks @ self.items.numpy(), dtype=np.float32))

    def _step_users(self, gradient: torch.Tensor, active: torch.Tensor | None) -> None:
        """One masked step of the user rows of the ``active`` devices (None: all) with ``gradient`` [G, w]:
        ``MaskedSGD`` (mean loss), or ``MaskedAdam`` at each device's own step count."""
        lr = self.config.fed.local_lr
        if self.config.fed.user_optimizer == "sgd":  # a device outside the step has a zero gradient
            self.users.sub_(lr * gradient * self.user_float_mask)
            return
        members = slice(None) if active is None else active.numpy()
        self.user_steps[members] += 1
        steps = torch.from_numpy(self.user_steps[members].astype(np.float64))
        _masked_adam(self.users, self.user_exp_avg, self.user_exp_avg_sq, gradient, self.user_float_mask, steps, lr, active)

    def _step_items(self, gradient: torch.Tensor, sizes: torch.Tensor, step: int, active: torch.Tensor | None) -> None:
        """One masked step of the item rows of the ``active`` devices (None: all) with ``gradient`` [R, w]
        (consumed): ``MaskedSGD`` on each device's summed loss (its batch size ``sizes`` [G] times the mean's
        gradient), or a fresh ``MaskedAdam``, whose step count is ``step`` for every device in the step."""
        fed = self.config.fed
        if self.item_exp_avg is None or self.item_exp_avg_sq is None:  # a device outside the step has a zero gradient
            gradient.mul_((fed.item_lr * sizes[self.row_device])[:, None])
            self.items.addcmul_(gradient, self.item_float_mask, value=-1.0)
            return
        rows = None if active is None else torch.nonzero(torch.isin(self.row_device, active)).view(-1)
        steps = torch.full((1,), float(step), dtype=torch.float64)
        _masked_adam(self.items, self.item_exp_avg, self.item_exp_avg_sq, gradient, self.item_float_mask, steps,
                     fed.local_lr, rows)

    def trained(self, g: int) -> TrainedRows:
        """Device ``g``'s slices of the stacked tensors after training, as ``finish_round`` takes them."""
        rows = slice(int(self.offsets[g]), int(self.offsets[g + 1]))
        start, mask = self.item_start[g], self.item_mask_arrays[g]
        moments = None
        if self.config.fed.user_optimizer == "adam":
            moments = (self.user_exp_avg[g].numpy().copy(), self.user_exp_avg_sq[g].numpy().copy(), int(self.user_steps[g]))
        moment_bytes = 2 * start.nbytes if self.item_exp_avg is not None else 0
        decoded_nbytes, alone_nbytes = self.decoded_nbytes[g], None
        if holds_compact_rows(self.config):  # alone, the device holds the active entries only (``compact_rows``)
            entries = int(mask.sum())
            signal_steps = int(self.step_counts[g]) if self.devices[g].local_round.send_signal else 0
            decoded_nbytes = entries * start.itemsize
            alone_nbytes = compact_working_nbytes(entries, start.shape[0], start.shape[1], self.item_exp_avg is not None,
                                                  signal_steps)
        return TrainedRows(
            self.items[rows].numpy(), start, mask, self.users[g].numpy(),
            None if self.bias is None else self.bias[g : g + 1].numpy(), moments,
            float(self.losses[g] / self.step_counts[g]), self.item_signal[rows].numpy(), self.user_signal[g].numpy(),
            start.nbytes + moment_bytes, decoded_nbytes,  # the item optimiser's float mask and Adam's moments
            alone_working_nbytes=alone_nbytes,
        )


def _row_dots(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two [m, w] tensors: float32 [m], one batched product (no [m, w] temporary)."""
    return torch.bmm(left[:, None, :], right[:, :, None]).view(-1)


def _masked_adam(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    gradient: torch.Tensor,
    float_mask: torch.Tensor,
    steps: torch.Tensor,
    lr: float,
    rows: torch.Tensor | None,
) -> None:
    """``MaskedAdam.step`` on the ``rows`` (int64 [k]; None: all) of ``weight`` [m, w], each row at its own step
    count ``steps`` float64 [k] (or one for all, [1]) counted after this step; ``gradient`` [m, w]."""
    beta1, beta2 = ADAM_BETAS
    step_size = (lr / (1.0 - beta1**steps)).to(torch.float32)[:, None]
    correction = ((1.0 - beta2**steps) ** 0.5).to(torch.float32)[:, None]
    if rows is None:
        masked = gradient * float_mask
        exp_avg.lerp_(masked, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(masked, masked, value=1.0 - beta2)
        weight.sub_(step_size * exp_avg / exp_avg_sq.sqrt().div_(correction).add_(ADAM_EPS))
        return
    masked = gradient[rows] * float_mask[rows]
    first = exp_avg[rows].lerp_(masked, 1.0 - beta1)
    second = exp_avg_sq[rows].mul_(beta2).addcmul_(masked, masked, value=1.0 - beta2)
    exp_avg[rows], exp_avg_sq[rows] = first, second
    weight[rows] = weight[rows] - step_size * first / second.sqrt().div_(correction).add_(ADAM_EPS)
