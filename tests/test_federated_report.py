"""benchmarks/federated.py's memory column: rows counted by the old batched path (dense working rows) are named
as such, rows that record how they counted keep it."""


import pandas as pd
from benchmark_scripts import load_benchmark_script


def test_old_batched_rows_read_as_upper_bounds_and_recorded_counts_are_kept():
    federated = load_benchmark_script("federated")
    frame = pd.DataFrame({
        "device_batch": [500, 0, 500, float("nan")],
        "device_memory_count": [None, None, federated.MEMORY_AS_ALONE, None],
    })
    assert federated.memory_count_column(frame).tolist() == [
        federated.MEMORY_BATCH_DENSE, federated.MEMORY_AS_ALONE, federated.MEMORY_AS_ALONE, federated.MEMORY_AS_ALONE,
    ]


def test_a_table_without_the_column_reads_from_its_batch_sizes():
    federated = load_benchmark_script("federated")
    frame = pd.DataFrame({"device_batch": [500, 0]})
    assert federated.memory_count_column(frame).tolist() == [federated.MEMORY_BATCH_DENSE, federated.MEMORY_AS_ALONE]
