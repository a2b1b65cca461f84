"""``fed.uplink = table``: every device sends back the whole table (FedAvg's upload), zero where it did not
train. Under FedMF's sum the server moves exactly as with the rows uplink; only the bytes differ."""

import numpy as np
import pytest

from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.federation.wire import row_id_dtype
from fedsparse.run_files import read_jsonl


def run(tmp_path, uplink: str, policy: str):
    config = RunConfig.from_flat({
        "results-dir": str(tmp_path / uplink / policy), "num-server-rounds": 2, "data.dataset": "synthetic",
        "data.synthetic-users": 30, "data.synthetic-items": 50, "data.synthetic-interactions-per-user": 8, "model.dim": 8,
        "sparse.policy": policy, "sparse.density": 0.5, "fed.nmf-init": "central", "fed.fraction-train": 0.5,
        "fed.uplink": uplink,
    })
    data = load_dataset(config.data, config.seed)
    run_dir, _ = run_inprocess(config, data)
    return np.load(run_dir / "checkpoint.npz"), read_jsonl(run_dir / "rounds.jsonl"), data


@pytest.mark.parametrize("policy", ["dense", "sparserec"])
def test_the_table_uplink_moves_the_server_as_the_rows_uplink_and_costs_the_whole_table(tmp_path, policy):
    rows_state, rows_rounds, data = run(tmp_path, "rows", policy)
    table_state, table_rounds, _ = run(tmp_path, "table", policy)
    np.testing.assert_allclose(table_state["server.item-weight"], rows_state["server.item-weight"], atol=1e-6)
    active = int(table_state["server.item-mask"].sum())
    for rows_record, table_record in zip(rows_rounds, table_rounds, strict=True):
        assert rows_record["recall@20"] == pytest.approx(table_record["recall@20"], abs=1e-6)
        assert table_record["upload_bytes_mean"] > rows_record["upload_bytes_mean"]
        assert table_record["wire_upload_bytes_mean"] > rows_record["wire_upload_bytes_mean"]
    # every active entry as float32, an id per row in the narrowest dtype, the example weight: no signal before the
    # first exploration round (fed.explore-every 5), and the mask keeps its K active entries
    for record in table_rounds:
        id_bytes = np.dtype(row_id_dtype(data.n_items)).itemsize * data.n_items
        assert record["upload_bytes_mean"] == record["upload_bytes_max"] == 4 * active + id_bytes + 4


def test_the_table_uplink_needs_the_whole_table_downloaded():
    with pytest.raises(ConfigError, match="fed.uplink"):
        RunConfig.from_flat({"fed.uplink": "table", "fed.downlink": "rows"})
