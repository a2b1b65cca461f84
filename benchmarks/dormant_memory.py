"""Memory per dormant device: the private states of many devices held as the in-process engine holds them.

For each setting, a fresh process builds ``--devices`` device states (``init_device(...).to_arrays()``, a dict
per device in a dict keyed by user id, as ``InProcessTransport.states``) and reads its resident memory before
and after; the per-device growth is set against ``memory_estimate.private_state_bytes`` (what the refusal of
too-large populations counts) and against the state's values alone (``DeviceState.nbytes``).

    python benchmarks/dormant_memory.py --devices 200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from fedsparse.experiments.tables import machine_description, write_markdown_table

HERE = Path(__file__).resolve().parent
SETTINGS = {  # name -> config overrides
    "dense, d 32": {"model.dim": 32, "sparse.policy": "dense", "sparse.density": 1.0},
    "dense, d 64": {"model.dim": 64, "sparse.policy": "dense", "sparse.density": 1.0},
    "sparserec 0.1, d 64": {"model.dim": 64, "sparse.policy": "sparserec", "sparse.density": 0.1},
    "PFedRec head (bias), d 32": {"model.dim": 32, "sparse.policy": "dense", "sparse.density": 1.0,
                                  "fed.user-bias": True, "fed.user-optimizer": "sgd", "fed.user-steps": 0,
                                  "train.loss": "bce"},
}
MEASURE = """
import json, sys
from fedsparse.config import RunConfig
from fedsparse.federation.device import init_device
from fedsparse.federation.memory_estimate import private_state_bytes

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

overrides, devices = json.loads(sys.argv[1]), int(sys.argv[2])
config = RunConfig.from_flat(overrides)
before = resident_bytes()
states = {user: init_device(config, user).to_arrays() for user in range(devices)}
after = resident_bytes()
print(json.dumps({"resident_bytes_per_device": (after - before) / len(states),
                  "estimate_bytes_per_device": private_state_bytes(config),
                  "values_bytes_per_device": init_device(config, 0).nbytes}))
"""


def measure(overrides: dict, devices: int) -> dict:
    """One setting in a fresh process: resident bytes per held state, the estimate and the values' bytes."""
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(overrides), str(devices)],
                            check=True, capture_output=True, text=True).stdout
    return {**json.loads(output.strip().splitlines()[-1]), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200_000, help="device states held per setting")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = []
    for name, overrides in SETTINGS.items():
        row = {"setting": name, "devices": args.devices, **measure(overrides, args.devices)}
        row["resident_vs_estimate"] = row["resident_bytes_per_device"] / row["estimate_bytes_per_device"]
        rows.append(row)
        print(f"{name}: {row['resident_bytes_per_device']:.0f} B resident per device, estimate "
              f"{row['estimate_bytes_per_device']} B, values {row['values_bytes_per_device']} B", flush=True)
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "dormant_memory.csv", index=False)
    header = (f"Measured by `python benchmarks/dormant_memory.py --devices {args.devices}` on {machine_description()}. "
              "Each setting in a fresh process: resident memory (RSS from /proc/self/statm) grown by holding the "
              "private states of that many fresh devices as the in-process engine holds them, per device; the "
              "estimate the refusal of too-large populations counts (`memory_estimate.private_state_bytes`); the "
              "bytes of the state's values alone.\n\n")
    write_markdown_table(args.out / "dormant_memory.md", header, frame)


if __name__ == "__main__":
    main()
