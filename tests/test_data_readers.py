"""Readers on small files: what good files parse to, and that every kind of bad file names file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsparse.data import DataFormatError
from fedsparse.data.readers import (
    read_lastfm_user_artists,
    read_lightgcn,
    read_movielens_dat,
    read_movielens_udata,
    read_recbole_inter,
    read_table,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    return path


def assert_bad(reader, path: Path, line: int | None, fragment: str, **kwargs) -> None:
    with pytest.raises(DataFormatError) as info:
        reader(path, **kwargs)
    message = str(info.value)
    location = f"{path}:{line}:" if line is not None else f"{path}:"
    assert message.startswith(location), message
    assert fragment in message, message


# --- LightGCN -----------------------------------------------------------------------------------


def test_lightgcn_ragged_lines_empty_user_and_blank_lines(tmp_path):
    path = write(tmp_path, "train.txt", "0 5 3 9\n1\n\n2 7\r\n3 1 2 \n")
    table = read_lightgcn(path)
    assert list(table.columns) == ["user", "item"]
    assert table["user"].dtype == np.int64 and table["item"].dtype == np.int64
    assert table["user"].tolist() == [0, 0, 0, 2, 3, 3]
    assert table["item"].tolist() == [5, 3, 9, 7, 1, 2]


def test_lightgcn_file_without_trailing_newline(tmp_path):
    table = read_lightgcn(write(tmp_path, "test.txt", "4 1 2"))
    assert table.values.tolist() == [[4, 1], [4, 2]]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "empty file"),
        ("  \n\n", 1, "empty file"),
        ("0 1 2\n1 x 3\n", 2, "non-integer item id 'x'"),
        ("0 1\n1 2.5\n", 2, "non-integer item id '2.5'"),
        ("0 1\n\n1 -3\n", 3, "negative item id -3"),
        ("0 1\n-1 2\n", 2, "negative user id -1"),
        ("0 1\n1 5-3\n", 2, "non-integer item id '5-3'"),
        ("0 1\n2 99999999999999999999\n", 2, "does not fit in int64"),
        ("0 1\n1 2\xa03\n", 2, "non-integer item id"),
    ],
)
def test_lightgcn_bad_files_name_file_and_line(tmp_path, text, line, fragment):
    assert_bad(read_lightgcn, write(tmp_path, "train.txt", text), line, fragment)


def test_lightgcn_error_deep_in_a_large_file_has_the_right_line(tmp_path):
    lines = [f"{u} {u + 1} {u + 2}" for u in range(5000)]
    lines[4321] = "4321 7 oops"
    assert_bad(read_lightgcn, write(tmp_path, "train.txt", "\n".join(lines)), 4322, "'oops'")


# --- MovieLens u.data / ratings.dat -------------------------------------------------------------


def test_udata_columns_and_types(tmp_path):
    table = read_movielens_udata(write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t4\t891717742\n"))
    assert list(table.columns) == ["user", "item", "rating", "timestamp"]
    assert table["user"].tolist() == [196, 186] and table["item"].tolist() == [242, 302]
    assert table["rating"].dtype == np.float64 and table["rating"].tolist() == [3.0, 4.0]
    assert table["timestamp"].tolist() == [881250949, 891717742]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "empty file"),
        ("1\t2\t3\t4\n1\t2\t3\n", 2, "expected 4 fields, found 3"),
        ("1\t2\t3\t4\n1\t2\t3\t4\n1\t2\t3\t4\t5\n", 3, "expected 4 fields, found 5"),
        ("1\t2\t3\t4\n1 2 3 4\n", 2, "expected 4 fields, found 1"),
        ("1\t2\t3\t4\nu7\t2\t3\t4\n", 2, "non-integer user id 'u7'"),
        ("1\t2\t3\t4\n1\t-2\t3\t4\n", 2, "negative item id -2"),
        ("1\t2\t3\t4\n1\t2.0\t3\t4\n", 2, "non-integer item id '2.0'"),
        ("1\t2\t3\t4\n\n1\t2\tgood\t4\n", 3, "non-numeric rating 'good'"),
        ("1\t2\t3\t4\n1\t2\t3\tyesterday\n", 2, "non-numeric timestamp 'yesterday'"),
        ("1\t2\t3\t4\n1\t2\tnan\t4\n", 2, "non-finite rating 'nan'"),
        ("1\t2\t3\t4\n1\t2\t\t4\n", 2, "missing rating"),
    ],
)
def test_udata_bad_files_name_file_and_line(tmp_path, text, line, fragment):
    assert_bad(read_movielens_udata, write(tmp_path, "u.data", text), line, fragment)


def test_ratings_dat_double_colon_latin1(tmp_path):
    table = read_movielens_dat(write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"))
    assert table.values.tolist() == [[1, 1193, 5.0, 978300760], [1, 661, 3.0, 978302109]]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "empty file"),
        ("1::1193::5::978300760\n1::661::3\n", 2, "expected 4 fields, found 3"),
        ("1::1193::5::978300760\n1::661::five::978302109\n", 2, "non-numeric rating 'five'"),
        ("1::1193::5::978300760\n1::x\xe9::5::978302109\n", 2, "non-integer item id 'x\xe9'"),
    ],
)
def test_ratings_dat_bad_files_name_file_and_line(tmp_path, text, line, fragment):
    assert_bad(read_movielens_dat, write(tmp_path, "ratings.dat", text), line, fragment)


# --- RecBole .inter -----------------------------------------------------------------------------


def test_recbole_inter_maps_columns_by_name_before_colon(tmp_path):
    text = "item_id:token\treview:token_seq\tuser_id:token\trating:float\n242\tgood film\t196\t3\n302\tok\t007\t4.5\n"
    table = read_recbole_inter(write(tmp_path, "x.inter", text))
    assert list(table.columns) == ["item", "user", "rating"]
    assert table["user"].tolist() == ["196", "007"]  # RecBole tokens stay strings ("007" is no integer's spelling)
    assert table["item"].tolist() == [242, 302]  # every token spells an integer: ids sort as numbers
    assert table["rating"].tolist() == [3.0, 4.5]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "empty file"),
        ("user_id:token\titem_id:token\n", 2, "no interactions after the header"),
        ("user_id:token\tcount:float\n1\t2\n", 1, "header lacks item_id"),
        ("user_id:token\titem_id:token\tuser_id:token\n1\t2\t3\n", 1, "repeats a column"),
        ("user_id:token\titem_id:token\trating:float\n1\t2\t3\n1\t2\tgreat\n", 3, "non-numeric rating 'great'"),
        ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n", 3, "expected 3 fields, found 2"),
        ("user_id:token\titem_id:token\n1\t2\n\t5\n", 3, "missing user"),
    ],
)
def test_recbole_inter_bad_files_name_file_and_line(tmp_path, text, line, fragment):
    assert_bad(read_recbole_inter, write(tmp_path, "x.inter", text), line, fragment)


# --- HetRec Last.fm -----------------------------------------------------------------------------


def test_lastfm_user_artists(tmp_path):
    text = "userID\tartistID\tweight\n2\t51\t13883\n2\t52\t11690\n"
    table = read_lastfm_user_artists(write(tmp_path, "user_artists.dat", text))
    assert table.values.tolist() == [[2, 51, 13883.0], [2, 52, 11690.0]]
    assert list(table.columns) == ["user", "item", "rating"]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "empty file"),
        ("user\tartist\tweight\n2\t51\t1\n", 1, "expected header"),
        ("userID\tartistID\tweight\n", 2, "no interactions after the header"),
        ("userID\tartistID\tweight\n2\t51\t1\n2\t52\tlots\n", 3, "non-numeric rating 'lots'"),
        ("userID\tartistID\tweight\n2\t51\t1\n2\t-52\t1\n", 3, "negative item id -52"),
    ],
)
def test_lastfm_bad_files_name_file_and_line(tmp_path, text, line, fragment):
    assert_bad(read_lastfm_user_artists, write(tmp_path, "user_artists.dat", text), line, fragment)


# --- generic CSV / Parquet ----------------------------------------------------------------------

CSV_COLUMNS = dict(user_col="uid", item_col="sku", rating_col="stars", timestamp_col="ts")


def test_csv_named_columns_ids_kept_as_written(tmp_path):
    path = write(tmp_path, "events.csv", "ts,uid,sku,stars,extra\n10,007,a1,4,x\n11,8,a2,2.5,y\n")
    table = read_table(path, **CSV_COLUMNS)
    assert list(table.columns) == ["user", "item", "rating", "timestamp"]
    assert table["user"].tolist() == ["007", "8"]
    assert table["rating"].tolist() == [4.0, 2.5] and table["timestamp"].tolist() == [10, 11]


def test_csv_without_optional_columns_and_other_separator(tmp_path):
    table = read_table(write(tmp_path, "pairs.tsv", "u\ti\n1\t2\n"), user_col="u", item_col="i", sep="\t")
    assert list(table.columns) == ["user", "item"] and table.values.tolist() == [["1", "2"]]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "empty file"),
        ("uid,sku,stars\n1,2,3\n", 1, "missing column(s) ts"),
        ("ts,uid,sku,stars\n", 1, "no rows"),
        ("ts,uid,sku,stars\n1,2,3,4\n1,2,3,4,5\n", 3, "wrong number of fields"),
        ("ts,uid,sku,stars\n1,2,3,4\n1,2,3,bad\n", 3, "non-numeric rating 'bad'"),
        ("ts,uid,sku,stars\n1,2,3,4\n1,,3,4\n", 3, "missing user"),
        ("ts,uid,sku,stars\n1,2,3,4\n\n", 3, "missing user"),
        ("ts,uid,sku,stars\nnoon,2,3,4\n", 2, "non-numeric timestamp 'noon'"),
    ],
)
def test_csv_bad_files_name_file_and_line(tmp_path, text, line, fragment):
    assert_bad(read_table, write(tmp_path, "events.csv", text), line, fragment, **CSV_COLUMNS)


def test_parquet_reads_and_names_bad_row(tmp_path):
    good = tmp_path / "good.parquet"
    pd.DataFrame({"uid": [1, 2], "sku": ["a", "b"], "stars": [1.0, 5.0]}).to_parquet(good)
    table = read_table(good, user_col="uid", item_col="sku", rating_col="stars")
    assert table["user"].tolist() == [1, 2] and table["item"].tolist() == ["a", "b"]
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"uid": [1, 2, 3], "sku": ["a", "b", "c"], "stars": ["1", "2", "x"]}).to_parquet(bad)
    columns = dict(user_col="uid", item_col="sku")
    assert_bad(read_table, bad, None, "row 3: non-numeric rating 'x'", rating_col="stars", **columns)
    assert_bad(read_table, bad, None, "missing column(s) ts", timestamp_col="ts", **columns)


def test_csv_columns_by_position_with_or_without_a_header(tmp_path):
    headerless = write(tmp_path, "events.csv", "B00X1,A1,5\nB00X2,A1,3\n")
    table = read_table(headerless, user_col=1, item_col=0, rating_col=2, header=False)
    assert table["user"].tolist() == ["A1", "A1"] and table["item"].tolist() == ["B00X1", "B00X2"]  # string ids
    assert table["rating"].tolist() == [5.0, 3.0]
    named = write(tmp_path, "named.csv", "asin,reviewer\nB00X1,A1\n")
    assert read_table(named, user_col=1, item_col="asin")["user"].tolist() == ["A1"]  # positions work with a header too
    # An integer column that is not there is named in the message (it raised a TypeError while building it).
    assert_bad(read_table, headerless, 1, "missing column(s) 7 (found 3 columns, positions 0-2)", user_col=7, item_col=0,
               header=False)
    assert_bad(read_table, write(tmp_path, "gap.csv", "A1,B1\n,B2\n"), 2, "missing user", user_col=0, item_col=1, header=False)
