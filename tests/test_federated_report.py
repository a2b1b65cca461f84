"""benchmarks/federated.py's report: rows counted by the old batched path (dense working rows) are named as such,
rows that record how they counted keep it; rows older than the wire-upload columns read them from their run."""

import json

import pandas as pd
from benchmark_scripts import load_benchmark_script

from fedsparse.experiments.tables import ResultTable


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


def test_rows_measured_before_the_wire_upload_columns_read_them_from_their_run_directory(tmp_path):
    federated = load_benchmark_script("federated")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rounds = [{"round": 1, "upload_bytes_mean": 100.0, "upload_floor_bytes_mean": 80.0, "wire_upload_bytes_mean": 140.0},
              {"round": 2, "upload_bytes_mean": 120.0, "upload_floor_bytes_mean": 120.0, "wire_upload_bytes_mean": 160.0}]
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(line) + "\n" for line in rounds))
    table = ResultTable(tmp_path / "federated.csv")
    table.add("old", {"run_dir": str(run_dir), "recall@20": 0.1})
    table.add("gone", {"run_dir": str(tmp_path / "deleted"), "recall@20": 0.2})
    table.add("new", {"run_dir": str(run_dir), "recall@20": 0.3, "wire_upload_bytes_mean": 7.0, "wire_upload_vs_floor": 2.0})
    federated.fill_from_run_directories(table)
    frame = table.frame().set_index("cell")
    assert frame.loc["old", "wire_upload_bytes_mean"] == 150.0
    assert frame.loc["old", "wire_upload_vs_floor"] == 150.0 / 100.0  # mean wire upload over mean floor
    assert frame.loc["old", "recall@20"] == 0.1
    assert pd.isna(frame.loc["gone", "wire_upload_bytes_mean"])
    assert frame.loc["new", "wire_upload_bytes_mean"] == 7.0  # a measured value is never overwritten
