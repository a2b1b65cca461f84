"""A ``--report-only`` rewrite of a committed table keeps the notes added on top of it."""

from __future__ import annotations

from fedsparse.experiments.tables import standing_notes


def test_standing_notes_keep_the_bold_paragraphs_above_the_header(tmp_path):
    table = tmp_path / "table.md"
    assert standing_notes(table) == ""  # no table yet
    table.write_text("**Made under the old rules**: say so.\n\n**Second note.**\n\nMeasured by `x`.\n\n| a |\n|---|\n| 1 |\n")
    assert standing_notes(table) == "**Made under the old rules**: say so.\n\n**Second note.**\n\n"
    table.write_text("Measured by `x`.\n\n**Not a note**: below the header.\n")
    assert standing_notes(table) == ""
