"""``fedsparse report``: the density plot draws one line per policy from the runs' own files, and the
privacy frontier reads the privacy study's tables (run directories record no attack metric)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsparse.cli import main
from fedsparse.experiments.report import (
    NO_LEAKAGE_AUC,
    collect_runs,
    density_lines,
    find_run_dirs,
    frontier_points,
    labels,
    read_privacy_tables,
    write_report,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PRIVACY_TABLES = sorted((REPO_ROOT / "simulations" / "results").glob("privacy-*.csv"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 10_000  # a drawn plot with axes, labels and markers; an empty canvas is far smaller


def fake_run(root: Path, policy: str, density: float, seed: int, best: float, final: float | None = None) -> Path:
    """A finished run directory with the files ``fedsparse report`` reads (3 rounds, evaluated at 2 and 3)."""
    run_dir = root / f"fed-synthetic-{policy}-{density}-{seed}"
    run_dir.mkdir(parents=True)
    config = {"data.dataset": "synthetic", "sparse.policy": policy, "sparse.density": density, "seed": seed,
              "results-dir": str(root)}
    (run_dir / "config.json").write_text(json.dumps({"config": config}))
    rounds = [{"round": r, "upload_bytes_mean": 100.0 * density, "recall@20": None if r == 1 else best} for r in (1, 2, 3)]
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(record) + "\n" for record in rounds))
    summary = {"policy": policy, "density": density, "rounds": 3, "recall@20": best if final is None else final,
               "best_test_recall@20": best, "best_validation_round": 2}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def assert_png(path: Path) -> None:
    image = path.read_bytes()
    assert image.startswith(PNG_SIGNATURE) and len(image) > MIN_PNG_BYTES, path


def test_density_lines_average_seeds_per_policy_and_use_the_best_validation_round(tmp_path):
    for policy, offset in (("sparserec", 0.1), ("set", 0.0)):
        for density in (0.1, 0.5):
            for seed, noise in ((0, -0.01), (1, 0.01)):
                fake_run(tmp_path, policy, density, seed, best=offset + density / 10 + noise, final=0.0)
    table, _, varying = collect_runs(find_run_dirs([tmp_path]))
    lines = density_lines(table, varying)
    assert sorted(lines) == ["set", "sparserec"]  # seeds and paths do not split a line
    sparserec = lines["sparserec"]
    assert sparserec.index.tolist() == [0.1, 0.5]
    np.testing.assert_allclose(sparserec["mean"], [0.11, 0.15])  # the best-validation value, not the final 0.0
    np.testing.assert_allclose(sparserec["max"] - sparserec["min"], [0.02, 0.02])


def test_another_varying_key_splits_the_lines(tmp_path):
    for dataset in ("a", "b"):
        for density in (0.2, 0.4):
            run_dir = fake_run(tmp_path / dataset, "sparserec", density, 0, best=density)
            config = json.loads((run_dir / "config.json").read_text())
            config["config"]["data.dataset"] = dataset
            (run_dir / "config.json").write_text(json.dumps(config))
    table, _, varying = collect_runs(find_run_dirs([tmp_path]))
    assert sorted(density_lines(table, varying)) == ["sparserec, data.dataset=a", "sparserec, data.dataset=b"]


def test_the_report_draws_the_density_plot_only_when_densities_differ(tmp_path):
    for density in (0.1, 0.5):
        fake_run(tmp_path / "runs", "sparserec", density, 0, best=density)
    report = write_report(find_run_dirs([tmp_path / "runs"]), tmp_path / "differ")
    assert_png(tmp_path / "differ" / "recall_vs_density.png")
    assert tmp_path / "differ" / "recall_vs_density.png" in report.figures

    same = find_run_dirs([tmp_path / "runs"])[:1]
    report = write_report(same, tmp_path / "same")
    assert not (tmp_path / "same" / "recall_vs_density.png").exists()
    assert report.skipped["recall_vs_density.png"] == "every run trained at the same density"
    assert "attack metric" in report.skipped["privacy_frontier.png"]


@pytest.mark.skipif(not PRIVACY_TABLES, reason="no committed privacy-study table")
def test_the_frontier_reads_the_committed_privacy_tables(tmp_path):
    frame = read_privacy_tables(PRIVACY_TABLES)
    points = frontier_points(frame)
    secure = frame["defence"].str.startswith("secagg")
    assert secure.any() and (~secure).any()
    # Every cell, secure ones included (their sums are attacked), at its strongest matched AUC on all the server saw.
    assert points["attacked"].all()
    matched = frame[[f"{attack}_auc_matched" for attack in ("row-id", "value", "imia", "differencing", "start")]]
    np.testing.assert_allclose(points["auc"], matched.max(axis=1))
    np.testing.assert_allclose(points["utility"], frame["recall_vs_undefended"])
    undefended = points[frame["defence"] == "none"]
    assert (undefended["utility"] == 1.0).all()

    report = write_report([], tmp_path / "out", PRIVACY_TABLES)
    assert report.figures == [tmp_path / "out" / "privacy_frontier.png"] and not report.skipped
    assert_png(tmp_path / "out" / "privacy_frontier.png")


@pytest.mark.skipif(not PRIVACY_TABLES, reason="no committed privacy-study table")
def test_a_table_from_before_the_matched_auc_draws_the_uploaded_rows_auc():
    tables = read_privacy_tables(PRIVACY_TABLES)
    frame = tables.drop(columns=[column for column in tables.columns if "_auc_matched" in column])
    points = frontier_points(frame)
    attacks = [column for column in frame.columns if column.endswith("_auc_uploaded")]
    secure = frame["defence"].str.startswith("secagg")
    # Secure aggregation leaves no per-device upload: drawn hollow at 0.5, never as a measured AUC.
    assert not points.loc[secure, "attacked"].any() and (points.loc[secure, "auc"] == NO_LEAKAGE_AUC).all()
    np.testing.assert_allclose(points.loc[~secure, "auc"], frame.loc[~secure, attacks].max(axis=1))
    assert points.loc[frame["defence"] == "none", "attacked"].all()


def test_a_table_without_attack_metrics_is_refused_with_its_name(tmp_path):
    table = tmp_path / "not-privacy.csv"
    pd.DataFrame({"recall@20": [0.1], "defence": ["none"]}).to_csv(table, index=False)
    with pytest.raises(ValueError, match="not-privacy.csv is not a privacy-study table"):
        read_privacy_tables([table])


def test_the_command_reports_what_it_drew_and_skipped(tmp_path, capsys):
    runs = tmp_path / "runs"
    for density in (0.1, 0.5):
        fake_run(runs, "sparserec", density, 0, best=density)
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'out' / 'recall_vs_density.png'}" in printed
    assert "skipped privacy_frontier.png: run directories record no attack metric" in printed
    assert pd.read_csv(tmp_path / "out" / "report.csv")["sparse.density"].tolist() == [0.1, 0.5]

    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "nothing")]) == 2
    assert "no finished run directory" in capsys.readouterr().err


def test_the_report_shows_engine_and_dataset_and_short_distinct_legends(tmp_path):
    first = fake_run(tmp_path / "a", "sparserec", 0.2, 0, best=0.1)
    twin = fake_run(tmp_path / "b", "sparserec", 0.2, 0, best=0.1)  # an equal run from another results dir
    other = fake_run(tmp_path / "c", "set", 0.2, 0, best=0.05)
    recorded = json.loads((twin / "config.json").read_text())
    (twin / "config.json").write_text(json.dumps({**recorded, "engine": "flower"}))
    table, _, varying = collect_runs([first, twin, other])
    assert table["engine"].tolist() == ["inprocess", "flower", "inprocess"]  # recorded, else from the dir name
    assert set(table["dataset"]) == {"synthetic"}
    assert labels(table, varying) == ["engine=inprocess, policy=sparserec", "engine=flower, policy=sparserec",
                                      "engine=inprocess, policy=set"]  # no results-dir=..., no section prefixes
    same = table.assign(engine="inprocess")
    assert labels(same, varying) == ["policy=sparserec", "policy=sparserec #2", "policy=set"]
    write_report([first, twin, other], tmp_path / "report")
    header = (tmp_path / "report" / "report.md").read_text().splitlines()[2]
    assert [cell.strip() for cell in header.strip("|").split("|")][:4] == ["run", "engine", "dataset", "sparse.policy"]
