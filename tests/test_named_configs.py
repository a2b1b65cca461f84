"""Every named config in simulations/configs/ works where its header says it does.

A run config (any ``*.toml`` not named ``sweep-*``) must parse into a valid ``RunConfig`` by the path
``fedsparse simulate --config FILE`` takes, and Flower's own ``--run-config FILE`` parser must read the
same keys and values from it. A sweep file (``sweep-*.toml``) must expand into validated cells.
"""

from pathlib import Path

import pandas as pd
import pytest
from flwr.common.config import parse_config_args

from fedsparse.cli import read_config_file
from fedsparse.config import ConfigError, RunConfig
from fedsparse.experiments.sweep import expand_grid, read_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "simulations" / "configs"
FILES = sorted(CONFIGS.glob("*.toml"))
RUN_CONFIGS = [path for path in FILES if not path.name.startswith("sweep-")]
SWEEPS = [path for path in FILES if path.name.startswith("sweep-")]


def test_the_folder_holds_both_kinds():
    assert len(RUN_CONFIGS) >= 3 and len(SWEEPS) >= 2, [path.name for path in FILES]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda path: path.name)
def test_a_run_config_parses_for_fedsparse_simulate_and_for_flwr_run(path):
    flat = read_config_file(path)
    config = RunConfig.from_flat(flat)
    assert flat and all(config.to_flat()[key] == value for key, value in flat.items())
    assert parse_config_args([str(path)]) == flat  # what `flwr run . --run-config FILE` overrides


@pytest.mark.parametrize("path", SWEEPS, ids=lambda path: path.name)
def test_a_sweep_file_expands_into_validated_cells(path, tmp_path):
    spec = read_sweep(path)
    cells = expand_grid(spec, tmp_path)
    expected = len(spec.seeds)
    for values in spec.grid.values():
        expected *= len(values)
    assert len(cells) == expected and len({cell.cell for cell in cells}) == expected


def test_the_checks_fail_on_a_bad_file(tmp_path):
    """The two parsers above reject what a broken named config would contain."""
    bad_run = tmp_path / "bad.toml"
    bad_run.write_text('"sparse.density" = 1.5\n')
    with pytest.raises(ConfigError, match="sparse.density"):
        RunConfig.from_flat(read_config_file(bad_run))
    bad_sweep = tmp_path / "sweep-bad.toml"
    bad_sweep.write_text('[grid]\n"sparse.polcy" = ["sparserec"]\n')
    with pytest.raises(ConfigError, match="sparse.polcy"):
        expand_grid(read_sweep(bad_sweep), tmp_path)


def test_the_sparse_pfedrec_config_differs_from_pfedrec_only_by_its_mask():
    """pfedrec-sparserec.toml says it is PFedRec's protocol with every setting the same but the item mask."""
    dense, sparse = (read_config_file(CONFIGS / name) for name in ("pfedrec.toml", "pfedrec-sparserec.toml"))
    mask_keys = {"sparse.policy", "sparse.density", "fed.user-density"}
    assert {key: value for key, value in sparse.items() if key not in mask_keys} == {
        key: value for key, value in dense.items() if key not in mask_keys}
    assert (sparse["sparse.policy"], sparse["sparse.density"], sparse["fed.user-density"]) == ("sparserec", 0.2, 1.0)


@pytest.mark.parametrize("name, spec", [("secure-rows-popular.toml", "secagg-all:0.15:1+fixed"),
                                        ("secure-rows-target.toml", "secagg-all:0.11:1+fixed")])
def test_the_popular_secure_rows_configs_are_the_privacy_study_cells_they_name(monkeypatch, name, spec):
    """Each secure-rows config says which cell of the ml-1m privacy study it is: the study's undefended
    config (privacy-frontier.toml) with that spec's keys."""
    monkeypatch.syspath_prepend(str(CONFIGS.parent))
    from privacy_frontier import defence_overrides

    study = read_config_file(CONFIGS / "privacy-frontier.toml")
    cell = {**study, **defence_overrides(spec, 1.0)}
    assert RunConfig.from_flat(read_config_file(CONFIGS / name)) == RunConfig.from_flat(cell)
    assert spec in (CONFIGS / name).read_text()


def federated_row_settings(config: RunConfig, monkeypatch) -> dict:
    """What benchmarks/results/federated.csv records of a run's configuration, for ``config``."""
    monkeypatch.syspath_prepend(str(CONFIGS.parents[1] / "benchmarks"))
    from federated import start_of

    flat = config.to_flat()
    return {"dataset": flat["data.dataset"], "policy": flat["sparse.policy"], "density": flat["sparse.density"],
            "negatives": flat["train.negatives"], "rounds": flat["num-server-rounds"], "downlink": flat["fed.downlink"],
            "local_lr": flat["fed.local-lr"], "item_lr": flat["fed.item-lr"],
            "negatives_from": flat["train.negatives-from"], "start": start_of(flat)}


def test_the_ml1m_accuracy_configs_are_the_federated_table_rows_they_name(monkeypatch, tmp_path):
    """ml1m-accuracy.toml and sweep-ml1m-sparsity.toml say they hold the settings of federated.md's ml-1m SparseRec
    rows with one negative: every setting the table records of those rows equals the config's."""
    table = pd.read_csv(CONFIGS.parents[1] / "benchmarks" / "results" / "federated.csv")
    rows = table[(table["dataset"] == "ml-1m") & (table["variant"] == "sparserec") & (table["negatives"] == 1)]
    columns = list(federated_row_settings(RunConfig(), monkeypatch))
    recorded = {row["density"]: {column: row[column] for column in columns} for _, row in rows.iterrows()}
    single = RunConfig.from_flat(read_config_file(CONFIGS / "ml1m-accuracy.toml"))
    assert federated_row_settings(single, monkeypatch) == recorded[0.2]
    cells = expand_grid(read_sweep(CONFIGS / "sweep-ml1m-sparsity.toml"), tmp_path)
    assert {cell.flat["sparse.density"]: federated_row_settings(RunConfig.from_flat(cell.flat), monkeypatch)
            for cell in cells} == recorded
