"""Memory a device holds while it trains, dense against a sparse table, measured in the same invocation.

For each dataset, downlink and table (dense, and SparseRec at ``--density``), a short in-process federation
(``--rounds`` rounds of ``--devices`` devices, d = ``--dim``, no NMF start: the mask's density is what sets
the bytes) runs with every training message served one device at a time under ``tracemalloc``. Per device:

* ``download_bytes``: the payload it received (the compact table or its rows), held through the round;
* ``traced_peak_bytes``: the peak of what its handler allocated through Python and NumPy while decoding,
  training, encoding its upload and replying (the local model's torch tensors, r touched rows, are not traced);
* ``accounted_bytes``: the device's own tally of the arrays it held (``memory-bytes``, ``device.py``).

``held_bytes`` = download + traced peak; every ratio is against the dense table of the same dataset and
downlink measured in the same invocation.

    FEDSPARSE_DATA=../shared/data python benchmarks/device_memory.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import require_data  # noqa: E402

from fedsparse.config import RunConfig  # noqa: E402
from fedsparse.data import load_run_data  # noqa: E402
from fedsparse.experiments.tables import machine_description, write_markdown_table  # noqa: E402
from fedsparse.federation.engine import Arrays, Reply, check_population, run_federation  # noqa: E402
from fedsparse.federation.inprocess import InProcessTransport, population_of  # noqa: E402
from fedsparse.federation.messages import TRAIN  # noqa: E402
from fedsparse.federation.wire import payload_bytes  # noqa: E402
from fedsparse.run_files import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
COLUMNS = ["dataset", "items", "downlink", "table", "density", "devices_measured", "download_bytes", "traced_peak_bytes",
           "held_bytes", "held_vs_dense", "held_bytes_max", "accounted_bytes", "accounted_vs_dense", "seconds"]


class TracedTransport(InProcessTransport):
    """The in-process transport, serving training messages one device at a time under ``tracemalloc`` and keeping,
    per device served, the bytes of its message and the peak its handler allocated."""

    def __init__(self, config: RunConfig, data: Any) -> None:
        super().__init__(config, data)
        self.measured: list[tuple[int, int]] = []  # (download bytes, traced peak bytes) per device served

    def send(
        self, kind: str, server_round: int, messages: Mapping[int, Arrays], settings: Mapping[str, Any]
    ) -> dict[int, Reply | str]:
        if kind != TRAIN:
            return super().send(kind, server_round, messages, settings)
        replies: dict[int, Reply | str] = {}
        for user, message in messages.items():
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            replies.update(super().send(kind, server_round, {user: message}, settings))
            self.measured.append((payload_bytes(message), tracemalloc.get_traced_memory()[1] - before))
        return replies


def measure(dataset: str, downlink: str, policy: str, density: float, args: argparse.Namespace) -> dict[str, Any]:
    """One short federation; the per-device figures of its training rounds."""
    config = RunConfig.from_flat({
        "data.dataset": dataset, "data.data-dir": os.environ["FEDSPARSE_DATA"], "model.dim": args.dim,
        "sparse.policy": policy, "sparse.density": density, "fed.nmf-init": "none", "fed.downlink": downlink,
        "num-server-rounds": args.rounds, "fed.clients-per-round": args.devices, "fed.eval-fraction": 0.001,
        "fed.device-batch": 1,
    })
    data = load_run_data(config)
    population = population_of(data, config)
    check_population(config, population)
    transport = TracedTransport(config, data)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        tracemalloc.start()
        try:
            run_federation(config, population, transport, Path(run_dir), data.train)
        finally:
            tracemalloc.stop()
        rounds = pd.read_json(Path(run_dir) / "rounds.jsonl", lines=True)
    download, peak = np.array(transport.measured, dtype=np.float64).T
    held = download + peak
    return {"dataset": dataset, "items": data.n_items, "downlink": downlink, "table": policy, "density": density,
            "devices_measured": held.size, "download_bytes": download.mean(), "traced_peak_bytes": peak.mean(),
            "held_bytes": held.mean(), "held_bytes_max": held.max(),
            "accounted_bytes": rounds["device_memory_bytes_mean"].mean(), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-1m,gowalla")
    parser.add_argument("--downlinks", default="full,rows")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--devices", type=int, default=100, help="devices per round")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    require_data(parser)
    rows = []
    for dataset in args.datasets.split(","):
        for downlink in args.downlinks.split(","):
            dense = measure(dataset, downlink, "dense", 1.0, args)
            sparse = measure(dataset, downlink, "sparserec", args.density, args)
            for row in (dense, sparse):
                row["held_vs_dense"] = row["held_bytes"] / dense["held_bytes"]
                row["accounted_vs_dense"] = row["accounted_bytes"] / dense["accounted_bytes"]
                rows.append(row)
                print(f"{dataset} {downlink} {row['table']}: held {row['held_bytes']:.0f} B "
                      f"({row['held_vs_dense']:.3f}x dense), accounted {row['accounted_bytes']:.0f} B", flush=True)
    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "device_memory.csv", frame.to_csv(index=False))
    header = (f"Measured by `python benchmarks/device_memory.py --datasets {args.datasets} --downlinks {args.downlinks} "
              f"--density {args.density} --dim {args.dim} --rounds {args.rounds} --devices {args.devices}` on "
              f"{machine_description()}. Per device that trained (means over the devices measured, bytes): the payload "
              "it received (`download_bytes`), the peak its handler allocated through Python and NumPy under tracemalloc "
              "(`traced_peak_bytes`: decoding, training, the upload, the reply; the local model's torch tensors over its "
              "touched rows are not traced), their sum (`held_bytes`, also its maximum) and the device's own tally of "
              "the arrays it held (`accounted_bytes`, the runs' `device_memory_bytes_mean`). Ratios are against the "
              "dense table of the same dataset and downlink in this invocation.\n\n")
    write_markdown_table(args.out / "device_memory.md", header, frame)


if __name__ == "__main__":
    main()
