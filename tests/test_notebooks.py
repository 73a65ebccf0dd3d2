"""Every notebook, executed by papermill in smoke mode: each alone, then the whole chain in order.

"Alone" means an empty artifacts folder: the notebook must build what it needs through
nexlab. The chain shares one artifacts folder, as `make workbook` does. A failed
assert in a notebook fails the test and names the cell.
"""

from __future__ import annotations

import json

import pytest

from nexlab.workbook import runner as workbook

NOTEBOOKS = workbook.list_notebooks()
pytestmark = pytest.mark.notebook


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_alone_in_smoke_mode(notebook, tmp_path):
    paths = workbook.WorkbookPaths(tmp_path)
    params = workbook.notebook_parameters(notebook, paths, smoke=True, seed=0, extra={})
    workbook.run_notebook(notebook, paths.executed / notebook.name, params)
    results = json.loads((paths.outputs / notebook.stem / "results.json").read_text())
    assert results, f"{notebook.name} recorded no results"


def test_workbook_chain_runs_in_order(tmp_path):
    times = workbook.run_workbook(smoke=True, root=tmp_path)
    assert list(times) == [p.stem for p in NOTEBOOKS]
    for stem in times:
        assert (tmp_path / "outputs" / stem / "results.json").exists()
        assert (tmp_path / "executed" / f"{stem}.ipynb").exists()
