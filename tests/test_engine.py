"""The run loop under faults: bad replies are dropped, failed devices counted, runs resume exactly."""

import json

import numpy as np
import pytest

from fedsparse.config import RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.engine import TIMING_KEYS, Reply, run_federation
from fedsparse.federation.inprocess import InProcessTransport, population_of, run_inprocess
from fedsparse.run_files import new_run_dir, read_jsonl

VOLATILE = set(TIMING_KEYS)


def small_config(tmp_path, **overrides):
    flat = {
        "results-dir": str(tmp_path),
        "num-server-rounds": 4,
        "data.dataset": "synthetic",
        "data.synthetic-users": 16,
        "data.synthetic-items": 40,
        "data.synthetic-interactions-per-user": 8,
        "model.dim": 8,
        "sparse.policy": "sparserec",
        "sparse.density": 0.25,
        "fed.fraction-train": 0.5,
        "fed.explore-every": 2,
        "fed.nmf-rounds": 2,
        **overrides,
    }
    return RunConfig.from_flat(flat)


class Interrupted(Exception):
    pass


class FaultyTransport(InProcessTransport):
    """The in-process transport with scripted faults: corrupt or failed replies, or an interruption."""

    def __init__(self, config, data, corrupt=None, fail=(), interrupt_at=None):
        super().__init__(config, data)
        self.corrupt, self.fail, self.interrupt_at = corrupt, set(fail), interrupt_at

    def send(self, kind, server_round, messages, settings):
        if kind == "train" and server_round == self.interrupt_at:
            raise Interrupted(f"killed before round {server_round}")
        replies = super().send(kind, server_round, messages, settings)
        if kind != "train":
            return replies
        for user in list(replies):
            if user in self.fail:
                replies[user] = "simulated crash"
            elif self.corrupt and isinstance(replies[user], Reply) and user == min(messages):
                replies[user] = Reply(self.corrupt(dict(replies[user].arrays)), replies[user].metrics)
        return replies


def rounds_without_timing(run_dir):
    return [{k: v for k, v in record.items() if k not in VOLATILE} for record in read_jsonl(run_dir / "rounds.jsonl")]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda a: {**a, "values": np.full_like(a["values"], np.nan)},
        lambda a: {**a, "row-ids": a["row-ids"] + 10_000},
        lambda a: {**a, "values": a["values"][:-1]},
        lambda a: {key: value for key, value in a.items() if key != "weight"},
        lambda a: {**a, "extra": np.zeros(3)},
    ],
)
def test_a_malformed_reply_is_dropped_and_the_run_goes_on(tmp_path, corrupt):
    config = small_config(tmp_path, **{"num-server-rounds": 2})
    data = load_dataset(config.data, config.seed)
    run_dir = new_run_dir(tmp_path, "faulty")
    transport = FaultyTransport(config, data, corrupt=corrupt)
    summary = run_federation(config, population_of(data, config), transport, run_dir, data.train)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [record["dropped_updates"] for record in rounds] == [1, 1]
    assert all(record["failed_clients"] == 0 for record in rounds)
    assert np.isfinite(summary["recall@20"])


def test_failed_devices_are_counted_and_the_round_completes(tmp_path):
    config = small_config(tmp_path, **{"num-server-rounds": 2, "fed.fraction-train": 1.0})
    data = load_dataset(config.data, config.seed)
    run_dir = new_run_dir(tmp_path, "failing")
    run_federation(config, population_of(data, config), FaultyTransport(config, data, fail={0, 3, 5}), run_dir, data.train)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [record["failed_clients"] for record in rounds] == [3, 3]
    assert all(record["clients"] == population_of(data, config).users.size for record in rounds)


@pytest.mark.parametrize("server_optimizer", [{}, {"fed.server-optimizer": "adam", "fed.server-lr": 0.01}], ids=["avg", "adam"])
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, server_optimizer):
    config = small_config(tmp_path, **server_optimizer)
    data = load_dataset(config.data, config.seed)
    reference_dir, reference = run_inprocess(config, data)

    run_dir = new_run_dir(tmp_path, "interrupted")
    with pytest.raises(Interrupted):
        run_federation(config, population_of(data, config), FaultyTransport(config, data, interrupt_at=3), run_dir, data.train)
    assert [record["round"] for record in read_jsonl(run_dir / "rounds.jsonl")] == [1, 2]
    resumed_dir, resumed = run_inprocess(config, data, resume_dir=run_dir)
    assert resumed_dir == run_dir
    assert rounds_without_timing(run_dir) == rounds_without_timing(reference_dir)
    for key in ("recall@20", "ndcg@20", "total_upload_bytes", "total_download_bytes", "item_active_entries"):
        assert resumed[key] == reference[key], key
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 4


def test_rows_past_the_checkpoint_are_redone_not_duplicated(tmp_path):
    config = small_config(tmp_path, **{"num-server-rounds": 2})
    data = load_dataset(config.data, config.seed)
    run_dir, _ = run_inprocess(config, data)
    with open(run_dir / "rounds.jsonl", "a") as stream:  # a line written after the last checkpoint
        stream.write(json.dumps({"round": 3, "clients": 1}) + "\n")
    run_inprocess(config, data, resume_dir=run_dir)
    assert [record["round"] for record in read_jsonl(run_dir / "rounds.jsonl")] == [1, 2]


class BadMetricsTransport(InProcessTransport):
    """The in-process transport whose lowest-id device reports an unusable metric in every reply."""

    def __init__(self, config, data, bad_value):
        super().__init__(config, data)
        self.bad_value = bad_value

    def send(self, kind, server_round, messages, settings):
        replies = super().send(kind, server_round, messages, settings)
        user = min(messages)
        if kind in ("train", "evaluate") and isinstance(replies.get(user), Reply):
            replies[user] = Reply(replies[user].arrays, {**replies[user].metrics, "loss": self.bad_value})
        return replies


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), "0.5", [1.0, 2.0], True, None])
def test_a_reply_with_an_unusable_metric_is_dropped(tmp_path, bad_value):
    config = small_config(tmp_path, **{"num-server-rounds": 2, "fed.eval-fraction": 1.0})
    data = load_dataset(config.data, config.seed)
    run_dir = new_run_dir(tmp_path, "bad-metrics")
    transport = BadMetricsTransport(config, data, bad_value)
    summary = run_federation(config, population_of(data, config), transport, run_dir, data.train)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert [record["dropped_updates"] for record in rounds] == [1, 1]
    clean_dir, _ = run_inprocess(config, data)
    clean = [record["evaluated_clients"] for record in read_jsonl(clean_dir / "rounds.jsonl")]
    assert [record["evaluated_clients"] for record in rounds] == [count - 1 for count in clean]
    assert np.isfinite(summary["recall@20"])


class CountingTransport(InProcessTransport):
    """The in-process transport that records which message kinds it delivered, per round."""

    def __init__(self, config, data):
        super().__init__(config, data)
        self.kinds = []

    def send(self, kind, server_round, messages, settings):
        self.kinds.append((kind, server_round, bool(settings.get("evaluate"))))
        return super().send(kind, server_round, messages, settings)


def test_local_evaluation_reports_the_trained_devices_own_models(tmp_path):
    """``fed.evaluate-model = local``: no evaluation message is sent; each evaluated round's metrics are the
    means of what the round's trained devices reported for their personal models (PFedRec's protocol)."""
    config = small_config(tmp_path, **{"num-server-rounds": 3, "fed.eval-every": 2, "fed.evaluate-model": "local",
                                       "sparse.policy": "dense", "sparse.density": 1.0, "fed.fraction-train": 1.0})
    data = load_dataset(config.data, config.seed)
    transport = CountingTransport(config, data)
    run_dir = new_run_dir(tmp_path, "local-eval")
    run_federation(config, population_of(data, config), transport, run_dir, data.train)
    assert [kind for kind, _, _ in transport.kinds] == ["train"] * 3
    assert [evaluate for _, _, evaluate in transport.kinds] == [False, True, True]  # rounds 2 and 3 (the last)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    assert "recall@20" not in rounds[0] and "recall@20" in rounds[1] and "validation_recall@20" in rounds[2]
    devices_with_test = sum(1 for user in population_of(data, config).users if data.test[int(user)].nnz)
    assert rounds[2]["evaluated_clients"] == devices_with_test


def dense_partial_run(tmp_path, transport_class, name, **overrides):
    """A dense federation of ``small_config`` with every device in the evaluation cohort and ``overrides``, over
    ``transport_class``: (config, data, transport, run directory)."""
    config = small_config(tmp_path, **{"sparse.policy": "dense", "sparse.density": 1.0, "fed.eval-fraction": 1.0,
                                       **overrides})
    data = load_dataset(config.data, config.seed)
    transport = transport_class(config, data)
    run_dir = new_run_dir(tmp_path, name)
    run_federation(config, population_of(data, config), transport, run_dir, data.train)
    return config, data, transport, run_dir


class ReportingTransport(InProcessTransport):
    """The in-process transport that keeps, per round and kind, each device's reported test Recall@20."""

    def __init__(self, config, data):
        super().__init__(config, data)
        self.reported = []

    def send(self, kind, server_round, messages, settings):
        replies = super().send(kind, server_round, messages, settings)
        self.reported.append((kind, server_round, {user: reply.metrics["test-recall@20"] for user, reply in replies.items()
                                                   if isinstance(reply, Reply) and "test-recall@20" in reply.metrics}))
        return replies


def test_local_last_evaluation_counts_each_device_with_its_last_personal_model(tmp_path):
    """``fed.evaluate-model = local-last`` (PFedRec's code at partial participation): every trained device reports its
    personal model every round; an evaluated round's mean is over the cohort, each device with the figure of its last
    training round, and the devices that never trained with what they report on the current table. The figures
    survive a checkpoint round trip."""
    from fedsparse.federation.engine import CHECKPOINT, RunState, read_checkpoint

    config, _, transport, run_dir = dense_partial_run(
        tmp_path, ReportingTransport, "local-last",
        **{"num-server-rounds": 4, "fed.eval-every": 2, "fed.evaluate-model": "local-last", "fed.fraction-train": 0.25})
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    last: dict[int, float] = {}
    for server_round in range(1, 5):
        trained = [reported for kind, r, reported in transport.reported if kind == "train" and r == server_round]
        assert trained and trained[0]  # every round's trained devices report (not only on evaluation rounds)
        last.update(trained[0])
        if server_round % 2:
            continue
        fresh = [reported for kind, r, reported in transport.reported if kind == "evaluate" and r == server_round]
        current = fresh[0] if fresh else {}
        assert not set(current) & set(last)  # only devices that never trained are asked to evaluate
        expected = [*[last[user] for user in last], *current.values()]
        assert rounds[server_round - 1]["recall@20"] == pytest.approx(np.mean(expected), rel=1e-6)
        assert rounds[server_round - 1]["evaluated_clients"] == len(expected)
    restored = RunState.from_arrays(config, read_checkpoint(run_dir / CHECKPOINT))
    assert {user: metrics["test-recall@20"] for user, metrics in restored.last_personal.items()} == pytest.approx(last)


def test_local_evaluation_with_partial_participation_also_ranks_the_cohorts_other_devices(tmp_path):
    """With 30 % of the devices per round, the evaluated round's metrics cover the trained devices (their personal
    models) and every other device of the evaluation cohort (its stored head on the current table), not the
    trained ones alone; with every device trained no evaluation message is sent (the test above)."""
    config, data, transport, run_dir = dense_partial_run(
        tmp_path, CountingTransport, "local-eval-partial",
        **{"num-server-rounds": 2, "fed.eval-every": 1, "fed.evaluate-model": "local", "fed.fraction-train": 0.3})
    assert [kind for kind, _, _ in transport.kinds] == ["train", "evaluate", "train", "evaluate"]
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    devices_with_test = sum(1 for user in population_of(data, config).users if data.test[int(user)].nnz)
    assert [record["evaluated_clients"] for record in rounds] == [devices_with_test] * 2


class RecordingTransport(InProcessTransport):
    """The in-process transport, keeping every training round's messages as the devices received them."""

    def __init__(self, config, data):
        super().__init__(config, data)
        self.train_messages = []

    def send(self, kind, server_round, messages, settings):
        if kind == "train":
            self.train_messages.append(dict(messages))
        return super().send(kind, server_round, messages, settings)


def test_in_process_devices_share_one_read_only_copy_of_the_whole_table(tmp_path):
    """With the full downlink the table is encoded once per round and every device's message holds that one copy,
    read-only: a device decodes the rows it touches from it and cannot write into what the others read."""
    config = small_config(tmp_path, **{"fed.downlink": "full", "num-server-rounds": 2})
    data = load_dataset(config.data, config.seed)
    transport = RecordingTransport(config, data)
    run_federation(config, population_of(data, config), transport, new_run_dir(tmp_path, "shared"), data.train)
    assert len(transport.train_messages) == 2
    for messages in transport.train_messages:
        first, *others = messages.values()
        table_keys = [key for key in first if key.startswith("table.")]
        assert others and "table.values" in table_keys
        for key in table_keys:
            assert not first[key].flags.writeable
            assert all(message[key] is first[key] for message in others)
