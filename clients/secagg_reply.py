"""SecAgg+'s reply as this ClientApp sends it: masked vectors in the narrowest integer dtype the round allows."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key

from fedsparse.federation.secagg_vectors import narrow_masked


def narrow_masked_reply(reply: Message, context: Context) -> Message:
    """``reply`` (what ``secaggplus_mod`` returned) with its masked vectors re-encoded by ``narrow_masked``:
    4 bytes an entry under the narrow modulus instead of Flower's int64; replies of other stages unchanged."""
    if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        return reply
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS not in configs:
        return reply
    modulus = int(context.state.config_records[RECORD_KEY_STATE][Key.MOD_RANGE])
    masked = configs[Key.MASKED_PARAMETERS]
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(narrow_masked(bytes_to_ndarray(vector), modulus))
                                      for vector in masked]  # type: ignore[union-attr]
    return reply
