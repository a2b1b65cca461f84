"""Translation between Flower records and the plain arrays/dicts of the core."""

from __future__ import annotations

import functools
import io
import re

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

STATE_PREFIX = "device."


NPY_PREFIX = b"\x93NUMPY\x01\x00"  # np.save's magic and format version 1.0, then a 2-byte header length
# The header np.save writes for a plain dtype: what ``read_npy`` parses without ast (anything else: np.load).
NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-zA-Z]\d+)', 'fortran_order': (False|True), 'shape': \(([\d, ]*)\), \} *\n")


def to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a dict of numpy arrays."""
    return {key: read_npy(value) for key, value in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A dict of numpy arrays as an ArrayRecord, each Array holding exactly what ``np.save`` writes."""
    return ArrayRecord({key: npy_array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def npy_array(value: np.ndarray) -> Array:
    """``Array(value)`` for a C-contiguous array: ``np.save``'s bytes, its header written once per dtype and shape
    (Flower's own constructor runs ``np.save`` for every array, the larger share of a small array's cost)."""
    if value.dtype.hasobject:
        return Array(value)
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray",
                 data=_npy_header(value.dtype.str, value.shape) + value.tobytes())


@functools.lru_cache(maxsize=65536)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes before a C-ordered array of this dtype and shape."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def read_npy(array: Array) -> np.ndarray:
    """``array.numpy()`` (a writable array of its own), its header read by a pattern instead of Python's parser
    when it is the plain header ``np.save`` writes; any other header, dtype or stype goes through Flower."""
    data = array.data
    if array.stype != "numpy.ndarray" or not data.startswith(NPY_PREFIX):
        return array.numpy()
    length = int.from_bytes(data[8:10], "little")
    match = NPY_HEADER.fullmatch(data[10 : 10 + length])
    if match is None:
        return array.numpy()
    descr, fortran, dims = match.groups()
    shape = tuple(int(dim) for dim in dims.split(b",") if dim.strip())
    dtype = np.dtype(descr.decode())
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != 10 + length + count * dtype.itemsize:
        return array.numpy()  # np.load says what is wrong with it
    values = np.frombuffer(data, dtype=dtype, count=count, offset=10 + length)
    return values.reshape(shape, order="F" if fortran == b"True" else "C").copy(order="K")


def load_state(context: Context, user: int) -> dict[str, np.ndarray]:
    """The private state of ``user``'s device from ``context.state`` (empty on first contact)."""
    key = f"{STATE_PREFIX}{user}"
    return to_arrays(context.state[key]) if key in context.state else {}


def save_state(context: Context, user: int, state: dict[str, np.ndarray]) -> None:
    """Persist ``user``'s private state in ``context.state`` (it never leaves the node)."""
    if state:
        context.state[f"{STATE_PREFIX}{user}"] = to_record(state)


def forget_state(context: Context, user: int) -> None:
    """Drop ``user``'s private state from ``context.state`` (its device crashed and lost its memory)."""
    context.state.pop(f"{STATE_PREFIX}{user}", None)


def reply_content(results: dict[int, tuple[dict, dict] | str]) -> RecordDict:
    """Per-user replies: ``arrays.<u>`` and ``metrics.<u>``, or ``error.<u>`` with the reason."""
    content = RecordDict()
    for user, result in results.items():
        if isinstance(result, str):
            content[f"error.{user}"] = ConfigRecord({"reason": result})
            continue
        arrays, metrics = result
        content[f"arrays.{user}"] = to_record(arrays)
        content[f"metrics.{user}"] = MetricRecord({key: float(value) for key, value in metrics.items()})
    return content
