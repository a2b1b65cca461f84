"""The hostile probes of issue 18, run against this checkout: each probe's command and what it does now.

Probes reachable from the command line run as ``python -m fedsparse.cli ...`` on damaged copies of a
small finished run in a temporary folder (its path is shown as ``$W``); the others run the named test of
``tests/test_hardening.py`` (or ``tests/test_hostile_updates.py``), which drives the same probe in
process, and report whether it passed. The table replaces the part of ``docs/guides/robustness.md``
between the two ``probes`` markers.

    python simulations/robustness_probes.py            # about 4 minutes on 2 cores (one real `flwr run`)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ERROR_LINE = re.compile(r"fedsparse( [a-z]+)*: error:")  # the CLI's error line, with or without its subcommand
REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "guides" / "robustness.md"
START, END = "<!-- probes:start -->", "<!-- probes:end -->"
COMMAND_SECONDS = 600  # a probe that takes longer is reported as hung
MESSAGE_CHARS = 240  # of a probe's last output line, in the table
SMALL_RUN = ["--dataset", "synthetic", "--data.synthetic-users", "30", "--data.synthetic-items", "40",
             "--data.synthetic-interactions-per-user", "8", "--model.dim", "8", "--sparse.density", "0.25",
             "--fed.fraction-train", "0.5", "--fed.nmf-rounds", "2"]


@dataclass(frozen=True)
class Probe:
    """One probe: its issue item, what it does, the damage done first (on a copy of the finished run in
    ``$W/run``), and the command (CLI arguments, or ``pytest`` and a test id)."""

    item: str
    probe: str
    command: list[str]
    damage: Callable[[Path], None] | None = None
    shown: str = ""  # the command as the table shows it, when not the command itself
    outcome: Callable[[Path, str], str] | None = None  # (workspace, the command's output) -> what it did, for exit 0


def shown_command(probe: Probe, workspace: Path) -> str:
    """``fedsparse ...`` or ``pytest TEST`` as a reader would type it, the workspace shown as $W."""
    if probe.shown:
        text = probe.shown
    elif probe.command[2] == "pytest":
        text = "pytest " + probe.command[-1]
    else:
        text = " ".join(["fedsparse", *probe.command[3:]])
    return text.replace(" ".join(SMALL_RUN), "$SMALL").replace(str(workspace), "$W")


def run(command: list[str], workspace: Path, env: dict[str, str] | None = None) -> tuple[int, str, float, str]:
    """(exit code, its error or warning line, else the last line of its output, with the workspace shown as
    $W; seconds; the whole output)."""
    started = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_SECONDS, cwd=REPO, env=environment)
    except subprocess.TimeoutExpired:
        return -1, f"did not finish within {COMMAND_SECONDS} s", time.perf_counter() - started, ""
    output = done.stderr + done.stdout
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    errors = [line for line in lines if ERROR_LINE.match(line) or line.startswith("warning:")]
    last = (errors or lines or [""])[-1].replace(str(workspace), "$W")
    return done.returncode, last[:MESSAGE_CHARS], time.perf_counter() - started, output


def resumed(workspace: Path, output: str) -> str:
    """What a resume left in $W/run: its rounds, the summary's label and any warning it printed."""
    rounds = [json.loads(line)["round"] for line in (workspace / "run" / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((workspace / "run" / "summary.json").read_text())
    warned = [line.split(": ", 1)[-1] for line in output.splitlines() if "torn" in line]
    return f"rounds.jsonl holds rounds {rounds}; summary.json says rounds = {summary['rounds']}" + (
        f"; printed: {warned[0]}" if warned else "")


def abbreviation(workspace: Path, output: str) -> str:
    """Whether the abbreviated flag was taken for --num-server-rounds."""
    summary = json.loads(next((workspace / "out10").glob("*/summary.json")).read_text())
    return f"accepted as --num-server-rounds (summary.json: rounds = {summary['rounds']}); item 10 belongs to another branch"


def rewrite_checkpoint(path: Path, change: Callable[[dict], None]) -> None:
    """Load every array of a checkpoint, let ``change`` edit them, save it back (a hostile edit)."""
    with np.load(path, allow_pickle=True) as stored:
        arrays = {key: stored[key] for key in stored.files}
    change(arrays)
    np.savez(path, **arrays)


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = text
    path.write_text("".join(lines))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedsparse.cli", *args]


def test(test_id: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id]


def probes(workspace: Path) -> list[Probe]:
    """Every probe of issue 18 (item 10 is shown as it behaves on this branch)."""
    run_dir = str(workspace / "run")
    resume = ["simulate", *SMALL_RUN, "--resume", run_dir]
    hardening = "tests/test_hardening.py::"
    return [
        Probe("1", "line 2 of rounds.jsonl replaced by garbage, then resume", cli(*resume, "--num-server-rounds", "5"),
              lambda d: replace_line(d / "rounds.jsonl", 2, "garbage\n")),
        Probe("1", "torn last line (a crash mid-append), then resume", cli(*resume, "--num-server-rounds", "4"), _tear,
              outcome=resumed),
        Probe("2", "two resumes of one run directory at once",
              test(hardening + "test_a_second_writer_of_a_run_directory_is_refused_and_a_stale_lock_is_taken_over")),
        Probe("3", "resume of a round-3 checkpoint with num-server-rounds 2", cli(*resume, "--num-server-rounds", "2")),
        Probe("3", "resume without --num-server-rounds (run killed after round 3 of 5)", cli(*resume),
              lambda d: _target(d, 5), outcome=resumed),
        Probe("4", "checkpoint with the device states removed", cli(*resume, "--num-server-rounds", "4"),
              lambda d: rewrite_checkpoint(d / "checkpoint.npz",
                                           lambda a: [a.pop(k) for k in list(a) if k.startswith("transport.")])),
        Probe("6", "checkpoint truncated", cli(*resume, "--num-server-rounds", "4"),
              lambda d: (d / "checkpoint.npz").write_bytes((d / "checkpoint.npz").read_bytes()[:2000])),
        Probe("6", "checkpoint empty", cli(*resume, "--num-server-rounds", "4"),
              lambda d: (d / "checkpoint.npz").write_bytes(b"")),
        Probe("6", "checkpoint of random bytes", cli(*resume, "--num-server-rounds", "4"),
              lambda d: (d / "checkpoint.npz").write_bytes(np.random.default_rng(0).bytes(4096))),
        Probe("6", "checkpoint with a bad CRC", cli(*resume, "--num-server-rounds", "4"), _flip_byte),
        Probe("6", "checkpoint missing the item table", cli(*resume, "--num-server-rounds", "4"),
              lambda d: rewrite_checkpoint(d / "checkpoint.npz", lambda a: a.pop("server.item-weight"))),
        Probe("6", "checkpoint with bad JSON inside", cli(*resume, "--num-server-rounds", "4"),
              lambda d: rewrite_checkpoint(d / "checkpoint.npz", lambda a: a.update({"json.totals": np.asarray("{not json")}))),
        Probe("6", "checkpoint with an object array", cli(*resume, "--num-server-rounds", "4"),
              lambda d: rewrite_checkpoint(d / "checkpoint.npz",
                                           lambda a: a.update({"json.best": np.asarray([{"x": 1}], dtype=object)}))),
        Probe("7", "report over a run whose summary.json is a list",
              cli("report", run_dir, str(workspace / "good"), "--out", str(workspace / "rep")),
              lambda d: (d / "summary.json").write_text("[1, 2]")),
        Probe("7", "report over a run whose config.json lacks `config`",
              cli("report", run_dir, str(workspace / "good"), "--out", str(workspace / "rep")),
              lambda d: (d / "config.json").write_text("{}")),
        Probe("7", "report over a run missing round 2",
              [sys.executable, "-c", "import pandas, sys; from fedsparse.cli import main; main(sys.argv[1:]); "
               f"print('rounds_check:', pandas.read_csv('{workspace / 'rep' / 'report.csv'}')['rounds_check'].dropna().tolist())",
               "report", run_dir, "--out", str(workspace / "rep")],
              lambda d: replace_line(d / "rounds.jsonl", 2, ""), shown=f"fedsparse report {run_dir} --out {workspace / 'rep'}"),
        Probe("8", "config file in Latin-1", cli("simulate", "--config", str(workspace / "latin1.toml"))),
        Probe("8", "unquoted dotted key `sparse.density = 0.1`", cli("simulate", "--config", str(workspace / "dotted.toml"))),
        Probe("9", "--fed.item-lr inf", cli("simulate", *SMALL_RUN, "--fed.item-lr", "inf",
                                            "--results-dir", str(workspace / "out9"))),
        Probe("9", "--faults.straggler-seconds nan", cli("simulate", *SMALL_RUN, "--faults.straggler-seconds", "nan",
                                                        "--results-dir", str(workspace / "out9"))),
        Probe("9", "--results-dir naming a file", cli("simulate", *SMALL_RUN, "--results-dir", str(workspace / "latin1.toml"))),
        Probe("5", "--data-dir naming a missing folder (the cache holds ml-100k)",
              cli("simulate", "--dataset", "ml-100k", "--data-dir", str(workspace / "nowhere"),
                  "--results-dir", str(workspace / "out5"))),
        Probe("5", "--data-dir naming a file",
              cli("simulate", "--dataset", "ml-100k", "--data-dir", str(workspace / "latin1.toml"),
                  "--results-dir", str(workspace / "out5"))),
        Probe("5", "--data-dir naming an empty folder",
              cli("simulate", "--dataset", "ml-100k", "--data-dir", str(workspace / "empty"),
                  "--results-dir", str(workspace / "out5"))),
        Probe("5", "no --data-dir: data from the cache", cli("data", "info", "ml-100k")),
        Probe("10", "--num-server-round 1 (an abbreviation of --num-server-rounds)",
              cli("simulate", *SMALL_RUN, "--num-server-round", "1", "--results-dir", str(workspace / "out10")),
              outcome=abbreviation),
        Probe("11", "a device claims weight 1e30",
              test(hardening + "test_a_device_cannot_claim_more_examples_than_the_rows_it_sends")),
        Probe("12", "a programming error inside a device handler, in process",
              test(
                  hardening + "test_a_programming_error_in_process_fails_the_run_loudly_while_a_device_error_is_a_failed_device"
              )),
        Probe("12", "the same in the ClientApp",
              test(hardening + "test_a_programming_error_in_the_clientapp_fails_loudly_while_a_device_error_is_reported")),
        Probe("12", "the ClientApp's exception as Flower reports it to the ServerApp",
              test(hardening + "test_a_clientapp_exception_stops_the_flower_run_while_a_lost_node_is_a_failed_device")),
        Probe("13", "malformed Array in a reply; evaluate/NMF sends without timeout",
              test(
                  hardening + "test_the_flower_transport_times_out_every_kind_and_turns_undecodable_replies_into_failed_devices"
              )),
        Probe("14", "1,000 hostile replies through engine.train_round",
              test("tests/test_hostile_updates.py::test_a_thousand_hostile_replies_through_the_apply_path_leave_the_server_as_if_they_never_replied")),
        Probe("15", "in-process timeouts on a loaded machine",
              test(hardening + "test_in_process_timeouts_follow_simulated_time_not_the_machines_load")),
        Probe("16", "`fedsparse superlink stop` with a foreign flower-superlink running",
              test(hardening + "test_superlink_stop_stops_only_the_superlinks_fedsparse_recorded")),
        Probe("17", "a test's `flwr run` with a SuperLink of its own",
              test(hardening + "test_a_flower_test_runs_its_own_superlink_on_free_ports_and_stops_exactly_it")),
        Probe("18", "installed Flower against the pin",
              test(hardening + "test_flower_is_pinned_to_one_tested_minor_and_the_installed_one_is_inside_it")),
        Probe("19", "requires-python against tomllib",
              test(hardening + "test_requires_python_admits_no_version_without_tomllib")),
    ]


def _target(run_dir: Path, rounds: int) -> None:
    """Make the finished run look killed after its last round of ``rounds`` (config target raised, no summary)."""
    stored = json.loads((run_dir / "config.json").read_text())
    stored["config"]["num-server-rounds"] = rounds
    (run_dir / "config.json").write_text(json.dumps(stored))
    (run_dir / "summary.json").unlink()


def _tear(run_dir: Path) -> None:
    """Append half a record without its newline, as a process killed mid-append leaves it."""
    with open(run_dir / "rounds.jsonl", "a", encoding="utf-8") as stream:
        stream.write('{"round": 4, "cli')


def _flip_byte(run_dir: Path) -> None:
    """Corrupt the stored item table inside the archive so its CRC no longer matches."""
    import zipfile

    path = run_dir / "checkpoint.npz"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("server.item-weight.npy")
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def prepare(workspace: Path) -> tuple[Path, dict[str, str]]:
    """A finished 3-round run (``$W/finished``), a second good one for the report, the probes' files and
    a private cache holding a small ml-100k; returns (the finished run, the environment of every probe)."""
    code, message, _, _ = run(cli("simulate", *SMALL_RUN, "--results-dir", str(workspace / "finished")), workspace)
    if code != 0:
        raise SystemExit(f"the base run failed: {message}")
    finished = next((workspace / "finished").iterdir())
    shutil.copytree(finished, workspace / "good")
    (workspace / "latin1.toml").write_bytes('"data.dataset" = "caf\u00e9"\n'.encode("latin-1"))
    (workspace / "dotted.toml").write_text("seed = 1\nsparse.density = 0.1\n")
    (workspace / "empty" / "ml-100k").mkdir(parents=True)
    cached = workspace / "xdg" / "fedsparse" / "ml-100k"
    cached.mkdir(parents=True)
    ratings = [f"{user}\t{item}\t4\t{880000000 + user * 10 + item}" for user in range(1, 21) for item in range(1, 11)]
    (cached / "u.data").write_text("\n".join(ratings) + "\n")
    return finished, {"XDG_CACHE_HOME": str(workspace / "xdg"), "FEDSPARSE_DATA": ""}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsparse-probes-") as temp:
        workspace = Path(temp)
        finished, env = prepare(workspace)
        for probe in sorted(probes(workspace), key=lambda probe: int(probe.item)):
            shutil.rmtree(workspace / "run", ignore_errors=True)
            shutil.copytree(finished, workspace / "run")
            if probe.damage is not None:
                probe.damage(workspace / "run")
            code, message, seconds, output = run(probe.command, workspace, env)
            command = shown_command(probe, workspace)
            if code == 0 and probe.outcome is not None:
                message = probe.outcome(workspace, output).replace(str(workspace), "$W")
            if probe.command[2] == "pytest":  # the test is the probe: its verdict, without the timing
                message = "the test passes" if code == 0 else f"the test FAILS: {message}"
            behaviour = f"exit {code}: {message}" if message else f"exit {code}"
            rows.append(f"| {probe.item} | {probe.probe} | `{_cell(command)}` | {_cell(behaviour)} |")
            print(f"{probe.item:>3} {seconds:6.1f} s  {probe.probe}: {behaviour}", flush=True)
    table = "\n".join([
        f"Written by `python simulations/robustness_probes.py` on {time.strftime('%Y-%m-%d', time.gmtime())}; `$W` is its "
        "temporary folder, `$W/run` a copy of a finished 3-round synthetic run damaged as the probe says, and "
        f"`$SMALL` that run's flags (`{' '.join(SMALL_RUN)}`).\n",
        "| item | probe | command | behaviour now |", "|---|---|---|---|", *rows,
    ])
    text = GUIDE.read_text()
    head, rest = text.split(START, 1) if START in text else (text.rstrip() + "\n\n", END)
    tail = rest.split(END, 1)[1]
    from fedsparse.run_files import atomic_write_text

    atomic_write_text(GUIDE, f"{head}{START}\n{table}\n{END}{tail}")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    main()
