"""The ``fedsparse`` command line: ``data``, ``train``, ``simulate``, ``sweep``, ``report`` and ``superlink stop``.

Every flat config key is also a flag (``--train.lr 0.01``); the common ones have short aliases
(``--dataset``, ``--model``, ``--dim``, ``--epochs``, ...). ``--config FILE`` reads a TOML file of flat
keys (a ``[tool.flwr.app.config]`` table or top-level keys); flags override the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fedsparse.config import ConfigError, RunConfig, check_flat_keys, flat_defaults, read_toml

if TYPE_CHECKING:
    from fedsparse.report import Report

ALIASES = {
    "dataset": "data.dataset",
    "data-dir": "data.data-dir",
    "split": "data.split",
    "model": "model.name",
    "dim": "model.dim",
    "epochs": "train.epochs",
    "batch-size": "train.batch-size",
    "lr": "train.lr",
    "loss": "train.loss",
    "negatives": "train.negatives",
}


def read_config_file(path: Path) -> dict[str, Any]:
    """Flat keys from a TOML file: its ``[tool.flwr.app.config]`` table if present, else its top level."""
    document, text = read_toml(path, "config file")
    flat = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config", document)
    check_flat_keys(flat, path, text)
    return flat


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file of flat config keys")
    reverse = {key: alias for alias, key in ALIASES.items()}
    for key, default in flat_defaults().items():
        names = [f"--{key}"] + ([f"--{reverse[key]}"] if key in reverse else [])
        parser.add_argument(*names, dest=key, default=None, metavar=type(default).__name__.upper(), help=f"default: {default!r}")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    flat = read_config_file(args.config) if args.config else {}
    flat.update({key: getattr(args, key) for key in flat_defaults() if getattr(args, key, None) is not None})
    return RunConfig.from_flat(flat)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fedsparse", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", required=True)
    data.add_parser("list", help="list registered dataset names")
    info = data.add_parser("info", help="users, items and train/validation/test counts of a dataset")
    info.add_argument("name")
    info.add_argument("--data-dir", default="", help="folder holding <name>/ (default: $FEDSPARSE_DATA, cache, download)")
    info.add_argument("--split", default="auto")
    info.add_argument("--seed", type=int, default=0)
    info.add_argument("--json", action="store_true", help="print JSON")
    verify = data.add_parser("verify", help="check a dataset's users, items and interactions against the published counts")
    verify.add_argument("name")
    verify.add_argument("--data-dir", default="", help="folder holding <name>/ (default: $FEDSPARSE_DATA, cache, download)")
    fetch = data.add_parser("fetch", help="find a dataset, downloading it into the cache when it is nowhere else")
    fetch.add_argument("name")
    fetch.add_argument("--data-dir", default="")

    train = commands.add_parser("train", help="centralised reference training (dense MF / NeuMF)")
    _add_config_flags(train)
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a terminal)")

    simulate = commands.add_parser("simulate", help="federated simulation: in-process engine or Flower")
    _add_config_flags(simulate)
    simulate.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess")
    simulate.add_argument("--app-dir", type=Path, default=Path.cwd(), help="the Flower app (repository root)")
    simulate.add_argument("--resume", type=Path, help="continue the run in this run directory from its checkpoint (same flags)")
    simulate.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="round progress bar (default: on a terminal)")
    sweep = commands.add_parser("sweep", help="a resumable grid of federations (in-process or Flower) from a TOML file")
    sweep.add_argument("file", type=Path, help="TOML with seeds, [base] keys, a [grid] of key = [values] and optionally engine")
    sweep.add_argument("--out", type=Path, help="sweep directory (default: results/sweeps/<file name>)")
    sweep.add_argument("--jobs", type=int, default=1, help="cells run at once (processes; 1 for engine = \"flower\")")
    sweep.add_argument("--app-dir", type=Path, default=Path.cwd(), help="the Flower app (repository root), for engine = \"flower\"")
    sweep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="cell progress bar (default: on a terminal)")
    report = commands.add_parser("report", help="collect run directories into a table and plots")
    report.add_argument("runs", type=Path, nargs="*", help="run directories, or folders searched for them")
    report.add_argument("--out", type=Path, required=True, help="folder for report.csv, report.md and the PNGs")
    report.add_argument("--privacy", type=Path, action="append", default=[], metavar="CSV",
                        help="a results CSV of simulations/privacy_frontier.py: draws privacy_frontier.png (repeatable)")
    superlink = commands.add_parser("superlink", help="the local Flower SuperLink that `flwr run` starts")
    superlink.add_argument("action", choices=("stop",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsparse`` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "data":
            return _data_command(args)
        if args.command == "train":
            from fedsparse.train import train_centralised

            result = train_centralised(_config_from_args(args), show_progress=args.progress)
            print(json.dumps(result.summary, indent=2, sort_keys=True))
            print(f"run directory: {result.run_dir}")
            return 0
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            from fedsparse.report import find_run_dirs, write_report

            report = write_report(find_run_dirs(args.runs), args.out, args.privacy)
            _print_report(report)
            print(f"{len(report.table)} runs -> {args.out}")
            return 0
        if args.command == "superlink":
            from fedsparse.flower_run import SUPERLINK_RECORD, flower_home, stop_superlink

            stopped = stop_superlink()
            for link in stopped:
                print(f"stopped SuperLink pid {link['pid']} (ports {link['ports'] or 'default'}) and {len(link['children'])} child process(es)")
            if not stopped:
                print(f"no running SuperLink started by fedsparse in {flower_home() / SUPERLINK_RECORD}; others are left alone")
            return 0
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"fedsparse: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _simulate(args: argparse.Namespace) -> int:
    import logging

    from fedsparse.data import load_dataset
    from fedsparse.engine import check_population, check_resumable, resume_target
    from fedsparse.inprocess import population_of, run_inprocess
    from fedsparse.results import check_unlocked

    config = _config_from_args(args)
    if args.resume:
        config = replace(config, resume_dir=str(args.resume.resolve()))
        if getattr(args, "num-server-rounds") is None and "num-server-rounds" not in (read_config_file(args.config) if args.config else {}):
            config = replace(config, num_server_rounds=resume_target(args.resume))  # the run's own target, not the default
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Bad data, a config that cannot run or a run that cannot be resumed fail here, before Ray starts.
    data = load_dataset(config.data, config.seed)
    check_population(config, population_of(data))
    if config.resume_dir:
        check_resumable(config, Path(config.resume_dir))
        check_unlocked(Path(config.resume_dir))
    if args.engine == "inprocess":
        run_dir, summary = run_inprocess(config, data, show_progress=args.progress)
    else:
        from fedsparse.flower_run import check_flower_config, run_flower

        check_flower_config(config)
        run_dir = run_flower(config, args.app_dir.resolve(), data.n_users)
        summary = json.loads((run_dir / "summary.json").read_text())
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"run directory: {run_dir}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedsparse.report import write_report
    from fedsparse.sweep import run_sweep

    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    out = (args.out or Path("results") / "sweeps" / args.file.stem).resolve()
    table = run_sweep(args.file, out, args.jobs, on_cell=lambda cell, row: print(f"{cell}: recall@20={row.get('recall@20')}", flush=True),
                      show_progress=args.progress, app_dir=args.app_dir)
    frame = table.frame()
    _print_report(write_report([Path(run_dir) for run_dir in frame["run_dir"]], out))
    print(f"{len(frame)} cells in {out / 'sweep.csv'}; report in {out / 'report.md'}")
    return 0


def _print_report(report: "Report") -> None:
    """One line per figure written and per figure skipped (with the reason)."""
    for figure in report.figures:
        print(f"wrote {figure}")
    for name, reason in report.skipped.items():
        print(f"skipped {name}: {reason}")
    for run_dir, reason in report.skipped_runs.items():
        print(f"warning: skipped run directory {run_dir}: {reason}", file=sys.stderr)


def _data_command(args: argparse.Namespace) -> int:
    from fedsparse.data import DATASETS, load_dataset
    from fedsparse.data.registry import get_dataset, resolve_dataset_dir

    if args.data_command == "list":
        for name in DATASETS:
            print(name)
        return 0
    if args.data_command == "fetch":
        print(resolve_dataset_dir(get_dataset(args.name).name, args.data_dir))
        return 0
    if args.data_command == "verify":
        return _verify(args.name, args.data_dir)
    config = RunConfig.from_flat({"data.dataset": args.name, "data.data-dir": args.data_dir, "data.split": args.split})
    data = load_dataset(config.data, args.seed)
    counts = {"name": data.name, **data.counts(), "repairs": data.repairs}
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        for key, value in counts.items():
            print(f"{key:>14}: {value}")
    return 0


def _verify(name: str, data_dir: str) -> int:
    """Exit 0 when the loaded dataset has the published users, items and interactions, else 1 (naming them)."""
    from fedsparse.data import load_dataset
    from fedsparse.data.registry import get_dataset

    published = get_dataset(name).published
    if published is None:
        raise ConfigError(f"{name} has no published counts to verify against")
    data = load_dataset(RunConfig.from_flat({"data.dataset": name, "data.data-dir": data_dir}).data, 0)
    counts = data.counts()
    # The files' pairs, before the loader dropped test pairs whose item never occurs in training.
    dropped = int(data.repairs.get("test_pairs_unseen_in_train", 0))
    found = (data.n_users, data.n_items, counts["train"] + counts["validation"] + counts["test"] + dropped)
    for label, have, want in zip(("users", "items", "interactions"), found, published):
        print(f"{label:>13}: {have:,} ({'ok' if have == want else f'published {want:,}'})")
    if dropped:
        print(f"  ({dropped:,} test pairs of items unseen in training are in the files but not in the loaded splits)")
    return 0 if found == published else 1


if __name__ == "__main__":
    raise SystemExit(main())
