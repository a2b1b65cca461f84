"""Issue 18, reliability hardening: each test reproduces one probe of the issue and fails on the old behaviour.

The probe number of the issue is in each test's docstring; docs/guides/robustness.md tabulates them
(written by simulations/robustness_probes.py).
"""

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import time
import tomllib
import types
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_reliability import small_config  # the same 30-device synthetic federation

from fedsparse.cli import main
from fedsparse.config import ConfigError, RunConfig
from fedsparse.data import load_dataset
from fedsparse.federation.engine import Reply
from fedsparse.federation.faults import DeviceError, straggler_delay
from fedsparse.federation.inprocess import population_of, run_inprocess
from fedsparse.federation.server_state import Server, clients_per_round, sample_clients, validate_update
from fedsparse.federation.wire import RowUpdate, row_id_dtype
from fedsparse.run_files import LOCK_FILE, ResultFileError, RunDirInUse, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


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


# --- 1-4, 6. rounds.jsonl, the run-directory lock, resume targets, checkpoints ----------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 3-round in-process run (with device states in its checkpoint); tests copy it."""
    config = small_config(tmp_path_factory.mktemp("finished"))
    run_dir, _ = run_inprocess(config, load_dataset(config.data, config.seed))
    return run_dir


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def run_flags(tmp_path: Path) -> list[str]:
    """``small_config`` as CLI flags, without the round count and resume dir (each test sets those)."""
    return [f"--{key}={value}" for key, value in small_config(tmp_path).to_flat().items()
            if key not in ("num-server-rounds", "resume-dir")]


def resume(run_dir: Path, tmp_path: Path, rounds: int) -> dict:
    config = small_config(tmp_path, **{"num-server-rounds": rounds})
    return run_inprocess(config, load_dataset(config.data, config.seed), resume_dir=run_dir)[1]


def test_a_bad_line_in_rounds_jsonl_refuses_the_resume_and_keeps_every_record(finished_run, tmp_path):
    """Probe 1: line 2 replaced by garbage made resume rewrite the file without rounds 2 and 3."""
    run_dir = copy_run(finished_run, tmp_path)
    lines = (run_dir / "rounds.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "garbage\n"
    (run_dir / "rounds.jsonl").write_text("".join(lines))
    with pytest.raises(ResultFileError, match=r"rounds.jsonl:2: not a JSON record"):
        resume(run_dir, tmp_path, 5)
    assert (run_dir / "rounds.jsonl").read_text() == "".join(lines)


def test_a_torn_last_line_is_repaired_on_resume(finished_run, tmp_path):
    """Probe 1: the one repair allowed: a last line cut short by a crash is redone."""
    run_dir = copy_run(finished_run, tmp_path)
    with open(run_dir / "rounds.jsonl", "a") as stream:
        stream.write('{"round": 4, "clie')
    summary = resume(run_dir, tmp_path, 4)
    assert [record["round"] for record in read_jsonl(run_dir / "rounds.jsonl")] == [1, 2, 3, 4] and summary["rounds"] == 4


def test_a_duplicated_round_refuses_the_resume(finished_run, tmp_path):
    """Probe 1/2: rounds written twice (two writers) are not silently accepted."""
    run_dir = copy_run(finished_run, tmp_path)
    lines = (run_dir / "rounds.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "rounds.jsonl").write_text("".join([lines[0], lines[1], lines[1], lines[2]]))
    with pytest.raises(ResultFileError, match=r"duplicated rounds \[2\]"):
        resume(run_dir, tmp_path, 5)


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from fedsparse.run_files import run_dir_lock
with run_dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_of_a_run_directory_is_refused_and_a_stale_lock_is_taken_over(finished_run, tmp_path):
    """Probe 2: two resumes at once wrote rounds twice; now the second is refused, naming the holder."""
    run_dir = copy_run(finished_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=f"in use by process {holder.pid}"):
            resume(run_dir, tmp_path, 4)
        done = cli("simulate", *run_flags(tmp_path), "--resume", str(run_dir), "--num-server-rounds", "4")
        assert done.returncode == 2 and f"in use by process {holder.pid}" in done.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (run_dir / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind by a killed holder: stale
    assert resume(run_dir, tmp_path, 4)["rounds"] == 4
    assert [record["round"] for record in read_jsonl(run_dir / "rounds.jsonl")] == [1, 2, 3, 4]


def test_a_resume_below_the_checkpoint_is_refused_and_the_cli_continues_to_the_runs_own_target(finished_run, tmp_path):
    """Probe 3: a checkpoint at round 5 resumed with the default 3 rounds wrote summary "rounds": 3."""
    run_dir = copy_run(finished_run, tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint is at round 3, past num-server-rounds = 2"):
        resume(run_dir, tmp_path, 2)
    stored = json.loads((run_dir / "config.json").read_text())
    stored["config"]["num-server-rounds"] = 5  # as if the run had been killed after round 3 of 5
    (run_dir / "config.json").write_text(json.dumps(stored))
    (run_dir / "summary.json").unlink()
    done = cli("simulate", *run_flags(tmp_path), "--resume", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [record["round"] for record in read_jsonl(run_dir / "rounds.jsonl")] == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 5


def rewrite_checkpoint(path: Path, change) -> None:
    """Load every array, let ``change`` edit the dict, save it back (a hostile edit of the file)."""
    with np.load(path, allow_pickle=True) as stored:
        arrays = {key: stored[key] for key in stored.files}
    change(arrays)
    np.savez(path, **arrays)


def flip_a_stored_byte(path: Path) -> None:
    """Corrupt the data of the item table inside the archive so its CRC no longer matches."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("server.item-weight.npy")
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


DAMAGES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "damaged archive"),
    "empty": (lambda p: p.write_bytes(b""), "not a checkpoint archive (empty)"),
    "random-bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a checkpoint archive"),
    "bad-crc": (flip_a_stored_byte, "Bad CRC-32"),
    "missing-array": (lambda p: rewrite_checkpoint(p, lambda a: a.pop("server.item-weight")),
                      "lacks 1 array(s) (server.item-weight)"),
    "device-states-removed": (lambda p: rewrite_checkpoint(p, lambda a: [a.pop(k) for k in list(a)
                                                                         if k.startswith("transport.")]),
                              "array(s) (transport."),
    "device-state-sizes": (lambda p: rewrite_checkpoint(p, lambda a: a.update(
        {"transport.user-row.sizes": a["transport.user-row.sizes"] + 1})), "device state 'user-row': sizes add up to"),
    "bad-json": (lambda p: rewrite_checkpoint(p, lambda a: a.update({"json.totals": np.asarray("{not json")})),
                 "json.totals is not valid JSON"),
    "object-array": (lambda p: rewrite_checkpoint(p, lambda a: a.update({"json.best": np.asarray([{"x": 1}], dtype=object)})),
                     "array 'json.best' holds Python objects"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_stops_the_resume_with_one_message_naming_the_file(finished_run, tmp_path, damage):
    """Probes 4 and 6: a checkpoint without its device states resumed silently (worse recall); damaged files
    ended in tracebacks, some advising numpy's allow_pickle."""
    run_dir = copy_run(finished_run, tmp_path)
    before = (run_dir / "rounds.jsonl").read_text()
    apply, fragment = DAMAGES[damage]
    apply(run_dir / "checkpoint.npz")
    done = cli("simulate", *run_flags(tmp_path), "--num-server-rounds", "4", "--resume", str(run_dir))
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"fedsparse simulate: error: {run_dir / 'checkpoint.npz'}: ") and fragment in message, message
    assert "Traceback" not in done.stderr and "allow_pickle" not in done.stderr
    assert (run_dir / "rounds.jsonl").read_text() == before and (run_dir / "summary.json").read_text() != ""


# --- 7. fedsparse report -----------------------------------------------------------------------------

def report_run(root: Path, name: str, rounds: list[int] | None = None) -> Path:
    """A finished run directory as ``fedsparse report`` reads it (summary says 3 rounds)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"seed": 0, "sparse.density": 0.2}}))
    records = [{"round": r, "upload_bytes_mean": 10.0, "recall@20": 0.1} for r in (rounds or [1, 2, 3])]
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run_dir / "summary.json").write_text(json.dumps({"rounds": 3, "recall@20": 0.1, "density": 0.2}))
    return run_dir


def test_the_report_skips_damaged_run_directories_by_name_and_flags_missing_or_duplicated_rounds(tmp_path, capsys):
    """Probe 7: damaged runs were skipped silently, aborted the report with a JSON error naming no file, or
    raised a traceback (config.json without `config`, a summary.json that is a list)."""
    runs = tmp_path / "runs"
    report_run(runs, "good")
    report_run(runs, "missing-round", [1, 3])
    report_run(runs, "duplicated-round", [1, 2, 2, 3])
    damaged = {
        "no-config-key": ("config.json", json.dumps({"population": {}}), "config.json: lacks config"),
        "summary-list": ("summary.json", "[1, 2]", "summary.json: expected a JSON object, got list"),
        "summary-not-json": ("summary.json", "{", "summary.json: not valid JSON"),
        "rounds-garbage": ("rounds.jsonl", '{"round": 1}\ngarbage\n{"round": 3}\n', "rounds.jsonl:2: not a JSON record"),
    }
    for name, (file, text, _) in damaged.items():
        (report_run(runs, name) / file).write_text(text)
    (report_run(runs, "unfinished") / "summary.json").unlink()
    damaged["unfinished"] = (None, None, "summary.json: missing")
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    for name, (_, _, fragment) in damaged.items():
        assert f"warning: skipped run directory {runs / name}: {runs / name / fragment.split(':')[0]}" in err, name
        assert fragment.split(": ", 1)[1] in err, name
    table = pd.read_csv(tmp_path / "out" / "report.csv").set_index("run")
    assert sorted(table.index) == ["duplicated-round", "good", "missing-round"]
    assert table.loc["missing-round", "rounds_check"] == "missing rounds [2]"
    assert table.loc["duplicated-round", "rounds_check"] == "duplicated rounds [2]"
    assert pd.isna(table.loc["good", "rounds_check"])
    assert "rounds_check" in (tmp_path / "out" / "report.md").read_text()


# --- 8. Config files ---------------------------------------------------------------------------------

def test_a_config_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path):
    """Probe 8: a Latin-1 config file ended in a bare UnicodeDecodeError naming no file."""
    path = tmp_path / "run.toml"
    path.write_bytes('"data.dataset" = "caf\u00e9"\n'.encode("latin-1"))
    done = cli("simulate", "--config", str(path))
    assert done.returncode == 2
    assert f"config file {path} is not UTF-8 text" in done.stderr and "save it as UTF-8" in done.stderr


@pytest.mark.parametrize("kind", ["config", "sweep"])
def test_an_unquoted_dotted_key_names_the_file_line_and_the_quoting_fix(tmp_path, kind):
    """Probe 8: `sparse.density = 0.1` reads as a table `sparse`, rejected as an unknown key "sparse"."""
    path = tmp_path / f"{kind}.toml"
    if kind == "config":
        path.write_text("seed = 1\nsparse.density = 0.1\n")
        done = cli("simulate", "--config", str(path))
    else:
        path.write_text("seeds = [0]\n[base]\nseed = 1\n[grid]\nsparse.density = [0.1, 0.2]\n")
        done = cli("sweep", str(path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    line = 2 if kind == "config" else 5
    assert f"{path}:{line}: sparse.density is read by TOML as a nested table" in done.stderr
    assert '"sparse.density" = ...' in done.stderr


# --- 5. --data-dir is authoritative; fallbacks are printed ------------------------------------------

def fake_ml100k(root: Path) -> Path:
    """A small u.data (20 users x 10 items) in ``root/ml-100k``; returns the file."""
    lines = [f"{user}\t{item}\t4\t{880000000 + user * 10 + item}" for user in range(1, 21) for item in range(1, 11)]
    path = root / "ml-100k" / "u.data"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("given", ["missing", "a-file", "empty"])
def test_a_given_data_dir_without_the_dataset_is_an_error_even_when_the_cache_has_it(tmp_path, given):
    """Probe 5: the run silently trained on another copy (cache or download) while config.json named the given dir."""
    fake_ml100k(tmp_path / "xdg" / "fedsparse")  # a cached copy the old code fell back to
    data_dir = tmp_path / "given"
    if given == "a-file":
        data_dir.write_text("not a folder\n")
    elif given == "empty":
        data_dir.mkdir()
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "FEDSPARSE_DATA": ""}
    done = cli("simulate", "--dataset", "ml-100k", "--data-dir", str(data_dir), "--results-dir", str(tmp_path / "out"), env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    shown = data_dir if given == "a-file" else data_dir / "ml-100k"
    assert f"data.data-dir {data_dir}: {shown} " in done.stderr and "no cache or download is tried" in done.stderr
    assert not (tmp_path / "out").exists()


def test_without_a_data_dir_the_fallback_source_file_and_checksum_are_printed(tmp_path):
    """Probe 5: a fallback to the cache (or a download) happened without a word."""
    cached = fake_ml100k(tmp_path / "xdg" / "fedsparse")
    done = cli("data", "info", "ml-100k", env={"XDG_CACHE_HOME": str(tmp_path / "xdg"), "FEDSPARSE_DATA": ""})
    assert done.returncode == 0, done.stderr
    digest = hashlib.blake2b(cached.read_bytes(), digest_size=16).hexdigest()
    assert f"ml-100k from cache: {cached} (blake2b {digest})" in done.stderr


# --- 11. Bounded sample weights ----------------------------------------------------------------------

@pytest.mark.parametrize("claimed", [1e30, 4.0, 2.5])
def test_a_device_cannot_claim_more_examples_than_the_rows_it_sends(claimed):
    """Probe 11: a claimed weight of 1e30 was accepted and dominated the per-row mean."""
    server = Server.create(RunConfig.from_flat({"model.dim": 4, "sparse.policy": "dense"}), 10)
    rows = np.asarray([1, 5, 7], dtype=row_id_dtype(10))
    honest = RowUpdate(rows, np.zeros(12, np.float32), 3.0).to_arrays()
    assert validate_update(server, honest)[1] is None
    update, reason = validate_update(server, {**honest, "weight": np.float32([claimed])})
    assert update is None and "not a whole number of training examples in [1, 3]" in reason


# --- 12. Only device errors are device failures ------------------------------------------------------

def raiser(exc: Exception):
    def handler(*args, **kwargs):
        raise exc
    return handler


def test_a_programming_error_in_process_fails_the_run_loudly_while_a_device_error_is_a_failed_device(tmp_path, monkeypatch):
    """Probe 12: every ValueError (and KeyError) counted as a failed device, so bugs looked like flaky devices."""
    from fedsparse.federation.dispatch import HANDLERS

    config = small_config(tmp_path, **{"num-server-rounds": 1, "sparse.policy": "rigl"})
    data = load_dataset(config.data, config.seed)
    monkeypatch.setitem(HANDLERS, "train", raiser(DeviceError("the download lacks rows the round needs")))
    run_dir, _ = run_inprocess(config, data)
    assert read_jsonl(run_dir / "rounds.jsonl")[0]["failed_clients"] == 15
    for bug in (ValueError("operands could not be broadcast"), KeyError("item-weight"), TypeError("bad call")):
        monkeypatch.setitem(HANDLERS, "train", raiser(bug))
        with pytest.raises(type(bug)):
            run_inprocess(config, data)


def test_a_programming_error_in_the_clientapp_fails_loudly_while_a_device_error_is_reported(monkeypatch):
    """Probe 12, Flower shell: clients/app.py turned every ValueError into a per-user error record."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, Context, RecordDict

    import clients.app as client_app
    from clients.records import to_record
    from fedsparse.federation.dispatch import HANDLERS

    content = RecordDict({"settings": ConfigRecord({"server-round": 1}), "arrays.3": to_record({"x": np.zeros(2, np.float32)})})
    message = types.SimpleNamespace(content=content)  # a received message: only its content is read
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 3}, state=RecordDict(),
                      run_config={"data.dataset": "synthetic", "data.synthetic-users": 30, "data.synthetic-items": 40})
    monkeypatch.setattr(client_app, "Message", lambda reply, reply_to: reply)  # the reply's content, unsent
    monkeypatch.setitem(HANDLERS, "train", raiser(DeviceError("no negative exists")))
    reply = client_app._handle(message, context, "train")
    assert "DeviceError: no negative exists" in str(reply["error.3"]["reason"])
    monkeypatch.setitem(HANDLERS, "train", raiser(ValueError("operands could not be broadcast")))
    with pytest.raises(ValueError, match="operands"):
        client_app._handle(message, context, "train")


# --- 15. Simulated device time in process ------------------------------------------------------------

def test_in_process_timeouts_follow_simulated_time_not_the_machines_load(tmp_path, monkeypatch):
    """Probe 15: an honest device once exceeded fed.round-timeout on a loaded machine (measured wall time)."""
    from fedsparse.federation.dispatch import HANDLERS

    real_train = HANDLERS["train"]

    def loaded_machine(*args, **kwargs):
        time.sleep(0.05)  # every device is slow here, 5x the round timeout
        return real_train(*args, **kwargs)

    monkeypatch.setitem(HANDLERS, "train", loaded_machine)
    config = small_config(tmp_path, **{"num-server-rounds": 2, "faults.failure-rate": 0.3, "faults.failure-mode": "timeout",
                                       "faults.straggler-seconds": 30.0, "fed.round-timeout": 0.01})
    data = load_dataset(config.data, config.seed)
    started = time.monotonic()
    run_dir, _ = run_inprocess(config, data)
    assert time.monotonic() - started < 30.0  # stragglers are late in simulated time: nobody sleeps 30 s
    population = population_of(data, config)
    for record in read_jsonl(run_dir / "rounds.jsonl"):
        chosen = population.users[sample_clients(config.seed, record["round"], population.users.size,
                                                 clients_per_round(config, population.users.size))]
        stragglers = [int(user) for user in chosen if straggler_delay(config, record["round"], int(user)) > 0]
        assert record["failed_clients"] == len(stragglers) > 0  # exactly the drawn stragglers, no honest device


# --- 13. Flower transport: decode errors and timeouts on every send ----------------------------------

class FakeGrid:
    """Answers each pushed message from the node it was sent to with ``answer(node)`` at the first pull."""

    def __init__(self, answer) -> None:
        self.answer, self.pushed = answer, {}

    def push_messages(self, messages):
        ids = [f"message-{len(self.pushed) + index}" for index, _ in enumerate(messages)]
        self.pushed.update(zip(ids, messages, strict=True))
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in message_ids:
            reply = self.answer(self.pushed[message_id].dst_node_id)
            reply.metadata.reply_to_message_id = message_id
            replies.append(reply)
        return replies


def record_exchange_timeouts(monkeypatch, transport_module) -> list:
    """The timeout of every exchange the transport makes (``server.exchange.send_and_receive``), in order."""
    timeouts: list = []
    exchange = transport_module.send_and_receive

    def recorded(grid, messages, timeout):
        timeouts.append(timeout)
        return exchange(grid, messages, timeout)

    monkeypatch.setattr(transport_module, "send_and_receive", recorded)
    return timeouts


def stub_wire_counts(monkeypatch, transport_module) -> None:
    """Zero wire counts and no pre-read replies: these tests' messages are stand-ins, not Flower's."""
    monkeypatch.setattr(transport_module, "sent_bytes_per_device", lambda message, records, users: dict.fromkeys(users, 0))
    monkeypatch.setattr(transport_module, "received_bytes_per_device",
                        lambda message, users, records=None: dict.fromkeys(users, 0))
    monkeypatch.setattr(transport_module, "reply_records", lambda message: None)


@pytest.mark.parametrize("kind", ["nmf", "query", "train", "evaluate"])
def test_the_flower_transport_times_out_every_kind_and_turns_undecodable_replies_into_failed_devices(monkeypatch, kind):
    """Probe 13: evaluate and NMF sends waited forever for a lost node, and a malformed Array raised."""
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord

    import server.transport as transport_module
    from clients.records import reply_content

    monkeypatch.setattr(transport_module, "Message", lambda content, dst_node_id, message_type, group_id: types.SimpleNamespace(
        content=content, dst_node_id=dst_node_id))
    stub_wire_counts(monkeypatch, transport_module)

    def answer(node: int):
        content = reply_content({node: ({"x": np.ones(2, np.float32)}, {"m": 1.0})})
        if node == 2:  # this node's array claims 5 floats in 3 bytes
            content["arrays.2"] = ArrayRecord({"x": Array(dtype="float32", shape=(5,), stype="numpy.ndarray",
                                                          data=b"\x00\x01\x02")})
        return types.SimpleNamespace(content=content, metadata=types.SimpleNamespace(src_node_id=node), has_error=lambda: False)

    timeouts = record_exchange_timeouts(monkeypatch, transport_module)
    flower = transport_module.FlowerTransport(FakeGrid(answer), {1: 1, 2: 2}, 1, 5.0)
    replies = flower.send(kind, 1, {1: {}, 2: {}}, {})
    assert timeouts == [5.0]
    assert isinstance(replies[1], Reply) and replies[1].arrays["x"].tolist() == [1.0, 1.0]
    assert isinstance(replies[2], str) and "node 2: the reply of user 2 does not decode" in replies[2]


# --- 16, 17. SuperLinks: stop only what fedsparse started; tests on their own SuperLink ---------------

DECOY = "import time; time.sleep(300)"  # argv carries "flower-superlink": what the old stop matched


def decoy_superlink(env: dict | None = None) -> subprocess.Popen:
    """A process whose command line names flower-superlink (someone else's SuperLink, as far as a
    command-line match can tell)."""
    return subprocess.Popen([sys.executable, "-c", DECOY, "flower-superlink"], env={**os.environ, **(env or {})})


def test_superlink_stop_stops_only_the_superlinks_fedsparse_recorded(tmp_path):
    """Probe 16: `fedsparse superlink stop` killed every flower-superlink on the machine."""
    from fedsparse.experiments.flower_run import LAUNCH_ENV, _record_superlinks, stop_superlink

    home = tmp_path / "flwr-home"
    foreign = decoy_superlink()
    ours = decoy_superlink({LAUNCH_ENV: "token-of-this-launch"})
    try:
        time.sleep(0.5)  # both processes exec'd, so /proc shows their command lines
        done = cli("superlink", "stop", env={"FLWR_HOME": str(home)})
        assert done.returncode == 0 and "no running SuperLink started by fedsparse" in done.stdout
        assert foreign.poll() is None and ours.poll() is None
        _record_superlinks(home, "token-of-this-launch", (40001, 40002))
        done = cli("superlink", "stop", env={"FLWR_HOME": str(home)})
        assert done.returncode == 0 and f"stopped SuperLink pid {ours.pid} (ports [40001, 40002])" in done.stdout
        assert ours.wait(timeout=30) is not None and foreign.poll() is None
        assert stop_superlink(home) == []  # the record is gone: nothing more to stop
    finally:
        for process in (foreign, ours):
            process.kill()
            process.wait(timeout=30)


def test_a_flower_test_runs_its_own_superlink_on_free_ports_and_stops_exactly_it(tmp_path, isolated_flower):
    """Probe 17: tests reused whatever local SuperLink was up (e.g. the quick start's) and stopped nothing."""
    from fedsparse.experiments.flower_run import _read_records, process_running, run_flower, stop_superlink

    foreign = decoy_superlink({"FLWR_HOME": str(isolated_flower.home)})  # even in our Flower home: not ours
    try:
        config = small_config(tmp_path, **{"num-server-rounds": 1, "data.synthetic-users": 12, "fed.nmf-rounds": 1})
        run_dir = run_flower(config, REPO_ROOT, 12, flwr_home=isolated_flower.home, ports=isolated_flower.ports, timeout=600)
        assert [record["round"] for record in read_jsonl(run_dir / "rounds.jsonl")] == [1]
        (record,) = _read_records(isolated_flower.home)
        assert record["ports"] == list(isolated_flower.ports)
        command = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"flower-superlink" in command[1] and str(isolated_flower.ports[0]).encode() in command
        (stopped,) = stop_superlink(isolated_flower.home)
        assert stopped["pid"] == record["pid"] and not process_running(record["pid"])  # gone, or a zombie awaiting its reaper
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait(timeout=30)


def test_a_clientapp_exception_stops_the_flower_run_while_a_lost_node_is_a_failed_device(monkeypatch):
    """Probe 12 under Flower: Flower turns a ClientApp exception into an error reply, which the server
    counted as a failed device, so a bug looked like a flaky node."""
    pytest.importorskip("flwr")
    from flwr.common.constant import ErrorCode

    import server.transport as transport_module

    monkeypatch.setattr(transport_module, "Message", lambda content, dst_node_id, message_type, group_id: types.SimpleNamespace(
        content=content, dst_node_id=dst_node_id))
    stub_wire_counts(monkeypatch, transport_module)

    def failing(code: int):
        error = types.SimpleNamespace(code=code, reason="<class 'ValueError'>:<'operands could not be broadcast'>")
        return lambda node: types.SimpleNamespace(metadata=types.SimpleNamespace(src_node_id=node), has_error=lambda: True,
                                                  error=error)

    crashed = transport_module.FlowerTransport(FakeGrid(failing(ErrorCode.CLIENT_APP_CRASHED)), {1: 1}, 1, None)
    assert "node 1 error" in crashed.send("train", 1, {1: {}}, {})[1]
    raised = transport_module.FlowerTransport(FakeGrid(failing(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)), {1: 1}, 1, None)
    with pytest.raises(RuntimeError, match="the ClientApp on node 1 raised .*operands could not be broadcast"):
        raised.send("train", 1, {1: {}}, {})
