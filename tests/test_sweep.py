"""Sweeps run every cell once (a rerun recomputes nothing) and reports write a table and real PNGs."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedsparse.config import ConfigError
from fedsparse.sweep import read_sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = """seeds = [0]
[base]
"data.dataset" = "synthetic"
"data.synthetic-users" = 20
"data.synthetic-items" = 30
"model.dim" = 8
num-server-rounds = 2
"fed.nmf-rounds" = 1
[grid]
"sparse.density" = [0.25, 0.5]
"sparse.policy" = ["sparserec", "set"]
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sweep(file: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedsparse.cli", "sweep", str(file), "--out", str(out), "--jobs", "2"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


def test_a_sweep_runs_each_cell_once_resumes_without_recomputing_and_reports(tmp_path):
    file, out = tmp_path / "tiny.toml", tmp_path / "sweep"
    file.write_text(TINY)
    first = sweep(file, out)
    assert first.returncode == 0, first.stderr[-2000:]
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 4 and set(table["sparse.policy"]) == {"sparserec", "set"}
    runs = sorted(path.name for path in (out / "runs").iterdir())
    assert len(runs) == 4

    second = sweep(file, out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert sorted(path.name for path in (out / "runs").iterdir()) == runs  # no cell ran again
    assert pd.read_csv(out / "sweep.csv")["run_dir"].tolist() == table["run_dir"].tolist()

    file.write_text(TINY.replace("[0.25, 0.5]", "[0.25, 0.5, 0.75]"))  # a grown grid only adds cells
    assert sweep(file, out).returncode == 0
    assert len(list((out / "runs").iterdir())) == 6

    report = (out / "report.md").read_text()
    assert report.count("fed-synthetic") == 6  # one row per run
    for name in ("recall_vs_rounds.png", "recall_vs_upload.png"):
        image = (out / name).read_bytes()
        assert image.startswith(PNG_SIGNATURE) and len(image) > 10_000, name


def test_report_collects_run_directories_given_on_the_command_line(tmp_path):
    file, out = tmp_path / "tiny.toml", tmp_path / "sweep"
    file.write_text(TINY.replace('"sparse.policy" = ["sparserec", "set"]', ""))
    assert sweep(file, out).returncode == 0
    command = [sys.executable, "-m", "fedsparse.cli", "report", str(out / "runs"), "--out", str(tmp_path / "report")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    table = pd.read_csv(tmp_path / "report" / "report.csv")
    assert sorted(table["sparse.density"]) == [0.25, 0.5] and table["upload_bytes_mean"].gt(0).all()
    parquet = pd.read_parquet(tmp_path / "report" / "report.parquet")
    assert parquet["recall@20"].tolist() == pytest.approx(table["recall@20"].tolist())


@pytest.mark.parametrize(
    "text, message",
    [
        ("[grid]\nseed = 3\n", "must list at least one value"),
        ("seeds = []\n", "seeds must be"),
        ("[grids]\n", "unknown table"),
        ("[base\n", "cannot read sweep file"),
    ],
)
def test_a_malformed_sweep_file_is_rejected_with_its_problem(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_sweep(file)


def test_a_bad_key_in_a_sweep_stops_it_before_any_cell_runs(tmp_path):
    file, out = tmp_path / "bad.toml", tmp_path / "sweep"
    file.write_text(TINY.replace('"sparse.density" = [0.25, 0.5]', '"sparse.density" = [0.25, 1.5]'))
    completed = sweep(file, out)
    assert completed.returncode == 2 and "sparse.density" in completed.stderr
    assert not (out / "runs").exists()


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "simulations" / "configs").glob("*.toml")), ids=lambda path: path.name)
def test_every_named_config_is_valid(path, tmp_path):
    from fedsparse.cli import read_config_file
    from fedsparse.config import RunConfig
    from fedsparse.sweep import expand_grid

    if path.name.startswith("sweep-"):
        assert expand_grid(*read_sweep(path), tmp_path)
    else:
        RunConfig.from_flat(read_config_file(path))


@pytest.mark.parametrize("flag, shown", [("--progress", True), (None, False)])
def test_simulate_shows_a_round_bar_only_when_asked_off_a_terminal(tmp_path, flag, shown):
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", "--dataset", "synthetic", "--data.synthetic-users", "20",
               "--data.synthetic-items", "30", "--dim", "8", "--num-server-rounds", "2", "--fed.nmf-rounds", "1",
               "--results-dir", str(tmp_path), *([flag] if flag else [])]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert ("rounds synthetic" in completed.stderr) == shown
