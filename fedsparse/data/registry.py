"""Which datasets exist, how their files look on disk, and where to find or fetch them.

A dataset lives in a directory ``<root>/<name>/``. ``resolve_dataset_dir`` looks, in order, in
the ``data_dir`` config value alone when it is given (missing files there are an error, never a
fallback); otherwise in (1) ``$FEDSPARSE_DATA``; (2) the user cache (``$XDG_CACHE_HOME/fedsparse`` or
``~/.cache/fedsparse``); (3) the cache again after downloading from the dataset's sources, tried in
order. If all fail, one ``DatasetNotFoundError`` lists every place and every download error.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedsparse.config import ConfigError, DataConfig, did_you_mean
from fedsparse.data.download import Network, UrlFiles, WheelMember, ZipMember
from fedsparse.data.errors import DatasetNotFoundError
from fedsparse.data.readers import (
    WHITESPACE_SEPARATOR,
    read_lastfm_user_artists,
    read_lightgcn,
    read_movielens_dat,
    read_movielens_udata,
    read_recbole_inter,
    read_table,
)

Download = UrlFiles | ZipMember | WheelMember

DATA_ENV = "FEDSPARSE_DATA"
CHECKSUM_BLOCK_BYTES = 1 << 20  # read size while hashing a data file


@dataclass(frozen=True)
class Layout:
    """One way a dataset's files can sit in its directory.

    ``files`` are read with ``reader`` in order; a layout that ``provides_split`` has exactly two
    files, train then test. ``has_timestamps`` says whether leave-one-out is possible.
    """

    files: tuple[str, ...]
    reader: Callable[[Path], pd.DataFrame]
    provides_split: bool
    has_timestamps: bool

    @property
    def default_split(self) -> str:
        """What ``split="auto"`` means for this layout: the files' own split if any, else random."""
        return "provided" if self.provides_split else "random"

    def present(self, directory: Path) -> bool:
        """Whether every file of the layout exists in ``directory``."""
        return all((directory / name).is_file() for name in self.files)

    def read(self, directory: Path) -> tuple[pd.DataFrame, ...]:
        """The raw tables, one per file (train, test for a provided split)."""
        return tuple(self.reader(directory / name) for name in self.files)

    def supports(self, split: str) -> bool:
        """Whether this layout can be split with ``split`` (auto/provided/random/loo)."""
        if split == "provided":
            return self.provides_split
        if split == "loo":
            return self.has_timestamps
        return True


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's name, on-disk layouts (preferred first) and download sources (tried in order).

    A spec with no layouts is generated in memory (``synthetic``) and has no directory.
    """

    name: str
    layouts: tuple[Layout, ...]
    downloads: tuple[Download, ...]
    published: tuple[int, int, int] | None = None  # (users, items, interactions) as published, for `data verify`

    @property
    def generated(self) -> bool:
        """Whether the data is generated rather than read from files."""
        return not self.layouts

    def present(self, directory: Path) -> bool:
        """Whether any layout is complete in ``directory``."""
        return any(layout.present(directory) for layout in self.layouts)

    def layout_for(self, directory: Path, split: str) -> Layout:
        """The first complete layout in ``directory`` that supports ``split``.

        Raises ConfigError when files are there but none can be split that way (e.g. ``loo`` on
        files without timestamps).
        """
        present = [layout for layout in self.layouts if layout.present(directory)]
        for layout in present:
            if layout.supports(split):
                return layout
        found = "; ".join(" + ".join(layout.files) for layout in present) or "no complete layout"
        need = "a provided train/test split" if split == "provided" else "timestamps"
        raise ConfigError(
            f"data.split={split!r} needs {need}, but {self.name}'s files in {directory} ({found}) have none"
        )

    def expected_files(self) -> str:
        """The accepted file sets, for messages: ``u.data or ml-100k.inter``."""
        return " or ".join(" + ".join(layout.files) for layout in self.layouts)


_GROUPLENS = "https://files.grouplens.org/datasets"
_LIGHTGCN_RAW = "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data"
_LIGHTGCN = Layout(("train.txt", "test.txt"), read_lightgcn, provides_split=True, has_timestamps=False)
_RECBOLE_ML100K = "recbole/dataset_example/ml-100k/ml-100k.inter"


def _lightgcn_files(name: str) -> UrlFiles:
    return UrlFiles(tuple((file, f"{_LIGHTGCN_RAW}/{name}/{file}") for file in ("train.txt", "test.txt")))


DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "ml-100k",
        layouts=(
            Layout(("u.data",), read_movielens_udata, provides_split=False, has_timestamps=True),
            Layout(("ml-100k.inter",), read_recbole_inter, provides_split=False, has_timestamps=True),
        ),
        downloads=(
            ZipMember(f"{_GROUPLENS}/movielens/ml-100k.zip", "ml-100k/u.data", "u.data"),
            WheelMember("recbole==1.2.1", _RECBOLE_ML100K, "ml-100k.inter"),
        ),
        published=(943, 1_682, 100_000),
    ),
    "ml-1m": DatasetSpec(
        "ml-1m",
        layouts=(
            _LIGHTGCN,
            Layout(("ratings.dat",), read_movielens_dat, provides_split=False, has_timestamps=True),
        ),
        downloads=(ZipMember(f"{_GROUPLENS}/movielens/ml-1m.zip", "ml-1m/ratings.dat", "ratings.dat"),),
        published=(6_040, 3_706, 1_000_209),
    ),
    "gowalla": DatasetSpec("gowalla", (_LIGHTGCN,), (_lightgcn_files("gowalla"),), published=(29_858, 40_981, 1_027_370)),
    "yelp2018": DatasetSpec("yelp2018", (_LIGHTGCN,), (_lightgcn_files("yelp2018"),), published=(31_668, 38_048, 1_561_406)),
    "lastfm-2k": DatasetSpec(
        "lastfm-2k",
        layouts=(Layout(("user_artists.dat",), read_lastfm_user_artists, provides_split=False, has_timestamps=False),),
        downloads=(
            ZipMember(f"{_GROUPLENS}/hetrec2011/hetrec2011-lastfm-2k.zip", "user_artists.dat", "user_artists.dat"),
        ),
        published=(1_892, 17_632, 92_834),
    ),
    "synthetic": DatasetSpec("synthetic", layouts=(), downloads=()),
}


def get_dataset(name: str) -> DatasetSpec:
    """The registered spec for ``name``; ConfigError listing the known names otherwise."""
    if name not in DATASETS:
        raise ConfigError(f"data.dataset {name!r} is not registered{did_you_mean(name, DATASETS)}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


SEPARATORS = {"tab": "\t", "\\t": "\t", "space": WHITESPACE_SEPARATOR}  # data.separator words -> what the reader takes


def file_spec(config: DataConfig) -> DatasetSpec:
    """The user's own interaction file (``data.path``) as a one-file dataset named after the file (its stem).

    Columns are header names or 0-based positions (digits); ids are read as text, so string ids work.
    Raises ConfigError for contradictory column settings and DatasetNotFoundError when the file is absent.
    """
    path = Path(config.path).expanduser()
    user, item, rating, timestamp = (_column(text) for text in (config.user_column, config.item_column,
                                                                 config.rating_column, config.timestamp_column))
    if user is None or item is None or user == item:
        raise ConfigError(f"data.user-column and data.item-column must name two different columns, got {user!r} and {item!r}")
    named = [column for column in (user, item, rating, timestamp) if isinstance(column, str)]
    if named and not config.header:
        raise ConfigError(f"data.header = false: a file without a header has no column names, use positions instead of {named}")
    if not config.separator:
        raise ConfigError("data.separator must not be empty")
    if not path.is_file():
        raise DatasetNotFoundError(f"data.path {path}: no such file")
    reader = functools.partial(read_table, user_col=user, item_col=item, rating_col=rating, timestamp_col=timestamp,
                               sep=SEPARATORS.get(config.separator, config.separator), header=config.header)
    layout = Layout((path.name,), reader, provides_split=False, has_timestamps=timestamp is not None)
    return DatasetSpec(path.stem, (layout,), downloads=())


def _column(text: str) -> str | int | None:
    """A column setting: digits are a 0-based position, other text a header name, "" none."""
    return int(text) if text.isdigit() else (text or None)


def cache_dir() -> Path:
    """The user cache root: ``$XDG_CACHE_HOME/fedsparse``, else ``~/.cache/fedsparse``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedsparse"


def resolve_dataset_dir(name: str, data_dir: str = "", *, network: Network | None = None) -> Path:
    """The directory holding dataset ``name``'s files (see ``locate_dataset``)."""
    return locate_dataset(name, data_dir, network=network)[0]


def locate_dataset(name: str, data_dir: str = "", *, network: Network | None = None) -> tuple[Path, str]:
    """(the directory holding dataset ``name``'s files, where it came from: "data.data-dir", "$FEDSPARSE_DATA",
    "cache" or "download").

    Parameters
    ----------
    name: a key of ``DATASETS`` (not ``synthetic``, which has no files).
    data_dir: root holding ``<name>/``. When given it is authoritative: the files must be there, and
        nothing else is tried (a silent fallback would train on other data than the config records).
        Empty means ``$FEDSPARSE_DATA`` (itself optional), then the cache, then a download.
    network: how to download; the default uses urllib and pip with short timeouts.

    Raises
    ------
    DatasetNotFoundError naming the given directory and what is wrong with it, or listing every
    directory tried and every download error.
    """
    spec = get_dataset(name)
    if spec.generated:
        raise ConfigError(f"data.dataset {name!r} is generated in memory and has no directory")
    if data_dir:
        directory = Path(data_dir).expanduser() / name
        if spec.present(directory):
            return directory, "data.data-dir"
        given = Path(data_dir).expanduser()
        if given.is_file():
            state = f"{given} is a file, not a folder"
        elif directory.is_file():
            state = f"{directory} is a file, not a folder"
        elif not directory.exists():
            state = f"{directory} does not exist"
        else:
            state = f"{directory} lacks {spec.expected_files()}"
        hint = f" (the files are in {given} itself: pass its parent, {given.parent})" if spec.present(given) else ""
        raise DatasetNotFoundError(
            f"data.data-dir {data_dir}: {state}{hint}. A given data dir is authoritative: no cache or "
            f"download is tried. Put {name}'s files in {directory}, or leave data.data-dir empty to use "
            f"${DATA_ENV}, the cache or a download.")
    root = os.environ.get(DATA_ENV, "")
    candidates = [(f"${DATA_ENV}", Path(root).expanduser() / name)] if root else []
    cache = cache_dir() / name
    candidates.append(("cache", cache))
    tried = [] if root else [f"data_dir and ${DATA_ENV}: not set"]
    for label, directory in candidates:
        if spec.present(directory):
            return directory, label
        state = f"lacks {spec.expected_files()}" if directory.is_dir() else "no such directory"
        tried.append(f"{label} {directory}: {state}")
    network = network or Network()
    created_cache = not cache.exists()
    for download in spec.downloads:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            download.fetch(cache, network)
        except Exception as exc:  # every failure is reported below, none is swallowed
            tried.append(f"download {download.describe()}: {type(exc).__name__}: {exc}")
            continue
        if spec.present(cache):
            return cache, f"download ({download.describe()})"
        tried.append(f"download {download.describe()}: finished, but {cache} still lacks {spec.expected_files()}")
    if created_cache and cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()  # an empty folder left behind would read as "lacks the files" in the next lookup's message
    lines = "\n".join(f"  - {attempt}" for attempt in tried)
    raise DatasetNotFoundError(
        f"dataset {name!r} not found. Tried:\n{lines}\n"
        f"Put the files in <root>/{name}/ and set data.data-dir or ${DATA_ENV} to <root>."
    )


def file_checksum(path: Path) -> str:
    """BLAKE2b-128 hex digest of a file's bytes (printed with a fallback data source, to tell copies apart)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHECKSUM_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["DATA_ENV", "DATASETS", "DatasetSpec", "Layout", "cache_dir", "file_checksum", "file_spec", "get_dataset",
           "locate_dataset", "resolve_dataset_dir"]
