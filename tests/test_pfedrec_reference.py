"""benchmarks/pfedrec_reference.py reads PFedRec's per-round scores and picks the best-validation round as its code does."""


import pytest
from benchmark_scripts import load_benchmark_script

LOG = """26-11-29 19:18-INFO-Round 0 starts !
26-11-29 19:18-INFO-[Testing Epoch 0] HR = 0.1092, NDCG = 0.0476
26-11-29 19:18-INFO-[Evluating Epoch 0] HR = 0.1071, NDCG = 0.0476
26-11-29 19:19-INFO-[Testing Epoch 1] HR = 0.5000, NDCG = 0.2000
26-11-29 19:19-INFO-[Evluating Epoch 1] HR = 0.6000, NDCG = 0.3000
26-11-29 19:21-INFO-[Testing Epoch 2] HR = 0.4000, NDCG = 0.2500
26-11-29 19:21-INFO-[Evluating Epoch 2] HR = 0.6000, NDCG = 0.3100
26-11-29 19:22-INFO-[Testing Epoch 3] HR = 0.9000, NDCG = 0.5000
"""


def test_a_log_of_a_stopped_run_is_read_up_to_its_last_complete_round(tmp_path):
    module = load_benchmark_script("pfedrec_reference")
    path = tmp_path / "run.txt"
    path.write_text(LOG)
    curve = module.read_pfedrec_log(path, seed=7)
    assert curve["round"].tolist() == [1, 2, 3]  # round 4 has no validation score: the run stopped inside it
    assert curve["test_hr@10"].tolist() == [0.1092, 0.5, 0.4] and set(curve["seed"]) == {7}
    assert curve["elapsed_seconds"].tolist() == [0.0, 60.0, 180.0]  # from the minute stamps
    curve["participation"] = 0.1
    best = module.best_validation_rows(curve, [2, 3, 5])
    assert best["rounds"].tolist() == [2, 3]  # a cap beyond the run is not read
    assert best["best_round"].tolist() == [2, 3]  # a validation tie goes to the later round (PFedRec's >=)
    assert best["test_hr@10"].tolist() == [0.5, 0.4]
    path.write_text("26-11-29 19:18-INFO-Round 0 starts !\n")
    with pytest.raises(SystemExit, match="no round with both"):
        module.read_pfedrec_log(path, seed=0)
