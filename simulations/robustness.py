"""Robustness study: device failures against seed noise, and item-promotion poisoning against server defences.

Failures: the same federation with and without ``--failure-rate`` of the sampled devices failing each
round, over several seeds, so the gap can be read against the seed-to-seed spread.

Poisoning: malicious devices (``poison.fraction``) promote one unpopular target item (fake interactions
plus a boosted target-row delta); the server defends with ``clip`` (per-row norm bounding at the 95th
percentile of honest row-delta norms, measured on the clean run), ``median`` or ``trimmed``
(coordinate-wise, per row). Reported: ER@10 of the target among benign users who never interacted with
it, and Recall@20, each defence also without attack (its accuracy cost).

    python simulations/robustness.py --dataset ml-100k
    python simulations/robustness.py --dataset ml-100k --report-only   # rewrite the tables from the CSVs, run nothing
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedsparse.config import RunConfig, flat_defaults
from fedsparse.data import load_run_data
from fedsparse.experiments.tables import (
    ResultTable,
    machine_description,
    standing_notes,
    write_markdown_sections,
    write_markdown_table,
)
from fedsparse.federation.inprocess import run_inprocess
from fedsparse.federation.robust import row_delta_norms
from fedsparse.federation.server_state import Server
from fedsparse.federation.wire import RowUpdate
from fedsparse.rng import rng_for
from fedsparse.run_files import read_jsonl

HERE = Path(__file__).resolve().parent
CLIP_QUANTILE = 95  # percentile of honest per-row delta norms used as the clipping bound
FAILURE_COLUMNS = ["dataset", "failure_rate", "failure_mode", "seed", "recall@20", "ndcg@20", "failed_clients_mean", "seconds"]
POISON_COLUMNS = ["dataset", "attack_fraction", "boost", "defence", "target_item", "target_train_count", "exposure@10",
                  "recall@20", "ndcg@20", "recall_vs_clean", "clip_norm", "dropped_updates", "seconds"]


class RowNormLog:
    """An upload observer that keeps the per-row delta norms of every accepted upload."""

    def __init__(self) -> None:
        self.norms: list[np.ndarray] = []

    def observe(self, server_round: int, user: int, update: RowUpdate, server: Server) -> None:
        self.norms.append(row_delta_norms(update, server.item_mask))


def unpopular_target(train, seed: int) -> tuple[int, int]:
    """A seeded item among those with 2 training interactions up to the 25th percentile: (item, count)."""
    counts = np.asarray(train.sum(axis=0)).ravel().astype(np.int64)
    ceiling = max(2, int(np.percentile(counts[counts > 0], 25)))
    candidates = np.flatnonzero((counts >= 2) & (counts <= ceiling))
    item = int(rng_for(seed, "poison-target").choice(candidates))
    return item, int(counts[item])


def defence_overrides(defence: str, clip_norm: float) -> dict[str, object]:
    """Config keys of ``none``, ``clip``, ``median`` or ``trimmed:F``."""
    name, _, strength = defence.partition(":")
    if name == "none":
        return {}
    if name == "clip":
        return {"robust.clip-norm": clip_norm}
    if name == "median":
        return {"robust.aggregator": "median"}
    if name == "trimmed":
        return {"robust.aggregator": "trimmed-mean", "robust.trim-fraction": float(strength or 0.1)}
    raise ValueError(f"unknown defence {defence!r}: use none, clip, median or trimmed:F")


def run(base: dict, data, overrides: dict, observer=None) -> tuple[dict, list[dict], float]:
    """One in-process federation: (summary, rounds, seconds)."""
    started = time.perf_counter()
    run_dir, summary = run_inprocess(RunConfig.from_flat({**base, **overrides}), data, observer=observer)
    return summary, read_jsonl(run_dir / "rounds.jsonl"), time.perf_counter() - started


def failure_study(args, base: dict, data, table: ResultTable) -> None:
    for seed in range(args.seeds):
        for rate in (0.0, args.failure_rate):
            cell = f"failures/{args.dataset}/{rate}/{args.failure_mode}/seed{seed}/r{args.rounds}"
            if table.has(cell):
                continue
            overrides = {"seed": seed, "faults.failure-rate": rate, "faults.failure-mode": args.failure_mode}
            summary, rounds, seconds = run(base, data, overrides)
            table.add(cell, {
                "dataset": args.dataset, "failure_rate": rate, "failure_mode": args.failure_mode, "seed": seed,
                "recall@20": summary["recall@20"], "ndcg@20": summary["ndcg@20"],
                "failed_clients_mean": float(np.mean([r["failed_clients"] for r in rounds])), "seconds": seconds,
            })
            print(f"{cell:50s} recall@20={summary['recall@20']:.4f}", flush=True)


def failure_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Recall@20 over the seeds per failure rate: mean and seed-to-seed s.d. (ddof 1), for reading the gap against.

    frame: the failure table's rows (one per seed and rate); returns one row per dataset, rate and mode."""
    keys = ["dataset", "failure_rate", "failure_mode"]
    grouped = frame.groupby(keys)["recall@20"]
    summary = grouped.agg(seeds="count", recall_mean="mean", recall_sd=lambda values: values.std(ddof=1)).reset_index()
    return summary.rename(columns={"recall_mean": "recall@20_mean", "recall_sd": "recall@20_sd"})


def poisoning_study(args, base: dict, data, table: ResultTable) -> None:
    target, target_count = unpopular_target(data.train, int(base["seed"]))
    attack = {"poison.target-item": target}
    norms = RowNormLog()
    clean_summary, _, clean_seconds = run(base, data, {**attack, "poison.fraction": 0.0}, observer=norms)
    clip_norm = float(np.percentile(np.concatenate(norms.norms), CLIP_QUANTILE))
    clean_recall = clean_summary["recall@20"]
    cells = [(0.0, 1.0, defence) for defence in args.defences.split(",")]
    cells += [(fraction, boost, defence) for fraction in map(float, args.fractions.split(","))
              for boost in map(float, args.boosts.split(",")) for defence in args.defences.split(",")]
    for fraction, boost, defence in cells:
        cell = f"poison/{args.dataset}/{fraction}/b{boost}/{defence}/r{args.rounds}"
        if table.has(cell):
            continue
        if fraction == 0 and defence == "none":
            summary, rounds, seconds = clean_summary, [], clean_seconds
        else:
            overrides = {**attack, "poison.fraction": fraction, "poison.boost": boost, **defence_overrides(defence, clip_norm)}
            summary, rounds, seconds = run(base, data, overrides)
        table.add(cell, {
            "dataset": args.dataset, "attack_fraction": fraction, "boost": boost, "defence": defence,
            "target_item": target, "target_train_count": target_count, "exposure@10": summary.get("exposure@10", np.nan),
            "recall@20": summary["recall@20"], "ndcg@20": summary["ndcg@20"],
            "recall_vs_clean": summary["recall@20"] / clean_recall, "clip_norm": clip_norm if defence == "clip" else np.nan,
            "dropped_updates": int(sum(r["dropped_updates"] for r in rounds)), "seconds": seconds,
        })
        print(f"{cell:50s} ER@10={summary.get('exposure@10', np.nan):.4f} recall@20={summary['recall@20']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.1, help="devices sampled per round")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the failure study")
    parser.add_argument("--failure-rate", type=float, default=0.3)
    parser.add_argument("--failure-mode", default="exception", choices=("exception", "crash"))
    parser.add_argument("--fractions", default="0.01,0.05", help="malicious shares of the devices")
    parser.add_argument("--boosts", default="1,10", help="factors on the malicious target-row delta")
    parser.add_argument("--defences", default="none,clip,median,trimmed:0.1")
    parser.add_argument("--studies", default="failures,poisoning")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key for every run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="run no cell: rewrite the tables of --studies from the CSVs")
    args = parser.parse_args()
    started = time.perf_counter()
    command = (f"`python simulations/robustness.py --dataset {args.dataset} --rounds {args.rounds} --fraction {args.fraction}"
               f" --seeds {args.seeds} --failure-rate {args.failure_rate} --failure-mode {args.failure_mode}"
               f" --fractions {args.fractions} --boosts {args.boosts} --defences {args.defences} --studies {args.studies}"
               f"{''.join(f' --set {item}' for item in args.set)}` on {machine_description()}")
    if args.report_only:
        command = f"{command}; the table was rewritten from the CSV (--report-only), its cells ran earlier"
        stem = args.dataset
        if "failures" in args.studies:
            write_failures(args.out / f"failures-{stem}.md", ResultTable(args.out / f"failures-{stem}.csv"), command, True)
        if "poisoning" in args.studies:
            write_poisoning(args.out / f"poisoning-{stem}.md", ResultTable(args.out / f"poisoning-{stem}.csv"), command, True)
        return
    base = {**flat_defaults(), "data.dataset": args.dataset, "num-server-rounds": args.rounds,
            "fed.fraction-train": args.fraction, "fed.eval-every": args.rounds, "fed.eval-fraction": 1.0,
            "results-dir": str(args.out / "runs"), **dict(item.split("=", 1) for item in args.set)}
    data = load_run_data(RunConfig.from_flat(base))  # honours eval.candidates, like every run
    if "failures" in args.studies:
        table = ResultTable(args.out / f"failures-{args.dataset}.csv")
        failure_study(args, base, data, table)
        write_failures(args.out / f"failures-{args.dataset}.md", table, command)
    if "poisoning" in args.studies:
        table = ResultTable(args.out / f"poisoning-{args.dataset}.csv")
        poisoning_study(args, base, data, table)
        write_poisoning(args.out / f"poisoning-{args.dataset}.md", table,
                        f"{command}; this invocation took {time.perf_counter() - started:.0f} s")


def write_failures(path: Path, table: ResultTable, command: str, keep_notes: bool = False) -> None:
    """The failure table, one row per seed and rate, then its seed means and s.d. (``keep_notes``: a rewrite from the
    CSV keeps the notes on top of the old table; a run that measured the cells drops them)."""
    frame = table.frame()
    notes = standing_notes(path) if keep_notes else ""
    header = f"{notes}Measured by {command}; final test metrics, every device evaluated.\n\n"
    write_markdown_sections(path, header, [
        ("", frame.reindex(columns=FAILURE_COLUMNS)),
        ("\nRecall@20 over the seeds of each failure rate (s.d. across seeds, ddof 1):\n\n", failure_summary(frame)),
    ])


def write_poisoning(path: Path, table: ResultTable, command: str, keep_notes: bool = False) -> None:
    """The poisoning table (``keep_notes`` as in ``write_failures``)."""
    notes = standing_notes(path) if keep_notes else ""
    header = (f"{notes}Measured by {command}. ER@10 over benign users who never interacted with the target, "
              "every device evaluated after the last round.\n\n")
    write_markdown_table(path, header, table.frame().reindex(columns=POISON_COLUMNS))


if __name__ == "__main__":
    main()
