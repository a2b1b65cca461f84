"""The ``fedsparse`` command line: ``data``, ``train``, ``simulate``, ``sweep``, ``report`` and ``superlink stop``.

Every flat config key is also a flag (``--train.lr 0.01``); the common ones have short aliases
(``--dataset``, ``--model``, ``--dim``, ``--epochs``, ...). ``--config FILE`` reads a TOML file of flat
keys (a ``[tool.flwr.app.config]`` table or top-level keys); flags override the file.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fedsparse.config import (
    HOLDOUTS,
    LOO_TIES,
    ConfigError,
    KeyHelp,
    RunConfig,
    check_flat_keys,
    did_you_mean,
    flat_defaults,
    key_help,
    read_toml,
    section_help,
)

if TYPE_CHECKING:
    from fedsparse.experiments.report import Report

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
    "resume": "resume-dir",
}
CHOICE_LIST = re.compile(r"must be one of (\(.*\))")  # validate()'s words for an enumerated key
JSON_HELP = "print the summary as one JSON object (with run_dir) instead of a table"


class Parser(argparse.ArgumentParser):
    """An argument parser that takes no abbreviated flag and suggests the closest flag or choice on errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--num-server-round 20` must not pass as --num-server-rounds
        super().__init__(*args, **kwargs)
        self.set_defaults(parser=self)  # the deepest subcommand's parser wins: its usage goes with later errors
        self.config_actions: list[argparse.Action] = []  # one flag per config key, summed up as [--KEY VALUE ...]

    def error(self, message: str) -> NoReturn:
        """Print this (sub)command's usage and the message with a suggestion, exit 2."""
        unknown = UNKNOWN_CHOICE.search(message)
        if unknown:  # Python 3.11 quotes the choices ('a', 'b'), 3.12 does not (a, b)
            message += did_you_mean(unknown.group(1), [choice.strip("'\"") for choice in unknown.group(2).split(", ")])
        super().error(message)

    def shorten_usage(self) -> None:
        """Usage naming this command's own flags and ``[--KEY VALUE ...]`` for the config keys (not 200 flags)."""
        formatter = self._get_formatter()
        formatter.add_usage(None, [action for action in self._actions if action not in self.config_actions], [])
        own = formatter.format_help().strip().removeprefix("usage: ")
        self.usage = f"{own} [--KEY VALUE ...]".replace("%", "%%")

    def reject_unrecognized(self, extras: list[str]) -> NoReturn:
        """Exit 2 naming the flags this (sub)command does not take, each with the closest flag it does take."""
        flags = [option for action in self._actions for option in action.option_strings]
        named = ", ".join(arg + did_you_mean(arg.split("=", 1)[0], flags) if arg.startswith("--") else arg for arg in extras)
        self.error(f"unrecognized arguments: {named}")


UNKNOWN_CHOICE = re.compile(r"invalid choice: '(.*?)' \(choose from (.*)\)")


def read_config_file(path: Path) -> dict[str, Any]:
    """Flat keys from a TOML file: its ``[tool.flwr.app.config]`` table if present, else its top level."""
    document, text = read_toml(path, "config file")
    flat = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config", document)
    check_flat_keys(flat, path, text)
    return flat


def _add_config_flags(parser: Parser, only: str | None = None) -> None:
    """One flag per flat config key (plus its alias), grouped by section, each with its field's own description;
    ``only``: just that section's keys."""
    parser.add_argument("--config", type=Path, help="TOML file of flat config keys; flags override it")
    reverse = {key: alias for alias, key in ALIASES.items()}
    sections = section_help()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, about in key_help().items():
        if only is not None and about.section != only:
            continue
        if about.section not in groups:
            groups[about.section] = parser.add_argument_group(f"{about.section} keys", sections[about.section])
        names = [f"--{key}"] + ([f"--{reverse[key]}"] if key in reverse else [])
        metavar = type(about.default).__name__.upper()
        action = groups[about.section].add_argument(*names, dest=key, default=None, metavar=metavar, help=flag_help(about))
        parser.config_actions.append(action)


def flag_help(about: KeyHelp) -> str:
    """One flag's help: what the key does, the values it accepts, its default (``%`` escaped for argparse)."""
    accepted = about.accepted
    choices = CHOICE_LIST.fullmatch(accepted)
    if choices:
        accepted = "one of " + ", ".join(ast.literal_eval(choices.group(1)))
    elif isinstance(about.default, bool):
        accepted = "true or false"
    default = json.dumps(about.default) if isinstance(about.default, (str, bool)) else repr(about.default)
    allowed = f"Allowed: {accepted.removeprefix('must be ')}. " if accepted else ""
    return f"{about.description}. {allowed}Default: {default}.".replace("%", "%%")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    flat = read_config_file(args.config) if args.config else {}
    flat.update({key: getattr(args, key) for key in flat_defaults() if getattr(args, key, None) is not None})
    return RunConfig.from_flat(flat)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    summary, details = (" ".join(paragraph.split()).replace("``", "") for paragraph in __doc__.split("\n\n")[:2])
    parser = Parser(prog="fedsparse", description=f"{summary} {details}")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", required=True)
    data.add_parser("list", help="list registered dataset names")
    info = data.add_parser("info", help="users, items and train/validation/test counts of a dataset or of your own file")
    verify = data.add_parser("verify", help="check a dataset's users, items and interactions against the published counts")
    for command in (info, verify):
        command.add_argument("name", nargs="?", help="a registered dataset (`fedsparse data list`); leave out with --data.path")
        _add_config_flags(command, only="data")
    info.add_argument("--seed", type=int, default=0, help="seed of the random split")
    info.add_argument("--candidates", default="", help="a candidate file (eval.candidates) to check and split by")
    info.add_argument("--negatives", type=int, default=99, help="eval.sampled-negatives the candidate file must hold")
    info.add_argument("--json", action="store_true", help="print JSON")
    fetch = data.add_parser("fetch", help="find a dataset, downloading it into the cache when it is nowhere else")
    fetch.add_argument("name")
    fetch.add_argument("--data-dir", default="")
    candidates = data.add_parser(
        "candidates", help="write a leave-one-out candidate file (eval.candidates): per user the validation and test "
        "item and their sampled negatives, PFedRec's rules, original ids")
    candidates.add_argument("name")
    candidates.add_argument("--out", type=Path, required=True, help="the CSV to write (atomically)")
    candidates.add_argument("--seed", type=int, default=0,
                            help="seeds the negatives (rng_for(seed, 'eval-candidates', user))")
    candidates.add_argument("--data-dir", default="",
                            help="folder holding <name>/ (default: $FEDSPARSE_DATA, cache, download)")
    candidates.add_argument("--holdout", choices=HOLDOUTS, default="latest",
                            help="which items are held out: latest = the latest interaction is the test item, the "
                            "second-latest the validation item (needs timestamps); random = a seeded random pair per "
                            "user (random leave-one-out, for data without timestamps such as ml-1m's LightGCN files: "
                            "easier, and not comparable with time-based figures)")
    candidates.add_argument("--ties", choices=LOO_TIES, default="file-last",
                            help="--holdout latest, equal timestamps (data.loo-ties): file-last = the later row in the "
                            "file is later (fedsparse's loo split), file-first = the earlier one (PFedRec), item = the "
                            "larger item id")
    candidates.add_argument("--negatives", type=int, default=99,
                            help="negatives per held-out item (eval.sampled-negatives)")
    candidates.add_argument("--rating-threshold", type=float, default=0.0,
                            help="data.rating-threshold of the runs that will read it")
    candidates.add_argument("--k-core", type=int, default=0, help="data.k-core of the runs that will read it")

    train = commands.add_parser("train", help="centralised reference training (dense MF / NeuMF)")
    _add_config_flags(train)
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: on a terminal)")
    train.add_argument("--json", action="store_true", help=JSON_HELP)

    simulate = commands.add_parser("simulate", help="federated simulation: in-process engine or Flower")
    _add_config_flags(simulate)
    simulate.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                          help="inprocess: devices called in this process (fast); "
                          "flower: a real flwr run, a supernode per device")
    simulate.add_argument("--app-dir", type=Path, default=Path.cwd(), help="the Flower app (repository root)")
    simulate.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                          help="round progress bar (default: on a terminal)")
    simulate.add_argument("--json", action="store_true", help=JSON_HELP)
    sweep = commands.add_parser("sweep", help="a resumable grid of federations (in-process or Flower) from a TOML file")
    sweep.add_argument("file", type=Path, help="TOML with seeds, [base] keys, a [grid] of key = [values] and optionally engine")
    sweep.add_argument("--out", type=Path, help="sweep directory (default: results/sweeps/<file name>)")
    sweep.add_argument("--jobs", type=int, default=1, help="cells run at once (processes; 1 for engine = \"flower\")")
    sweep.add_argument("--app-dir", type=Path, default=Path.cwd(),
                       help="the Flower app (repository root), for engine = \"flower\"")
    sweep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="cell progress bar (default: on a terminal)")
    report = commands.add_parser("report", help="collect run directories into a table and plots")
    report.add_argument("runs", type=Path, nargs="*", help="run directories, or folders searched for them")
    report.add_argument("--out", type=Path, required=True, help="folder for report.csv, report.md and the PNGs")
    report.add_argument("--privacy", type=Path, action="append", default=[], metavar="CSV",
                        help="a results CSV of simulations/privacy_frontier.py: draws privacy_frontier.png (repeatable)")
    for command in (info, verify, train, simulate):
        command.shorten_usage()
    superlink = commands.add_parser("superlink", help="the local Flower SuperLink that `flwr run` starts")
    superlink.add_argument("action", choices=("stop",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsparse`` command; returns the process exit code."""
    args, extras = build_parser().parse_known_args(argv)
    if extras:
        args.parser.reject_unrecognized(extras)
    try:
        if args.command == "data":
            return _data_command(args)
        if args.command == "train":
            config = _config_from_args(args)  # a bad setting is reported before torch and the trainer load
            from fedsparse.central.train import train_centralised

            result = train_centralised(config, show_progress=args.progress)
            _print_summary(result.summary, result.run_dir, args.json)
            return 0
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            from fedsparse.experiments.report import find_run_dirs, write_report

            report = write_report(find_run_dirs(args.runs), args.out, args.privacy)
            _print_report(report)
            print(f"{len(report.table)} runs -> {args.out}")
            return 0
        if args.command == "superlink":
            from fedsparse.experiments.flower_run import SUPERLINK_RECORD, flower_home, stop_superlink

            stopped = stop_superlink()
            for link in stopped:
                print(f"stopped SuperLink pid {link['pid']} (ports {link['ports'] or 'default'}) "
                      f"and {len(link['children'])} child process(es)")
            if not stopped:
                print(f"no running SuperLink started by fedsparse in {flower_home() / SUPERLINK_RECORD}; others are left alone")
            return 0
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        if isinstance(exc, ConfigError):  # a setting the user gave: show how this command is called
            args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _print_summary(summary: dict[str, Any], run_dir: Path, as_json: bool) -> None:
    """The run's summary on stdout: a short table, or with ``as_json`` one JSON object (plus ``run_dir``)."""
    from fedsparse.console import summary_table

    if as_json:
        print(json.dumps({**summary, "run_dir": str(run_dir)}, indent=2, sort_keys=True))
    else:
        print(summary_table(summary, run_dir))


def _simulate(args: argparse.Namespace) -> int:
    config = _config_from_args(args)  # a bad setting is reported before torch and the engine load
    import logging
    import time

    from tqdm.contrib.logging import logging_redirect_tqdm

    from fedsparse.console import dataset_line
    from fedsparse.data import load_run_data
    from fedsparse.federation.engine import check_population, check_resumable, resume_target
    from fedsparse.federation.inprocess import population_of, run_inprocess
    from fedsparse.run_files import check_unlocked

    if config.resume_dir:
        resume_dir = Path(config.resume_dir).expanduser().resolve()
        config = replace(config, resume_dir=str(resume_dir))
        if (getattr(args, "num-server-rounds") is None
                and "num-server-rounds" not in (read_config_file(args.config) if args.config else {})):
            config = replace(config, num_server_rounds=resume_target(resume_dir))  # the run's own target, not the default
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("fedsparse")
    # Bad data, a config that cannot run or a run that cannot be resumed fail here, before Ray starts.
    log.info("loading dataset %s ...", config.data.path or config.data.dataset)
    started = time.perf_counter()
    data = load_run_data(config)
    log.info(dataset_line(data.name, data.counts(), time.perf_counter() - started))
    check_population(config, population_of(data, config))
    if config.resume_dir:
        check_resumable(config, Path(config.resume_dir))
        check_unlocked(Path(config.resume_dir))
    with logging_redirect_tqdm():  # log lines go above the progress bar, never onto its line
        if args.engine == "inprocess":
            run_dir, summary = run_inprocess(config, data, show_progress=args.progress)
        else:
            from fedsparse.experiments.flower_run import check_flower_config, run_flower

            check_flower_config(config)
            log.info("starting flwr run (Flower's SuperLink and Ray take 15-30 s before the ServerApp's first line)")
            run_dir = run_flower(config, args.app_dir.resolve(), data.n_users, show_progress=args.progress)
            summary = json.loads((run_dir / "summary.json").read_text())
    _print_summary(summary, run_dir, args.json)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedsparse.experiments.report import write_report
    from fedsparse.experiments.sweep import run_sweep

    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    out = (args.out or Path("results") / "sweeps" / args.file.stem).resolve()
    table = run_sweep(args.file, out, args.jobs,
                      on_cell=lambda cell, row: print(f"{cell}: recall@20={row.get('recall@20')}", flush=True),
                      show_progress=args.progress, app_dir=args.app_dir)
    frame = table.frame()
    _print_report(write_report([Path(run_dir) for run_dir in frame["run_dir"]], out))
    print(f"{len(frame)} cells in {out / 'sweep.csv'}; report in {out / 'report.md'}")
    return 0


def _print_report(report: Report) -> None:
    """One line per figure written and per figure skipped (with the reason)."""
    for figure in report.figures:
        print(f"wrote {figure}")
    for name, reason in report.skipped.items():
        print(f"skipped {name}: {reason}")
    for run_dir, reason in report.skipped_runs.items():
        print(f"warning: skipped run directory {run_dir}: {reason}", file=sys.stderr)


def _data_command(args: argparse.Namespace) -> int:
    from fedsparse.data import DATASETS, load_run_data
    from fedsparse.data.registry import get_dataset, resolve_dataset_dir

    if args.data_command == "list":
        for name in DATASETS:
            print(name)
        return 0
    if args.data_command == "fetch":
        print(resolve_dataset_dir(get_dataset(args.name).name, args.data_dir))
        return 0
    if args.data_command == "candidates":
        from fedsparse.data.candidates import write_candidates

        if args.negatives < 1:
            raise ConfigError("--negatives must be >= 1")
        data_config = RunConfig.from_flat({"data.dataset": args.name, "data.data-dir": args.data_dir, "data.loo-ties": args.ties,
                                           "data.rating-threshold": args.rating_threshold, "data.k-core": args.k_core}).data
        path, users = write_candidates(data_config, args.out, args.seed, args.ties, args.negatives, args.holdout)
        rule = f"holdout latest, ties {args.ties}" if args.holdout == "latest" else "holdout random"
        print(f"wrote {users} users to {path} ({rule}, seed {args.seed}, "
              f"{args.negatives} + {args.negatives} negatives each)")
        return 0
    config = _config_from_args(args)
    if args.name:
        config = config.with_overrides({"data.dataset": args.name})
    elif not (config.data.path or args.config or getattr(args, "data.dataset")):
        raise ConfigError("name a dataset (`fedsparse data list`) or give your own file with --data.path")
    if args.data_command == "verify":
        return _verify(config)
    config = config.with_overrides({"eval.candidates": args.candidates, "eval.sampled-negatives": args.negatives,
                                    "seed": args.seed})
    data = load_run_data(config)
    counts = {"name": data.name, **data.counts(), "repairs": data.repairs}
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        for key, value in counts.items():
            print(f"{key:>14}: {value}")
    return 0


def _verify(config: RunConfig) -> int:
    """Exit 0 when the loaded dataset has the published users, items and interactions, else 1 (naming them).

    A user's own file (``data.path``) has no published counts: it passes when it reads cleanly, and what was
    read and repaired is printed."""
    from fedsparse.data import load_dataset
    from fedsparse.data.registry import get_dataset

    if config.data.path:
        data = load_dataset(config.data, 0)
        print(f"{config.data.path}: read cleanly; {data.n_users:,} users, {data.n_items:,} items, "
              f"{data.counts()['interactions']:,} interactions; repairs: {data.repairs}")
        return 0
    published = get_dataset(config.data.dataset).published
    if published is None:
        raise ConfigError(f"{config.data.dataset} has no published counts to verify against")
    data = load_dataset(config.data, 0)
    counts = data.counts()
    # The files' pairs, before the loader dropped test pairs whose item never occurs in training.
    dropped = int(data.repairs.get("test_pairs_unseen_in_train", 0))
    found = (data.n_users, data.n_items, counts["train"] + counts["validation"] + counts["test"] + dropped)
    for label, have, want in zip(("users", "items", "interactions"), found, published, strict=True):
        print(f"{label:>13}: {have:,} ({'ok' if have == want else f'published {want:,}'})")
    if dropped:
        print(f"  ({dropped:,} test pairs of items unseen in training are in the files but not in the loaded splits)")
    return 0 if found == published else 1


if __name__ == "__main__":
    raise SystemExit(main())
