"""PFedRec's public code run as the reference: its test and validation HR@10 / NDCG@10 every round, on this machine.

Runs ``train.py`` of a checkout of PFedRec's repository (github.com/Zhangcx19/IJCAI-23-PFedRec) unchanged, on the
CPU, with its own defaults (ml-100k, d 32, 4 negatives, every client every round, SGD lr 0.1, lr_eta 80), and
reads the per-round scores it logs. Nothing of PFedRec is copied: the checkout's module is run in a child process
in which three things are set first, none of which touch its algorithm: ``Tensor.cuda`` / ``Module.cuda`` return
the object itself (its code calls ``.cuda()`` unconditionally), ``random.sample`` takes a set as Python 3.8-3.10
did (as ``pfedrec_negatives.py`` does), and torch's seed is fixed (PFedRec seeds Python's ``random`` but not torch,
whose draws give its initial item table, its head and the batch order), with one intra-op thread. Its code needs
pandas < 3: it binarises the ratings by chained assignment, which pandas 3's copy-on-write turns into a no-op (the
ratings 1-5 then reach its BCE loss and it stops), so ``--python`` names an interpreter that has it.

The table gives the test score at the best-validation round (PFedRec's rule: ``>=``, the latest of ties) among the
first N rounds for each N of ``--report-rounds``, so a run of 65 rounds and one of 100 are read from one log;
rows of earlier invocations (other seeds, shares, caps) are kept.

    python -m venv --system-site-packages pfedrec-env && pfedrec-env/bin/pip install "pandas<3" tensorboardX
    python benchmarks/pfedrec_reference.py --checkout IJCAI-23-PFedRec --python pfedrec-env/bin/python --rounds 100 --seed 0
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

from fedsparse.experiments.tables import machine_description
from fedsparse.run_files import atomic_write_text

CHILD = """
import random, runpy, sys, torch
sample = random.sample
random.sample = lambda population, k, **options: sample(
    tuple(population) if isinstance(population, (set, frozenset)) else population, k, **options)
torch.Tensor.cuda = lambda self, *args, **kwargs: self
torch.nn.Module.cuda = lambda self, *args, **kwargs: self
torch.set_num_threads(1)
torch.manual_seed(int(sys.argv[1]))
sys.argv = ["train.py"] + sys.argv[2:]
sys.path.insert(0, ".")
runpy.run_path("train.py", run_name="__main__")
"""
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOG_STAMP = re.compile(r"\d\d-\d\d-\d\d \d\d:\d\d-")  # the minute stamp opening each line of PFedRec's log file
SCORE_LINE = re.compile(r"\[(Testing|Evluating) Epoch (\d+)\] HR = ([0-9.]+), NDCG = ([0-9.]+)")
CURVE_CSV = RESULTS_DIR / "pfedrec_reference_curves.csv"
TABLE_CSV = RESULTS_DIR / "pfedrec_reference.csv"
TABLE_MD = RESULTS_DIR / "pfedrec_reference.md"


def run_pfedrec(python: str, checkout: Path, rounds: int, seed: int, dataset: str, participation: float) -> pd.DataFrame:
    """Run PFedRec's ``train.py`` once; one row per round: test and validation HR@10 / NDCG@10, wall seconds.

    ``participation`` is its ``--clients_sample_ratio``: the share of all clients it samples each round.
    """
    (checkout / "log").mkdir(exist_ok=True)
    (checkout / "sh_result").mkdir(exist_ok=True)
    command = [python, "-c", CHILD, str(seed), "--dataset", dataset, "--num_round", str(rounds),
               "--clients_sample_ratio", str(participation), "--use_cuda", ""]
    environment = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    scores: dict[int, dict[str, float]] = {}
    started = time.monotonic()
    with subprocess.Popen(command, cwd=checkout, env=environment, stderr=subprocess.PIPE, text=True) as child:
        assert child.stderr is not None
        for line in child.stderr:
            if add_score(scores, line, time.monotonic() - started):
                print(f"round {max(scores)}: test HR@10 {scores[max(scores)]['test_hr@10']}", flush=True)
    if child.returncode != 0:
        raise SystemExit(f"PFedRec's train.py exited with {child.returncode}")
    return curve_of(scores, seed)


def read_pfedrec_log(path: Path, seed: int) -> pd.DataFrame:
    """The same rows from the log file a run of ``train.py`` wrote (its ``log/`` folder), e.g. of a run stopped
    early: every round whose test and validation scores both reached the file; seconds from its minute stamps."""
    scores: dict[int, dict[str, float]] = {}
    first: datetime | None = None
    for line in path.read_text().splitlines():
        if LOG_STAMP.match(line):
            stamp = datetime.strptime(line[:14], "%y-%m-%d %H:%M")
            first = first or stamp
            add_score(scores, line, (stamp - first).total_seconds())
    complete = {index: row for index, row in scores.items() if "test_hr@10" in row and "val_hr@10" in row}
    if not complete:
        raise SystemExit(f"{path}: no round with both test and validation scores (not a PFedRec log?)")
    return curve_of(complete, seed)


def add_score(scores: dict[int, dict[str, float]], line: str, elapsed: float) -> bool:
    """Record the score a log ``line`` carries (1-based round); True for a test score."""
    match = SCORE_LINE.search(line)
    if match is None:
        return False
    phase, round_index, hit_ratio, ndcg = match.groups()
    prefix = "test" if phase == "Testing" else "val"
    row = scores.setdefault(int(round_index) + 1, {})
    row.update({f"{prefix}_hr@10": float(hit_ratio), f"{prefix}_ndcg@10": float(ndcg)})
    if prefix == "test":
        row["elapsed_seconds"] = elapsed
    return prefix == "test"


def curve_of(scores: dict[int, dict[str, float]], seed: int) -> pd.DataFrame:
    """Per-round scores as a frame with the seed."""
    curve = pd.DataFrame.from_dict(scores, orient="index").rename_axis("round").reset_index()
    curve.insert(0, "seed", seed)
    return curve


def best_validation_rows(curve: pd.DataFrame, report_rounds: list[int]) -> pd.DataFrame:
    """Test scores at the best-validation round among the first N rounds (ties: the latest, as PFedRec's ``>=``)."""
    rows = []
    for (seed, participation), run in curve.groupby(["seed", "participation"]):
        for cap in report_rounds:
            window = run[run["round"] <= cap]
            if len(window) < cap:
                continue
            best = window.iloc[::-1]["val_hr@10"].idxmax()
            rows.append({
                "seed": seed, "participation": participation, "rounds": cap, "best_round": int(window.loc[best, "round"]),
                "val_hr@10": window.loc[best, "val_hr@10"], "test_hr@10": window.loc[best, "test_hr@10"],
                "test_ndcg@10": window.loc[best, "test_ndcg@10"],
                "seconds_per_round": window["elapsed_seconds"].iloc[-1] / cap,
            })
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, help="a checkout of PFedRec's repository (to run it)")
    parser.add_argument("--python", default=sys.executable, help="an interpreter with torch, pandas < 3, tensorboardX")
    parser.add_argument("--rounds", type=int, default=100, help="PFedRec's --num_round (its default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed in the child")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--participation", type=float, default=1.0,
                        help="PFedRec's --clients_sample_ratio: the share of clients each round (its default: 1.0)")
    parser.add_argument("--from-log", type=Path, default=None,
                        help="read the per-round scores from a log file a run of train.py wrote (its log/ folder; e.g. "
                             "a run stopped early) instead of running it; --seed and --participation say what it ran")
    parser.add_argument("--report-rounds", default="65,100",
                        help="comma-separated N: the best-validation test score among the first N rounds")
    args = parser.parse_args()
    if args.checkout is None and args.from_log is None:
        parser.error("give --checkout (to run PFedRec's train.py) or --from-log (to read a run's log)")
    curve = (read_pfedrec_log(args.from_log, args.seed) if args.from_log is not None
             else run_pfedrec(args.python, args.checkout.resolve(), args.rounds, args.seed, args.dataset, args.participation))
    curve.insert(1, "dataset", args.dataset)
    curve.insert(2, "participation", args.participation)
    curves = pd.concat([pd.read_csv(CURVE_CSV), curve]) if CURVE_CSV.exists() else curve
    key = ["dataset", "participation", "seed", "round"]
    curves = curves.drop_duplicates(key, keep="last").sort_values(key)
    atomic_write_text(CURVE_CSV, curves.to_csv(index=False))
    report = [int(value) for value in args.report_rounds.split(",")]
    table = best_validation_rows(curve, report).assign(dataset=args.dataset)
    if TABLE_CSV.exists():
        table = pd.concat([pd.read_csv(TABLE_CSV), table])
    key = ["dataset", "participation", "seed", "rounds"]
    table = table.drop_duplicates(key, keep="last").sort_values(key)
    atomic_write_text(TABLE_CSV, table.to_csv(index=False))
    lines = [
        "# PFedRec's public code, run as the reference",
        "",
        f"Command: `python benchmarks/pfedrec_reference.py --checkout IJCAI-23-PFedRec --python pfedrec-env/bin/python "
        "--rounds ROUNDS --seed SEED --participation SHARE --report-rounds N,...` (one invocation per seed and share; "
        "the environment in the script's docstring). "
        f"Machine: {machine_description().split(' (')[0]}, one torch thread in PFedRec's process; seconds per round "
        "were measured beside other benchmarks.",
        "",
        "PFedRec's `train.py` unchanged with its defaults but `--clients_sample_ratio` (`participation`), on the CPU; "
        "test HR@10 / NDCG@10 at the round of best validation HR@10 among the first `rounds` rounds. With partial "
        "participation its code scores every client with the model it kept after its last round (a client never "
        "sampled yet: the initial model). Per-round scores: `pfedrec_reference_curves.csv`.",
        "",
        table.to_markdown(index=False, floatfmt=".4f"),
        "",
    ]
    atomic_write_text(TABLE_MD, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
