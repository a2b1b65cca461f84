"""The real datasets in shared/data load with exactly the counts verified in shared/data/README.md.

The folder is found via $FEDSPARSE_DATA (the variable the loader reads), else ``shared/data`` next to the repository; the
tests skip when it is absent (e.g. on CI without the licensed files).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedsparse.config import DataConfig
from fedsparse.data import load_dataset
from fedsparse.data.readers import read_lightgcn, read_movielens_udata, read_recbole_inter
from fedsparse.data.registry import DATA_ENV

SHARED = Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")


def shared(name: str) -> Path:
    directory = SHARED / name
    if not directory.is_dir():
        pytest.skip(f"shared dataset {directory} not available")
    return directory


@pytest.mark.parametrize(
    "name, users, items, train, test",
    [
        ("gowalla", 29_858, 40_981, 810_128, 217_242),
        ("yelp2018", 31_668, 38_048, 1_237_259, 324_147),
    ],
)
def test_lightgcn_datasets_keep_the_published_split(name, users, items, train, test):
    shared(name)
    data = load_dataset(DataConfig(dataset=name, data_dir=str(SHARED), validation_ratio=0.0), seed=0)
    assert data.counts() == {
        "users": users,
        "items": items,
        "train": train,
        "validation": 0,
        "test": test,
        "interactions": train + test,
    }
    assert data.repairs == {
        "duplicate_pairs": 0,
        "test_items_unseen_in_train": 0,
        "test_users_unseen_in_train": 0,
        "test_pairs_unseen_in_train": 0,
    }
    assert data.user_ids.tolist() == list(range(users))  # LightGCN ids are already 0..n-1


def test_gowalla_validation_comes_out_of_train_and_reads_fast():
    directory = shared("gowalla")
    start = time.perf_counter()
    read_lightgcn(directory / "train.txt")
    assert time.perf_counter() - start < 3.0
    data = load_dataset(DataConfig(dataset="gowalla", data_dir=str(SHARED), validation_ratio=0.1), seed=0)
    counts = data.counts()
    assert counts["train"] + counts["validation"] == 810_128 and counts["test"] == 217_242
    assert 0.09 < counts["validation"] / 810_128 < 0.12


def test_ml100k_from_u_data_and_from_recbole_inter(tmp_path):
    directory = shared("ml-100k")
    for table in (read_movielens_udata(directory / "u.data"), read_recbole_inter(directory / "ml-100k.inter")):
        assert len(table) == 100_000 and table["user"].nunique() == 943 and table["item"].nunique() == 1_682
        assert table["rating"].value_counts().sort_index().tolist() == [6_110, 11_370, 27_145, 34_174, 21_201]
    only_inter = tmp_path / "ml-100k"
    only_inter.mkdir()
    (only_inter / "ml-100k.inter").symlink_to(directory / "ml-100k.inter")
    checksums = []
    for root in (SHARED, tmp_path):  # SHARED prefers u.data; tmp_path only has the .inter file
        data = load_dataset(DataConfig(dataset="ml-100k", data_dir=str(root)), seed=0)
        counts = data.counts()
        assert (counts["users"], counts["items"], counts["interactions"]) == (943, 1_682, 100_000)
        assert counts["test"] > 0 and counts["validation"] > 0 and data.repairs == {"duplicate_pairs": 0}
        checksums.append(data.checksum())
    assert checksums[0] == checksums[1]  # the same ids in the same order: the same users, items and splits


def test_ml1m_pairs_and_the_23_test_items_unseen_in_train():
    shared("ml-1m")
    data = load_dataset(DataConfig(dataset="ml-1m", data_dir=str(SHARED), validation_ratio=0.0), seed=0)
    counts = data.counts()
    assert (counts["users"], counts["items"]) == (6_040, 3_706)
    assert data.repairs["test_items_unseen_in_train"] == 23 and data.repairs["test_users_unseen_in_train"] == 0
    assert data.repairs["duplicate_pairs"] == 0
    assert counts["interactions"] + data.repairs["test_pairs_unseen_in_train"] == 1_000_209
    assert counts["train"] == 800_167 and counts["test"] + data.repairs["test_pairs_unseen_in_train"] == 200_042
    test_only_columns = (data.train.getnnz(axis=0) == 0).sum()
    assert test_only_columns == 23 and data.test.getnnz(axis=0)[data.train.getnnz(axis=0) == 0].sum() == 0


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m", "gowalla", "yelp2018"])
def test_data_verify_matches_the_published_counts(name, capsys):
    from fedsparse.cli import main

    shared(name)
    assert main(["data", "verify", name, "--data-dir", str(SHARED)]) == 0
    assert capsys.readouterr().out.count("(ok)") == 3
