"""benchmarks/sparse_grid.py's report: rows without a recorded negative rule read as old, ratios stay within one
dataset and rule, and a report-only rewrite keeps the measured invocation of the header."""

import argparse

import pandas as pd
from benchmark_scripts import load_benchmark_script


def grid_row(dataset: str, policy: str, recall: float, rule: str | None) -> dict:
    """One CSV row of the grid; ``rule`` None for a row made before the rule was recorded."""
    row = {"cell": f"{dataset}/{policy}", "dataset": dataset, "variant": policy, "policy": policy, "density": 0.2,
           "recall@20": recall, "seconds_per_epoch": 2.0, "peak_grad_bytes": 100, "stored_model_bytes": 50}
    return row | ({"negatives_from": rule, "code_version": "abc1234"} if rule else {})


def test_old_rows_are_marked_and_ratios_stay_within_their_rule(tmp_path):
    grid = load_benchmark_script("sparse_grid")
    pd.DataFrame([grid_row("yelp2018", "dense", 0.04, None), grid_row("yelp2018", "sparserec", 0.05, None),
                  grid_row("gowalla", "dense", 0.10, "non-train"), grid_row("gowalla", "sparserec", 0.11, "non-train")]
                 ).to_csv(tmp_path / "sparse_grid.csv", index=False)
    (tmp_path / "sparse_grid.md").write_text("Last invocation: `python benchmarks/sparse_grid.py` on a box, 42 s.\n\n|x|\n")
    grid.write_report(argparse.Namespace(out=tmp_path, name="sparse_grid"), "", 0.0)
    text = (tmp_path / "sparse_grid.md").read_text()
    assert text.startswith("Rows whose `rules` read `old`")
    assert "Last invocation: `python benchmarks/sparse_grid.py` on a box, 42 s." in text
    frame = grid.with_ratios(pd.read_csv(tmp_path / "sparse_grid.csv")).set_index("cell")
    assert frame.loc["yelp2018/sparserec", "rules"] == "old" and frame.loc["gowalla/sparserec", "rules"] == "current"
    assert abs(frame.loc["yelp2018/sparserec", "recall_vs_dense"] - 1.25) < 1e-12
    assert abs(frame.loc["gowalla/sparserec", "recall_vs_dense"] - 1.1) < 1e-12


def test_a_grid_of_current_rows_carries_no_old_rules_note(tmp_path):
    grid = load_benchmark_script("sparse_grid")
    pd.DataFrame([grid_row("gowalla", "dense", 0.10, "non-train")]).to_csv(tmp_path / "g.csv", index=False)
    grid.write_report(argparse.Namespace(out=tmp_path, name="g"), "`python benchmarks/sparse_grid.py`", 7.0)
    text = (tmp_path / "g.md").read_text()
    assert "old" not in text.split("\n\n")[0] and "`python benchmarks/sparse_grid.py` on " in text and ", 7 s" in text


def test_a_grid_shards_by_policy_with_the_dense_cell_first():
    grid = load_benchmark_script("sparse_grid")
    planned = grid.cells(["main"], [0.05, 0.5], ["sparserec", "magnitude"])
    assert [(variant, density) for variant, _, density, _ in planned] == [
        ("dense", 1.0), ("sparserec", 0.05), ("magnitude", 0.05), ("sparserec", 0.5), ("magnitude", 0.5)]
    assert len(grid.cells(["main"], [0.2], grid.POLICIES)) == 1 + len(grid.POLICIES)
