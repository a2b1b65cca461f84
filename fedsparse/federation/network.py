"""NeuMF in a federation (FedNCF, docs/methods.md#fedncf): the shared network and what it needs.

A NeuMF user or item row is its GMF and MLP embeddings side by side, [dim | mlp_dim]
(``central.models.JoinedNeuMF``), so item rows are masked, uploaded as row deltas and merged per row
exactly as MF's are, and the user row stays on the device as MF's does. What MF lacks is the shared
network (the MLP tower and the output layer): the server holds it, sends it with every training and
evaluation message, each device trains its copy and uploads the delta, and the server adds the deltas'
mean weighted by the devices' examples (FedAvg, FedNCF's rule for the network). This module owns the
network's parameter shapes, its seeded start, the local model of a round and the combinations of
settings a NeuMF federation refuses.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from fedsparse.central.models import JoinedNeuMF, MatrixFactorization
from fedsparse.config import ConfigError, RunConfig, mlp_embedding_width
from fedsparse.federation.wire import NetworkShapes, NetworkWeights, RowUpdate
from fedsparse.rng import rng_for
from fedsparse.sparse.policies import build_policy

FEDERATED_MODELS = ("mf", "neumf")


def uses_network(config: RunConfig) -> bool:
    """Whether the federation trains a shared network beside the embedding rows (``model.name = neumf``)."""
    return config.model.name == "neumf"


def network_shapes(config: RunConfig) -> NetworkShapes | None:
    """The shared network's parameters in order, name -> shape (the names of ``JoinedNeuMF``'s and
    ``NeuMF``'s ``mlp.*`` and ``output.*`` parameters); None for MF, which has no network."""
    if not uses_network(config):
        return None
    widths = config.model.mlp_widths
    shapes: dict[str, tuple[int, ...]] = {}
    in_width = 2 * mlp_embedding_width(widths)
    for layer, width in enumerate(widths):
        shapes[f"mlp.{2 * layer}.weight"] = (width, in_width)  # a Linear, then a ReLU: Linear layers at even positions
        shapes[f"mlp.{2 * layer}.bias"] = (width,)
        in_width = width
    shapes["output.weight"] = (1, config.model.dim + in_width)
    shapes["output.bias"] = (1,)
    return shapes


def initial_network(config: RunConfig) -> NetworkWeights | None:
    """The server's starting network: NeuMF's Xavier-uniform weights and zero biases from the stream
    (seed, "server-network"); None for MF."""
    if not uses_network(config):
        return None
    generator = torch.Generator().manual_seed(int(rng_for(config.seed, "server-network").integers(2**62)))
    model = JoinedNeuMF(1, 1, config.model.dim, config.model.mlp_widths, generator)
    return network_of(model)


def network_of(model: JoinedNeuMF) -> NetworkWeights:
    """A copy of ``model``'s shared network as float32 arrays."""
    return NetworkWeights({name: parameter.detach().numpy().astype(np.float32, copy=True)
                           for name, parameter in network_parameters(model).items()})


def network_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The shared network's parameters of a NeuMF module, by name (every one outside the embedding tables)."""
    return {name: parameter for name, parameter in model.named_parameters() if name.startswith(("mlp.", "output."))}


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of ``array`` that is only ever read (a table shared read-only by a batch's devices):
    torch warns on any non-writable array; nothing writes through this view."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def local_model(config: RunConfig, user_row: np.ndarray, item_rows: np.ndarray,
                network: NetworkWeights | None, user_bias: np.ndarray | None = None) -> MatrixFactorization | JoinedNeuMF:
    """The device's working model over one user row float32 [w] and item rows float32 [r, w]: MF (with the
    device's score bias float32 [1] when it keeps one), or ``JoinedNeuMF`` with the received ``network``
    loaded (NeuMF needs one: ValueError otherwise)."""
    rows = np.ascontiguousarray(item_rows)
    items = torch.from_numpy(rows) if rows.flags.writeable else read_only_tensor(rows)
    user = torch.from_numpy(user_row).view(1, -1)
    if not uses_network(config):
        return MatrixFactorization.from_weights(user, items, None if user_bias is None else torch.from_numpy(user_bias))
    if network is None:
        raise ValueError("a NeuMF device needs the shared network's weights")
    model = JoinedNeuMF(1, item_rows.shape[0], config.model.dim, config.model.mlp_widths)
    parameters = network_parameters(model)
    with torch.no_grad():
        for name, array in network.arrays.items():
            parameters[name].copy_(torch.from_numpy(array))
        model.user_embedding.weight.copy_(user)
        model.item_embedding.weight.copy_(items)
    return model


def weighted_network_mean(updates: Sequence[RowUpdate]) -> NetworkWeights | None:
    """FedAvg of the devices' network deltas: sum_k n_k * delta_k / sum_k n_k with n_k each update's weight
    (its training examples), float64 sums; None when no update carries a network."""
    carried = [update for update in updates if update.network is not None]
    if not carried:
        return None
    total = sum(update.weight for update in carried)
    first = carried[0].network
    assert first is not None  # carried holds only updates with a network
    mean = {name: np.zeros(array.shape, dtype=np.float64) for name, array in first.arrays.items()}
    for update in carried:
        assert update.network is not None
        for name, array in update.network.arrays.items():
            mean[name] += (update.weight / total) * array.astype(np.float64)
    return NetworkWeights({name: array.astype(np.float32) for name, array in mean.items()})


def check_federated_model(config: RunConfig) -> None:
    """Raise ConfigError, before any work, for a model the federation cannot train, or a NeuMF federation
    under a setting that would silently skip the shared network or misread its rows."""
    if config.model.name not in FEDERATED_MODELS:
        raise ConfigError(f"model.name = {config.model.name} has no federated version (federated models: "
                          f"{', '.join(FEDERATED_MODELS)})")
    if not uses_network(config):
        return
    policy = build_policy(config.sparse)
    refused = [
        (policy.settings.mask_init == "nmf" and config.fed.nmf_init != "none", "the NMF mask start",
         f"it factorises to rank model.dim = {config.model.dim}, a NeuMF row is {config.model.row_width} wide "
         "(GMF | MLP); use sparse.mask-init = random or fed.nmf-init = none"),
        (policy.storage_format == "prefix" or policy.name == "amgp", f"sparse.policy = {policy.name}",
         "it sizes rows by leading dimensions, which would cut a NeuMF row's MLP half first; use an "
         "element-wise policy (dense, static, set, rigl, dsl, sparserec)"),
        (bool(config.budget.widths), "budget.device-widths",
         "a device class holds a prefix of each row, which would cut a NeuMF row's MLP half first"),
        (config.privacy.secure_aggregation, "privacy.secure-aggregation",
         "the secure vectors do not cover the shared network's deltas"),
        (config.robust.aggregator != "mean" or config.robust.clip_norm > 0, "robust.aggregator / robust.clip-norm",
         "they act per item row; the shared network always takes FedAvg's weighted mean"),
        (config.budget.stream_stages > 0, "budget.stream-stages",
         "a device with no item yet has no network delta to send"),
    ]
    for refuse, setting, why in refused:
        if refuse:
            raise ConfigError(f"{setting} cannot run with model.name = neumf in a federation: {why}")
