"""nexlab.core.text.markdown_table: the workbook's one table formatter (notebooks 00 and 04 show tables with it).

Expected strings are written out by hand, cell by cell, so a change of layout or number format fails here.
"""

from __future__ import annotations

import numpy as np

from nexlab.core.text import markdown_table


def test_markdown_table_layout_header_rule_and_one_line_per_row():
    s = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": 3.0}], floatfmt=".3g")
    assert s.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| 2 | 3 |"]


def test_ints_get_thousands_separators_python_and_numpy_alike():
    s = markdown_table([{"n": 1234567, "m": np.int64(-9876543), "k": 12}])
    assert s.splitlines()[2] == "| 1,234,567 | -9,876,543 | 12 |"


def test_floats_follow_floatfmt_python_and_numpy_alike():
    rows = [{"x": 1234.5678, "y": np.float32(0.5), "z": np.float64(2.0 / 3.0)}]
    assert markdown_table(rows).splitlines()[2] == "| 1235 | 0.5 | 0.6667 |"  # default .4g
    assert markdown_table(rows, floatfmt=".2f").splitlines()[2] == "| 1234.57 | 0.50 | 0.67 |"
    assert markdown_table([{"x": float("nan"), "y": float("inf")}]).splitlines()[2] == "| nan | inf |"


def test_other_values_are_str_and_bools_stay_words():
    rows = [{"s": "Q4_K", "shape": [2, 3], "ok": True, "none": None}]
    assert markdown_table(rows).splitlines()[2] == "| Q4_K | [2, 3] | True | None |"


def test_columns_choose_and_order_and_missing_keys_give_empty_cells():
    rows = [{"a": 1, "b": 2.5, "c": "x"}, {"a": 2}]
    s = markdown_table(rows, ["c", "a", "b"])
    assert s.splitlines() == ["| c | a | b |", "|---|---|---|", "| x | 1 | 2.5 |", "|  | 2 |  |"]


def test_default_columns_are_the_first_rows_keys():
    s = markdown_table([{"b": 1, "a": 2}, {"a": 3, "b": 4, "extra": 5}])
    assert s.splitlines()[0] == "| b | a |" and s.splitlines()[3] == "| 4 | 3 |"


def test_no_rows_give_an_empty_string():
    assert markdown_table([]) == ""
    assert markdown_table([], ["a", "b"]) == ""
