"""Does every figure the README, the guides and the scripts' READMEs quote come from a committed results file?

A figure is a number in prose (not in code) with a decimal point, a thousands separator or a percent
sign. It is backed when some number in ``benchmarks/results`` or ``simulations/results`` (Markdown or
CSV) rounds to it at the figure's precision, either as it is or times 100 (a share quoted as a
percentage); a figure followed by a unit of bytes (KB, MB, GB; KiB, MiB, GiB) is also backed by a byte count
that rounds to it in that unit (7,792,290 B backs "7.79 MB"). Exits 1 listing the unbacked figures with
file and line. tests/test_docs.py runs the same check on the committed files.

    python benchmarks/quoted_figures.py            # README.md, docs/guides/*.md, benchmarks/ and simulations/ READMEs
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
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(\s?%|\s?[KMG]i?B\b)?(?![\w.]*\d)")
BYTE_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30}
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
    unit_bytes: float = 1.0  # bytes per unit when a unit of bytes follows the figure, else 1


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
            unit = (match.group(2) or "").strip()
            yield Figure(path, number, match.group(0).strip(), float(digits), decimals, BYTE_UNITS.get(unit, 1.0))


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
    """Some result rounds to the figure at its precision, as it is, as a percentage or as bytes in the figure's unit.
    Results count by magnitude: prose quotes a negative difference unsigned ("0.0244 below")."""
    target = round(figure.value, figure.decimals)
    scales = (1.0, 100.0) if figure.unit_bytes == 1.0 else (1.0, 100.0, 1 / figure.unit_bytes)
    return any(round(scale * abs(value), figure.decimals) == target for value in numbers for scale in scales)


def unbacked(documents: Iterable[Path], numbers: set[float]) -> list[Figure]:
    """The figures of ``documents`` that no number of ``numbers`` backs, in document and line order."""
    return [figure for path in documents for figure in quoted_figures(path) if not is_backed(figure, numbers)]


def default_documents() -> list[Path]:
    """The README, every guide and the READMEs of the benchmark and study scripts: the files whose figures must
    come from committed results."""
    return [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md")),
            ROOT / "benchmarks" / "README.md", ROOT / "simulations" / "README.md"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("documents", nargs="*", type=Path,
                        help="Markdown files (default: README.md, docs/guides/*.md and the scripts' READMEs)")
    args = parser.parse_args()
    documents = [path.resolve() for path in args.documents] or default_documents()
    missing = unbacked(documents, result_numbers(RESULT_DIRS))
    for figure in missing:
        where = figure.path.relative_to(ROOT) if figure.path.is_relative_to(ROOT) else figure.path
        print(f"{where}:{figure.line}: {figure.text} is in no committed results file")
    total = sum(1 for path in documents for _ in quoted_figures(path))
    print(f"{total - len(missing)} of {total} quoted figures are backed by a committed results file")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
