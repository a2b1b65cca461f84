"""Bytes of Flower's SecAgg+ against the undefended upload, both under `flwr run`, and the in-process secure sum.

For one dataset and a secure-aggregation setting (``simulations/configs/secure-rows.toml``: secure rows at 5 %,
or ``--config``), four runs of ``--rounds`` rounds with the same seed: Flower without secure aggregation (every
row, as an undefended run trains), Flower with SecAgg+ (every stage of its protocol counted on the wire,
``server/secagg.py``), and the in-process engine without and with secure aggregation (it sums the same
vectors exactly, without SecAgg+'s other stages). Per client-round: the payload upload (arrays and
config values) and the wire upload and download (serialised messages, every SecAgg+ stage included), each
against the undefended Flower run (or, where ``--cases`` left it out, the undefended in-process run) of the
same dataset, config and rounds; the SecAgg+ upload per stage; the last round's Recall@20.

    FEDSPARSE_DATA=../shared/data python benchmarks/secagg_bytes.py --dataset ml-100k
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_result_flags, require_data  # noqa: E402
from engines import run_case  # noqa: E402

from fedsparse.experiments.tables import ResultTable, machine_description, write_markdown_table  # noqa: E402
from fedsparse.federation.secagg_vectors import SECAGG_STAGES  # noqa: E402
from fedsparse.run_files import read_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "simulations" / "configs" / "secure-rows.toml"
CASES = [  # (case, engine, secure aggregation)
    ("undefended", "flower", False),
    ("SecAgg+", "flower", True),
    ("undefended in process", "inprocess", False),
    ("secure sum in process", "inprocess", True),
]
# The undefended runs: no secure aggregation and the default mask exploration, whatever the secure config sets.
UNDEFENDED = ["--privacy.secure-aggregation", "false", "--privacy.secure-row-fraction", "1.0", "--privacy.secure-row-bias", "0",
              "--sparse.drop-fraction", "-1"]
REFERENCE_CASES = ("undefended", "undefended in process")  # what the ratios divide by, in order of preference
STAGE_COLUMNS = {stage: f"wire_up_{stage.replace('-', '_')}_mean" for stage in SECAGG_STAGES}  # SecAgg+ rounds only
COLUMNS = ["dataset", "config", "case", "engine", "rounds", "devices_per_round", "reference", "upload_bytes_mean",
           "wire_upload_bytes_mean",
           "wire_download_bytes_mean", "upload_vs_undefended", "wire_upload_vs_undefended", "wire_download_vs_undefended",
           *STAGE_COLUMNS.values(), "wire_start_bytes_per_device_mean", "recall@20", "seconds_per_round"]


def stage_uploads(run_dir: Path) -> dict:
    """Mean wire upload per device of each SecAgg+ stage over the run's training rounds (empty without SecAgg+)."""
    path = run_dir / "secagg_stages.jsonl"
    rounds = [record["stages"] for record in read_jsonl(path) if record["phase"] == "train"] if path.exists() else []
    return {column: sum(stages[stage]["up"] for stages in rounds) / len(rounds)
            for stage, column in STAGE_COLUMNS.items() if rounds and all(stage in stages for stages in rounds)}


def case_row(run_dir: Path) -> dict:
    """Per client-round means over the run's rounds (payload and wire, SecAgg+'s stages apart), its devices per
    round and seconds, and the NMF start's wire bytes per device."""
    rounds = pd.DataFrame(read_jsonl(run_dir / "rounds.jsonl"))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"rounds": len(rounds), "devices_per_round": rounds["clients"].mean(), **stage_uploads(run_dir),
            "wire_start_bytes_per_device_mean": summary.get("wire_start_both_bytes_per_device_mean", float("nan")),
            "upload_bytes_mean": rounds["upload_bytes_mean"].mean(),
            "wire_upload_bytes_mean": rounds["wire_upload_bytes_mean"].mean(),
            "wire_download_bytes_mean": rounds["wire_download_bytes_mean"].mean(),
            "recall@20": rounds["recall@20"].dropna().iloc[-1] if "recall@20" in rounds else float("nan"),
            "seconds_per_round": rounds["seconds"].mean(), "run_dir": str(run_dir)}


def with_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row's bytes against the undefended run of its dataset, config and rounds (``reference``): the Flower
    one, or the in-process one where no undefended Flower run was made (its wire count is Flower's serialiser's)."""
    frame = frame.copy()
    keys = ["dataset", "config", "rounds"]
    found = {}  # (dataset, config, rounds) -> (case, its row), the first reference case present
    for case in reversed(REFERENCE_CASES):
        found.update({key: (case, row) for key, row in frame[frame["case"] == case].set_index(keys).iterrows()})
    references = [found.get(key, ("", None)) for key in frame[keys].itertuples(index=False, name=None)]
    frame["reference"] = [case for case, _ in references]
    for column in ("upload_bytes_mean", "wire_upload_bytes_mean", "wire_download_bytes_mean"):
        reference = pd.Series([row[column] if row is not None else float("nan") for _, row in references], index=frame.index)
        frame[column.replace("_bytes_mean", "_vs_undefended")] = frame[column] / reference
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the secure setting (a named config)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="devices evaluated at the last round")
    parser.add_argument("--cases", default=",".join(case for case, _, _ in CASES),
                        help="comma list of the cases to run (to shard an invocation; ratios need the undefended one)")
    add_result_flags(parser, HERE / "results")
    args = parser.parse_args()
    table = ResultTable(args.out / "secagg_bytes.csv")
    started = time.perf_counter()
    if not args.report_only:
        chosen = args.cases.split(",")
        unknown = sorted(set(chosen) - {case for case, _, _ in CASES})
        if unknown:
            parser.error(f"unknown --cases {', '.join(unknown)}; choose from {', '.join(case for case, _, _ in CASES)}")
        require_data(parser)
        for case, engine, secure in [entry for entry in CASES if entry[0] in chosen]:
            cell = f"{args.dataset}/{args.config.name}/{case}/r{args.rounds}"
            if table.has(cell):
                continue
            flags = ["--config", str(args.config.resolve()), "--dataset", args.dataset, "--num-server-rounds", str(args.rounds),
                     "--fed.eval-fraction", str(args.eval_fraction), "--fed.clients-per-node", "1",
                     *([] if secure else UNDEFENDED)]
            run_dir, _, _ = run_case(engine, flags, args.out / "runs")
            row = case_row(run_dir)
            table.add(cell, {"dataset": args.dataset, "config": args.config.name, "case": case, "engine": engine, **row})
            print(f"{cell}: upload {row['upload_bytes_mean']:.0f} B payload, {row['wire_upload_bytes_mean']:.0f} B wire",
                  flush=True)
    frame = with_ratios(table.frame())
    command = ("" if args.report_only else f"`python benchmarks/secagg_bytes.py --dataset {args.dataset} "
               f"--config {args.config.name} --rounds {args.rounds} --eval-fraction {args.eval_fraction} "
               f"--cases '{args.cases}'` ")
    header = (f"Measured by {command or 'earlier invocations (this table rewritten with --report-only) '}on "
              f"{machine_description()}, {time.perf_counter() - started:.0f} s. Per client-round, means over the run's "
              "rounds: the payload upload (arrays and config values) and the wire bytes (serialised messages, every SecAgg+ "
              "stage included) each device sent and received; ratios against the undefended run of the same "
              "dataset, config and rounds (`reference`: under Flower, or in process where no undefended Flower run was "
              "made, whose wire count is what Flower's serialiser gives); `wire_up_<stage>_mean`: the SecAgg+ upload "
              "split by the protocol's stages "
              "(the masked vectors travel in collect_masked_vectors); `recall@20`: the last round's, over the evaluated "
              "devices (`--eval-fraction`); `wire_start_bytes_per_device_mean`: the NMF start's wire bytes, down and up, "
              "per device averaged over all devices (summary.json; under Flower every SecAgg+ stage of the start's "
              "rounds). The in-process secure sum counts the vectors "
              "SecAgg+ masks, as float32 (4 bytes an entry, as the masked vectors travel under a round modulus of "
              "2**32), without the protocol's other stages.\n\n")
    write_markdown_table(args.out / "secagg_bytes.md", header, frame.reindex(columns=COLUMNS))


if __name__ == "__main__":
    main()
