"""A ``--report-only`` rewrite of a committed table keeps the notes added on top of it."""

from __future__ import annotations

from fedsparse.experiments.tables import ResultTable, standing_notes


def test_standing_notes_keep_the_bold_paragraphs_above_the_header(tmp_path):
    table = tmp_path / "table.md"
    assert standing_notes(table) == ""  # no table yet
    table.write_text("**Made under the old rules**: say so.\n\n**Second note.**\n\nMeasured by `x`.\n\n| a |\n|---|\n| 1 |\n")
    assert standing_notes(table) == "**Made under the old rules**: say so.\n\n**Second note.**\n\n"
    table.write_text("Measured by `x`.\n\n**Not a note**: below the header.\n")
    assert standing_notes(table) == ""


def test_fill_sets_columns_of_one_cell_and_keeps_the_rows_order(tmp_path):
    table = ResultTable(tmp_path / "table.csv")
    for cell, value in (("a", 1), ("b", 2), ("c", 3)):
        table.add(cell, {"value": value})
    table.fill("b", {"added": 0.5, "value": 20})
    frame = table.frame()
    assert frame["cell"].tolist() == ["a", "b", "c"]
    assert frame["value"].tolist() == [1, 20, 3]
    assert frame["added"].isna().tolist() == [True, False, True]
    assert frame.loc[1, "added"] == 0.5
