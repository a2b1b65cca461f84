"""NMF start benchmark: per start method, its wire bytes per device against the training's, and the Recall@20 after training.

Every cell is one in-process federation (``fedsparse simulate`` in a subprocess) with the training of the
project's current SparseRec setting, the one ``bytes_to_accuracy.py`` runs as "SparseRec 0.2 (rows
downlink)" (its named config, flags and setting are imported from there, not copied); only the start
differs. The reference is the central NMF oracle (``fed.nmf-init = central``: it costs no start bytes in
the simulation, but no real federation can run it). Bytes come from the run's whole-run ledger in
summary.json (``wire_*``: what Flower serialises per message; ``payload_*``: the arrays alone), per
device over every device of the federation, start, training and evaluation apart.

    OMP_NUM_THREADS=1 FEDSPARSE_DATA=/work/shared/data python benchmarks/nmf_start.py --dataset ml-1m --rounds 100 \
        --fraction 0.1 --dim 64 --eval-every 5 --methods "central,range c0.1 r1"
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bytes_to_accuracy import CONFIGS, METHODS, setting_flags, setting_of  # noqa: E402  (the current SparseRec setting)
from common import add_result_flags, require_data, run_code_version, run_fedsparse  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_sections  # noqa: E402
from fedsparse.federation.secagg_vectors import NARROW_MODULUS, secagg_ranges  # noqa: E402
from fedsparse.run_files import save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
TRAINING = "SparseRec 0.2 (rows downlink)"  # the bytes_to_accuracy method every cell trains as
ACCURACY_TARGET = 0.95  # issue 16: final Recall@20 >= this share of the central-oracle run's
# Fixed starts; "mu-30 all" is the start before issue 16 (30 multiplicative rounds, every device).
NAMED_STARTS = {
    "central": ["--fed.nmf-init", "central"],
    "random mask": ["--fed.nmf-init", "none"],
    "mu-30 all": ["--fed.nmf-start", "mu", "--fed.nmf-rounds", "30", "--fed.nmf-cohort", "1.0"],
    "mu-3 all": ["--fed.nmf-start", "mu", "--fed.nmf-rounds", "3", "--fed.nmf-cohort", "1.0"],
}
# "range c0.05 r3", "svd c0.1", "range c0.1 r1 p1 s96": start, cohort share, refinements, power passes, sketch width
SECURE_START = re.compile(r"(range|svd) c([0-9.]+)(?: r(\d+))?(?: p(\d+))?(?: s(\d+))?")
COLUMNS = [
    "method", "start_rounds", "start_cohort", "start_wire_bytes_per_device", "start_wire_bytes_per_device_max",
    "training_wire_bytes_per_device", "training_wire_bytes_per_device_max", "start_vs_training",
    "devices_start_over_training", "start_secagg_floor_bytes_per_device", "floor_vs_training",
    "evaluate_wire_bytes_per_device", "start_payload_bytes_per_device",
    "training_payload_bytes_per_device", "start_vs_training_payload", "final_recall@20", "best_val_test_recall@20",
    "final_vs_central", "meets_both_targets", "seconds", "code_version",
]


def start_flags(method: str) -> list[str]:
    """The flags that choose a method's start (``--methods`` names); ValueError for an unknown name."""
    if method in NAMED_STARTS:
        return NAMED_STARTS[method]
    match = SECURE_START.fullmatch(method)
    if match is None:
        raise ValueError(f"unknown start {method!r}: one of {sorted(NAMED_STARTS)} or 'range|svd cC [rR] [pP] [sS]'")
    start, cohort, refine, power, sketch = match.groups()
    flags = ["--fed.nmf-start", start, "--fed.nmf-cohort", cohort]
    for key, value in (("--fed.nmf-refine", refine), ("--fed.nmf-power", power), ("--fed.nmf-sketch", sketch)):
        if value is not None:
            flags += [key, value]
    if start == "range" and refine is None:
        raise ValueError(f"{method!r}: a range start names its refinements (r0-r3)")
    return flags


def training_command(args: argparse.Namespace) -> list[str]:
    """The ``fedsparse simulate`` flags of the training every cell shares (bytes_to_accuracy's SparseRec setting)."""
    config, extra = next((config, extra) for name, config, extra in METHODS if name == TRAINING)
    batch = ["--fed.device-batch", str(args.device_batch)] if args.device_batch else []
    return ["--config", str(CONFIGS / config), *setting_flags(args), *extra, *batch]


def command_of(args: argparse.Namespace, method: str) -> str:
    """The invocation that reproduces one cell."""
    return (f"python benchmarks/nmf_start.py --dataset {args.dataset} --rounds {args.rounds} --fraction {args.fraction:g} "
            f"--dim {args.dim} --eval-every {args.eval_every} --methods {shlex.quote(method)}"
            + (f" --device-batch {args.device_batch}" if args.device_batch else ""))


def per_device_share_over(run_dir: Path) -> float:
    """Share of the federation's devices whose own start wire bytes exceed their own training wire bytes
    (the per-device ledger of checkpoint.npz; nan if the checkpoint predates it)."""
    arrays = np.load(run_dir / "checkpoint.npz")
    try:
        start = sum(arrays[f"traffic.wire.start.{direction}"] for direction in ("down", "up"))
        training = sum(arrays[f"traffic.wire.train.{direction}"] for direction in ("down", "up"))
    except KeyError:
        return float("nan")
    return float(np.mean(start > training))


def cell_row(summary: dict) -> dict:
    """Start, training and evaluation bytes per device (wire and payload) and the accuracy of one run."""
    run_dir = Path(summary["run_dir"])
    written = json.loads((run_dir / "config.json").read_text())
    config = written["config"]
    wire_start, wire_train = (summary[f"wire_{phase}_both_bytes_per_device_mean"] for phase in ("start", "train"))
    payload_start, payload_train = (summary[f"payload_{phase}_both_bytes_per_device_mean"] for phase in ("start", "train"))
    return {
        "density": config.get("sparse.density"), "negatives": config.get("train.negatives"),
        "start_rounds": summary.get("total_nmf_rounds", 0), "start_cohort": summary.get("total_nmf_cohort", 0),
        "start_wire_bytes_per_device": wire_start,
        "start_wire_bytes_per_device_max": summary["wire_start_both_bytes_per_device_max"],
        "training_wire_bytes_per_device": wire_train,
        "training_wire_bytes_per_device_max": summary["wire_train_both_bytes_per_device_max"],
        "start_vs_training": wire_start / wire_train,
        "devices_start_over_training": per_device_share_over(run_dir),
        "evaluate_wire_bytes_per_device": summary["wire_evaluate_both_bytes_per_device_mean"],
        "start_payload_bytes_per_device": payload_start,
        "start_up_payload_bytes_per_device": summary["payload_start_up_bytes_per_device_mean"],
        "training_payload_bytes_per_device": payload_train,
        "start_vs_training_payload": payload_start / payload_train,
        "final_recall@20": summary["recall@20"],
        "best_val_test_recall@20": summary["best_test_recall@20"],  # test Recall@20 at the round of best validation
        "seconds": summary["seconds"],
        "code_version": run_code_version(run_dir),
        "run_dir": str(run_dir),
    }


def with_targets(frame: pd.DataFrame) -> pd.DataFrame:
    """``final_vs_central`` and ``meets_both_targets`` (start wire <= training wire per device, final Recall@20
    >= 95 % of the central oracle's), within each setting."""
    frame = frame.copy()
    # SecAgg+ sends each masked entry as uint32 (4 bytes, as the ledger counts float32) where the cohort leaves the
    # narrow modulus enough levels, else as int64: then the start's upload again
    wide = [cohort > 0 and secagg_ranges(int(cohort))[1] > NARROW_MODULUS for cohort in frame["start_cohort"]]
    floor = frame["start_wire_bytes_per_device"] + frame["start_up_payload_bytes_per_device"].where(wide, 0.0)
    frame["start_secagg_floor_bytes_per_device"] = floor
    frame["floor_vs_training"] = floor / frame["training_wire_bytes_per_device"]
    central = frame[frame["method"] == "central"].set_index("setting")["final_recall@20"]
    frame["final_vs_central"] = [row["final_recall@20"] / central[row["setting"]] if row["setting"] in central.index
                                 else float("nan") for _, row in frame.iterrows()]
    frame["meets_both_targets"] = [
        "oracle" if row["method"] == "central" else
        "yes" if row["start_vs_training"] <= 1 and row["final_vs_central"] >= ACCURACY_TARGET else
        "no" if np.isfinite(row["final_vs_central"]) else "no central run"
        for _, row in frame.iterrows()]
    return frame


def trained(frame: pd.DataFrame, column: str) -> str:
    """The values of a training setting the cells ran with (from their config.json), for the header."""
    return " / ".join(sorted({f"{value:g}" for value in frame[column].dropna()})) or "?"


def report(args: argparse.Namespace, frame: pd.DataFrame, seconds: float) -> None:
    """The Markdown table, one section per setting, each cell with its command and code version."""
    invocation = ("Rewritten from the CSV (`--report-only`)" if args.report_only else
                  f"Last invocation: `{' '.join(shlex.quote(a) for a in sys.argv)}` on {machine_description()}, "
                  f"{seconds:.0f} s (cells already in the CSV were not rerun)")
    header = (
        f"{invocation}. In-process engine; every cell trains as `bytes_to_accuracy.py`'s \"{TRAINING}\" "
        f"(`simulations/configs/sparserec-peer.toml`: SparseRec at density {trained(frame, 'density')}, "
        f"{trained(frame, 'negatives')} negatives, as each run's config.json says, and the federation's defaults; "
        "`--fed.downlink rows`; the group's rounds, participation, dimension and evaluation period); "
        "only the start differs (`start_flags`). Bytes per device: the run's ledger (summary.json) averaged over "
        "every device of the federation, down + up; `_max` is the device that spent most. **Wire** bytes are what "
        "Flower serialises for each message (every object of the message, envelope included, re-derived in process "
        "by `wire_format` with one device per supernode). **Start** = every start round: the request down (a seed; "
        "Q and QᵀQ in each refinement) and the float32 secure-sum vector up, which the in-process engine sums "
        "exactly. It does not run SecAgg+: key setup, share exchange and unmasking are **not** counted, so under "
        "`flwr run` the start costs more (`benchmarks/results/secagg_bytes.md` measures those stages per device for "
        "secure training rounds). The project has no SecAgg+ measurement of the start at this scale; its only "
        "measured SecAgg+ bytes are of secure training rounds (README, *Privacy*: the 12-device test federation and "
        "2-round ml-100k / ml-1m runs), which it does not turn into a figure for the start. The public gram QᵀQ "
        "each device fits p_u from travels in its first training or evaluation download, so it is counted there, "
        "not in the start. **Training** = the training rounds (row request, rows down, update up); **evaluation** "
        "(a fixed 20 % of devices at every evaluated round) is its own column and in neither. `start_vs_training` "
        "= start wire / training wire, both means over all devices (the issue's bytes target: <= 1); "
        "`devices_start_over_training` = share of devices whose own start wire bytes exceed their own training "
        "wire bytes (the per-device ledger of checkpoint.npz). `start_secagg_floor_bytes_per_device` = start wire "
        "plus, where the cohort is too large for masks modulo 2**32 (4,096 devices or more, "
        "`fedsparse.federation.secagg_vectors.secagg_ranges`), the start's float32 upload again (SecAgg+'s int64 masked "
        "entries; below that they travel as uint32, 4 bytes as counted; key exchange, shares and unmasking still "
        "excluded): a lower bound of the start under SecAgg+, `floor_vs_training` its share of the training wire bytes. "
        "**Payload** bytes count the arrays alone. "
        "`final_recall@20`: test Recall@20 at the last round (the issue's accuracy target: >= 95 % of the central "
        "run's, `final_vs_central`); `best_val_test_recall@20`: at the round of best validation Recall@20.\n"
    )
    sections = []
    for setting, group in frame.groupby("setting", sort=False):
        commands = "\n".join(f"    {row['command']}   # {row['method']}, code {row['code_version']}"
                             for _, row in group.iterrows())
        sections.append((f"\n## {setting}\n\nCommands (each cell its own invocation, with `OMP_NUM_THREADS=1 "
                         f"FEDSPARSE_DATA=...`) and the code version each ran at:\n\n{commands}\n\n",
                         group[[c for c in COLUMNS if c in group]]))
    write_markdown_sections(args.out / "nmf_start.md", header, sections)
    plot_frontier(frame, args.out / "nmf_start.png")


def plot_frontier(frame: pd.DataFrame, path: Path) -> None:
    """Per setting, each secure start's wire bytes per device (log scale) against its final Recall@20 over the central
    oracle's; the oracle and the random mask (no start bytes) as level lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(frame["setting"]))
    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for axis, setting in zip(axes[0], settings, strict=True):
        group = frame[frame["setting"] == setting]
        starts = group[group["start_wire_bytes_per_device"] > 0]
        axis.scatter(starts["start_wire_bytes_per_device"], starts["final_vs_central"])
        for _, row in starts.iterrows():
            axis.annotate(row["method"], (row["start_wire_bytes_per_device"], row["final_vs_central"]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
        for name, style in (("central", ":"), ("random mask", "--")):
            level = group.loc[group["method"] == name, "final_vs_central"]
            if not level.empty:
                axis.axhline(float(level.iloc[0]), color="grey", linestyle=style, linewidth=1, label=name)
        axis.axhline(ACCURACY_TARGET, color="red", linestyle=":", linewidth=1, label=f"{ACCURACY_TARGET:g} x central")
        axis.set_xscale("log")
        axis.set_xlabel("start wire bytes per device (mean over all devices)")
        axis.set_ylabel("final Recall@20 / central oracle's")
        axis.set_title(setting, fontsize=8)
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1, help="devices per training round / devices")
    parser.add_argument("--dim", type=int, default=64, help="model.dim (0 = the named config's)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--device-batch", type=int, default=0,
                        help="fed.device-batch of every cell (devices trained as one batch, the same results; 0: one at a time)")
    parser.add_argument("--methods", default="central,range c0.1 r1",
                        help=f"comma-separated: {', '.join(NAMED_STARTS)}, or 'range cC rR [pP] [sS]' / 'svd cC [pP] [sS]' "
                             "(cohort share C, refinements R, power passes P, sketch width S)")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    methods = args.methods.split(",")
    for method in methods:
        try:
            start_flags(method)
        except ValueError as exc:
            parser.error(str(exc))
    started = time.perf_counter()
    table = ResultTable(args.out / "nmf_start.csv")
    if not args.report_only:
        require_data(parser)
        for method in methods:
            cell = f"{setting_of(args)}/{method}"
            if table.has(cell):
                continue
            summary = run_fedsparse("simulate", [*training_command(args), *start_flags(method)], args.out / "runs")
            row = cell_row(summary)
            table.add(cell, {"setting": setting_of(args), "method": method, "command": command_of(args, method), **row})
            print(f"{cell}: start {row['start_wire_bytes_per_device']:,.0f} B/device, training "
                  f"{row['training_wire_bytes_per_device']:,.0f} B/device (wire), final Recall@20 {row['final_recall@20']:.4f}",
                  flush=True)
    frame = with_targets(table.frame())
    report(args, frame, time.perf_counter() - started)


if __name__ == "__main__":
    main()
