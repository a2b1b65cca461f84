"""The ClientApp's SecAgg+ reply: masked vectors leave in the narrowest dtype the round's modulus allows."""

import types

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key

from clients.secagg_reply import narrow_masked_reply
from fedsparse.federation.secagg_vectors import NARROW_MODULUS, WIDE_MODULUS


def reply_and_context(configs: dict, modulus: int) -> tuple:
    """What secaggplus_mod hands back (the reply's content is all the function reads) and the node's context."""
    reply = types.SimpleNamespace(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), has_error=lambda: False)
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({Key.MOD_RANGE: modulus})})
    return reply, Context(run_id=1, node_id=7, node_config={}, state=state, run_config={})


@pytest.mark.parametrize("modulus, dtype", [(NARROW_MODULUS, np.uint32), (WIDE_MODULUS, np.int64)])
def test_masked_vectors_are_narrowed_only_under_the_narrow_modulus(modulus, dtype):
    vectors = [np.array([0, 5, modulus - 1], dtype=np.int64), np.arange(4, dtype=np.int64).reshape(2, 2)]
    reply, context = reply_and_context({Key.MASKED_PARAMETERS: [ndarray_to_bytes(v) for v in vectors]}, modulus)
    sent = narrow_masked_reply(reply, context).content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    decoded = [bytes_to_ndarray(b) for b in sent]
    assert [d.dtype for d in decoded] == [dtype, dtype]
    for before, after in zip(vectors, decoded, strict=True):
        np.testing.assert_array_equal(after, before)  # the same integers, so the server's sum is unchanged
    if dtype == np.uint32:
        assert sum(map(len, sent)) < sum(len(ndarray_to_bytes(v)) for v in vectors)


def test_replies_of_the_other_stages_pass_unchanged():
    reply, context = reply_and_context({Key.PUBLIC_KEY_1: b"pk1", Key.PUBLIC_KEY_2: b"pk2"}, NARROW_MODULUS)
    assert narrow_masked_reply(reply, context).content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_1] == b"pk1"
