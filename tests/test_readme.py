"""nexlab.workbook.readme: README.md's measured figures are the committed records' (``nexlab readme``)."""

from __future__ import annotations

import pytest

from nexlab.cli import main
from nexlab.workbook import readme


def test_readme_figures_equal_the_records():
    """Every marked block of README.md is what its record renders to; a hand edit, or a record remade
    without `nexlab readme`, fails here."""
    assert readme.update_readme(check=True) == []


def test_a_figure_edited_by_hand_is_found_and_rewritten(tmp_path, capsys):
    text = readme.README.read_text()
    assert "| 0.45 |" in text
    bad = tmp_path / "README.md"
    bad.write_text(text.replace("| 0.45 |", "| 0.40 |", 1))
    assert main(["readme", "--check", "--readme", str(bad)]) == 1
    assert "full_size" in capsys.readouterr().out
    assert readme.update_readme(bad) == ["full_size"] and bad.read_text() == text


def test_blocks_and_renderers_must_match(tmp_path):
    f = tmp_path / "README.md"
    f.write_text("<!-- nexlab readme: nope -->\n<!-- /nexlab readme: nope -->\n")
    with pytest.raises(ValueError, match="without a renderer"):
        readme.update_readme(f, check=True)
