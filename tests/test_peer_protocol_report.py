"""benchmarks/peer_protocol.py's comparison at the reference length: a run shorter than the length is left out
(its best round was picked among fewer rounds), and seeds of one method and candidate file are summarised."""

import pandas as pd
import pytest
from benchmark_scripts import load_benchmark_script


def curve(cell: str, validation: list[float], test: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"cell": cell, "round": range(1, len(validation) + 1),
                         "validation_sampled_hr@10": validation, "sampled_hr@10": test})


def test_runs_shorter_than_the_length_are_left_out_and_seeds_summarised():
    peer = load_benchmark_script("peer_protocol")
    frame = pd.DataFrame({
        "cell": ["a", "b", "c"], "dataset": "ml-100k", "method": "PFedRec", "candidates": "file.csv",
        "eval_every": 1, "participation": 1.0, "rounds": [4, 3, 2], "seed": [0, 1, 2],
    })
    curves = pd.concat([curve("a", [0.1, 0.5, 0.5, 0.9], [0.2, 0.6, 0.7, 0.8]),
                        curve("b", [0.3, 0.2, 0.1], [0.5, 0.1, 0.1]),
                        curve("c", [0.9, 0.1], [0.9, 0.1])])
    code = pd.DataFrame({"seed": [0, 1], "participation": 1.0, "rounds": 3, "test_hr@10": [0.6, 0.7], "dataset": "ml-100k"})
    rows = peer.within_rounds(frame, curves, 3, code)
    assert rows["seed"].tolist() == [0, 1]  # seed 2 ran 2 rounds: not within 3
    assert rows["best_round"].tolist() == [3, 1]  # ties go to the later round
    assert rows["sampled_hr@10"].tolist() == [0.7, 0.5]
    summary = peer.within_rounds_across_seeds(rows)
    assert summary["seeds"].tolist() == ["0 1"]
    assert summary["sampled_hr@10_mean"].iloc[0] == pytest.approx(0.6)
    assert summary["vs_pfedrec_code"].iloc[0] == pytest.approx(0.6 - 0.65)
    assert summary["vs_pfedrec_reference"].iloc[0] == pytest.approx(0.6 - peer.PFEDREC_PUBLISHED_HR10)
    assert peer.within_rounds_across_seeds(rows[rows["seed"] == 0]).empty  # one seed: nothing to summarise
