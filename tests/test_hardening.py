"""Issue 18, reliability hardening: each test reproduces one probe of the issue and fails on the old behaviour.

The probe number of the issue is in each test's docstring; docs/guides/robustness.md tabulates them
(written by simulations/robustness_probes.py).
"""

import importlib.metadata
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedsparse.config import ConfigError, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def small_config(tmp_path: Path, **overrides) -> RunConfig:
    """A 30-device synthetic federation that runs in about a second."""
    return RunConfig.from_flat({
        "results-dir": str(tmp_path / "results"),
        "num-server-rounds": 3,
        "data.dataset": "synthetic",
        "data.synthetic-users": 30,
        "data.synthetic-items": 40,
        "data.synthetic-interactions-per-user": 8,
        "model.dim": 8,
        "sparse.density": 0.25,
        "fed.fraction-train": 0.5,
        "fed.nmf-rounds": 2,
        **overrides,
    })


def cli(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m fedsparse.cli ARGS`` with this checkout first on the path."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fedsparse.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=environment)


# --- 9. Non-finite floats and a results-dir that is a file -------------------------------------------

FLOAT_KEYS = ["fed.item-lr", "fed.local-lr", "fed.server-lr", "faults.straggler-seconds", "robust.max-update-norm",
              "privacy.clip-norm", "sparse.density"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, "inf", "-inf", "nan", math.nan])
def test_every_float_key_rejects_non_finite_values(key, value):
    """Probe 9: inf/nan used to pass validation (then dropped every update or crashed mid-round)."""
    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
        RunConfig.from_flat({key: value})


def test_a_non_finite_value_stops_the_cli_before_any_run_directory(tmp_path):
    """Probe 9: `--faults.straggler-seconds inf` left a run directory behind (OverflowError mid-round)."""
    done = cli("simulate", "--dataset", "synthetic", "--results-dir", str(tmp_path / "out"),
               "--faults.failure-mode", "timeout", "--faults.failure-rate", "0.5", "--faults.straggler-seconds", "inf")
    assert done.returncode == 2 and "'faults.straggler-seconds' must be a finite number" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_results_dir_that_is_a_file_is_a_clear_error(tmp_path):
    """Probe 9: `--results-dir FILE` ended in a FileExistsError traceback."""
    target = tmp_path / "results.txt"
    target.write_text("not a folder\n")
    done = cli("simulate", "--dataset", "synthetic", "--data.synthetic-users", "30", "--data.synthetic-items", "40",
               "--results-dir", str(target))
    assert done.returncode == 2, done.stderr
    assert f"results-dir {target} cannot be a folder" in done.stderr and "Traceback" not in done.stderr


# --- 18, 19. Packaging ------------------------------------------------------------------------------

def test_flower_is_pinned_to_one_tested_minor_and_the_installed_one_is_inside_it():
    """Probe 18: `>=1.41,<1.43` let pip pick 1.42.0 while the suite had been run on 1.41.0."""
    (flower,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("flwr")]
    assert flower == "flwr[simulation]>=1.42,<1.43"
    installed = importlib.metadata.version("flwr")
    assert installed.startswith("1.42."), f"flwr {installed} is installed, outside the pin {flower}"
    assert "flwr[simulation]>=1.42,<1.43" in (REPO_ROOT / "README.md").read_text()


def test_requires_python_admits_no_version_without_tomllib():
    """Probe 19: `requires-python = ">=3.10"` but the CLI imports tomllib (3.11+)."""
    uses_tomllib = [p for p in (REPO_ROOT / "fedsparse").rglob("*.py") if "import tomllib" in p.read_text()]
    assert uses_tomllib
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
