"""``load_dataset``: from a ``DataConfig`` to one ``Interactions``, every step in one readable place.

Order (each step sees the previous one's output):
read or generate -> drop duplicate pairs -> (provided split) check train/test are disjoint ->
rating threshold -> k-core over all rows -> remap ids over all rows -> split -> CSR matrices.

For a provided split, deduplication runs per file and the k-core and remapping run over train and
test together, so the matrices cover every user and item of both files (ML-1M's 23 test-only items
stay as columns with no interactions left; their 28 test rows are dropped and counted).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd
import scipy.sparse as sp

from fedsparse.config import ConfigError, DataConfig, RunConfig
from fedsparse.data.interactions import Interactions, binary_csr
from fedsparse.data.registry import Layout, file_checksum, file_spec, get_dataset, locate_dataset
from fedsparse.data.splits import (
    TEST,
    TRAIN,
    VALIDATION,
    check_disjoint,
    leave_one_out_split,
    provided_split,
    random_split,
)
from fedsparse.data.synthetic import generate_synthetic
from fedsparse.data.transforms import drop_duplicate_pairs, k_core, remap_ids, to_implicit
from fedsparse.rng import rng_for

log = logging.getLogger("fedsparse")


def load_dataset(config: DataConfig, seed: int) -> Interactions:
    """Read (or generate), clean and split the configured dataset, or the user's own file (``data.path``).

    ``config.split="auto"`` is the files' own split when they provide one (gowalla, yelp2018, ml-1m
    from ``train.txt``/``test.txt``), else the per-user random split (ml-100k, ml-1m from
    ``ratings.dat``, lastfm-2k, synthetic). ``"loo"`` must be asked for and needs timestamps.
    Randomness: ``rng_for(seed, "split", name)`` for the split, ``rng_for(seed, "synthetic")`` for
    generated data.

    Returns
    -------
    Interactions whose ``repairs`` hold ``duplicate_pairs`` and, for a provided split,
    ``test_items_unseen_in_train``, ``test_users_unseen_in_train`` and ``test_pairs_unseen_in_train``.

    Raises
    ------
    ConfigError for an unknown dataset or a split the files cannot support; DatasetNotFoundError;
    DataFormatError for malformed files or a provided split whose train and test overlap.
    """
    spec = file_spec(config) if config.path else get_dataset(config.dataset)
    if spec.generated:
        layout: Layout | None = None
        rng = rng_for(seed, "synthetic")
        tables: tuple[pd.DataFrame, ...] = (
            generate_synthetic(
                config.synthetic_users, config.synthetic_items, config.synthetic_interactions_per_user, rng
            ),
        )
        source = spec.name
    else:
        if config.path:  # the user's own file: it is its own source
            directory, origin = Path(config.path).expanduser().parent, "data.data-dir"
        else:
            directory, origin = locate_dataset(spec.name, config.data_dir)
        layout = spec.layout_for(directory, config.split)
        if origin != "data.data-dir":  # no dir given: say which copy this run trains on
            files = ", ".join(f"{directory / name} (blake2b {file_checksum(directory / name)})" for name in layout.files)
            log.warning("data: no data.data-dir given; %s from %s: %s", spec.name, origin, files)
        tables = layout.read(directory)
        source = " + ".join(str(directory / name) for name in layout.files)
    split = _resolve_split(config.split, layout, spec.name)

    if split == "provided":
        train, train_duplicates = drop_duplicate_pairs(tables[0])
        test, test_duplicates = drop_duplicate_pairs(tables[1])
        check_disjoint(train, test, source)
        table = pd.concat([train.assign(in_test=False), test.assign(in_test=True)], ignore_index=True)
        duplicates = train_duplicates + test_duplicates
    else:
        table, duplicates = drop_duplicate_pairs(pd.concat(tables, ignore_index=True))
    repairs = {"duplicate_pairs": duplicates}

    table = k_core(to_implicit(table, config.rating_threshold), config.k_core)
    ids = remap_ids(table)
    rng = rng_for(seed, "split", spec.name)
    if split == "provided":
        labels, split_repairs = provided_split(
            ids.users, ids.items, table["in_test"].to_numpy(), config.validation_ratio, rng
        )
        repairs.update(split_repairs)
    elif split == "random":
        labels = random_split(ids.users, config.test_ratio, config.validation_ratio, rng)
    else:
        if "timestamp" not in table:
            raise ConfigError(f"data.split='loo' needs timestamps, but {source} has none")
        labels = leave_one_out_split(
            ids.users, table["timestamp"].to_numpy(), config.validation_ratio > 0, config.loo_ties, ids.items
        )

    shape = (len(ids.user_ids), len(ids.item_ids))

    def matrix(label: int) -> sp.csr_matrix:
        rows = labels == label
        return binary_csr(ids.users[rows], ids.items[rows], *shape)

    return Interactions(
        name=spec.name,
        train=matrix(TRAIN),
        validation=matrix(VALIDATION),
        test=matrix(TEST),
        user_ids=ids.user_ids,
        item_ids=ids.item_ids,
        repairs=repairs,
    )


def candidate_split(config: DataConfig) -> str:
    """The split under which ``load_dataset`` reads every interaction a candidate file names: ``loo`` (the
    timestamped file, ml-100k ``u.data``, ml-1m ``ratings.dat``) when the dataset has one, else ``random``
    (every file of the layout, a provided split's train and test alike: ml-1m's LightGCN ``train.txt`` +
    ``test.txt``). Either way the rows are all of the dataset's interactions; the candidate file then
    replaces the split. Generated data gets ``loo``, which ``load_dataset`` refuses with its reason."""
    spec = file_spec(config) if config.path else get_dataset(config.dataset)
    if spec.generated:
        return "loo"
    directory = Path(config.path).expanduser().parent if config.path else locate_dataset(spec.name, config.data_dir)[0]
    present = [layout for layout in spec.layouts if layout.present(directory)]
    return "loo" if any(layout.has_timestamps for layout in present) else "random"


def load_candidate_table(config: DataConfig) -> tuple[pd.DataFrame, str]:
    """The dataset's cleaned interaction table as a run with ``eval.candidates`` reads it, before remapping
    and splitting.

    The files of ``candidate_split`` (the timestamped file when there is one, else every file), then
    deduplicated, thresholded and k-cored exactly like ``load_dataset``, rows in file order, original ids.
    The candidate-file writer starts here, so its ids and rows are the ones such a run loads.

    Returns
    -------
    (table with ``user``, ``item`` [, ``timestamp``] [, ``rating``], a description of the source files);
    ``timestamp`` only when the files have one.

    Raises
    ------
    ConfigError for generated data (no file a candidate file could name); DatasetNotFoundError.
    """
    spec = get_dataset(config.dataset)
    if spec.generated:
        raise ConfigError(f"{spec.name} is generated and has no timestamps or files a candidate file could name")
    directory, _ = locate_dataset(spec.name, config.data_dir)
    layout = spec.layout_for(directory, candidate_split(config))
    table, _ = drop_duplicate_pairs(pd.concat(layout.read(directory), ignore_index=True))
    table = k_core(to_implicit(table, config.rating_threshold), config.k_core)
    return table, " + ".join(str(directory / name) for name in layout.files)


def load_timestamped_table(config: DataConfig) -> tuple[pd.DataFrame, str]:
    """``load_candidate_table`` of a dataset with timestamps (ml-100k ``u.data``, ml-1m ``ratings.dat``).

    Raises
    ------
    ConfigError when the dataset has no timestamped file (or is generated); DatasetNotFoundError.
    """
    table, source = load_candidate_table(config)
    if "timestamp" not in table:
        raise ConfigError(f"{source} has no timestamps")
    return table, source


def load_run_data(config: RunConfig) -> Interactions:
    """The interactions a run trains and evaluates on: ``load_dataset``, or, with ``eval.candidates``,
    every interaction of the dataset (``candidate_split``) re-split by the candidate file (its validation
    and test items held out, its negatives fixed). Bad candidate files raise DataFormatError before any work."""
    if not config.eval.candidates:
        return load_dataset(config.data, config.seed)
    from fedsparse.data.candidates import apply_candidates, read_candidates

    data = load_dataset(replace(config.data, split=candidate_split(config.data)), config.seed)
    candidates = read_candidates(config.eval.candidates, data, config.eval.sampled_negatives)
    return apply_candidates(data, candidates)


def _resolve_split(split: str, layout: Layout | None, name: str) -> str:
    """``auto`` -> the layout's default; generated data supports only random (and auto)."""
    if layout is None:
        if split in ("provided", "loo"):
            raise ConfigError(f"data.split={split!r} is impossible for {name}: it has no provided split or timestamps")
        return "random"
    return layout.default_split if split == "auto" else split


__all__ = ["candidate_split", "load_candidate_table", "load_dataset", "load_run_data", "load_timestamped_table"]
