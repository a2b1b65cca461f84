"""Budget benchmark (central): element-wise masks vs embedding sizes vs AMGP at equal measured bytes.

MF-BPR, d = 64, every cell one ``fedsparse train`` subprocess with the same seed, epochs and flags; all
cells use the sparse backward, so only the mask differs. The element-wise policies (sparserec, dsl) run at
``--density``; the size policies run at the density whose prefix-stored tables take no more bytes than
the element-wise tables do (a prefix mask costs one count per row instead of a column index per entry,
so it holds more values in the same bytes). AMGP prunes to that same width and ends full-size, so its
bytes are reported as it holds them: the final table, and the mean over training. size-bet's allocation
comes from the BET-style search of fedsparse/sparse/bet.py, each candidate scored by a short proxy training's
validation Recall@20. Finished cells are kept in ``<out>/budgets_central.csv`` and skipped on a rerun.

    FEDSPARSE_DATA=../shared/data python benchmarks/budgets.py --datasets ml-1m,gowalla
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_training  # noqa: E402

from fedsparse.config import DataConfig  # noqa: E402
from fedsparse.data import load_dataset  # noqa: E402
from fedsparse.experiments.tables import (  # noqa: E402
    ResultTable,
    machine_description,
    standing_notes,
    write_markdown_sections,
)
from fedsparse.run_files import save_figure  # noqa: E402
from fedsparse.sparse.bet import BetSettings, bet_search  # noqa: E402
from fedsparse.sparse.masks import budget  # noqa: E402
from fedsparse.sparse.storage import compact_nbytes  # noqa: E402

HERE = Path(__file__).resolve().parent
ELEMENT_WISE = ["sparserec", "dsl"]
SIZE_POLICIES = ["size-frequency", "size-scall", "size-ciess", "size-bet"]
DIM = 64
ROW_ORDER = ["dense", "sparserec", "dsl", "size-frequency", "size-frequency NMF start", "size-scall", "size-ciess",
             "size-uniform", "size-bet", "amgp"]
BET_GROUPS = 8  # popularity groups of the size-bet allocation (sparse.size-groups' default)
SUMMARY_KEYS = ("recall@20", "ndcg@20", "stored_model_bytes", "training_state_bytes", "peak_grad_bytes", "peak_rss_bytes",
                "seconds_per_epoch", "mask_updates")
COLUMNS = [
    "dataset", "policy", "density", "recall@20", "ndcg@20", "recall_vs_dense", "recall_vs_sparserec",
    "stored_model_bytes", "bytes_vs_sparserec", "mean_training_bytes", "training_state_bytes", "peak_grad_bytes",
    "peak_rss_bytes", "seconds_per_epoch", "mask_updates", "group_sizes",
]


def equal_bytes_density(table_rows: list[int], density: float) -> float:
    """The largest density (4 decimals) whose prefix-stored tables take no more bytes than element-wise
    tables at ``density`` stored in their smaller layout (both by ``compact_nbytes``, the encoder's counts)."""
    element = sum(compact_nbytes(rows, DIM, budget(density, rows, DIM)) for rows in table_rows)

    def prefix(d: float) -> int:
        return sum(compact_nbytes(rows, DIM, budget(d, rows, DIM), "prefix") for rows in table_rows)

    candidate = np.floor((element - sum(table_rows)) / (4 * DIM * sum(table_rows)) * 1e4) / 1e4
    while prefix(candidate) > element:
        candidate -= 1e-4
    return float(candidate)


def amgp_mean_bytes(table_rows: list[int], width: int, sparse_share: float) -> float:
    """Mean stored bytes over training: ``sparse_share`` of it pruned to ``width`` dimensions, the rest full."""
    pruned = sum(compact_nbytes(rows, DIM, rows * width, "prefix") for rows in table_rows)
    full = sum(compact_nbytes(rows, DIM, rows * DIM, "prefix") for rows in table_rows)
    return sparse_share * pruned + (1 - sparse_share) * full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-1m,gowalla")
    parser.add_argument("--density", type=float, default=0.2, help="density of the element-wise policies")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--lr", default="0.005")
    parser.add_argument("--proxy-epochs", type=int, default=2, help="epochs of each BET candidate's proxy training")
    parser.add_argument("--bet-initial", type=int, default=4, help="random allocations measured before the predictor")
    parser.add_argument("--bet-rounds", type=int, default=2)
    parser.add_argument("--amgp-sparse-share", type=float, default=0.75)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="run no cell: rewrite the table and the plot from the CSV")
    args = parser.parse_args()
    table = ResultTable(args.out / "budgets_central.csv")
    if args.report_only:
        write_report(args, table, 0.0)
        return
    if not os.environ.get("FEDSPARSE_DATA"):
        parser.error("set FEDSPARSE_DATA to the folder holding the datasets (e.g. ../shared/data)")

    started = time.perf_counter()
    for dataset in args.datasets.split(","):
        run_dataset(args, table, dataset)
    write_report(args, table, time.perf_counter() - started)


def run_dataset(args: argparse.Namespace, table: ResultTable, dataset: str) -> None:
    """Every policy's cell on one dataset (finished cells are skipped)."""
    data = load_dataset(DataConfig(dataset=dataset), 0)
    rows = [data.n_users, data.n_items]
    size_density = equal_bytes_density(rows, args.density)
    base = ["--dataset", dataset, "--model", "mf", "--dim", str(DIM), "--loss", "bpr", "--negatives", "1", "--lr", args.lr,
            "--train.patience", "0"]
    timed = [*base, "--epochs", str(args.epochs), "--train.eval-every", str(args.eval_every)]

    def cell(policy: str, density: float, extra: list[str], extra_row: dict | None = None, label: str = "") -> None:
        label = label or policy
        key = f"{dataset}/{label}/{density}"
        if table.has(key):
            return
        backward = [] if policy == "dense" else ["--sparse.sparse-grad", "on"]
        flags = [*timed, "--sparse.policy", policy, "--sparse.density", str(density), *backward, *extra]
        summary = run_training(flags, args.out / "runs")
        table.add(key, {"dataset": dataset, "policy": label, "density": density,
                        **{k: summary.get(k) for k in SUMMARY_KEYS},
                        **(extra_row or {})})
        print(f"{key:40s} recall@20={summary['recall@20']:.4f} bytes={summary['stored_model_bytes']:,}", flush=True)

    cell("dense", 1.0, [])
    for policy in ELEMENT_WISE:
        cell(policy, args.density, [])
    for policy in SIZE_POLICIES[:-1]:
        cell(policy, size_density, [])
    # SparseRec's NMF start under a size mask: separates the start from the mask's structure.
    cell("size-frequency", size_density, ["--sparse.mask-init", "nmf"], label="size-frequency NMF start")
    uniform = ",".join(["1"] * BET_GROUPS)  # the search's first candidate: every row the same size
    cell("size-bet", size_density, ["--sparse.size-groups", str(BET_GROUPS), "--sparse.group-sizes", uniform],
         {"group_sizes": uniform}, label="size-uniform")
    if not table.has(f"{dataset}/size-bet/{size_density}"):
        allocation = search_allocation(args, base, data, size_density)
        cell("size-bet", size_density, ["--sparse.group-sizes", allocation], {"group_sizes": allocation})
    width = max(1, round(size_density * DIM))
    cell("amgp", size_density, ["--sparse.amgp-sparse-share", str(args.amgp_sparse_share)],
         {"mean_training_bytes": amgp_mean_bytes(rows, width, args.amgp_sparse_share)})


def timing_note(seconds: float) -> str:
    """How the table's cells came about, for its header."""
    if seconds == 0.0:
        return ("the table was rewritten from the CSV (--report-only); its cells ran over earlier invocations, "
                "each skipping finished cells")
    return f"this invocation took {seconds:.0f} s (cells already in the CSV were not rerun)"


def ratio_to(group: pd.DataFrame, column: str, policy: str) -> pd.Series:
    """``column`` of every row of one dataset's ``group`` over that of ``policy`` (nan when it did not run)."""
    reference = group.set_index("policy")
    return group[column] / (reference.loc[policy, column] if policy in reference.index else float("nan"))


def write_report(args: argparse.Namespace, table: ResultTable, seconds: float) -> None:
    """The Markdown table (ratios against dense and sparserec of the same dataset) and the plot."""
    frame = table.frame()
    for _, group in frame.groupby("dataset"):
        frame.loc[group.index, "recall_vs_dense"] = ratio_to(group, "recall@20", "dense")
        frame.loc[group.index, "recall_vs_sparserec"] = ratio_to(group, "recall@20", "sparserec")
        frame.loc[group.index, "bytes_vs_sparserec"] = ratio_to(group, "stored_model_bytes", "sparserec")
    frame["mean_training_bytes"] = frame["mean_training_bytes"].fillna(frame["stored_model_bytes"])
    order = {policy: rank for rank, policy in enumerate(ROW_ORDER)}
    frame = frame.sort_values(["dataset", "policy"], key=lambda c: c.map(order) if c.name == "policy" else c,
                              ascending=[False, True])
    frame = frame.reindex(columns=COLUMNS)
    header = (
        f"Measured by `python benchmarks/budgets.py --datasets {args.datasets} --density {args.density} --epochs {args.epochs} "
        f"--eval-every {args.eval_every} --lr {args.lr} --proxy-epochs {args.proxy_epochs} --bet-initial {args.bet_initial} "
        f"--bet-rounds {args.bet_rounds}` on {machine_description()}; {timing_note(seconds)}. Size policies run at the density "
        "whose prefix-stored tables fit in the element-wise tables' bytes; amgp's stored bytes are its final full-size table.\n\n"
    )
    path = args.out / "budgets_central.md"
    sections = [("", frame)]
    search = ResultTable(args.out / "budgets_bet_search.csv").frame()
    if len(search):
        note = ("\nThe BET-style search of size-bet (every candidate in budgets_bet_search.csv): validation Recall@20 "
                "of the proxy trainings, the uniform start (candidate 0) against the best, and the spread "
                "(best - worst) against the predictor's in-sample error.\n\n")
        sections.append((note, bet_search_summary(search)))
    write_markdown_sections(path, standing_notes(path) + header, sections)
    plot_budgets(frame, args.out / "budgets_central.png")


def bet_search_summary(search: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset of the BET search: candidates, uniform and best proxy score, their spread, predictor rmse.

    search: budgets_bet_search.csv's rows (one per measured candidate, ``order`` 0 the uniform start)."""
    rows = []
    for dataset, group in search.groupby("dataset", sort=False):
        scores = group["proxy_recall@20"]
        rows.append({"dataset": dataset, "candidates": len(group),
                     "uniform_proxy_recall@20": float(scores[group["order"] == 0].iloc[0]),
                     "best_proxy_recall@20": float(scores.max()), "worst_proxy_recall@20": float(scores.min()),
                     "proxy_spread": float(scores.max() - scores.min()),
                     "predictor_rmse": float(group["predictor_rmse"].iloc[0])})
    return pd.DataFrame(rows)


def plot_budgets(frame, path: Path) -> None:
    """Test Recall@20 against stored table bytes, one panel per dataset, one marker per policy (amgp also
    at its mean bytes over training, hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(frame["dataset"].unique())
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        for _, row in frame[frame["dataset"] == dataset].iterrows():
            line = axis.scatter(row["stored_model_bytes"], row["recall@20"], label=row["policy"])
            if row["policy"] == "amgp":
                axis.scatter(row["mean_training_bytes"], row["recall@20"], facecolors="none", edgecolors=line.get_facecolor())
        axis.set_xscale("log")
        axis.set_title(dataset)
        axis.set_xlabel("stored user + item tables (bytes)")
        axis.set_ylabel("test Recall@20")
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def search_allocation(args: argparse.Namespace, base: list[str], data, density: float) -> str:
    """BET-style search of relative group sizes scored by short proxy trainings; the best as a flag value."""
    groups = BET_GROUPS
    popularity = np.bincount(data.train.indices, minlength=data.n_items).astype(np.float64)
    total = budget(density, data.n_items, DIM)

    def proxy(candidate: np.ndarray) -> float:
        allocation = ",".join(f"{v:.4f}" for v in candidate / candidate.max())
        flags = [*base, "--sparse.sparse-grad", "on", "--epochs", str(args.proxy_epochs),
                 "--train.eval-every", str(args.proxy_epochs),
                 "--sparse.policy", "size-bet", "--sparse.density", str(density), "--sparse.size-groups", str(groups),
                 "--sparse.group-sizes", allocation]
        score = run_training(flags, args.out / "runs" / "bet-proxy")["validation_recall@20"]
        print(f"  bet proxy {allocation}: validation recall@20 {score:.4f}", flush=True)
        measured.append({"dataset": data.name, "order": len(measured), "allocation": allocation, "proxy_recall@20": score})
        return score

    measured: list[dict] = []

    settings = BetSettings(initial_measured=args.bet_initial, search_rounds=args.bet_rounds)
    result = bet_search(proxy, popularity, total, DIM, groups, np.random.default_rng(0), settings)
    print(f"  bet best {result.best.round(3)} (proxy {result.best_score:.4f}, "
          f"predictor rmse {result.predictor_rmse:.4f})", flush=True)
    for row in measured:
        row["predictor_rmse"] = result.predictor_rmse
    ResultTable(args.out / "budgets_bet_search.csv").set_rows(data.name, measured)
    return ",".join(f"{v:.4f}" for v in result.best)


if __name__ == "__main__":
    main()
