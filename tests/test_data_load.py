"""load_dataset end to end on tiny datasets written to tmp_path (no network, no shared data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsparse.config import ConfigError, DataConfig
from fedsparse.data import DataFormatError, Interactions, load_dataset


def put(root: Path, name: str, files: dict[str, str]) -> str:
    directory = root / name
    directory.mkdir(parents=True)
    for file, text in files.items():
        (directory / file).write_text(text)
    return str(root)


def ml100k_text(n_users: int = 30, per_user: int = 12, seed: int = 0) -> str:
    """A u.data with distinct timestamps and ratings 1..5."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, n_users + 1):
        for item in rng.choice(np.arange(1, 60), size=per_user, replace=False):
            lines.append(f"{user}\t{item}\t{rng.integers(1, 6)}\t{rng.integers(10**8, 10**9)}")
    return "\n".join(lines) + "\n"


def pairs(matrix) -> set[tuple[int, int]]:
    coo = matrix.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist(), strict=True))


def assert_disjoint(data: Interactions) -> None:
    train, validation, test = pairs(data.train), pairs(data.validation), pairs(data.test)
    assert not train & validation and not train & test and not validation & test


def test_provided_split_keeps_files_and_reports_unseen_test_items(tmp_path):
    root = put(
        tmp_path,
        "gowalla",
        {"train.txt": "0 1 2 3\n1 1 2\n2 3\n", "test.txt": "0 4\n1 3 9\n2\n3 1\n"},
    )
    data = load_dataset(DataConfig(dataset="gowalla", data_dir=root, validation_ratio=0.0), seed=0)
    # item 4 and 9 only in test, user 3 only in test: all kept as (empty) rows/columns, test rows dropped
    assert data.user_ids.tolist() == [0, 1, 2, 3] and data.item_ids.tolist() == [1, 2, 3, 4, 9]
    assert data.repairs == {
        "duplicate_pairs": 0,
        "test_items_unseen_in_train": 2,
        "test_users_unseen_in_train": 1,
        "test_pairs_unseen_in_train": 3,
    }
    assert data.counts() == {"users": 4, "items": 5, "train": 6, "validation": 0, "test": 1, "interactions": 7}
    assert pairs(data.test) == {(1, 2)}  # user 1, item 3
    assert data.train.dtype == np.float32 and data.train.has_sorted_indices


def test_provided_split_overlap_is_an_error_naming_count_and_pair(tmp_path):
    root = put(tmp_path, "yelp2018", {"train.txt": "0 1 2\n1 1 2\n", "test.txt": "0 2 5\n1 1\n"})
    expected = r"train\.txt \+ .*test\.txt: 2 \(user, item\) pairs .*first: user 0, item 2"
    with pytest.raises(DataFormatError, match=expected):
        load_dataset(DataConfig(dataset="yelp2018", data_dir=root), seed=0)


def test_duplicates_are_counted_per_file(tmp_path):
    root = put(tmp_path, "gowalla", {"train.txt": "0 1 1 2\n0 2 3\n1 1 2\n", "test.txt": "0 4\n1 4 4\n"})
    data = load_dataset(DataConfig(dataset="gowalla", data_dir=root, validation_ratio=0.0), seed=0)
    assert data.repairs["duplicate_pairs"] == 3
    assert data.counts()["train"] == 5 and data.counts()["test"] == 0  # item 4 is unseen in train


def test_validation_is_carved_from_provided_train(tmp_path):
    train = "".join(f"{u} " + " ".join(str(i) for i in range(u, u + 10)) + "\n" for u in range(20))
    test = "".join(f"{u} {u + 10}\n" for u in range(20))
    root = put(tmp_path, "gowalla", {"train.txt": train, "test.txt": test})
    data = load_dataset(DataConfig(dataset="gowalla", data_dir=root, validation_ratio=0.2), seed=0)
    assert data.counts()["train"] + data.counts()["validation"] == 200
    assert np.all(np.diff(data.validation.indptr) == 2) and data.counts()["test"] == 20 - 1  # item 29 unseen
    assert_disjoint(data)


def test_auto_is_random_for_ml100k_and_seeded(tmp_path):
    root = put(tmp_path, "ml-100k", {"u.data": ml100k_text()})
    config = DataConfig(dataset="ml-100k", data_dir=root, test_ratio=0.25, validation_ratio=0.1)
    data = load_dataset(config, seed=1)
    assert data.counts()["interactions"] == 30 * 12 and data.repairs == {"duplicate_pairs": 0}
    assert np.all(np.diff(data.test.indptr) == 3)  # round(0.25 * 12)
    assert np.all(np.diff(data.validation.indptr) == 1)  # round(0.1 * 9)
    assert_disjoint(data)
    again = load_dataset(config, seed=1)
    other = load_dataset(config, seed=2)
    assert (data.test != again.test).nnz == 0 and (data.test != other.test).nnz > 0


def test_loo_on_ml100k_picks_each_users_latest(tmp_path):
    text = ml100k_text()
    root = put(tmp_path, "ml-100k", {"u.data": text})
    data = load_dataset(DataConfig(dataset="ml-100k", data_dir=root, split="loo"), seed=0)
    rows = [line.split("\t") for line in text.splitlines()]
    latest = {}
    for user, item, _, stamp in rows:
        if int(user) not in latest or int(stamp) > latest[int(user)][1]:
            latest[int(user)] = (int(item), int(stamp))
    got = {(int(data.user_ids[u]), int(data.item_ids[i])) for u, i in pairs(data.test)}
    assert got == {(user, item) for user, (item, _) in latest.items()}
    assert data.counts()["validation"] == 30


def test_loo_needs_timestamps(tmp_path):
    root = put(tmp_path, "lastfm-2k", {"user_artists.dat": "userID\tartistID\tweight\n1\t2\t3\n1\t3\t1\n1\t4\t9\n"})
    with pytest.raises(ConfigError, match="needs timestamps"):
        load_dataset(DataConfig(dataset="lastfm-2k", data_dir=root, split="loo"), seed=0)
    inter = put(tmp_path / "b", "ml-100k", {"ml-100k.inter": "user_id:token\titem_id:token\n1\t2\n1\t3\n1\t4\n"})
    with pytest.raises(ConfigError, match="needs timestamps"):
        load_dataset(DataConfig(dataset="ml-100k", data_dir=inter, split="loo"), seed=0)


def test_rating_threshold_and_k_core(tmp_path):
    text = ml100k_text()
    root = put(tmp_path, "ml-100k", {"u.data": text})
    n_high = sum(int(line.split("\t")[2]) >= 4 for line in text.splitlines())
    data = load_dataset(DataConfig(dataset="ml-100k", data_dir=root, rating_threshold=4.0), seed=0)
    assert data.counts()["interactions"] == n_high
    cored = load_dataset(DataConfig(dataset="ml-100k", data_dir=root, rating_threshold=4.0, k_core=3), seed=0)
    full = cored.train + cored.validation + cored.test
    assert np.diff(full.indptr).min() >= 3 and np.asarray(full.sum(axis=0)).min() >= 3
    assert cored.counts()["interactions"] < n_high
    unrated = put(tmp_path / "g", "gowalla", {"train.txt": "0 1\n", "test.txt": "0 2\n"})
    with pytest.raises(ConfigError, match="no ratings"):
        load_dataset(DataConfig(dataset="gowalla", data_dir=unrated, rating_threshold=1.0), seed=0)


def test_random_split_on_a_provided_layout_merges_the_files(tmp_path):
    root = put(tmp_path, "gowalla", {"train.txt": "0 1 2 3 4\n1 1 2 3\n", "test.txt": "0 5\n1 4 1\n"})
    data = load_dataset(DataConfig(dataset="gowalla", data_dir=root, split="random"), seed=0)
    assert data.repairs == {"duplicate_pairs": 1}  # (1, 1) is in both files
    assert data.counts()["interactions"] == 9


def test_synthetic_through_load_dataset():
    config = DataConfig(
        dataset="synthetic", synthetic_users=300, synthetic_items=100, synthetic_interactions_per_user=8
    )
    data = load_dataset(config, seed=0)
    assert data.n_users == 300 and data.n_items <= 100
    assert data.user_ids.tolist() == list(range(300))
    assert_disjoint(data)
    assert (load_dataset(config, seed=0).train != data.train).nnz == 0
    with pytest.raises(ConfigError, match="impossible for synthetic"):
        load_dataset(DataConfig(dataset="synthetic", split="loo"), seed=0)


OWN_FILE = "".join(f"U{u};ASIN{(u * 7 + k) % 25:04d};{1 + k % 5};{1000 + k}\n" for u in range(12) for k in range(6))


def test_a_users_own_headerless_file_loads_with_columns_by_position(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text(OWN_FILE)
    config = DataConfig(path=str(path), user_column="0", item_column="1", rating_column="2", timestamp_column="3",
                        separator=";", header=False, split="loo")
    data = load_dataset(config, 0)
    assert data.name == "reviews" and data.n_users == 12 and data.counts()["interactions"] == 72
    assert str(data.user_ids[0]).startswith("U") and str(data.item_ids[0]).startswith("ASIN")  # string ids kept
    assert data.counts()["test"] == 12  # leave-one-out by the timestamp column


def test_own_file_settings_that_cannot_work_are_named(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("user,item\nA,B\n")
    with pytest.raises(ConfigError, match="use positions instead of"):
        load_dataset(DataConfig(path=str(path), header=False), 0)
    with pytest.raises(ConfigError, match="two different columns"):
        load_dataset(DataConfig(path=str(path), user_column="item"), 0)
    from fedsparse.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_dataset(DataConfig(path=str(tmp_path / "absent.csv")), 0)
