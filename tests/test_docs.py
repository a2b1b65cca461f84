"""docs/methods.md stays the page the code cites: every cited section exists, every mask policy has
one, every file and ``module::name`` path it gives exists, and nothing cites the outside methods file any more.
Every figure the README and the guides quote comes from a committed results file (benchmarks/quoted_figures.py)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

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


def quoted_figures_module():
    """benchmarks/quoted_figures.py, loaded from its file (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("quoted_figures", ROOT / "benchmarks" / "quoted_figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def test_every_figure_the_readme_and_guides_quote_is_in_a_committed_results_file():
    qf = quoted_figures_module()
    documents = qf.default_documents()
    assert len(documents) >= 5 and sum(1 for path in documents for _ in qf.quoted_figures(path)) >= 200
    missing = [f"{figure.path.relative_to(ROOT)}:{figure.line}: {figure.text}"
               for figure in qf.unbacked(documents, qf.result_numbers(qf.RESULT_DIRS))]
    assert not missing, f"quoted in prose but in no file of benchmarks/results or simulations/results: {missing}"


def test_the_quoted_figures_check_fails_on_a_figure_no_results_file_holds(tmp_path):
    qf = quoted_figures_module()
    results = tmp_path / "results"
    results.mkdir()
    (results / "table.csv").write_text("cell,recall@20,bytes\na,0.11320,7792290\n")
    (results / "table.md").write_text("| users |\n|---|\n| 6,040 |\n")
    guide = tmp_path / "guide.md"
    guide.write_text("Recall@20 0.1132 (11.32 %), 7.79 MB, 6,040 users; but 0.1133 and 1,853 items.\n"
                     "```\nin code 0.9999 is not a figure\n```\n`inline 0.9998` neither\n")
    missing = qf.unbacked([guide], qf.result_numbers([results]))
    assert [(figure.line, figure.text) for figure in missing] == [(1, "0.1133"), (1, "1,853")]
