"""Dataset counts: users, items and interactions per split of each dataset as fedsparse loads it.

Counts only, for the figures the guides quote (the data files themselves are never committed). Each
dataset is loaded with its default split, and, for the datasets of ``--random-candidates``, also as a run
with a random leave-one-out candidate file (``fedsparse data candidates NAME --holdout random --seed 0``)
loads it: every interaction, the file's validation and test item held out per user. ``interactions``
counts the pairs in the files, test pairs of items unseen in training included (the loader drops them
from the test split: ``dropped_test_pairs``); the ``published_*`` columns are the registry's counts.
No training runs; loading the four shared datasets takes seconds.

    FEDSPARSE_DATA=../shared/data python benchmarks/dataset_counts.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import require_data  # noqa: E402

from fedsparse.config import RunConfig  # noqa: E402
from fedsparse.data import load_run_data  # noqa: E402
from fedsparse.data.candidates import write_candidates  # noqa: E402
from fedsparse.data.interactions import Interactions  # noqa: E402
from fedsparse.data.registry import get_dataset  # noqa: E402
from fedsparse.experiments.tables import write_markdown_table  # noqa: E402
from fedsparse.run_files import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0
COLUMNS = ["dataset", "split", "users", "items", "interactions", "train", "validation", "test", "dropped_test_pairs",
           "published_users", "published_items", "published_interactions"]


def count_row(name: str, split: str, data: Interactions) -> dict:
    """One table row: ``data``'s counts, the files' pairs and the registry's published counts."""
    counts = data.counts()
    dropped = int(data.repairs.get("test_pairs_unseen_in_train", 0))
    published = get_dataset(name).published or (None, None, None)
    return {"dataset": name, "split": split, "users": counts["users"], "items": counts["items"],
            "interactions": counts["interactions"] + dropped, "train": counts["train"], "validation": counts["validation"],
            "test": counts["test"], "dropped_test_pairs": dropped, "published_users": published[0],
            "published_items": published[1], "published_interactions": published[2]}


def random_candidates_row(name: str, folder: Path) -> dict:
    """The counts a run with a random leave-one-out candidate file (seed 0, 99 negatives) trains and evaluates on."""
    config = RunConfig.from_flat({"data.dataset": name, "seed": SEED})
    path, _ = write_candidates(config.data, folder / f"{name}-random.csv", SEED, "file-last", 99, "random")
    data = load_run_data(config.with_overrides({"eval.candidates": str(path)}))
    return count_row(name, f"random leave-one-out candidates (seed {SEED})", data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ml-100k,ml-1m,gowalla,yelp2018")
    parser.add_argument("--random-candidates", default="ml-1m", help="datasets also counted under a random LOO candidate file")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    require_data(parser)
    rows = []
    with tempfile.TemporaryDirectory() as folder:  # candidate files name items of the data: not kept
        for name in args.datasets.split(","):
            rows.append(count_row(name, "default", load_run_data(RunConfig.from_flat({"data.dataset": name, "seed": SEED}))))
            if name in args.random_candidates.split(","):
                rows.append(random_candidates_row(name, Path(folder)))
    frame = pd.DataFrame(rows, columns=COLUMNS).astype({column: "Int64" for column in COLUMNS[2:]})
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "dataset_counts.csv", frame.to_csv(index=False))
    header = (f"Counted by `FEDSPARSE_DATA=../shared/data python benchmarks/dataset_counts.py --datasets {args.datasets} "
              f"--random-candidates {args.random_candidates}` from the shared data files (counts only; the data is never "
              "committed). interactions: the pairs in the files; dropped_test_pairs: test pairs of items unseen in training, "
              "which the loader leaves out of the test split; published_*: the registry's counts.\n\n")
    write_markdown_table(args.out / "dataset_counts.md", header, frame)


if __name__ == "__main__":
    main()
