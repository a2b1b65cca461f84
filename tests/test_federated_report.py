"""benchmarks/federated.py's memory column: rows counted by the old batched path (dense working rows) are named
as such, rows that record how they counted keep it."""

import importlib.util
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def federated_module():
    """benchmarks/federated.py, loaded from its file (benchmarks/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("federated_benchmark", ROOT / "benchmarks" / "federated.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_batched_rows_read_as_upper_bounds_and_recorded_counts_are_kept():
    federated = federated_module()
    frame = pd.DataFrame({
        "device_batch": [500, 0, 500, float("nan")],
        "device_memory_count": [None, None, federated.MEMORY_AS_ALONE, None],
    })
    assert federated.memory_count_column(frame).tolist() == [
        federated.MEMORY_BATCH_DENSE, federated.MEMORY_AS_ALONE, federated.MEMORY_AS_ALONE, federated.MEMORY_AS_ALONE,
    ]


def test_a_table_without_the_column_reads_from_its_batch_sizes():
    federated = federated_module()
    frame = pd.DataFrame({"device_batch": [500, 0]})
    assert federated.memory_count_column(frame).tolist() == [federated.MEMORY_BATCH_DENSE, federated.MEMORY_AS_ALONE]
