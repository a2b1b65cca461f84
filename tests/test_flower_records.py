"""Arrays as Flower records (``clients/records.py``): what ``to_record`` builds is byte for byte what Flower's
own ``Array(ndarray)`` builds, and ``read_npy`` reads back what ``Array.numpy`` reads, faster."""

from __future__ import annotations

import numpy as np
import pytest

flwr_app = pytest.importorskip("flwr.app")

from clients.records import npy_array, read_npy, to_arrays, to_record  # noqa: E402

DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.int16, ">f4", "<U3"]
SHAPES = [(), (0,), (5,), (3, 4), (2, 3, 4), (0, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrays_are_flowers_own_and_read_back_exactly(dtype) -> None:
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        value = np.ascontiguousarray(np.asarray(rng.integers(0, 9, size=shape)).astype(dtype))
        reference = flwr_app.Array(value)
        mine = npy_array(value)
        assert (mine.data, mine.dtype, tuple(mine.shape), mine.stype) == (
            reference.data, reference.dtype, tuple(reference.shape), reference.stype), shape
        for stored in (reference, flwr_app.Array(np.asfortranarray(value))):
            back, expected = read_npy(stored), stored.numpy()
            assert back.dtype == expected.dtype and back.shape == expected.shape and np.array_equal(back, expected)
            assert back.flags.writeable and back.flags.f_contiguous == expected.flags.f_contiguous


def test_a_record_round_trips_and_a_damaged_array_is_refused_as_flower_refuses_it() -> None:
    arrays = {"row-ids": np.arange(5, dtype=np.int32), "values": np.ones((5, 3), dtype=np.float32)}
    back = to_arrays(to_record(arrays))
    assert back.keys() == arrays.keys() and all(np.array_equal(back[key], arrays[key]) for key in arrays)
    damaged = flwr_app.Array(dtype="float32", shape=(5,), stype="numpy.ndarray", data=npy_array(np.ones(5, np.float32)).data[:-4])
    with pytest.raises(ValueError):
        damaged.numpy()
    with pytest.raises(ValueError):
        read_npy(damaged)
