"""Typed messages: every kind round-trips through flat arrays with its bytes counted by the one counter,
and every malformed message is rejected with a PayloadError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

from fedsparse.config import RunConfig
from fedsparse.federation.messages import (
    DeviceInitFields,
    EvaluateReply,
    EvaluateRequest,
    QueryReply,
    QueryRequest,
    StartContribution,
    StartRequest,
    TrainRequest,
)
from fedsparse.federation.secure_start import SECURE_SUM
from fedsparse.federation.server_state import Server
from fedsparse.federation.wire import PayloadError, RowUpdate, SecureUpload, payload_bytes, row_id_dtype

N_ITEMS, DIM = 10, 4
ROWS = np.asarray([1, 5, 7], dtype=row_id_dtype(N_ITEMS))


def server() -> Server:
    return Server.create(RunConfig.from_flat({"model.dim": DIM, "sparse.policy": "dense"}), N_ITEMS)


def init_fields() -> DeviceInitFields:
    rng = np.random.default_rng(0)
    return DeviceInitFields(column_scale=rng.random(DIM).astype(np.float32), projection=rng.random((DIM, DIM)).astype(np.float32))


def assert_same_arrays(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right)
    for key in left:
        assert left[key].dtype == right[key].dtype, key
        np.testing.assert_array_equal(left[key], right[key])


def start_requests() -> dict[str, StartRequest]:
    rng = np.random.default_rng(1)
    factor = rng.random((N_ITEMS, DIM)).astype(np.float32)
    return {
        "sketch": StartRequest(sketch=(7, 5)),
        "power": StartRequest(test_basis=rng.random((N_ITEMS, 5)).astype(np.float32)),
        "multiplicative": StartRequest(item_factor=factor, gram=(factor.T @ factor).astype(np.float32), init_scale=0.25),
        "refine": StartRequest(item_factor=factor, gram=(factor.T @ factor).astype(np.float32), fit=True),
    }


# ------------------------------------------------------------------------------------- round trips


def round_trips() -> dict[str, tuple[object, object]]:
    """kind -> (a message, the same message decoded from its arrays)."""
    rows_download, full_download = server().download(ROWS.astype(np.int64)), server().download(None)
    mask = server().item_mask
    update = RowUpdate(ROWS, np.arange(int(mask[ROWS].sum()), dtype=np.float32), 3.0)
    secure = SecureUpload.from_update(update, mask, 3.0)
    contribution = StartContribution(np.linspace(-1, 1, 12, dtype=np.float32))
    messages = {
        "query": (QueryRequest(), QueryRequest.from_arrays(QueryRequest().to_arrays())),
        "query-reply": (QueryReply(ROWS), QueryReply.from_arrays(QueryReply(ROWS).to_arrays(), N_ITEMS)),
        "train": (TrainRequest(rows_download, init_fields()),
                  TrainRequest.from_arrays(TrainRequest(rows_download, init_fields()).to_arrays(), N_ITEMS, DIM)),
        "train-reply": (update, RowUpdate.from_arrays(update.to_arrays(), mask)),
        "secure-upload": (secure, SecureUpload.from_arrays(secure.to_arrays(), mask)),
        "evaluate": (EvaluateRequest(full_download),
                     EvaluateRequest.from_arrays(EvaluateRequest(full_download).to_arrays(), N_ITEMS, DIM)),
        "evaluate-reply": (EvaluateReply(), EvaluateReply.from_arrays({})),
        "start-contribution": (contribution, StartContribution.from_arrays(contribution.to_arrays(), 12)),
    }
    for form, request in start_requests().items():
        messages[f"start-{form}"] = (request, StartRequest.from_arrays(request.to_arrays(), N_ITEMS))
    return messages


@pytest.mark.parametrize("kind", sorted(round_trips()))
def test_every_message_kind_round_trips_and_counts_its_bytes_once(kind: str) -> None:
    sent, received = round_trips()[kind]
    assert type(received) is type(sent)
    assert_same_arrays(received.to_arrays(), sent.to_arrays())
    assert sent.nbytes == payload_bytes(sent.to_arrays()) == sum(array.nbytes for array in sent.to_arrays().values())


def test_start_requests_keep_their_form_and_their_bytes() -> None:
    requests = start_requests()
    assert requests["sketch"].nbytes == 16  # int64 [seed, width]
    assert StartRequest.from_arrays(requests["sketch"].to_arrays(), N_ITEMS).sketch == (7, 5)
    assert "nmf-fit" not in requests["multiplicative"].to_arrays()
    decoded = StartRequest.from_arrays(requests["refine"].to_arrays(), N_ITEMS)
    assert decoded.fit and decoded.init_scale == 0.0
    assert StartRequest.from_arrays(requests["multiplicative"].to_arrays(), N_ITEMS).init_scale == 0.25


def test_train_request_carries_its_init_fields_and_download() -> None:
    sent = TrainRequest(server().download(ROWS.astype(np.int64)), init_fields())
    request = TrainRequest.from_arrays(sent.to_arrays(), N_ITEMS, DIM)
    np.testing.assert_array_equal(request.download.row_ids, ROWS)
    np.testing.assert_array_equal(request.init.projection, init_fields().projection)
    assert request.init.user_factor is None
    assert TrainRequest.from_arrays(server().download(None).to_arrays(), N_ITEMS, DIM).init == DeviceInitFields()


# ------------------------------------------------------------------------------------- rejections


def train_arrays(**changes) -> dict:
    arrays = TrainRequest(server().download(ROWS.astype(np.int64)), init_fields()).to_arrays()
    return {key: value for key, value in {**arrays, **changes}.items() if value is not None}


def start_arrays(form: str, **changes) -> dict:
    arrays = start_requests()[form].to_arrays()
    return {key: value for key, value in {**arrays, **changes}.items() if value is not None}


REJECTED = {
    "query-with-arrays": (lambda: QueryRequest.from_arrays({"row-ids": ROWS}), "unexpected array(s): row-ids"),
    "query-reply-unsorted": (lambda: QueryReply.from_arrays({"row-ids": ROWS[::-1].copy()}, N_ITEMS), "strictly increasing"),
    "query-reply-int64": (lambda: QueryReply.from_arrays({"row-ids": ROWS.astype(np.int64)}, N_ITEMS), "must be uint16"),
    "query-reply-extra": (lambda: QueryReply.from_arrays({"row-ids": ROWS, "user": np.ones(1)}, N_ITEMS),
                          "unexpected array(s): user"),
    "query-reply-missing": (lambda: QueryReply.from_arrays({}, N_ITEMS), "missing array 'row-ids'"),
    "train-extra": (lambda: TrainRequest.from_arrays(train_arrays(**{"user-row": np.ones(DIM, np.float32)}), N_ITEMS, DIM),
                    "unexpected array(s): user-row"),
    "train-init-float64": (lambda: TrainRequest.from_arrays(train_arrays(**{"nmf-scale": np.ones(DIM)}), N_ITEMS, DIM),
                           "'nmf-scale' must be float32"),
    "train-init-non-finite": (lambda: TrainRequest.from_arrays(
        train_arrays(**{"nmf-user-factor": np.full(DIM, np.nan, np.float32)}), N_ITEMS, DIM), "non-finite"),
    "train-projection-not-square": (lambda: TrainRequest.from_arrays(
        train_arrays(**{"nmf-project": np.ones((DIM, DIM + 1), np.float32)}), N_ITEMS, DIM), "must be square"),
    "train-no-table": (lambda: TrainRequest.from_arrays({"row-ids": ROWS}, N_ITEMS, DIM), "item rows"),
    "evaluate-some-rows": (lambda: EvaluateRequest.from_arrays(train_arrays(), N_ITEMS, DIM), "needs the full item table"),
    "evaluate-reply-arrays": (lambda: EvaluateReply.from_arrays({"values": np.ones(2, np.float32)}),
                              "unexpected array(s): values"),
    "start-two-forms": (
        lambda: StartRequest.from_arrays(start_arrays("sketch", **{"nmf-test": np.ones((N_ITEMS, 2), np.float32)}), N_ITEMS),
        "unexpected array(s): nmf-test"),
    "start-sketch-float": (lambda: StartRequest.from_arrays({"nmf-sketch": np.ones(2, np.float32)}, N_ITEMS), "must be int64"),
    "start-sketch-width": (lambda: StartRequest.from_arrays({"nmf-sketch": np.asarray([3, 0])}, N_ITEMS), "width >= 1"),
    "start-test-rows": (lambda: StartRequest.from_arrays({"nmf-test": np.ones((N_ITEMS - 1, 2), np.float32)}, N_ITEMS),
                        f"nmf-test must be [{N_ITEMS}, k]"),
    "start-factor-rows": (lambda: StartRequest.from_arrays(
        start_arrays("multiplicative", **{"item-factor": np.ones((3, DIM), np.float32)}), N_ITEMS), "must cover all"),
    "start-gram-shape": (lambda: StartRequest.from_arrays(
        start_arrays("multiplicative", gram=np.ones((DIM, 2), np.float32)), N_ITEMS), "'gram' must be"),
    "start-no-scale": (lambda: StartRequest.from_arrays(start_arrays("multiplicative", **{"init-scale": None}), N_ITEMS),
                       "missing array 'init-scale'"),
    "start-fit-value": (lambda: StartRequest.from_arrays(start_arrays("refine", **{"nmf-fit": np.asarray([2])}), N_ITEMS),
                        "'nmf-fit' must be [1]"),
    "start-nothing": (lambda: StartRequest.from_arrays({}, N_ITEMS), "missing array 'item-factor'"),
    "contribution-extra": (lambda: StartContribution.from_arrays({SECURE_SUM: np.zeros(4, np.float32), "rows": np.arange(2)}, 4),
                           "expected only 'secure-sum'"),
    "contribution-float64": (lambda: StartContribution.from_arrays({SECURE_SUM: np.zeros(4)}, 4), "float64"),
    "contribution-length": (lambda: StartContribution.from_arrays({SECURE_SUM: np.zeros(3, np.float32)}, 4), "float32 [4]"),
    "contribution-nan": (lambda: StartContribution.from_arrays({SECURE_SUM: np.full(4, np.nan, np.float32)}, 4), "non-finite"),
}


@pytest.mark.parametrize("problem", sorted(REJECTED))
def test_malformed_messages_are_rejected_with_a_payload_error_naming_the_problem(problem: str) -> None:
    decode, reason = REJECTED[problem]
    with pytest.raises(PayloadError) as caught:
        decode()
    assert reason in str(caught.value)
