"""RunConfig: the one bridge from Flower's flat run_config to typed settings."""

import tomllib
from pathlib import Path

import pytest

from fedsparse.config import ConfigError, RunConfig, flat_defaults

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_table_mirrors_every_default():
    table = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = flat_defaults()
    assert set(table) == set(defaults)
    for key, value in defaults.items():
        assert table[key] == value, key
        assert type(table[key]) is type(value), key


def test_round_trip_through_flat_keys():
    config = RunConfig.from_flat({"train.lr": 0.05, "model.dim": 32, "data.dataset": "gowalla"})
    assert config.train.lr == 0.05 and config.model.dim == 32 and config.data.dataset == "gowalla"
    assert RunConfig.from_flat(config.to_flat()) == config


def test_strings_from_the_command_line_are_coerced():
    config = RunConfig.from_flat({"train.epochs": "3", "train.lr": "1e-2", "seed": "7"})
    assert (config.train.epochs, config.train.lr, config.seed) == (3, 0.01, 7)


@pytest.mark.parametrize(
    "flat, fragment",
    [
        ({"train.learning-rate": 0.1}, "unknown config key(s): train.learning-rate"),
        ({"model.dim": "wide"}, "'model.dim' expects int"),
        ({"model.dim": 0}, "model.dim must be > 0"),
        ({"train.loss": "hinge"}, "train.loss must be one of"),
        ({"data.split": "temporal"}, "data.split must be one of"),
        ({"data.test-ratio": 1.5}, "data.test-ratio must be in (0, 1)"),
        ({"model.mlp-layers": "64,x"}, "model.mlp-layers must be comma-separated integers"),
        ({"train.epochs": True}, "'train.epochs' expects int"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(flat, fragment):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flat(flat)
    assert fragment in str(error.value)
