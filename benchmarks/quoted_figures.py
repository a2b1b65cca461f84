"""Does every figure the README and the guides quote come from a committed results file?

A figure is a number in prose (not in code) with a decimal point, a thousands separator or a percent
sign. It is backed when some number in ``benchmarks/results`` or ``simulations/results`` (Markdown or
CSV) rounds to it at the figure's precision, either as it is or times 100 (a share quoted as a
percentage). Exits 1 listing the unbacked figures with file and line.

    python benchmarks/quoted_figures.py            # README.md and docs/guides/*.md
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_DIRS = (ROOT / "benchmarks" / "results", ROOT / "simulations" / "results")
RESULT_SUFFIXES = (".md", ".csv")
FENCE = re.compile(r"^\s*```")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(\s?%)?(?![\w.]*\d)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class Figure:
    """One quoted figure: its text, where it stands, and its value at its own precision."""

    path: Path
    line: int
    text: str
    value: float
    decimals: int


def quoted_figures(path: Path) -> Iterator[Figure]:
    """The figures of a Markdown file's prose: code blocks, inline code and link targets are skipped."""
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        prose = LINK_TARGET.sub("]", INLINE_CODE.sub(" ", line))
        for match in FIGURE.finditer(prose):
            digits = match.group(1).replace(",", "")
            decimals = len(digits.split(".")[1]) if "." in digits else 0
            yield Figure(path, number, match.group(0).strip(), float(digits), decimals)


def result_numbers(directories: Iterable[Path]) -> set[float]:
    """Every number written in the committed results files."""
    numbers: set[float] = set()
    for directory in directories:
        for path in sorted(directory.rglob("*")):
            if path.suffix in RESULT_SUFFIXES and path.is_file():
                text = path.read_text()
                # a CSV's commas separate fields; in Markdown a comma between digit groups is a thousands separator
                text = text.replace(",", " ") if path.suffix == ".csv" else THOUSANDS.sub("", text)
                numbers.update(float(token) for token in NUMBER.findall(text))
    return numbers


def is_backed(figure: Figure, numbers: set[float]) -> bool:
    """Some result rounds to the figure at its precision, as it is or as a percentage."""
    target = round(figure.value, figure.decimals)
    return any(round(value, figure.decimals) == target or round(100 * value, figure.decimals) == target for value in numbers)


def unbacked(documents: Iterable[Path], numbers: set[float]) -> list[Figure]:
    return [figure for path in documents for figure in quoted_figures(path) if not is_backed(figure, numbers)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("documents", nargs="*", type=Path, help="Markdown files (default: README.md and docs/guides/*.md)")
    args = parser.parse_args()
    defaults = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
    documents = [path.resolve() for path in args.documents] or defaults
    missing = unbacked(documents, result_numbers(RESULT_DIRS))
    for figure in missing:
        print(f"{figure.path.relative_to(ROOT)}:{figure.line}: {figure.text} is in no committed results file")
    total = sum(1 for path in documents for _ in quoted_figures(path))
    print(f"{total - len(missing)} of {total} quoted figures are backed by a committed results file")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
