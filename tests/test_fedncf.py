"""FedNCF: NeuMF in the federation (docs/methods.md#fedncf).

The device step against a slow dense reference (the central ``NeuMF`` module stepped by hand on the same
batches), the server's FedAvg of the network deltas against the weighted mean, the network's arrays
rejected when malformed and counted in every byte figure, the device's ranking against the central
model's, the settings a NeuMF federation refuses, and whole in-process runs that learn and resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedsparse.central.losses import batch_loss
from fedsparse.central.models import JoinedNeuMF, NeuMF
from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.device import (
    DeviceData,
    LocalRound,
    device_scorer,
    evaluate_device,
    init_device,
    local_batches,
    local_train,
    round_negatives,
)
from fedsparse.federation.engine import CHECKPOINT, TIMING_KEYS, CheckpointError, check_population, run_federation
from fedsparse.federation.inprocess import InProcessTransport, population_of, run_inprocess
from fedsparse.federation.messages import EvaluateRequest, TrainRequest
from fedsparse.federation.network import (
    check_federated_model,
    initial_network,
    network_parameters,
    network_shapes,
    weighted_network_mean,
)
from fedsparse.federation.protocol import privatize
from fedsparse.federation.server_state import Server, validate_update
from fedsparse.federation.wire import NetworkWeights, PayloadError, RowsDownload, RowUpdate, payload_bytes
from fedsparse.federation.wire_format import reply_wire_bytes
from fedsparse.rng import rng_for
from fedsparse.run_files import new_run_dir, read_jsonl
from fedsparse.sparse.storage import CompactTable

N_USERS, N_ITEMS, DIM, LAYERS = 4, 40, 4, "8,4"  # MLP embeddings 4 wide: rows of 8
USER = 2


def config(**overrides: object) -> RunConfig:
    flat = {
        "seed": 5,
        "model.name": "neumf",
        "model.dim": DIM,
        "model.mlp-layers": LAYERS,
        "sparse.policy": "dense",
        "sparse.density": 1.0,
        "train.loss": "bce",
        "train.negatives": 2,
        "train.l2-reg": 1e-3,
        "fed.local-epochs": 2,
        "fed.user-steps": 0,
        "fed.user-optimizer": "sgd",
        "fed.local-lr": 0.1,
        "fed.item-optimizer": "sgd",
        "fed.item-lr": 0.05,
        "fed.network-lr": 0.01,
    }
    flat.update(overrides)
    return RunConfig.from_flat(flat)


def csr(rows: dict[int, list[int]]) -> sp.csr_matrix:
    indptr, indices = [0], []
    for user in range(N_USERS):
        indices += rows.get(user, [])
        indptr.append(len(indices))
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(N_USERS, N_ITEMS))


def user_data() -> DeviceData:
    train = csr({0: [1, 2], USER: [17, 3, 30, 8, 11], 3: [0, 39]})
    return DeviceData.from_interactions(train, csr({USER: [21]}), csr({USER: [25]}), USER)


def table(cfg: RunConfig) -> np.ndarray:
    width = cfg.model.row_width
    return rng_for(0, "test-fedncf-items").normal(0, 0.3, (N_ITEMS, width)).astype(np.float32)


def download_of(weight: np.ndarray) -> RowsDownload:
    return RowsDownload(None, CompactTable.encode(weight, np.ones(weight.shape, dtype=bool)))


def central_copy(cfg: RunConfig, user_row: np.ndarray, items: np.ndarray, network: NetworkWeights) -> NeuMF:
    """The central NeuMF (four separate tables) holding the same user row, item table and network."""
    model = NeuMF(1, items.shape[0], DIM, cfg.model.mlp_widths)
    with torch.no_grad():
        model.user_embedding.weight.copy_(torch.from_numpy(user_row[None, :DIM]))
        model.user_mlp_embedding.weight.copy_(torch.from_numpy(user_row[None, DIM:]))
        model.item_embedding.weight.copy_(torch.from_numpy(items[:, :DIM]))
        model.item_mlp_embedding.weight.copy_(torch.from_numpy(items[:, DIM:]))
        parameters = network_parameters(model)
        for name, array in network.arrays.items():
            parameters[name].copy_(torch.from_numpy(array))
    return model


# ---------------------------------------------------------------- the model and its shared network


def test_network_shapes_are_the_neumf_modules_parameters():
    cfg = config()
    shapes = network_shapes(cfg)
    assert shapes is not None
    central = NeuMF(1, 1, DIM, cfg.model.mlp_widths)
    assert {name: tuple(p.shape) for name, p in network_parameters(central).items()} == dict(shapes)
    assert list(initial_network(cfg).arrays) == list(shapes)  # the wire order is the shapes' order
    assert network_shapes(config(**{"model.name": "mf"})) is None and initial_network(config(**{"model.name": "mf"})) is None
    assert cfg.model.row_width == DIM + 4


def test_joined_rows_score_exactly_as_the_central_neumf():
    cfg = config()
    joined = JoinedNeuMF(3, 9, DIM, cfg.model.mlp_widths, torch.Generator().manual_seed(1))
    users, items = joined.user_embedding.weight.detach().numpy(), joined.item_embedding.weight.detach().numpy()
    central = NeuMF(3, 9, DIM, cfg.model.mlp_widths)
    with torch.no_grad():
        central.user_embedding.weight.copy_(torch.from_numpy(users[:, :DIM]))
        central.user_mlp_embedding.weight.copy_(torch.from_numpy(users[:, DIM:]))
        central.item_embedding.weight.copy_(torch.from_numpy(items[:, :DIM]))
        central.item_mlp_embedding.weight.copy_(torch.from_numpy(items[:, DIM:]))
        shared = network_parameters(central)
        for name, parameter in network_parameters(joined).items():  # the network, under the same names
            shared[name].copy_(parameter)
    who, pairs = torch.tensor([0, 2, 1]), torch.tensor([[1, 4], [8, 0], [3, 3]])
    torch.testing.assert_close(joined.score(who, pairs), central.score(who, pairs))
    torch.testing.assert_close(joined.score_all(who), central.score_all(who))
    torch.testing.assert_close(joined.batch_l2(who, pairs[:, 0]), central.batch_l2(who, pairs[:, 0]))


@pytest.mark.parametrize("epochs, batch", [(2, 0), (1, 2)], ids=["two-full-batch-epochs", "mini-batches"])
def test_one_local_round_equals_the_central_neumf_stepped_by_hand(epochs, batch):
    """The device's item deltas, network delta, user row and loss equal a dense reference: the central
    NeuMF on the same batches, SGD on the user row (mean loss) and item rows (per example), Adam on the
    network."""
    cfg = config(**{"fed.local-epochs": epochs, "fed.local-batch-size": batch})
    data, weight, network = user_data(), table(cfg), initial_network(cfg)
    state = init_device(cfg, USER)
    result = local_train(cfg, state, data, download_of(weight), N_ITEMS, LocalRound(1), network)

    reference = central_copy(cfg, state.user_row, weight, network)
    adam = torch.optim.Adam(list(network_parameters(reference).values()), lr=cfg.fed.network_lr)
    negatives = round_negatives(cfg, data, N_ITEMS, 1)
    losses = []
    for epoch, positions in local_batches(cfg, data, 1):
        reference.zero_grad(set_to_none=True)
        chosen = positions.numpy()
        loss = batch_loss(reference, torch.zeros(chosen.size, dtype=torch.int64), torch.from_numpy(data.train[chosen]),
                          torch.from_numpy(negatives[epoch][chosen]), "bce", cfg.train.l2_reg)
        loss.backward()
        with torch.no_grad():
            for name in ("user_embedding", "user_mlp_embedding"):
                getattr(reference, name).weight -= cfg.fed.local_lr * getattr(reference, name).weight.grad
            for name in ("item_embedding", "item_mlp_embedding"):
                getattr(reference, name).weight -= cfg.fed.item_lr * chosen.size * getattr(reference, name).weight.grad
        adam.step()
        losses.append(float(loss.detach()))

    joined_items = torch.cat([reference.item_embedding.weight, reference.item_mlp_embedding.weight], 1).detach().numpy()
    rows = result.update.row_ids.astype(np.int64)
    np.testing.assert_array_equal(rows, np.union1d(data.train, negatives.ravel()))
    np.testing.assert_allclose(result.update.values.reshape(rows.size, -1), (joined_items - weight)[rows], atol=2e-6)
    assert np.abs(result.update.values).max() > 1e-3  # the rows did move
    assert result.update.network is not None
    for name, parameter in network_parameters(reference).items():
        expected = parameter.detach().numpy() - network.arrays[name]
        np.testing.assert_allclose(result.update.network.arrays[name], expected, atol=2e-6, err_msg=name)
    user = torch.cat([reference.user_embedding.weight, reference.user_mlp_embedding.weight], 1).detach().numpy()[0]
    np.testing.assert_allclose(result.state.user_row, user, atol=2e-6)
    assert result.loss == pytest.approx(np.mean(losses), rel=1e-5)


def test_the_upload_and_the_reply_count_the_network_bytes():
    cfg = config()
    network = initial_network(cfg)
    result = local_train(cfg, init_device(cfg, USER), user_data(), download_of(table(cfg)), N_ITEMS, LocalRound(1), network)
    update = result.update
    assert update.network is not None and set(update.network.arrays) == set(network_shapes(cfg))
    rows_only = RowUpdate(update.row_ids, update.values, update.weight)
    assert update.nbytes == rows_only.nbytes + network.nbytes == payload_bytes(update.to_arrays())
    assert network.nbytes == 4 * sum(int(np.prod(shape)) for shape in network_shapes(cfg).values())
    assert (reply_wire_bytes("train", 1, USER, update.to_arrays(), {})
            >= reply_wire_bytes("train", 1, USER, rows_only.to_arrays(), {}) + network.nbytes)
    request = TrainRequest(download_of(table(cfg)), network=network)
    assert request.nbytes == TrainRequest(download_of(table(cfg))).nbytes + network.nbytes


# ---------------------------------------------------------------- the server's merge


def test_the_network_merge_is_the_example_weighted_mean_of_the_deltas():
    cfg = config()
    shapes = network_shapes(cfg)
    rng = np.random.default_rng(0)
    weights = [3.0, 1.0, 6.0]
    deltas = [{name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()} for _ in weights]
    updates = [RowUpdate(np.zeros(0, np.uint16), np.zeros(0, np.float32), w, network=NetworkWeights(d))
               for w, d in zip(weights, deltas, strict=True)]
    mean = weighted_network_mean(updates)
    for name in shapes:
        expected = np.average(np.stack([d[name] for d in deltas]), axis=0, weights=weights)
        np.testing.assert_allclose(mean.arrays[name], expected, rtol=1e-6, atol=1e-7)
    assert weighted_network_mean([RowUpdate(np.zeros(0, np.uint16), np.zeros(0, np.float32), 1.0)]) is None

    server = Server.create(cfg, N_ITEMS)
    before = {name: array.copy() for name, array in server.network.arrays.items()}
    server.apply_round(1, updates)
    for name in shapes:
        np.testing.assert_allclose(server.network.arrays[name], before[name] + mean.arrays[name], rtol=1e-6, atol=1e-7)


def trained_reply(cfg: RunConfig) -> dict[str, np.ndarray]:
    server = Server.create(cfg, N_ITEMS)
    result = local_train(cfg, init_device(cfg, USER), user_data(), server.download(), N_ITEMS, LocalRound(1), server.network)
    return result.update.to_arrays()


@pytest.mark.parametrize(
    "corrupt, named",
    [
        (lambda a: {k: v for k, v in a.items() if k != "network.output.bias"}, "missing array 'network.output.bias'"),
        (lambda a: {**a, "network.mlp.9.weight": np.zeros((2, 2), np.float32)}, "network.mlp.9.weight"),
        (lambda a: {**a, "network.mlp.0.weight": a["network.mlp.0.weight"].astype(np.float64)}, "must be float32"),
        (lambda a: {**a, "network.mlp.0.weight": a["network.mlp.0.weight"][:, :-1]}, "must have shape [8, 8]"),
        (lambda a: {**a, "network.mlp.2.bias": a["network.mlp.2.bias"][None]}, "must have 1 dimension"),
        (lambda a: {**a, "network.output.weight": np.full_like(a["network.output.weight"], np.nan)}, "non-finite"),
        (lambda a: {**a, "network.mlp.0.bias": np.full_like(a["network.mlp.0.bias"], np.inf)}, "non-finite"),
        (lambda a: {**a, "network.output.bias": [0.0]}, "must be a numpy array"),
    ],
    ids=["missing", "unexpected", "dtype", "shape", "dimensions", "nan", "inf", "not-an-array"],
)
def test_a_malformed_network_upload_is_rejected_naming_the_problem(corrupt, named):
    cfg = config()
    server = Server.create(cfg, N_ITEMS)
    reply = trained_reply(cfg)
    assert validate_update(server, reply)[1] is None  # the intact reply passes
    update, reason = validate_update(server, corrupt(dict(reply)))
    assert update is None and named in reason


def test_the_network_is_required_of_neumf_and_refused_from_mf():
    cfg, mf = config(), config(**{"model.name": "mf"})
    reply = trained_reply(cfg)
    rows_only = {k: v for k, v in reply.items() if not k.startswith("network.")}
    assert "missing array 'network." in validate_update(Server.create(cfg, N_ITEMS), rows_only)[1]
    mf_server = Server.create(mf, N_ITEMS)
    mf_reply = {**trained_reply(mf), "network.output.bias": np.zeros(1, np.float32)}
    assert "unexpected array(s): network.output.bias" in validate_update(mf_server, mf_reply)[1]


@pytest.mark.parametrize("request_class", [TrainRequest, EvaluateRequest])
def test_a_device_refuses_a_download_with_a_malformed_network(request_class):
    cfg = config()
    network = initial_network(cfg)
    arrays = request_class(download_of(table(cfg)), network=network).to_arrays()
    width, shapes = cfg.model.row_width, network_shapes(cfg)
    decoded = request_class.from_arrays(arrays, N_ITEMS, width, shapes)
    np.testing.assert_array_equal(decoded.network.arrays["mlp.0.weight"], network.arrays["mlp.0.weight"])
    with pytest.raises(PayloadError, match="non-finite"):
        request_class.from_arrays({**arrays, "network.output.bias": np.array([np.nan], np.float32)}, N_ITEMS, width, shapes)
    with pytest.raises(PayloadError, match="missing array 'network.mlp.2.bias'"):
        request_class.from_arrays({k: v for k, v in arrays.items() if k != "network.mlp.2.bias"}, N_ITEMS, width, shapes)
    with pytest.raises(PayloadError, match="unexpected array"):  # an MF device expects no network
        request_class.from_arrays(arrays, N_ITEMS, width, None)


def test_local_dp_clips_and_noises_the_network_delta_with_the_rows():
    cfg = config(**{"privacy.ldp": "gaussian", "privacy.clip-norm": 0.05, "privacy.noise-multiplier": 0.0})
    network = initial_network(cfg)
    update = local_train(cfg, init_device(cfg, USER), user_data(), download_of(table(cfg)), N_ITEMS, LocalRound(1),
                         network).update
    private = privatize(cfg, update, 1, USER)
    joined = np.concatenate([private.values, private.network.flat()])
    assert np.linalg.norm(joined) == pytest.approx(0.05, rel=1e-5)  # clipped together: the network is covered
    scale = 0.05 / np.linalg.norm(np.concatenate([update.values, update.network.flat()]))
    np.testing.assert_allclose(private.network.flat(), update.network.flat() * scale, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- evaluation on the device


def test_the_device_ranks_with_the_central_neumfs_scores():
    cfg = config(**{"eval.sampled-negatives": 5, "data.split": "loo"})
    weight, network, state = table(cfg), initial_network(cfg), init_device(cfg, USER)
    every, some = device_scorer(cfg, state, weight, network)
    central = central_copy(cfg, state.user_row, weight, network)
    torch.testing.assert_close(every, central.score_all(torch.zeros(1, dtype=torch.int64))[0])
    ids = np.array([[25, 1, 7, 30]])
    torch.testing.assert_close(some(ids), central.score(torch.zeros(1, dtype=torch.int64), torch.from_numpy(ids)))
    metrics = evaluate_device(cfg, state, user_data(), weight, "test", network)
    assert {"recall@20", "ndcg@20", "sampled_hr@10", "sampled_ndcg@10"} <= set(metrics)
    mf_scores = device_scorer(config(**{"model.name": "mf"}), state, weight, None)[0]  # MF: the dot product
    torch.testing.assert_close(mf_scores, torch.from_numpy(weight) @ torch.from_numpy(state.user_row))


# ---------------------------------------------------------------- settings a NeuMF federation refuses


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"sparse.policy": "sparserec", "sparse.density": 0.5}, "the NMF mask start"),
        ({"sparse.policy": "size-frequency", "sparse.density": 0.5}, "sparse.policy = size-frequency"),
        ({"sparse.policy": "amgp", "sparse.density": 0.5}, "sparse.policy = amgp"),
        ({"budget.device-widths": "4,8"}, "budget.device-widths"),
        ({"privacy.secure-aggregation": True}, "privacy.secure-aggregation"),
        ({"robust.aggregator": "median"}, "robust.aggregator"),
        ({"robust.clip-norm": 1.0}, "robust.clip-norm"),
        ({"budget.stream-stages": 2}, "budget.stream-stages"),
        ({"model.name": "popular"}, "model.name = popular has no federated version"),
    ],
)
def test_a_neumf_federation_refuses_settings_that_would_skip_the_network(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        check_federated_model(config(**overrides))


def test_element_wise_masks_apply_to_neumf_rows_with_the_exact_budget(tmp_path):
    """SparseRec with a random start (no NMF source) masks the [GMF | MLP] rows element-wise, budget exact."""
    cfg = run_config(tmp_path, **{"sparse.policy": "sparserec", "sparse.density": 0.5, "fed.nmf-init": "none",
                                  "fed.explore-every": 1, "num-server-rounds": 2})
    check_federated_model(cfg)
    run_dir, summary = run_inprocess(cfg)
    n_items = json.loads((run_dir / "config.json").read_text())["population"]["n_items"]
    assert summary["item_active_entries"] == round(0.5 * n_items * cfg.model.row_width)
    assert all(record["dropped_updates"] == 0 and record["rows_updated"] > 0 for record in read_jsonl(run_dir / "rounds.jsonl"))


# ---------------------------------------------------------------- whole runs


def run_config(tmp_path, **overrides: object) -> RunConfig:
    flat = {
        "results-dir": str(tmp_path),
        "num-server-rounds": 8,
        "data.dataset": "synthetic",
        "data.synthetic-users": 48,
        "data.synthetic-items": 120,
        "data.synthetic-interactions-per-user": 14,
        "model.name": "neumf",
        "model.dim": 8,
        "model.mlp-layers": "16,8",
        "sparse.policy": "dense",
        "sparse.density": 1.0,
        "train.loss": "bce",
        "train.negatives": 4,
        "fed.fraction-train": 1.0,
        "fed.eval-fraction": 1.0,
        "fed.user-steps": 0,
        "fed.item-lr": 0.05,
        "fed.network-lr": 0.01,
        "fed.eval-every": 1,
        **overrides,
    }
    return RunConfig.from_flat(flat)


def test_an_inprocess_fedncf_run_learns_and_counts_the_network_in_its_bytes(tmp_path):
    cfg = run_config(tmp_path)
    run_dir, summary = run_inprocess(cfg)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    first, last = rounds[0], rounds[-1]
    # test Recall@20 (validation holds about one item per user here: too few to show the trend) roughly doubles
    assert last["recall@20"] > first["recall@20"] + 0.1, [r["recall@20"] for r in rounds]
    assert summary["best_validation_round"] > 1
    network_bytes = initial_network(cfg).nbytes
    n_items = json.loads((run_dir / "config.json").read_text())["population"]["n_items"]
    assert first["dense_fedavg_upload_bytes"] == n_items * cfg.model.row_width * 4 + network_bytes
    # every upload carries the network's delta beside its rows: at least the network's bytes each
    assert first["upload_bytes_mean"] > network_bytes and first["wire_upload_bytes_mean"] > first["upload_bytes_mean"]
    assert first["upload_floor_bytes_mean"] > network_bytes


@pytest.mark.parametrize(
    "overrides",
    [
        {"fed.user-state": "reconstruct", "fed.user-steps": 3},
        {"fed.user-steps": 2, "privacy.padding-ratio": 0.5},
        {"fed.evaluate-model": "local"},
        {"fed.downlink": "rows", "fed.local-batch-size": 3, "privacy.ldp": "gaussian", "privacy.noise-multiplier": 0.01},
    ],
    ids=["fedrecon-reconstruct", "padding", "personal-evaluation", "rows-downlink-minibatches-ldp"],
)
def test_a_neumf_federation_runs_under_the_device_steps_other_rules(tmp_path, overrides):
    run_dir, summary = run_inprocess(run_config(tmp_path, **{"num-server-rounds": 2, **overrides}))
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert all(r["failed_clients"] == 0 and r["dropped_updates"] == 0 and r["rows_updated"] > 0 for r in rounds)
    assert 0.0 < summary["recall@20"] <= 1.0


class Interrupted(Exception):
    pass


class InterruptedTransport(InProcessTransport):
    def __init__(self, cfg, data, interrupt_at):
        super().__init__(cfg, data)
        self.interrupt_at = interrupt_at

    def send(self, kind, server_round, messages, settings):
        if kind == "train" and server_round == self.interrupt_at:
            raise Interrupted(f"killed before round {server_round}")
        return super().send(kind, server_round, messages, settings)


def test_an_interrupted_fedncf_run_resumes_to_the_same_result(tmp_path):
    cfg = run_config(tmp_path, **{"num-server-rounds": 4, "fed.fraction-train": 0.5})
    data = load_dataset(cfg.data, cfg.seed)
    reference_dir, reference = run_inprocess(cfg, data)
    run_dir = new_run_dir(tmp_path, "interrupted")
    with pytest.raises(Interrupted):
        run_federation(cfg, population_of(data, cfg), InterruptedTransport(cfg, data, 3), run_dir, data.train)
    _, resumed = run_inprocess(cfg, data, resume_dir=run_dir)
    def without_time(directory: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(directory / "rounds.jsonl")]

    assert without_time(run_dir) == without_time(reference_dir)
    for key in ("recall@20", "ndcg@20", "total_upload_bytes", "total_download_bytes"):
        assert resumed[key] == reference[key], key
    stored = np.load(run_dir / CHECKPOINT)
    np.testing.assert_array_equal(stored["server.network.output.weight"],
                                  np.load(reference_dir / CHECKPOINT)["server.network.output.weight"])


def test_a_checkpoint_without_the_network_is_refused(tmp_path):
    cfg = run_config(tmp_path, **{"num-server-rounds": 1})
    data = load_dataset(cfg.data, cfg.seed)
    run_dir, _ = run_inprocess(cfg, data)
    with np.load(run_dir / CHECKPOINT) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["server.network.mlp.0.weight"] = arrays["server.network.mlp.0.weight"][:, :3].copy()
    manifest = json.loads(str(arrays["json.manifest"]))
    manifest["arrays"]["server.network.mlp.0.weight"] = [list(arrays["server.network.mlp.0.weight"].shape), "<f4"]
    arrays["json.manifest"] = np.asarray(json.dumps(manifest, sort_keys=True))
    np.savez(run_dir / CHECKPOINT, **arrays)
    with pytest.raises(CheckpointError, match="shared network does not fit"):
        run_inprocess(run_config(tmp_path, **{"num-server-rounds": 2}), data, resume_dir=run_dir)


def test_the_refusal_comes_before_any_work(tmp_path):
    cfg = run_config(tmp_path, **{"privacy.secure-aggregation": True})
    data = load_dataset(cfg.data, cfg.seed)
    with pytest.raises(ConfigError, match="privacy.secure-aggregation cannot run with model.name = neumf"):
        check_population(cfg, population_of(data, cfg))
