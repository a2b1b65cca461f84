"""Privacy study: density x defence x strength -> Recall@20, upload bytes, attack leakage and local-DP epsilon.

Each cell is one in-process federation whose server records the first upload of a fixed set of watched
devices; the attacks (fedsparse.privacy) then score them. Defences are written ``none``, ``pad:RHO``
(fake positives per real one), ``ldp:Z`` (Gaussian local DP, noise multiplier Z, clipped at the median
upload norm of the undefended cell of the same density), ``secagg`` or ``secagg:F`` (secure aggregation
over all rows or over a public random share F of them per round: dense masked uploads whose sum alone the
server sees, so no per-device attack has an input: its per-upload attack columns are empty; devices train
only their items among the round's rows), ``secagg-all:F`` (the same rows sent, but every item of the
device trains its user row: ``privacy.secure-train-items = all``; ``secagg-all:F:B`` draws the rows in
proportion to their active entries to the power B, ``privacy.secure-row-bias``) and combinations joined
by ``+``. What the server holds as sums is attacked too, in every cell: the NMF start's cohort sums
(``start_*``: the members of the start's cohort scored by the sums' row mass, and ``start_auc_outside``
the same score on the devices outside the cohort, the control) and, under secure aggregation, the
training rounds' cohort sums (``differencing_*``: consecutive cohorts share devices, so a device's rows
stand out in the rounds it joined against those it did not).

    python simulations/privacy_frontier.py --dataset ml-100k            # quick
    python simulations/privacy_frontier.py --dataset ml-1m --rounds 40  # the study's main table
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedsparse.config import RunConfig, flat_defaults
from fedsparse.data import load_run_data
from fedsparse.experiments.report import TARGET_AUC, TARGET_RECALL_RATIO, strongest_matched_auc
from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table
from fedsparse.federation.engine import run_federation
from fedsparse.federation.inprocess import InProcessTransport, population_of
from fedsparse.federation.observer import ObservingTransport, UploadLog
from fedsparse.privacy.accounting import ldp_epsilon
from fedsparse.privacy.evaluate import ATTACKS, evaluate_attacks, sum_attack
from fedsparse.privacy.leakage import POPULARITY_STRATA, AttackGuess, membership_metrics, popularity_strata
from fedsparse.rng import rng_for
from fedsparse.run_files import new_run_dir, read_jsonl, save_figure

HERE = Path(__file__).resolve().parent
DEFENCES = "none,pad:0.5,pad:1,ldp:0.5,ldp:1,ldp:2,pad:1+ldp:1,secagg,secagg:0.15,secagg:0.1"
SUM_ATTACKS = ("differencing", "start")
SUM_METRICS = ("auc", "auc_matched", "f1", "sign", "auc_outside", "auc_matched_outside")
COLUMNS = [
    "dataset", "density", "defence", "recall@20", "ndcg@20", "recall_vs_undefended", "upload_bytes_mean",
    "upload_vs_undefended", "clip_norm", "epsilon_max", "epsilon_mean", "strongest_auc_matched", "meets_target",
    *[f"{attack}_{metric}" for attack in ATTACKS for metric in ("auc", "auc_uploaded", "auc_matched", "f1")],
    *[f"{attack}_{metric}" for attack in SUM_ATTACKS for metric in SUM_METRICS],
    "sums_advantage", "popularity_auc", "popularity_auc_matched", "random_f1", "targets", "seconds",
]
TARGET_UPLOAD = 2.0  # the area's target's upload ratio (its AUC and Recall@20 ratio: fedsparse.experiments.report)


def defence_overrides(defence: str, clip_norm: float) -> dict[str, object]:
    """Config keys of a defence spec such as ``pad:1+ldp:0.5``."""
    overrides: dict[str, object] = {}
    for part in defence.split("+"):
        name, _, strength = part.partition(":")
        if name == "none":
            continue
        if name == "fixed":  # no mask exploration: no regrowth signal goes up, the NMF start's mask stays
            overrides["sparse.drop-fraction"] = 0.0
            continue
        if name == "pad":
            overrides["privacy.padding-ratio"] = float(strength)
        elif name in ("secagg", "secagg-all"):
            share, _, bias = strength.partition(":")
            overrides.update({"privacy.secure-aggregation": True, "fed.downlink": "full",
                              "privacy.secure-row-fraction": float(share or 1.0),
                              "privacy.secure-train-items": "all" if name == "secagg-all" else "covered"})
            if bias:
                overrides["privacy.secure-row-bias"] = float(bias)
        elif name == "ldp":
            overrides.update({"privacy.ldp": "gaussian", "privacy.noise-multiplier": float(strength),
                              "privacy.clip-norm": clip_norm})
        else:
            raise ValueError(f"unknown defence {part!r}: use none, pad:RHO, ldp:Z, secagg, secagg:F, secagg-all:F[:B], "
                             "fixed, joined by +")
    return overrides


def run_cell(base: dict, data, defence: str, clip_norm: float, watch: set[int]) -> tuple[dict, float]:
    """One federation with the defence; returns its row and the median upload value norm."""
    config = RunConfig.from_flat({**base, **defence_overrides(defence, clip_norm)})
    log = UploadLog(users=watch, per_user=1)
    started = time.perf_counter()
    transport = ObservingTransport(InProcessTransport(config, data), config, data.n_items)
    run_dir = new_run_dir(config.results_dir, f"fed-{data.name}-{config.sparse.policy}")
    summary = run_federation(config, population_of(data, config), transport, run_dir, data.train, observer=log)
    members = {user: np.sort(data.train.indices[data.train.indptr[user] : data.train.indptr[user + 1]]).astype(np.int64)
               for user in log.uploads}
    item_counts = np.asarray(data.train.sum(axis=0), dtype=np.float64).ravel()
    strata = popularity_strata(item_counts)
    if config.privacy.secure_aggregation:  # the server saw only sums: no attack has a per-device input
        leakage = {name: {metric: np.nan for metric in ("auc", "auc_uploaded", "auc_matched", "f1", "targets")}
                   for name in (*ATTACKS, "random")}
    else:
        leakage = evaluate_attacks(config, log.all(), members, strata)
    watched_members = {user: data.train.indices[data.train.indptr[user] : data.train.indptr[user + 1]].astype(np.int64)
                       for user in sorted(watch)}
    predicted = int(round(data.train.nnz / max(1, np.count_nonzero(np.diff(data.train.indptr)))))  # the mean device's items
    popularity = AttackGuess(item_counts, np.zeros(0, dtype=np.int64))
    prior = [membership_metrics(popularity, items, np.arange(data.n_items), strata) for items in watched_members.values()]
    for phase in ("train", "start"):  # the sums the server held, attacked on the watched devices that joined one
        leakage[{"train": "differencing", "start": "start"}[phase]] = sum_attack(
            [item for item in transport.sums if item.phase == phase], watched_members, data.n_items, predicted, config.seed,
            strata)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    counts = np.array(list(log.counts.values()))
    privacy = config.privacy
    per_count = {  # the accountant takes ~0.5 s a call: once per distinct number of uploads
        int(c): ldp_epsilon(privacy.ldp, privacy.noise_multiplier, int(c), privacy.delta) if privacy.ldp != "none" else np.inf
        for c in np.unique(counts)
    }
    epsilons = [per_count[int(c)] for c in counts]
    row = {
        "recall@20": summary.get("best_test_recall@20", summary.get("recall@20")),
        "ndcg@20": summary.get("best_test_ndcg@20", summary.get("ndcg@20")),
        "upload_bytes_mean": float(np.mean([r["upload_bytes_mean"] for r in rounds])),
        "clip_norm": clip_norm if privacy.ldp != "none" else np.nan,
        "epsilon_max": float(np.max(epsilons)) if epsilons else np.nan,  # nan: the server saw no upload
        "epsilon_mean": float(np.mean(epsilons)) if epsilons else np.nan,
        **{f"{attack}_{metric}": leakage[attack][metric]
           for attack in ATTACKS for metric in ("auc", "auc_uploaded", "auc_matched", "f1")},
        **{f"{attack}_{metric}": leakage[attack][metric] for attack in SUM_ATTACKS for metric in SUM_METRICS},
        "popularity_auc": float(np.nanmean([metrics["auc"] for metrics in prior])),  # item popularity alone, no upload read
        "popularity_auc_matched": float(np.nanmean([metrics["auc_matched"] for metrics in prior])),
        "random_f1": leakage["random"]["f1"],
        "targets": leakage["random"]["targets"],
        "seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
    }
    return row, float(np.median(log.value_norms)) if log.value_norms else np.nan


def sums_advantage(frame: pd.DataFrame) -> pd.Series:
    """Per cell, the larger excess of a sum attack's AUC over its control (differencing on the training sums, the
    start's sums): what the members' own vectors add to what the sums say of every device; nan without a control."""
    excess = [frame[f"{attack}_auc"] - frame[f"{attack}_auc_outside"] for attack in ("differencing", "start")
              if f"{attack}_auc_outside" in frame]
    return pd.concat(excess, axis=1).max(axis=1, skipna=True) if excess else pd.Series(np.nan, index=frame.index)


def meets_target(frame: pd.DataFrame) -> pd.Series:
    """Per cell, whether it meets the area's target: strongest matched AUC <= 0.55, Recall@20 >= 90 % and upload
    bytes <= 2x the undefended cell's (``TARGET_*``); False where the matched AUC was not measured."""
    return ((strongest_matched_auc(frame) <= TARGET_AUC) & (frame["recall_vs_undefended"] >= TARGET_RECALL_RATIO)
            & (frame["upload_vs_undefended"] <= TARGET_UPLOAD))


def plot_frontier(frame: pd.DataFrame, path: Path) -> None:
    """Utility (Recall@20 vs undefended) against leakage (the strongest popularity-matched AUC on anything the
    server saw); marker area = bytes. Cells measured before the matched AUC are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = frame["dataset"].iloc[0]
    leakage = strongest_matched_auc(frame)
    frame = frame[leakage.notna()]
    figure, axes = plt.subplots(figsize=(7, 5))
    for density, group in frame.groupby("density"):
        sizes = 60 * group["upload_vs_undefended"]
        axes.scatter(leakage[group.index], group["recall_vs_undefended"], s=sizes, alpha=0.6, label=f"density {density}")
        for index, row in group.iterrows():
            axes.annotate(row["defence"], (leakage[index], row["recall_vs_undefended"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    axes.axvline(TARGET_AUC, color="grey", linestyle=":", linewidth=1)
    axes.axhline(TARGET_RECALL_RATIO, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("strongest popularity-matched attack AUC on all the server saw (0.5: nothing learnt)")
    axes.set_ylabel("Recall@20 / undefended")
    axes.set_title(f"{dataset}: utility vs leakage (marker area = upload bytes)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--densities", default="0.2,0.5")
    parser.add_argument("--defences", default=DEFENCES,
                        help="comma list of none, pad:RHO, ldp:Z, secagg, secagg:F, secagg-all:F[:B], fixed and +-joined "
                             "combinations")
    parser.add_argument("--watch", type=int, default=200,
                        help="devices whose first upload the attacks score (half shadow, half targets)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key for every cell")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    base = {**flat_defaults(), "data.dataset": args.dataset, "num-server-rounds": args.rounds,
            "fed.fraction-train": args.fraction, "fed.eval-every": 5, "results-dir": str(args.out / "runs"),
            **dict(item.split("=", 1) for item in args.set)}
    data = load_run_data(RunConfig.from_flat(base))  # honours eval.candidates, like every run
    users = np.flatnonzero(np.diff(data.train.indptr) > 0)
    watch_rng = rng_for(int(base["seed"]), "privacy-watch")
    watch = set(watch_rng.choice(users, size=min(args.watch, users.size), replace=False).tolist())
    table = ResultTable(args.out / f"privacy-{args.dataset}.csv")
    defences = args.defences.split(",")
    if "none" not in defences:
        defences.insert(0, "none")  # the reference every ratio is taken against, and the clip norm's source
    ran = 0
    for density in [float(value) for value in args.densities.split(",")]:
        cell_base = {**base, "sparse.density": density}
        reference = None
        for defence in sorted(defences, key=lambda name: name != "none"):
            cell = f"{args.dataset}/{density}/{defence}/r{args.rounds}"
            existing = table.frame()
            if table.has(cell):
                row = existing[existing["cell"] == cell].iloc[0].to_dict()
            else:
                ran += 1
                clip_norm = reference["median_norm"] if reference else 1.0
                row, median_norm = run_cell(cell_base, data, defence, clip_norm, watch)
                row.update({"dataset": args.dataset, "density": density, "defence": defence, "rounds": args.rounds,
                            "median_norm": median_norm})
                baseline = reference or row
                row["recall_vs_undefended"] = row["recall@20"] / baseline["recall@20"]
                row["upload_vs_undefended"] = row["upload_bytes_mean"] / baseline["upload_bytes_mean"]
                table.add(cell, row)
            if defence == "none":
                reference = row
            print(f"{cell:40s} recall@20={row['recall@20']:.4f} value_auc_up={row['value_auc_uploaded']:.3f} "
                  f"imia_auc_up={row['imia_auc_uploaded']:.3f} eps_max={row['epsilon_max']:.3g}", flush=True)
    frame = table.frame()
    frame = frame[frame["dataset"] == args.dataset].reset_index(drop=True)
    frame["sums_advantage"] = sums_advantage(frame)
    frame["strongest_auc_matched"] = strongest_matched_auc(frame)
    frame["meets_target"] = meets_target(frame)
    header = (
        f"Measured by `python simulations/privacy_frontier.py --dataset {args.dataset} --rounds {args.rounds} --fraction "
        f"{args.fraction} --densities {args.densities} --defences {args.defences} --watch {args.watch}"
        f"{''.join(f' --set {item}' for item in args.set)}` on "
        f"{machine_description()}; this invocation ran {ran} of the table's cells in "
        f"{time.perf_counter() - started:.0f} s (each cell's own run time is its `seconds`; simulations/README.md names "
        "the invocation and code version of the others). AUC = over all items; auc_uploaded = among the uploaded rows "
        "(IMIA's framing); "
        "epsilon at delta = 1e-5 per device over its uploads (inf = no local DP). `*_auc_outside`: the control of "
        "a sum attack, the same score on watched devices that joined no such sum (what the sums reveal of everyone, "
        "item popularity; nan where every watched device joined one, or in rows measured before the column). "
        "`sums_advantage`: the larger of `differencing_auc` and `start_auc` minus its control, what the members' own "
        "vectors add to the sums' AUC (nan without a control). "
        "`popularity_auc`: the watched devices' items ranked by their training popularity alone (no upload read). "
        "`*_auc_matched`: the same AUC over member/non-member pairs of one popularity stratum only "
        f"({POPULARITY_STRATA} equal strata of the catalogue by training popularity), so what a score says of every "
        "device (popularity) reads 0.5 (`popularity_auc_matched` is the check) and the rest is what it learnt of the "
        "device. "
        "`strongest_auc_matched`: the largest matched AUC of every attack on everything the server saw (uploads, "
        "training sums, the start's sums), nan in rows measured before the column; `meets_target`: it is <= 0.55, "
        "Recall@20 >= 90 % and upload <= 2x of the undefended cell.\n\n"
    )
    write_markdown_table(args.out / f"privacy-{args.dataset}.md", header, frame.reindex(columns=COLUMNS))
    plot_frontier(frame, args.out / f"privacy-{args.dataset}.png")


if __name__ == "__main__":
    main()
