"""docs/methods.md stays the page the code cites: every cited section exists, every mask policy has
one, every file and ``module::name`` path it gives exists, and nothing cites the outside methods file any more.
Every figure the README, the guides and the scripts' READMEs quote comes from a committed results file
(benchmarks/quoted_figures.py).
Every ``python benchmarks/NAME.py`` / ``python simulations/NAME.py`` command the README, the guides and the two
scripts' READMEs show uses only flags its script's parser defines."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark_script

from fedsparse.sparse.policies import POLICIES

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
CITING_SUFFIXES = (".py", ".md", ".toml")
CITING_FOLDERS = ("fedsparse", "clients", "server", "benchmarks", "simulations", "tests", "docs")
CITED_ANCHOR = re.compile(r"methods\.md#([A-Za-z0-9_-]+)")
LOCAL_LINK = re.compile(r"\]\(#([A-Za-z0-9_-]+)\)")
CODE_PATH = re.compile(r"`(fedsparse/[\w/]+)\.py::([\w.]+)`")
FILE_PATH = re.compile(
    r"`((?:fedsparse|clients|server|benchmarks|simulations|docs|tests)/[\w/.-]+?\.(?:py|toml|md))(?:::[\w.]+)?`"
)


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def methods_anchors() -> set[str]:
    """Anchors of every heading of docs/methods.md."""
    headings = re.findall(r"^#{1,6} (.+)$", METHODS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {heading_anchor(heading) for heading in headings}


def citing_files() -> list[Path]:
    """The project's own source and documentation files (README, packages, configs, docs)."""
    files = [ROOT / "README.md"]
    for folder in CITING_FOLDERS:
        files += sorted(path for path in (ROOT / folder).rglob("*") if path.suffix in CITING_SUFFIXES and path.is_file())
    return files


def test_heading_anchor_follows_githubs_rule():
    assert heading_anchor("The federated device step and the server's merge") == "the-federated-device-step-and-the-servers-merge"
    assert heading_anchor("Size-BET") == "size-bet"


def test_every_cited_section_of_the_methods_page_exists():
    anchors = methods_anchors()
    cited = {(path.relative_to(ROOT).as_posix(), anchor)
             for path in citing_files() for anchor in CITED_ANCHOR.findall(path.read_text(encoding="utf-8"))}
    cited |= {("docs/methods.md", anchor) for anchor in LOCAL_LINK.findall(METHODS.read_text(encoding="utf-8"))}
    assert len(cited) >= 10  # the code does cite the page
    missing = sorted(f"{path} cites #{anchor}" for path, anchor in cited if anchor not in anchors)
    assert not missing, missing


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_mask_policy_has_a_section(policy):
    assert policy in methods_anchors(), f"docs/methods.md has no section #{policy}"


def test_every_code_path_on_the_methods_page_resolves():
    paths = CODE_PATH.findall(METHODS.read_text(encoding="utf-8"))
    assert len(paths) >= 40
    for module_path, name in paths:
        target: object = importlib.import_module(module_path.replace("/", "."))
        for part in name.split("."):
            assert hasattr(target, part), f"{module_path}.py::{name}: no {part!r}"
            target = getattr(target, part)


def test_every_file_named_on_the_methods_page_exists():
    named = set(FILE_PATH.findall(METHODS.read_text(encoding="utf-8")))
    assert len(named) >= 20
    assert not sorted(path for path in named if not (ROOT / path).is_file())


def test_nothing_cites_the_outside_methods_file():
    outside = "METHODS" + ".md"  # spelled apart so this file does not match itself
    citing = [path.relative_to(ROOT).as_posix() for path in citing_files() if outside in path.read_text(encoding="utf-8")]
    assert not citing, f"cite docs/methods.md#<section> instead: {citing}"


def test_every_figure_the_readmes_and_guides_quote_is_in_a_committed_results_file():
    qf = load_benchmark_script("quoted_figures")
    documents = qf.default_documents()
    assert len(documents) >= 5 and sum(1 for path in documents for _ in qf.quoted_figures(path)) >= 200
    missing = [f"{figure.path.relative_to(ROOT)}:{figure.line}: {figure.text}"
               for figure in qf.unbacked(documents, qf.result_numbers(qf.RESULT_DIRS))]
    assert not missing, f"quoted in prose but in no file of benchmarks/results or simulations/results: {missing}"


def test_the_quoted_figures_check_fails_on_a_figure_no_results_file_holds(tmp_path):
    qf = load_benchmark_script("quoted_figures")
    results = tmp_path / "results"
    results.mkdir()
    (results / "table.csv").write_text("cell,recall@20,bytes,gap\na,0.11320,7792290,-0.02439\n")
    (results / "table.md").write_text("| users |\n|---|\n| 6,040 |\n")
    guide = tmp_path / "guide.md"
    guide.write_text("Recall@20 0.1132 (11.32 %), 7.79 MB, 6,040 users, 0.0244 below; but 0.1133 and 1,853 items.\n"
                     "```\nin code 0.9999 is not a figure\n```\n`inline 0.9998` neither\n")
    missing = qf.unbacked([guide], qf.result_numbers([results]))
    assert [(figure.line, figure.text) for figure in missing] == [(1, "0.1133"), (1, "1,853")]


# Commands that run a benchmark or study script: shown in fenced bash blocks or inline code of these documents.
COMMAND_DOCUMENTS = ("README.md", "docs/guides/*.md", "benchmarks/README.md", "simulations/README.md")
SCRIPT_FOLDERS = ("benchmarks", "simulations")
FENCE_OPEN = re.compile(r"^\s*```\s*(\w*)")
SHELL_FENCES = ("bash", "sh", "shell")
INLINE_SPAN = re.compile(r"`([^`]+)`")
SCRIPT_ARG = re.compile(r"^(?:\./)?(benchmarks|simulations)/(\w+)\.py$")
BARE_SCRIPT = re.compile(r"^(\w+)\.py(?:\s|$)")  # `federated.py --datasets ...` in benchmarks/README.md's table
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = re.compile(r"^[0-9]*[<>]")


@dataclass(frozen=True)
class ScriptCommand:
    """One shown invocation of a script: where it is shown, the script (relative to the root) and its ``--`` flags."""

    document: Path
    line: int
    script: str
    flags: tuple[str, ...]


def shell_words(text: str) -> list[str]:
    """A shell line as words, with ``&&``, ``|``, ``;`` and redirections as words of their own and comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def script_commands(text: str, document: Path, line: int, folder: str | None = None) -> list[ScriptCommand]:
    """The script invocations of one shell line (continuations joined). After a ``cd`` the rest of the line runs
    another checkout's scripts (e.g. an old commit's worktree), so it is not checked. ``folder``: a bare
    ``NAME.py`` at the start names that folder's script (the scripts' own READMEs)."""
    words = shell_words(text)
    if folder and words and BARE_SCRIPT.match(text.strip()):
        words[0] = f"{folder}/{words[0]}"
        words.insert(0, "python")
    found: list[ScriptCommand] = []
    start = 0
    while start < len(words):
        end = next((i for i in range(start, len(words)) if words[i] in SEPARATORS), len(words))
        simple = words[start:end]
        body = [word for word in simple if not re.match(r"^[A-Z_][A-Z0-9_]*=", word)]
        if body[:1] == ["cd"]:
            break
        for index, word in enumerate(simple):
            match = SCRIPT_ARG.match(word)
            if match and index > 0 and Path(simple[index - 1]).name.startswith("python"):
                flags: list[str] = []
                for argument in simple[index + 1:]:
                    if REDIRECTS.match(argument):
                        break
                    if argument.startswith("--") and argument != "--":
                        flags.append(argument.split("=", 1)[0])
                found.append(ScriptCommand(document, line, f"{match[1]}/{match[2]}.py", tuple(flags)))
                break
        start = end + 1
    return found


def documented_script_commands(document: Path) -> list[ScriptCommand]:
    """Every script invocation a Markdown file shows: in fenced bash blocks and in inline code of its prose."""
    lines = document.read_text(encoding="utf-8").splitlines()
    folder = document.parent.name if document.parent.name in SCRIPT_FOLDERS else None
    found: list[ScriptCommand] = []
    prose = list(lines)
    fence: str | None = None
    pending, pending_line = "", 0
    for number, line in enumerate(lines, start=1):
        opened = FENCE_OPEN.match(line)
        if opened and fence is None:
            fence = opened[1] or "text"
            prose[number - 1] = ""
            continue
        if fence is not None:
            prose[number - 1] = ""
            if line.strip().startswith("```"):
                fence = None
            elif fence in SHELL_FENCES:
                pending_line = pending_line or number
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                found += script_commands(pending + line, document, pending_line)
                pending, pending_line = "", 0
    text = "\n".join(prose)
    for span in INLINE_SPAN.finditer(text):
        code = span[1]
        if "\n\n" in code or not (re.search(r"python (benchmarks|simulations)/", code) or (folder and BARE_SCRIPT.match(code))):
            continue
        found += script_commands(code.replace("\n", " "), document, text.count("\n", 0, span.start()) + 1, folder)
    return found


class _ParserBuilt(Exception):
    """Raised in place of parsing: carries the parser a script built."""


def script_options(script: Path) -> set[str]:
    """The option strings (``--rounds``, ...) of the parser ``script`` builds when run as a program: the script runs
    up to its ``parse_args`` call and stops there, so nothing is measured."""
    def caught(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        raise _ParserBuilt(parser)

    saved_path, saved_modules = list(sys.path), set(sys.modules)
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = caught  # type: ignore[assignment,method-assign]
    argparse.ArgumentParser.parse_known_args = caught  # type: ignore[assignment,method-assign]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _ParserBuilt as built:
        return set(built.args[0]._option_string_actions)
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved  # type: ignore[method-assign]
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:  # the scripts' sibling imports (common, federated, ...)
            if Path(getattr(sys.modules[name], "__file__", None) or "/").parent.name in SCRIPT_FOLDERS:
                del sys.modules[name]
    raise AssertionError(f"{script} built no argparse parser before it returned")


def undefined_flags(commands: list[ScriptCommand], root: Path) -> list[str]:
    """``document:line: script --flag`` for every shown flag (or script) that the script's parser does not define."""
    options: dict[str, set[str]] = {}
    problems = []
    for command in commands:
        document = command.document.relative_to(root) if command.document.is_relative_to(root) else command.document
        where = f"{document}:{command.line}"
        if not (root / command.script).is_file():
            problems.append(f"{where}: no script {command.script}")
            continue
        if command.script not in options:
            options[command.script] = script_options(root / command.script)
        problems += [f"{where}: {command.script} {flag}" for flag in command.flags if flag not in options[command.script]]
    return problems


def test_every_flag_of_a_benchmark_or_simulation_command_in_the_docs_is_defined_by_its_script():
    documents = sorted({path for pattern in COMMAND_DOCUMENTS for path in ROOT.glob(pattern)})
    commands = [command for document in documents for command in documented_script_commands(document)]
    assert len(commands) >= 40 and len({command.script for command in commands}) >= 15  # the docs do show them
    problems = undefined_flags(commands, ROOT)
    assert not problems, f"flags the script does not define (renamed or removed?): {problems}"


def test_the_command_flag_check_fails_on_a_flag_the_script_does_not_define(tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text(
        "```bash\n"
        "export FEDSPARSE_DATA=../shared/data\n"
        "OMP_NUM_THREADS=1 python benchmarks/round_seconds.py --dataset ml-100k \\\n"
        "  --rounds 6 --made-up-flag 3   # a comment --not-a-flag\n"
        "cd /tmp/old && python benchmarks/round_seconds.py --flag-of-an-old-checkout\n"
        "```\n"
        "Prose: `python simulations/robustness.py --dataset ml-100k\n--boost 100` and `python benchmarks/nowhere.py --x`.\n"
    )
    commands = documented_script_commands(guide)
    assert [(c.line, c.script, c.flags) for c in commands] == [
        (3, "benchmarks/round_seconds.py", ("--dataset", "--rounds", "--made-up-flag")),
        (7, "simulations/robustness.py", ("--dataset", "--boost")),
        (8, "benchmarks/nowhere.py", ("--x",)),
    ]
    problems = undefined_flags(commands, ROOT)
    assert problems == [f"{guide}:3: benchmarks/round_seconds.py --made-up-flag",
                        f"{guide}:7: simulations/robustness.py --boost",  # an abbreviation argparse would accept
                        f"{guide}:8: no script benchmarks/nowhere.py"]
