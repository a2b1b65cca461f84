"""Sweeps run every cell once (a rerun recomputes nothing) and reports write a table and real PNGs."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedsparse.config import ConfigError
from fedsparse.experiments.sweep import expand_grid, read_sweep, run_sweep

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


def sweep(file: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedsparse.cli", "sweep", str(file), "--out", str(out), "--jobs", "2", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


def test_a_sweep_runs_each_cell_once_resumes_without_recomputing_and_reports(tmp_path):
    file, out = tmp_path / "tiny.toml", tmp_path / "sweep"
    file.write_text(TINY)
    first = sweep(file, out, "--progress")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "sweep tiny" in first.stderr and "4/4" in first.stderr  # the cell bar, asked for off a terminal
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 4 and set(table["sparse.policy"]) == {"sparserec", "set"}
    assert set(table["engine"]) == {"inprocess"}
    assert not list(out.glob("*.lock"))  # the table's lock leaves no file behind
    runs = sorted(path.name for path in (out / "runs").iterdir())
    assert len(runs) == 4

    second = sweep(file, out)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "sweep tiny" not in second.stderr  # quiet off a terminal by default
    assert sorted(path.name for path in (out / "runs").iterdir()) == runs  # no cell ran again
    assert pd.read_csv(out / "sweep.csv")["run_dir"].tolist() == table["run_dir"].tolist()

    file.write_text(TINY.replace("[0.25, 0.5]", "[0.25, 0.5, 0.75]"))  # a grown grid only adds cells
    third = sweep(file, out)
    assert third.returncode == 0, third.stderr[-2000:]
    assert len(list((out / "runs").iterdir())) == 6

    report = (out / "report.md").read_text()
    assert report.count("fed-synthetic") == 6  # one row per run
    for name in ("recall_vs_rounds.png", "recall_vs_upload.png", "recall_vs_density.png"):
        image = (out / name).read_bytes()
        assert image.startswith(PNG_SIGNATURE) and len(image) > 10_000, name
        assert f"wrote {out / name}" in third.stdout
    assert "skipped privacy_frontier.png: run directories record no attack metric" in third.stdout
    assert not (out / "privacy_frontier.png").exists()


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
        ("[grids]\n", "unknown key"),
        ("[base\n", "cannot read sweep file"),
        ('engine = "ray"\n', "engine must be one of inprocess, flower"),
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


def test_the_engine_key_picks_flower_for_every_cell_and_keeps_inprocess_ids_unchanged(tmp_path):
    inprocess, flower = tmp_path / "inprocess.toml", tmp_path / "flower.toml"
    inprocess.write_text(TINY)
    flower.write_text('engine = "flower"\n' + TINY)
    assert read_sweep(inprocess).engine == "inprocess" and read_sweep(flower).engine == "flower"
    plain = expand_grid(read_sweep(inprocess), tmp_path)
    on_flower = expand_grid(read_sweep(flower), tmp_path)
    assert plain[0].cell == "sparse.density=0.25,sparse.policy=sparserec,seed=0"  # ids of existing sweep.csv files
    assert [cell.cell for cell in on_flower] == [f"{cell.cell},engine=flower" for cell in plain]
    assert {cell.engine for cell in on_flower} == {"flower"}


def test_a_flower_sweep_refuses_parallel_cells_and_settings_flower_cannot_run(tmp_path):
    file = tmp_path / "flower.toml"
    file.write_text('engine = "flower"\n' + TINY)
    with pytest.raises(ConfigError, match="one cell at a time"):
        run_sweep(file, tmp_path / "sweep", jobs=2)
    file.write_text('engine = "flower"\n' + TINY + '"fed.clients-per-node" = [2]\n"privacy.secure-aggregation" = [true]\n')
    with pytest.raises(ConfigError, match="clients-per-node = 1"):
        expand_grid(read_sweep(file), tmp_path)
    assert not (tmp_path / "sweep").exists()  # refused before any cell or table


@pytest.mark.parametrize("flag, shown", [("--progress", True), (None, False)])
def test_simulate_shows_a_round_bar_only_when_asked_off_a_terminal(tmp_path, flag, shown):
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", "--dataset", "synthetic", "--data.synthetic-users", "20",
               "--data.synthetic-items", "30", "--dim", "8", "--num-server-rounds", "2", "--fed.nmf-rounds", "1",
               "--results-dir", str(tmp_path), *([flag] if flag else [])]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert ("rounds synthetic" in completed.stderr) == shown
