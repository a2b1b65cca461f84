"""Leave-one-out tie rules (``data.loo-ties``) measured: how many users' held-out items each rule moves.

Counts, per pair of rules, the users whose test (and validation) item differs on a dataset with
timestamps, and how many users share their latest timestamp. With ``--pfedrec-ratings`` (PFedRec's
``data/ml-100k/ratings.dat``: ``uid,mid,rating,timestamp``, the same ids as ``u.data`` in another row
order) it also checks that the ``file-first`` rule on that file is PFedRec's own split (pandas
``rank(method="first", ascending=False)``, computed here independently) and counts how many of
PFedRec's test and validation items each rule recovers from ``u.data``. The file is read where it is
(copied only into a temporary directory); nothing of it is written to the results. Not a test.

    FEDSPARSE_DATA=../shared/data python benchmarks/loo_ties.py --pfedrec-ratings /tmp/pfedrec/ratings.dat
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from fedsparse.config import LOO_TIES, RunConfig
from fedsparse.data import load_dataset
from fedsparse.data.load import load_timestamped_table
from fedsparse.run_files import atomic_write_text

HERE = Path(__file__).resolve().parent


def held_out(dataset: str, ties: str, data_dir: str = "") -> tuple[pd.Series, pd.Series]:
    """(test item, validation item) per user, original ids, under ``data.split = loo`` with rule ``ties``."""
    data = load_dataset(RunConfig.from_flat({"data.dataset": dataset, "data.split": "loo", "data.loo-ties": ties,
                                             "data.data-dir": data_dir}).data, 0)

    def series(matrix) -> pd.Series:
        users = np.repeat(np.arange(data.n_users), np.diff(matrix.indptr))
        return pd.Series(data.item_ids[matrix.indices], index=data.user_ids[users])

    return series(data.test), series(data.validation)


def pfedrec_rule(path: Path) -> tuple[pd.Series, pd.Series]:
    """PFedRec's own assignment, recomputed from its file with its rule (not its code)."""
    ratings = pd.read_csv(path, sep=",", header=None, names=["uid", "mid", "rating", "timestamp"])
    rank = ratings.groupby("uid")["timestamp"].rank(method="first", ascending=False)
    return ratings[rank == 1].set_index("uid")["mid"], ratings[rank == 2].set_index("uid")["mid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--pfedrec-ratings", type=Path, help="PFedRec's ratings.dat for ml-100k (ids as in u.data)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "loo_ties.md")
    args = parser.parse_args()

    table, _ = load_timestamped_table(RunConfig.from_flat({"data.dataset": args.dataset}).data)
    latest = table.groupby("user")["timestamp"].transform("max") == table["timestamp"]
    sharing = int((table[latest].groupby("user").size() > 1).sum())
    users = table["user"].nunique()
    rules = {ties: held_out(args.dataset, ties) for ties in LOO_TIES}
    lines = [
        f"Measured by `python benchmarks/loo_ties.py{' --pfedrec-ratings PATH' if args.pfedrec_ratings else ''}` "
        f"on {args.dataset} ({users} users; {sharing} share their latest timestamp with another of their rows).",
        "",
        "| rules | users whose test item differs | users whose validation item differs |",
        "|:--|--:|--:|",
    ]
    for first, second in itertools.combinations(LOO_TIES, 2):
        (test_a, val_a), (test_b, val_b) = rules[first], rules[second]
        lines.append(f"| {first} vs {second} | {int((test_a != test_b).sum())} | {int((val_a != val_b).sum())} |")
    if args.pfedrec_ratings:
        test_p, val_p = pfedrec_rule(args.pfedrec_ratings)
        with tempfile.TemporaryDirectory() as root:
            directory = Path(root) / args.dataset
            directory.mkdir()
            text = args.pfedrec_ratings.read_text().replace(",", "\t")  # same rows, same order, u.data's layout
            (directory / "u.data").write_text(text)
            test_f, val_f = held_out(args.dataset, "file-first", root)
        same = int((test_f == test_p.reindex(test_f.index)).sum()), int((val_f == val_p.reindex(val_f.index)).sum())
        lines += [
            "",
            f"PFedRec's ratings.dat (same (user, item, rating, time) rows as u.data, another order): `file-first` on it "
            f"gives PFedRec's test item for {same[0]} of {len(test_p)} users and its validation item for {same[1]} "
            "(PFedRec's rule recomputed here with pandas `rank(method=\"first\", ascending=False)`).",
            "",
            "| rule on u.data | users with PFedRec's test item | users with PFedRec's validation item |",
            "|:--|--:|--:|",
        ]
        for ties, (test, validation) in rules.items():
            lines.append(f"| {ties} | {int((test == test_p.reindex(test.index)).sum())} | "
                         f"{int((validation == val_p.reindex(validation.index)).sum())} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
