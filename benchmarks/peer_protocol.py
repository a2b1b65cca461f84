"""FedRec baselines and SparseRec under the peers' own protocol: HR@10 / NDCG@10 on fixed candidates.

Every federated cell is a named configuration of ``simulations/configs/`` (its paper, what it sends and
what stays on the device are in the file's header) run by ``fedsparse simulate`` in a subprocess with
the protocol flags added: the candidate file (leave-one-out, 99 never-rated negatives per held-out
item), every device evaluated every ``--eval-every`` passes (default 1: every epoch, as PFedRec's code
evaluates), the test score at the round of best validation HR@10. The central cells
(most-popular, central MF) run ``fedsparse train`` on the same file. Participation 1.0 runs ``--rounds``
rounds; a lower participation runs rounds / fraction rounds, so every cell makes the same passes over
the data.

    FEDSPARSE_DATA=../shared/data python benchmarks/peer_protocol.py --candidates /tmp/pfedrec_candidates.csv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data, run_fedsparse  # noqa: E402

from fedsparse.experiments.tables import (  # noqa: E402
    ResultTable,
    machine_description,
    write_markdown_sections,
)
from fedsparse.run_files import read_jsonl, save_figure  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "simulations" / "configs"
CURVES = "peer_protocol_curves.csv"
PFEDREC_PUBLISHED_HR10 = 0.703  # PFedRec's public code on ml-100k, run here by an earlier session (issue 15)
PFEDREC_REFERENCE_ROUNDS = 65  # that run's length: its best-validation round (41) was picked among 65 rounds
PFEDREC_CODE_RUNS = "pfedrec_reference.csv"  # PFedRec's code rerun here (pfedrec_reference.py): per seed and length
# (method, kind, source): kind "federated" runs the named config (a tuple: the config, then flags added to it),
# "central" the trainer with the flags given.
METHODS = [
    ("most-popular", "central", ["--model", "popular"]),
    ("central MF", "central", ["--sparse.policy", "dense", "--model", "mf", "--dim", "32", "--negatives", "4",
                               "--train.patience", "0"]),
    ("FedMF", "federated", "fedmf.toml"),
    ("FedRecon", "federated", ("fedrecon.toml", "--fed.unseen-users", "0.1")),  # 10 % of users never trained, scored apart
    ("FedNCF", "federated", "fedncf.toml"),
    ("PFedRec", "federated", "pfedrec.toml"),
    ("SparseRec 0.2", "federated", "sparserec-peer.toml"),
    ("SparseRec 0.2 + PFedRec", "federated", "pfedrec-sparserec.toml"),
    # PFedRec's code's evaluation at partial participation: each client with the model its last round left
    ("PFedRec (last models)", "federated", ("pfedrec.toml", "--fed.evaluate-model", "local-last")),
    ("SparseRec 0.2 + PFedRec (last models)", "federated", ("pfedrec-sparserec.toml", "--fed.evaluate-model", "local-last")),
    # the same with the item mask explored every 50 rounds: at 10 % participation, as often per pass over the data
    # as every 5 rounds with every device
    ("SparseRec 0.2 + PFedRec (last models; explore every 50 rounds)", "federated",
     ("pfedrec-sparserec.toml", "--fed.evaluate-model", "local-last", "--fed.explore-every", "50")),
    # the mask explored over the first half (quarter) of the rounds, then fixed while the values train on
    ("SparseRec 0.2 + PFedRec (last models; mask fixed after half the rounds)", "federated",
     ("pfedrec-sparserec.toml", "--fed.evaluate-model", "local-last", "--sparse.end-fraction", "0.5")),
    ("SparseRec 0.2 + PFedRec (last models; mask fixed after a quarter of the rounds)", "federated",
     ("pfedrec-sparserec.toml", "--fed.evaluate-model", "local-last", "--sparse.end-fraction", "0.25")),
    # the item learning rate halved (PFedRec's 262.8 -> 131.4): at 10 % participation each pass over the data takes
    # ten times the server steps of full participation, and the masked table suffers most from large steps
    ("SparseRec 0.2 + PFedRec (last models; item-lr halved)", "federated",
     ("pfedrec-sparserec.toml", "--fed.evaluate-model", "local-last", "--fed.item-lr", "131.4")),
]
COLUMNS = [
    "dataset", "candidates", "method", "engine", "participation", "rounds", "eval_every", "seed", "negatives_from",
    "evaluate_model",
    "sampled_hr@10",
    "sampled_ndcg@10",
    "recall@20", "ndcg@20", "best_round", "unseen_sampled_hr@10", "unseen_recall@20", "unseen_users", "hr_vs_central",
    "upload_bytes_mean", "upload_vs_dense_table",
    "download_bytes_mean", "seconds_per_round", "seconds_vs_fedmf",
]


def run_dir_of(command: str, flags: list[str], results_dir: Path) -> Path:
    """The run directory of ``fedsparse COMMAND FLAGS`` run in its own process."""
    return Path(run_fedsparse(command, flags, results_dir)["run_dir"])


def federated_row(run_dir: Path) -> dict:
    """Test metrics at the best-validation round, per-client-round bytes and seconds of a federation."""
    rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())["config"]
    return {
        "sampled_hr@10": summary["best_test_sampled_hr@10"],
        "sampled_ndcg@10": summary["best_test_sampled_ndcg@10"],
        "recall@20": summary["best_test_recall@20"],
        "ndcg@20": summary["best_test_ndcg@20"],
        "best_round": summary["best_validation_round"],
        # FedRecon's evaluation on devices held out of training (fed.unseen-users), at the same round.
        "unseen_sampled_hr@10": summary.get("best_unseen_sampled_hr@10", float("nan")),
        "unseen_recall@20": summary.get("best_unseen_recall@20", float("nan")),
        "unseen_users": summary.get("unseen_users", 0),
        "negatives_from": config["train.negatives-from"],
        "evaluate_model": config["fed.evaluate-model"],
        "upload_bytes_mean": rounds["upload_bytes_mean"].mean(),
        "upload_vs_dense_table": rounds["upload_bytes_mean"].mean() / rounds["dense_fedavg_upload_bytes"].mean(),
        "download_bytes_mean": rounds["download_bytes_mean"].mean(),
        # Training rounds only: an evaluated round also ranks every device's items.
        "seconds_per_round": (rounds.loc[rounds["sampled_hr@10"].isna(), "seconds"].median() if "sampled_hr@10" in rounds
                              else float("nan")),
        "run_dir": str(run_dir),
    }


def central_row(run_dir: Path) -> dict:
    """The same columns from a central run's summary (its best epoch stands for the best round)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())["config"]
    return {
        "sampled_hr@10": summary["sampled_hr@10"], "sampled_ndcg@10": summary["sampled_ndcg@10"],
        "recall@20": summary["recall@20"], "ndcg@20": summary["ndcg@20"], "best_round": summary.get("best_epoch", 0),
        "negatives_from": config["train.negatives-from"], "run_dir": str(run_dir),
    }


def save_curve(path: Path, cell: str, run_dir: Path, fraction: float) -> None:
    """The cell's evaluated rounds (passes over the data, validation and test HR@10, Recall@20) into the curves CSV."""
    rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl")).dropna(subset=["sampled_hr@10"])
    rounds["passes"] = rounds["round"] * fraction
    columns = ["round", "passes", "validation_sampled_hr@10", "sampled_hr@10", "sampled_ndcg@10", "recall@20"]
    ResultTable(path).set_rows(cell, rounds.reindex(columns=columns).to_dict("records"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--candidates", type=Path,
                        help="candidate file (fedsparse data candidates); default: written here, seed 0")
    parser.add_argument("--rounds", type=int, default=60, help="rounds (epochs for central cells) at full participation")
    parser.add_argument("--fractions", default="1.0,0.1", help="participations to run (devices per round / devices)")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="passes between evaluations (1: every epoch, the round picked among all of them)")
    parser.add_argument("--methods", default="", help="only these comma-separated methods (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the federated cells (their cell key and row carry it when it is not 0)")
    parser.add_argument("--device-batch", type=int, default=0,
                        help="fed.device-batch of the federated cells (devices trained as one batch; 0: one at a time)")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    if args.report_only:
        write_report(args, "", 0.0)
        return
    require_data(parser)
    candidates = args.candidates or args.out / "runs" / f"{args.dataset}-candidates.csv"
    if not candidates.exists():
        subprocess.run([sys.executable, "-m", "fedsparse.cli", "data", "candidates", args.dataset, "--out", str(candidates)],
                       check=True)
    candidates = candidates.resolve()
    protocol = ["--dataset", args.dataset, "--eval.candidates", str(candidates)]
    table = ResultTable(args.out / "peer_protocol.csv")
    started = time.perf_counter()
    chosen = set(filter(None, args.methods.split(",")))
    for method, kind, source in METHODS:
        if chosen and method not in chosen:
            continue
        for fraction in ([1.0] if kind == "central" else [float(f) for f in args.fractions.split(",")]):
            rounds = round(args.rounds / fraction)
            cell = f"{args.dataset}/{candidates.name}/{method}/p{fraction:g}/r{rounds}/e{args.eval_every}"
            if args.seed and kind != "central":
                cell += f"/s{args.seed}"
            if table.has(cell):
                continue
            if kind == "central":
                flags = [*protocol, *source, "--epochs", str(rounds), "--train.eval-every", str(args.eval_every)]
                run_dir = run_dir_of("train", flags, args.out / "runs")
                row = central_row(run_dir)
            else:
                config, *extra = (source,) if isinstance(source, str) else source
                flags = ["--config", str(CONFIGS / config), *extra, *protocol, "--num-server-rounds", str(rounds),
                         "--fed.fraction-train", str(fraction), "--fed.eval-fraction", "1.0",
                         "--fed.eval-every", str(max(1, round(args.eval_every / fraction))),
                         "--fed.device-batch", str(args.device_batch), "--seed", str(args.seed)]
                run_dir = run_dir_of("simulate", flags, args.out / "runs")
                row = federated_row(run_dir)
                save_curve(args.out / CURVES, cell, run_dir, fraction)
            table.add(cell, {"dataset": args.dataset, "method": method, "engine": "central" if kind == "central" else "inprocess",
                             "participation": fraction, "rounds": rounds, "eval_every": args.eval_every,
                             "candidates": candidates.name, "device_batch": 0 if kind == "central" else args.device_batch,
                             "seed": 0 if kind == "central" else args.seed,
                             **row})
            print(f"{cell:60s} HR@10={row['sampled_hr@10']:.4f} Recall@20={row['recall@20']:.4f}", flush=True)
    command = (f"`python benchmarks/peer_protocol.py --dataset {args.dataset} --candidates {candidates.name} "
               f"--rounds {args.rounds} --fractions {args.fractions} --eval-every {args.eval_every} "
               f"--device-batch {args.device_batch} --seed {args.seed}`")
    write_report(args, command, time.perf_counter() - started)


def seed_spread(group: pd.DataFrame) -> dict:
    """The seeds of a group of rows and their test HR@10's mean, sample standard deviation, lowest and highest."""
    hr = group["sampled_hr@10"]
    return {"seeds": " ".join(str(int(seed)) for seed in sorted(group["seed"])), "sampled_hr@10_mean": hr.mean(),
            "sampled_hr@10_std": hr.std(), "sampled_hr@10_min": hr.min(), "sampled_hr@10_max": hr.max()}


def across_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Per federated cell run under several seeds (``--seed``): test HR@10 and Recall@20 at the best-validation round,
    mean, sample standard deviation, lowest and highest over the seeds."""
    keys = ["dataset", "candidates", "method", "participation", "rounds", "eval_every"]
    runs = frame[frame["engine"] != "central"]
    rows = []
    for key, group in runs.groupby(keys, sort=False):
        if group["seed"].nunique() < 2:
            continue
        rows.append({**dict(zip(keys, key, strict=True)), **seed_spread(group), "recall@20_mean": group["recall@20"].mean()})
    return pd.DataFrame(rows)


def write_report(args: argparse.Namespace, command: str, seconds: float) -> None:
    """The Markdown table (ratios against central MF and FedMF of the same dataset) and the HR@10 plot."""
    frame = ResultTable(args.out / "peer_protocol.csv").frame()
    frame["seed"] = frame["seed"].fillna(0).astype(int) if "seed" in frame else 0  # rows from before --seed: seed 0
    central = frame[frame["method"] == "central MF"].groupby(["dataset", "candidates", "rounds"])["sampled_hr@10"].max()
    # FedMF's round at the same dataset, share and length (one figure per key: the median of its rows)
    fedmf = frame[frame["method"] == "FedMF"].groupby(["dataset", "participation", "rounds"])["seconds_per_round"].median()
    frame["hr_vs_central"] = [  # against central MF on the same candidate file at equal passes (epochs)
        row["sampled_hr@10"] / central.get((row["dataset"], row["candidates"], round(row["rounds"] * row["participation"])),
                                           float("nan"))
        for _, row in frame.iterrows()]
    frame["seconds_vs_fedmf"] = [
        row["seconds_per_round"] / fedmf.get((row["dataset"], row["participation"], row["rounds"]), float("nan"))
        for _, row in frame.iterrows()]
    header = (
        (f"Last invocation: {command} on {machine_description()}, {seconds:.0f} s" if command else
         "Rewritten from the CSVs (`--report-only`); the commands of every dataset's rows are in "
         "docs/guides/peer-protocol.md") + ". HR@10 / NDCG@10: "
        "each held-out item among its 99 candidate negatives (the candidate file named in each row's cell), test at the "
        "round (epoch) of best validation HR@10 among the evaluated ones (every `eval_every` passes; PFedRec's code "
        "evaluates every epoch); Recall@20 / NDCG@20: full ranking at that round. Bytes are payload bytes per "
        "client-round; `upload_vs_dense_table` is the upload over the whole dense item table (what PFedRec's code sends; "
        f"ml-100k at d = 32: 215,296 B). `seconds_per_round`: median over the rounds without an evaluation (nan when every "
        "round was evaluated; `round_seconds.md` holds the quiet timing). "
        f"PFedRec's public code scored HR@10 {PFEDREC_PUBLISHED_HR10} on the ml-100k split "
        "(issue 15). The reading is in benchmarks/README.md.\n\n"
    )
    curves = ResultTable(args.out / CURVES).frame()
    reference_rows = pd.concat([within_rounds(frame, curves, rounds, code_runs(args.out))
                                for rounds in (PFEDREC_REFERENCE_ROUNDS, 100)], ignore_index=True)
    write_markdown_sections(args.out / "peer_protocol.md", header, [
        ("", frame.reindex(columns=COLUMNS)),
        (f"\nThe every-epoch dense cells at the length of PFedRec's reference run ({PFEDREC_REFERENCE_ROUNDS} rounds) and "
         "of its code's default (100): the test HR@10 at the best validation round among the first ones, from the cell's "
         "curve (`peer_protocol_curves.csv`; nothing in a dense config depends on the run's length, so a run stopped "
         f"there takes the same rounds), against the issue's reference ({PFEDREC_PUBLISHED_HR10}) and against PFedRec's "
         "public code rerun here for as many rounds (`pfedrec_reference.md`: `pfedrec_code_hr@10` is the mean over its "
         "seeds, `pfedrec_code_runs` how many; ml-100k only):\n\n",
         reference_rows),
        ("\nThe same under several seeds (each seed's run trains and picks its round alone; the candidate file is the "
         "same), the mean over its seeds against the issue's reference and PFedRec's code mean:\n\n",
         within_rounds_across_seeds(reference_rows)),
        ("\nAt partial participation, each cell under PFedRec's rules against PFedRec's code run at the same share "
         "(`pfedrec_reference.md`, `--participation`): the test HR@10 at the best validation round among the cell's "
         "first N rounds (its curve, evaluated every `eval_every` passes) for each N the code's runs were read at, "
         "and the code's mean over its seeds within the same N rounds (evaluated every round):\n\n",
         partial_participation_rows(frame, curves, code_runs(args.out))),
        ("\nCells run under several seeds (`--seed`; the same candidate file, so the spread is the training's, not the "
         "test set's): test HR@10 at each seed's best-validation round, its mean, sample standard deviation and range:\n\n",
         across_seeds(frame)),
    ])
    plot_curves(frame, curves, args.out / "peer_protocol.png")


def dense_methods() -> set[str]:
    """Federated methods whose named config trains the dense table: nothing in them depends on the run's length, so
    their first R rounds are what an R-round run takes (a sparse policy's mask schedule follows num-server-rounds)."""
    dense = set()
    for method, kind, source in METHODS:
        config = source if isinstance(source, str) else source[0]
        if kind == "federated" and tomllib.loads((CONFIGS / config).read_text()).get("sparse.policy") == "dense":
            dense.add(method)
    return dense


def code_runs(results: Path) -> pd.DataFrame:
    """PFedRec's public code rerun here (``pfedrec_reference.py``): its test HR@10 per seed, dataset and length."""
    path = results / PFEDREC_CODE_RUNS
    return (pd.read_csv(path) if path.exists()
            else pd.DataFrame(columns=["seed", "participation", "rounds", "test_hr@10", "dataset"]))


def within_rounds(frame: pd.DataFrame, curves: pd.DataFrame, rounds: int, code: pd.DataFrame) -> pd.DataFrame:
    """Per every-epoch dense cell at full participation that ran at least ``rounds`` rounds: the test HR@10 at the
    best validation HR@10 among rounds <= ``rounds`` (a tie goes to the later round, as the engine picks), and
    PFedRec's code at the same length."""
    rows = []
    chosen = ((frame["eval_every"] == 1) & (frame["participation"] == 1.0) & frame["method"].isin(dense_methods())
              & (frame["rounds"] >= rounds))
    for _, row in frame[chosen].iterrows():
        best = best_within(curves, row["cell"], rounds)
        if best is None:
            continue
        peer = code[(code["dataset"] == row["dataset"]) & (code["rounds"] == rounds) & (code["participation"] == 1.0)]
        peer = peer["test_hr@10"]
        peer_mean = float(peer.mean()) if len(peer) else float("nan")
        rows.append({"dataset": row["dataset"], "method": row["method"], "candidates": row["candidates"],
                     "seed": int(row["seed"]), "within_rounds": rounds, "best_round": int(best["round"]),
                     "sampled_hr@10": best["sampled_hr@10"],
                     "vs_pfedrec_reference": best["sampled_hr@10"] - PFEDREC_PUBLISHED_HR10,
                     "pfedrec_code_hr@10": peer_mean, "pfedrec_code_runs": len(peer),
                     "vs_pfedrec_code": best["sampled_hr@10"] - peer_mean})
    return pd.DataFrame(rows)


def within_rounds_across_seeds(rows: pd.DataFrame) -> pd.DataFrame:
    """``within_rounds`` rows of a method, candidate file and length run under several seeds: their test HR@10's
    mean, sample standard deviation and range, against the issue's reference and PFedRec's code mean."""
    keys = ["dataset", "method", "candidates", "within_rounds"]
    summary = []
    for key, group in rows.groupby(keys, sort=False):
        if group["seed"].nunique() < 2:
            continue
        spread, peer = seed_spread(group), group["pfedrec_code_hr@10"].iloc[0]
        summary.append({**dict(zip(keys, key, strict=True)), **spread,
                        "vs_pfedrec_reference": spread["sampled_hr@10_mean"] - PFEDREC_PUBLISHED_HR10,
                        "pfedrec_code_hr@10": peer, "vs_pfedrec_code": spread["sampled_hr@10_mean"] - peer})
    return pd.DataFrame(summary)


def best_within(curves: pd.DataFrame, cell: str, rounds: int) -> pd.Series | None:
    """The cell's evaluated point of best validation HR@10 among rounds <= ``rounds`` (ties: the later round)."""
    points = curves[(curves["cell"] == cell) & (curves["round"] <= rounds)].sort_values("round")
    if points.empty:
        return None
    return points.iloc[len(points) - 1 - int(np.argmax(points["validation_sampled_hr@10"].to_numpy()[::-1]))]


def partial_participation_rows(frame: pd.DataFrame, curves: pd.DataFrame, code: pd.DataFrame) -> pd.DataFrame:
    """Per federated cell under PFedRec's rules at a share < 1: its best-validation test HR@10 within the first N
    rounds, for each N at which PFedRec's code at the same share and dataset was read, beside the code's mean."""
    rows = []
    chosen = (frame["participation"] < 1.0) & frame["method"].str.contains("PFedRec") & (frame["engine"] != "central")
    for _, row in frame[chosen].iterrows():
        runs = code[(code["dataset"] == row["dataset"]) & (code["participation"] == row["participation"])]
        for rounds in sorted(runs["rounds"].unique()):
            best = best_within(curves, row["cell"], int(rounds))
            if best is None:
                continue
            peer = runs[runs["rounds"] == rounds]["test_hr@10"]
            rows.append({"dataset": row["dataset"], "method": row["method"], "participation": row["participation"],
                         "seed": row["seed"], "evaluate_model": row.get("evaluate_model"), "within_rounds": int(rounds),
                         "best_round": int(best["round"]), "sampled_hr@10": best["sampled_hr@10"],
                         "pfedrec_code_hr@10": float(peer.mean()), "pfedrec_code_runs": len(peer),
                         "vs_pfedrec_code": best["sampled_hr@10"] - float(peer.mean())})
    return pd.DataFrame(rows)


def plot_curves(frame: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    """Test HR@10 against passes over the data, one line per federated cell, central MF as a level line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for _, row in frame[frame["engine"] != "central"].iterrows():
        points = curves[curves["cell"] == row["cell"]]
        if not points.empty:
            style = "-" if row["participation"] == 1.0 else "--"
            axis.plot(points["passes"], points["sampled_hr@10"], style, marker=".",
                      label=f"{row['method']} ({row['participation']:g})")
    left = axis.get_xlim()[0]
    for _, row in frame[frame["engine"] == "central"].iterrows():
        axis.axhline(row["sampled_hr@10"], color="grey", linestyle=":", linewidth=1)
        axis.annotate(row["method"], (left, row["sampled_hr@10"]), xytext=(2, 2), textcoords="offset points", fontsize=7,
                      color="grey")
    axis.set_xlabel("passes over the training data (round x participation)")
    axis.set_ylabel("test HR@10 (99 candidate negatives)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


if __name__ == "__main__":
    main()
