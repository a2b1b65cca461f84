"""PFedRec's own evaluation candidates as a fedsparse candidate file, drawn by PFedRec's own code.

Runs ``data.SampleGenerator`` of a checkout of PFedRec's repository (github.com/Zhangcx19/IJCAI-23-PFedRec) on
its ``data/ml-100k/ratings.dat``, with the ids its ``train.py`` gives (users and items numbered in order of first
appearance in the file), and writes each user's validation and test item and the 99 + 99 negatives PFedRec scores
them against, in the file's raw ids (``fedsparse data candidates``' format). Nothing of PFedRec is copied: its
module is imported from the checkout and run. Its draw is ``random.sample`` over a set after ``random.seed(0)``;
Python 3.11 refuses a set there, so the set is passed as the tuple Python 3.8-3.10 made of it (the same draw).

    python benchmarks/pfedrec_negatives.py --checkout IJCAI-23-PFedRec --out /tmp/pfedrec-own-negatives-ml-100k-candidates.csv
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["uid", "mid", "rating", "timestamp"]  # PFedRec's ml-100k ratings.dat: comma-separated, no header


def _sample_sets_as_tuples() -> None:
    """Let ``random.sample`` take a set as Python 3.8-3.10 did (PFedRec's code samples from sets)."""
    sample = random.sample

    def compatible(population, k, **options):
        return sample(tuple(population) if isinstance(population, set | frozenset) else population, k, **options)

    random.sample = compatible  # type: ignore[assignment]


def pfedrec_candidates(checkout: Path) -> pd.DataFrame:
    """One row per user: raw user id, validation and test item, and the two lists of 99 negatives."""
    ratings = pd.read_csv(checkout / "data" / "ml-100k" / "ratings.dat", header=None, names=COLUMNS)
    users = pd.Series(pd.unique(ratings["uid"]))  # PFedRec's userId = order of first appearance
    items = pd.Series(pd.unique(ratings["mid"]))
    indexed = pd.DataFrame({
        "userId": ratings["uid"].map(pd.Series(np.arange(users.size), index=users)),
        "itemId": ratings["mid"].map(pd.Series(np.arange(items.size), index=items)),
        "rating": ratings["rating"], "timestamp": ratings["timestamp"],
    })
    _sample_sets_as_tuples()
    sys.path.insert(0, str(checkout))
    data = importlib.import_module("data")  # seeds Python's random with 0 on import, as train.py's import does
    generator = data.SampleGenerator(ratings=indexed)
    rows = []
    for split, name in ((generator.validate_data, "val"), (generator.test_data, "test")):
        held_users, held_items, negative_users, negative_items = (tensor.numpy() for tensor in split)
        for user, item in zip(held_users, held_items, strict=True):
            rows.append({"userId": user, "split": name, "item": items[item],
                         "negatives": " ".join(str(items[i]) for i in negative_items[negative_users == user])})
    frame = pd.DataFrame(rows).pivot(index="userId", columns="split", values=["item", "negatives"])
    return pd.DataFrame({
        "user": users[frame.index].to_numpy(), "val_item": frame[("item", "val")].to_numpy(),
        "test_item": frame[("item", "test")].to_numpy(), "val_negatives": frame[("negatives", "val")].to_numpy(),
        "test_negatives": frame[("negatives", "test")].to_numpy(),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, required=True, help="a checkout of PFedRec's repository")
    parser.add_argument("--out", type=Path, required=True, help="the candidate file to write")
    args = parser.parse_args()
    frame = pfedrec_candidates(args.checkout.resolve())
    frame.to_csv(args.out, index=False)
    print(f"{len(frame)} users -> {args.out}")


if __name__ == "__main__":
    main()
