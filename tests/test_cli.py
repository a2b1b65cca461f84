"""What a newcomer sees: help that explains every key, errors that name the fix, short readable output."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedsparse.cli import build_parser, main
from fedsparse.config import ConfigError, RunConfig, flat_defaults, key_help, section_help
from fedsparse.console import ROUND_LINE, SUMMARY_HEADER, byte_size, round_line, summary_table

ENUM_KEYS = {"data.split": "auto, provided, random, loo", "sparse.policy": "dense, static", "fed.downlink": "full, rows"}


def simulate_help() -> str:
    subcommands = next(action for action in build_parser()._actions if action.dest == "command")
    return subcommands.choices["simulate"].format_help()


def test_every_config_key_has_a_description_from_its_field_comment():
    helps = key_help()
    assert list(helps) == list(flat_defaults())
    undocumented = [key for key, about in helps.items() if not about.description]
    assert undocumented == [], "add a trailing comment to these fields in fedsparse/config.py"
    assert helps["sparse.density"].description.startswith("active share of each embedding table")
    # A comment continued on the next line belongs to the field above it.
    assert "timeout: the device answers only after straggler-seconds" in helps["faults.failure-mode"].description


def test_simulate_help_shows_each_key_with_its_description_allowed_values_and_default_by_section():
    text = " ".join(simulate_help().split())  # argparse wraps lines: compare with whitespace collapsed
    for key, about in key_help().items():
        assert f"--{key}" in text, key
        assert " ".join(about.description.split()[:4]) in text, key
    for key, values in ENUM_KEYS.items():
        assert f"Allowed: one of {values}" in text, key
    assert "round(density * rows * dim). Allowed: in (0, 1]. Default: 0.2." in text
    sections = [f"{section} keys: {' '.join(description.split())}" for section, description in section_help().items()]
    positions = [text.index(section) for section in sections]
    assert positions == sorted(positions)  # grouped, in the config's own order
    assert "default: " not in text.replace("(default: on a terminal)", "")  # no bare "default: X" lines left


def test_resume_is_one_flag_with_resume_dir():
    text = " ".join(simulate_help().split())
    assert "--resume-dir STR, --resume STR a run directory to continue from its checkpoint" in text
    args = build_parser().parse_args(["simulate", "--resume", "some/run"])
    assert getattr(args, "resume-dir") == "some/run"


def test_top_level_help_has_no_rest_markup():
    text = build_parser().format_help()
    assert "``" not in text and "The fedsparse command line" in text


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["simulate", "--num-server-round", "20"], "--num-server-round (did you mean --num-server-rounds?)"),
        (["simulate", "--sparse.densit", "0.5"], "--sparse.densit (did you mean --sparse.density?)"),
        (["train", "--epoch", "3"], "--epoch (did you mean --epochs?)"),
        (["simulate", "--engine", "flowr"], "invalid choice: 'flowr'"),
    ],
)
def test_abbreviations_are_refused_with_the_subcommands_usage_and_the_closest_flag(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: fedsparse {argv[0]} ")
    assert suggestion in err
    assert len(err.splitlines()) < 10  # the usage names the command's own flags, not every config key


def test_config_errors_print_the_usage_and_suggest_the_closest_key_or_dataset(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('"sparse.densty" = 0.1\n')
    assert main(["simulate", "--config", str(config), "--results-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fedsparse simulate ")
    assert "unknown config key(s): sparse.densty (did you mean sparse.density?)" in err
    assert main(["data", "info", "ml100k"]) == 2
    assert "data.dataset 'ml100k' is not registered (did you mean ml-100k?)" in capsys.readouterr().err
    assert main(["data", "info"]) == 2
    assert "name a dataset (`fedsparse data list`) or give your own file with --data.path" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"num-server-round \(did you mean num-server-rounds\?\)"):
        RunConfig.from_flat({"num-server-round": 3})


RECORD = {"round": 3, "clients": 94, "failed_clients": 1, "dropped_updates": 1, "recall@20": 0.12345, "ndcg@20": 0.05678,
          "upload_bytes_mean": 12345.0, "seconds": 4.21, **{f"extra_{i}": i for i in range(40)}}


def test_a_round_is_one_short_human_line():
    line = round_line(RECORD, 20)
    assert line == "round 3/20: 94 devices (2 failed or dropped), Recall@20 0.1235, NDCG@20 0.0568, upload 12.3 KB, 4.2 s"
    assert ROUND_LINE.match(line).groups() == ("3", "20")
    sampled = round_line({**RECORD, "failed_clients": 0, "dropped_updates": 0, "sampled_hr@10": 0.5}, 20)
    assert sampled == "round 3/20: 94 devices, Recall@20 0.1235, NDCG@20 0.0568, HR@10 0.5000, upload 12.3 KB, 4.2 s"
    unevaluated = {key: value for key, value in RECORD.items() if key not in ("recall@20", "ndcg@20")}
    assert "not evaluated" in round_line(unevaluated, 20)


def test_the_summary_is_a_short_table():
    summary = {"rounds": 3, "policy": "sparserec", "density": 0.2, "recall@20": 0.1, "ndcg@20": 0.05, "best_validation_round": 2,
               "best_test_recall@20": 0.11, "total_upload_bytes": 2_345_678, "total_download_bytes": 999, "seconds": 12.0,
               "wire_total_both_bytes_per_device_mean": 51_000, "wire_start_both_bytes_per_device_mean": 40_000,
               "wire_train_both_bytes_per_device_mean": 10_000, "wire_evaluate_both_bytes_per_device_mean": 1_000,
               **{f"validation_extra_{i}": i for i in range(40)}}
    lines = summary_table(summary, "/runs/x").splitlines()
    assert lines[0] == SUMMARY_HEADER and len(lines) <= 14
    shown = {line[:41].strip(): line[41:].strip() for line in lines[1:]}
    assert shown["upload payload, all devices, training"] == "2.35 MB"
    assert shown["download payload, all devices, training"] == "999 B"
    assert shown["per device, whole run, on the wire"] == "51 KB"
    assert shown["start / training / evaluation"] == "40 KB / 10 KB / 1 KB"
    assert lines[-1].split() == ["run", "directory", "/runs/x"]
    assert byte_size(12_300) == "12.3 KB"


def test_simulate_prints_round_lines_and_a_table_or_json(tmp_path):
    flags = ["--dataset", "synthetic", "--data.synthetic-users", "20", "--data.synthetic-items", "30", "--dim", "8",
             "--num-server-rounds", "2", "--fed.nmf-rounds", "1", "--results-dir", str(tmp_path)]
    command = [sys.executable, "-m", "fedsparse.cli", "simulate", *flags]
    root = Path(__file__).resolve().parents[1]
    human = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root)
    assert human.returncode == 0, human.stderr[-2000:]
    rounds = [line for line in human.stderr.splitlines() if ROUND_LINE.match(line)]
    assert [ROUND_LINE.match(line).group(1) for line in rounds] == ["1", "2"]
    assert all(len(line) < 120 for line in rounds)
    assert "dataset synthetic: 20 users, " in human.stderr and "NMF start round 1: " in human.stderr
    assert human.stdout.startswith(SUMMARY_HEADER) and "{" not in human.stdout
    scripted = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300, cwd=root)
    summary = json.loads(scripted.stdout)
    assert summary["rounds"] == 2 and Path(summary["run_dir"]).is_dir()
    # With the bar drawn, every log line starts a line of its own: the bar is cleared before it is written
    # (what follows the last carriage return is the line a terminal shows).
    barred = subprocess.run([*command, "--progress"], capture_output=True, text=True, timeout=300, cwd=root)
    shown = [line.rsplit("\r", 1)[-1] for line in barred.stderr.split("\n")]
    assert sum(1 for line in shown if ROUND_LINE.match(line)) == 2, barred.stderr
    assert "rounds synthetic" in barred.stderr


def test_result_and_downloaded_files_follow_the_umask(tmp_path):
    from fedsparse.data.download import atomic_write
    from fedsparse.run_files import atomic_write_text, write_json

    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
        atomic_write_text(tmp_path / "config.json", "{}")
        atomic_write(tmp_path / "u.data", lambda out: out.write(b"1\t2\t3\t4\n"))
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(previous)
    for name in ("summary.json", "config.json", "u.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "private.json", "summary.json", "u.data"]


def test_the_flower_launcher_passes_its_code_version_which_the_run_records(tmp_path):
    from fedsparse.experiments.flower_run import run_config_overrides
    from fedsparse.run_files import code_version, provenance

    here = code_version()
    if not here:
        pytest.skip("not a git checkout: there is no commit to pass")
    assert f'"code-version"="{here}"' in run_config_overrides(RunConfig())
    pinned = RunConfig.from_flat({"code-version": "abc123"})
    assert '"code-version"="abc123"' in run_config_overrides(pinned)  # an explicit value is passed as given
    assert provenance("abc123+modified")["code_version"] == "abc123" and provenance("abc123+modified")["code_modified"]
    assert provenance("abc123")["code_modified"] is False
    assert provenance()["code_version"] == here.removesuffix("+modified")


def test_flower_output_is_streamed_line_by_line_without_the_size_notice(tmp_path):
    from fedsparse.experiments.flower_run import OutputTail, _wait

    script = ("import sys; "
              "print('\\x1b[93mWARNING \\x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.');"
              "print('INFO :      Federation `@none/default` (943 simulated SuperNodes)'); "
              "print('round 1/3: 5 devices'); sys.exit(3)")
    seen: list[str] = []
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = OutputTail()
    tail.follow(process, seen.append)
    assert _wait(process, lambda: None, 60) and process.returncode == 3
    assert seen == ["INFO :      Federation `@none/default` (943 simulated SuperNodes)", "round 1/3: 5 devices"]
    assert "SuperNodes changed" in tail.text()  # the failure tail keeps everything
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert not _wait(sleeper, lambda: None, 0.5)  # stopped at the timeout
    assert sleeper.poll() is not None


def test_a_dense_run_records_the_density_it_trained_at(tmp_path):
    from fedsparse.federation.inprocess import run_inprocess

    config = RunConfig.from_flat({"data.dataset": "synthetic", "data.synthetic-users": 20, "data.synthetic-items": 30,
                                  "model.dim": 8, "num-server-rounds": 1, "sparse.policy": "dense", "sparse.density": 0.2,
                                  "results-dir": str(tmp_path)})
    run_dir, summary = run_inprocess(config)
    recorded = json.loads((run_dir / "config.json").read_text())["config"]
    assert recorded["sparse.density"] == summary["density"] == 1.0
    from fedsparse.central.train import train_centralised

    central = train_centralised(config.with_overrides({"train.epochs": 1}), show_progress=False)
    written = json.loads((central.run_dir / "config.json").read_text())["config"]
    assert written["sparse.density"] == central.summary["density"] == 1.0


def test_data_info_verify_and_simulate_take_a_users_own_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "reviews.tsv"
    path.write_text("".join(f"A{u}\tB{(u * 3 + k) % 20:03d}\n" for u in range(15) for k in range(6)))
    own = ["--data.path", str(path), "--data.header", "false", "--data.separator", "tab",
           "--data.user-column", "0", "--data.item-column", "1"]
    assert main(["data", "info", *own, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["name"], counts["users"], counts["interactions"]) == ("reviews", 15, 90)
    assert main(["data", "verify", *own]) == 0
    assert "read cleanly; 15 users" in capsys.readouterr().out
    flags = ["--dim", "8", "--num-server-rounds", "1", "--fed.nmf-rounds", "1", "--results-dir", str(tmp_path / "out")]
    assert main(["simulate", *own, *flags, "--json"]) == 0
    run_dir = Path(json.loads(capsys.readouterr().out)["run_dir"])
    assert "-fed-reviews-" in run_dir.name
    from fedsparse.experiments.flower_run import run_config_overrides

    monkeypatch.chdir(tmp_path)  # under flwr run the app runs from a copy: a relative path is made absolute
    relative = RunConfig.from_flat({"data.path": "reviews.tsv"})
    assert f'"data.path"="{path}"' in run_config_overrides(relative)


def test_allowed_values_come_from_the_validator_even_for_checks_naming_two_keys():
    helps = key_help()
    assert helps["fed.server-beta2"].accepted == "must be in [0, 1)"
    assert helps["sparse.ciess-noise"].accepted == "must be >= 0"
    assert helps["budget.device-shares"].accepted == "must be comma-separated numbers"
    assert helps["seed"].accepted == ""  # no check: any integer
