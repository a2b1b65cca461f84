"""Registry: where datasets are looked for, downloads (faked, offline) and atomic file handling."""

from __future__ import annotations

import urllib.error
import zipfile
from pathlib import Path

import pytest

from fedsparse.config import ConfigError
from fedsparse.data import DATASETS, DatasetNotFoundError, resolve_dataset_dir
from fedsparse.data.download import Network, extract_member, fetch_url
from fedsparse.data.readers import read_recbole_inter
from fedsparse.data.registry import get_dataset

U_DATA = "1\t10\t5\t100\n2\t10\t3\t200\n"
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t100\n"
RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty user cache and no $FEDSPARSE_DATA, so nothing outside tmp_path is found."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FEDSPARSE_DATA", raising=False)
    return tmp_path / "xdg" / "fedsparse"


def put(root: Path, name: str, files: dict[str, str]) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        (directory / file).write_text(text)
    return directory


class Offline:
    """A Network whose calls fail like an unreachable host and are recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fetch_url(self, url: str, dest: Path, timeout: float) -> None:
        self.calls.append(url)
        raise urllib.error.URLError(f"unreachable in tests ({timeout} s)")

    def pip_download(self, requirement: str, dest_dir: Path, timeout: float) -> Path:
        self.calls.append(f"pip {requirement}")
        raise OSError("no index in tests")

    def network(self) -> Network:
        return Network(fetch_url=self.fetch_url, pip_download=self.pip_download, timeout=0.5)


def test_data_dir_beats_env_var_beats_cache(tmp_path, cache, monkeypatch):
    configured = put(tmp_path / "configured", "ml-100k", {"u.data": U_DATA})
    from_env = put(tmp_path / "env", "ml-100k", {"u.data": U_DATA})
    cached = put(cache, "ml-100k", {"u.data": U_DATA})
    monkeypatch.setenv("FEDSPARSE_DATA", str(tmp_path / "env"))
    offline = Offline()
    assert resolve_dataset_dir("ml-100k", str(tmp_path / "configured"), network=offline.network()) == configured
    assert resolve_dataset_dir("ml-100k", "", network=offline.network()) == from_env
    monkeypatch.delenv("FEDSPARSE_DATA")
    assert resolve_dataset_dir("ml-100k", "", network=offline.network()) == cached
    assert offline.calls == []


def test_an_incomplete_given_data_dir_is_an_error_not_a_fallback_to_the_cache(tmp_path, cache):
    # Issue 18 item 5 changed this: the cache copy used to be taken silently while config.json named the given dir.
    put(tmp_path / "configured", "gowalla", {"train.txt": "0 1\n"})  # test.txt missing
    put(cache, "gowalla", {"train.txt": "0 1\n", "test.txt": "0 2\n"})
    offline = Offline()
    with pytest.raises(DatasetNotFoundError, match=r"lacks train.txt \+ test.txt.*no cache or download is tried"):
        resolve_dataset_dir("gowalla", str(tmp_path / "configured"), network=offline.network())
    assert offline.calls == []


def test_not_found_lists_every_place_and_every_download_error(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("FEDSPARSE_DATA", str(tmp_path / "env"))
    put(tmp_path / "env", "ml-100k", {"README": "nothing useful"})
    offline = Offline()
    with pytest.raises(DatasetNotFoundError) as info:
        resolve_dataset_dir("ml-100k", network=offline.network())
    message = str(info.value)
    assert f"$FEDSPARSE_DATA {tmp_path / 'env' / 'ml-100k'}: lacks u.data or ml-100k.inter" in message
    assert f"cache {cache / 'ml-100k'}: no such directory" in message
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in message and "URLError" in message
    assert "pip download recbole==1.2.1" in message and "no index in tests" in message
    assert offline.calls == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip", "pip recbole==1.2.1"]
    # No folder left behind (with no temporary leftovers in it), so the next lookup says "no such directory" again.
    assert not (cache / "ml-100k").exists()
    with pytest.raises(DatasetNotFoundError) as again:
        resolve_dataset_dir("ml-100k", network=offline.network())
    assert f"cache {cache / 'ml-100k'}: no such directory" in str(again.value)


def test_not_found_says_when_nothing_is_configured(cache):
    with pytest.raises(DatasetNotFoundError, match=r"data_dir and \$FEDSPARSE_DATA: not set"):
        resolve_dataset_dir("lastfm-2k", network=Offline().network())


def test_download_zip_member_into_cache(tmp_path, cache):
    archive = tmp_path / "served.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ml-1m/README", "readme")
        zipped.writestr("ml-1m/ratings.dat", "1::10::5::100\n")
    fetched: list[str] = []

    def serve(url: str, dest: Path, timeout: float) -> None:
        fetched.append(url)
        dest.write_bytes(archive.read_bytes())

    directory = resolve_dataset_dir("ml-1m", network=Network(fetch_url=serve, pip_download=Offline().pip_download))
    assert directory == cache / "ml-1m"
    assert fetched == ["https://files.grouplens.org/datasets/movielens/ml-1m.zip"]
    assert sorted(p.name for p in directory.iterdir()) == ["ratings.dat"]
    assert (directory / "ratings.dat").read_text() == "1::10::5::100\n"


def test_download_lightgcn_files_from_github(cache):
    fetched: dict[str, str] = {}

    def serve(url: str, dest: Path, timeout: float) -> None:
        fetched[dest.name] = url
        dest.write_text("0 1 2\n")

    directory = resolve_dataset_dir("yelp2018", network=Network(fetch_url=serve))
    assert fetched == {
        "train.txt": "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data/yelp2018/train.txt",
        "test.txt": "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data/yelp2018/test.txt",
    }
    assert directory == cache / "yelp2018" and (directory / "test.txt").is_file()


def test_recbole_wheel_fallback_extracts_inter_without_importing(tmp_path, cache):
    offline = Offline()
    requested: list[str] = []

    def fake_pip(requirement: str, dest_dir: Path, timeout: float) -> Path:
        requested.append(requirement)
        wheel = dest_dir / "recbole-1.2.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zipped:
            zipped.writestr("recbole/__init__.py", "raise RuntimeError('must not be imported')\n")
            zipped.writestr(RECBOLE_MEMBER, INTER)
        return wheel

    network = Network(fetch_url=offline.fetch_url, pip_download=fake_pip, timeout=0.5)
    directory = resolve_dataset_dir("ml-100k", network=network)
    assert offline.calls == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"]  # GroupLens first
    assert requested == ["recbole==1.2.1"]
    assert directory == cache / "ml-100k"
    assert sorted(p.name for p in directory.iterdir()) == ["ml-100k.inter"]
    assert read_recbole_inter(directory / "ml-100k.inter")["user"].tolist() == [1]  # ids that spell integers


def test_download_that_leaves_files_missing_is_reported(cache):
    def wrong_file(url: str, dest: Path, timeout: float) -> None:
        with zipfile.ZipFile(dest, "w") as zipped:
            zipped.writestr("user_artists.dat.bak", "x")

    with pytest.raises(DatasetNotFoundError, match="has no member user_artists.dat"):
        resolve_dataset_dir("lastfm-2k", network=Network(fetch_url=wrong_file))


def test_fetch_url_is_atomic(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_text("payload")
    dest = tmp_path / "cache" / "file.txt"
    fetch_url(source.as_uri(), dest, timeout=1.0)
    assert dest.read_text() == "payload"
    with pytest.raises(urllib.error.URLError):
        fetch_url((tmp_path / "absent.txt").as_uri(), tmp_path / "cache" / "other.txt", timeout=1.0)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.txt"]


def test_extract_member_matches_with_or_without_top_folder(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("hetrec/user_artists.dat", "nested")
    extract_member(archive, "user_artists.dat", tmp_path / "out.dat")
    assert (tmp_path / "out.dat").read_text() == "nested"
    with pytest.raises(FileNotFoundError, match="no member tags.dat"):
        extract_member(archive, "tags.dat", tmp_path / "tags.dat")


def test_registry_names_and_layout_choice(tmp_path):
    assert set(DATASETS) == {"ml-100k", "ml-1m", "gowalla", "yelp2018", "lastfm-2k", "synthetic"}
    with pytest.raises(ConfigError, match="not registered"):
        get_dataset("netflix")
    with pytest.raises(ConfigError, match="no directory"):
        resolve_dataset_dir("synthetic")
    both = put(tmp_path, "ml-1m", {"train.txt": "0 1\n", "test.txt": "0 2\n", "ratings.dat": "1::2::3::4\n"})
    spec = get_dataset("ml-1m")
    assert spec.layout_for(both, "auto").files == ("train.txt", "test.txt")
    assert spec.layout_for(both, "auto").default_split == "provided"
    assert spec.layout_for(both, "loo").files == ("ratings.dat",)
    (both / "ratings.dat").unlink()
    with pytest.raises(ConfigError, match="needs timestamps"):
        spec.layout_for(both, "loo")
    lastfm = put(tmp_path, "lastfm-2k", {"user_artists.dat": "userID\tartistID\tweight\n1\t2\t3\n"})
    assert get_dataset("lastfm-2k").layout_for(lastfm, "auto").default_split == "random"
    with pytest.raises(ConfigError, match="needs a provided train/test split"):
        get_dataset("lastfm-2k").layout_for(lastfm, "provided")


def test_data_verify_reports_a_mismatch_and_fetch_prints_the_folder(tmp_path, capsys):
    from fedsparse.cli import main

    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("1\t10\t5\t881250949\n2\t20\t3\t891717742\n")
    assert main(["data", "verify", "ml-100k", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "users: 2 (published 943)" in out and "interactions: 2 (published 100,000)" in out
    assert main(["data", "fetch", "ml-100k", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ml-100k")
    assert main(["data", "verify", "synthetic"]) == 2  # nothing published to compare with
