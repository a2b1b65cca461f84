"""Device states packed for the checkpoint (``fedsparse.federation.device_states``): a few arrays per key
whatever the population, restored exactly; a damaged pack is refused naming its key."""

from __future__ import annotations

import numpy as np
import pytest

from fedsparse.federation.device_states import pack_states, unpack_states


def states() -> dict[int, dict[str, np.ndarray]]:
    """Devices of two widths (budgeted sizes), one holding a key the others lack, one holding nothing."""
    rng = np.random.default_rng(0)
    result: dict[int, dict[str, np.ndarray]] = {}
    for user in (40, 3, 17, 8):
        width = 4 if user % 2 else 8
        result[user] = {"user-row": rng.normal(size=width).astype(np.float32), "user-mask": rng.random(width) < 0.5,
                        "steps": np.asarray([user], dtype=np.int64)}
    result[17]["nmf-factor"] = np.abs(rng.normal(size=3))
    result[5] = {}
    return result


def test_packed_states_come_back_exactly_in_three_arrays_per_key() -> None:
    original = states()
    packed = pack_states(original)
    assert sorted(packed) == sorted(f"{key}.{part}" for key in ("user-row", "user-mask", "steps", "nmf-factor")
                                    for part in ("users", "values", "sizes"))
    assert packed["user-row.users"].tolist() == [3, 8, 17, 40] and packed["nmf-factor.users"].tolist() == [17]
    restored = unpack_states(packed)
    assert sorted(restored) == [3, 8, 17, 40]  # a device with an empty state keeps nothing
    for user, state in restored.items():
        assert state.keys() == original[user].keys()
        for key, value in state.items():
            assert value.dtype == original[user][key].dtype
            np.testing.assert_array_equal(value, original[user][key])
            assert value.base is None or value.base is not packed[f"{key}.values"]  # a copy of its own
    assert unpack_states(pack_states({})) == {}


@pytest.mark.parametrize(("damage", "message"), [
    (lambda a: a.pop("steps.sizes"), "'steps' lacks steps.sizes"),
    (lambda a: a.update({"steps.sizes": a["steps.sizes"] + 1}), "'steps': sizes add up to 8, values hold 4"),
    (lambda a: a.update({"steps.users": np.asarray([3, 3, 8, 17])}), "'steps' lists a device more than once"),
    (lambda a: a.update({"steps.users": a["steps.users"][:2]}), "'steps': users and sizes must be integer arrays"),
])
def test_a_damaged_pack_is_refused_naming_its_key(damage, message) -> None:
    packed = pack_states(states())
    damage(packed)
    with pytest.raises(ValueError, match=message):
        unpack_states(packed)


def test_states_that_cannot_be_packed_are_named() -> None:
    with pytest.raises(ValueError, match=r"'user-row' of user 1 has shape \(2, 2\)"):
        pack_states({1: {"user-row": np.zeros((2, 2))}})
    with pytest.raises(ValueError, match="'steps' has values of several dtypes"):
        pack_states({1: {"steps": np.zeros(1, np.int64)}, 2: {"steps": np.zeros(1, np.float32)}})
