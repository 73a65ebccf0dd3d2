"""Project hygiene: dependency lists agree, notebooks are committed clean and follow the conventions."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import tomllib

from nexlab.workbook import results
from nexlab.workbook import runner as workbook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = workbook.list_notebooks()
REQUIRED_PARAMETERS = {"SMOKE", "SEED", "OUTPUT_DIR", "ARTIFACTS_DIR"}


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def _environment_pip_list(text: str) -> list[str]:
    """The `- pip:` section of environment.yml (a list of requirement strings), without a YAML parser."""
    lines, inside = [], False
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].rstrip()
        if re.match(r"^\s*-\s*pip:\s*$", stripped):
            inside = True
            continue
        if inside:
            m = re.match(r"^\s{6,}-\s*(\S.*)$", stripped)
            if m:
                lines.append(m.group(1).strip())
            elif stripped.strip():
                break
    return lines


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = project["dependencies"] + project["optional-dependencies"]["test"]
    env = _environment_pip_list((ROOT / "environment.yml").read_text())
    assert env, "environment.yml has no pip section"
    assert sorted(map(_norm, env)) == sorted(map(_norm, pyproject))


def test_torch_is_pinned_to_the_cpu_wheel_on_disk():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps


def test_notebooks_exist_in_chapter_order():
    stems = [p.stem for p in NOTEBOOKS]
    assert stems, "no notebooks"
    assert stems == sorted(stems)
    assert stems[0].startswith("00_") or stems[0].startswith("01_")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs_and_one_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{path.name} has outputs"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: need exactly one cell tagged 'parameters'"
    tree = ast.parse("".join(tagged[0]["source"]))
    names = set()
    for node in tree.body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), f"{path.name}: parameters cell holds only assignments"
        value = node.value
        ast.literal_eval(value)  # literals only, as papermill expects
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names.update(t.id for t in targets)
    assert REQUIRED_PARAMETERS <= names, f"{path.name}: missing {REQUIRED_PARAMETERS - names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_records_results(path):
    source = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert "record(" in source, f"{path.name} never records results.json"


def test_notebook_table_lists_every_notebook():
    table = (ROOT / "notebooks" / "README.md").read_text()
    for p in NOTEBOOKS:
        assert p.name in table or p.stem in table, f"notebooks/README.md does not list {p.name}"


def test_results_record_merges_and_converts_numpy(tmp_path):
    results.record(tmp_path, a=np.float32(1.5), b=np.arange(3))
    results.record(tmp_path, c="x", a=2)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == {"a": 2, "b": [0, 1, 2], "c": "x"}
    assert not list(tmp_path.glob(".results.*")), "temporary file left behind"


def test_workbook_parameter_parsing():
    assert workbook.parse_parameter("N_STEPS=5") == ("N_STEPS", 5)
    assert workbook.parse_parameter("NAME=tiny") == ("NAME", "tiny")
    assert workbook.parse_parameter("SMOKE=True") == ("SMOKE", True)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        workbook.parse_parameter("oops")
    with pytest.raises(ValueError, match="not a valid parameter name"):
        workbook.parse_parameter("1x=2")


def test_workbook_only_rejects_unknown_notebook():
    with pytest.raises(ValueError, match="no notebook matches"):
        workbook.select_notebooks(["99"])


def test_cli_lists_subcommands():
    from nexlab.cli import build_parser

    help_text = build_parser().format_help()
    assert "workbook" in help_text


def test_failing_notebook_names_the_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("SMOKE = True"), nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("assert x == 2, 'x should be two'")]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, src)
    with pytest.raises(workbook.NotebookFailed) as info:
        workbook.run_notebook(src, tmp_path / "out.ipynb", {"SMOKE": True})
    message = str(info.value)
    assert "99_broken.ipynb" in message and "AssertionError" in message and "x should be two" in message
    assert info.value.cell_index == 2 and "cell 2" in message and "assert x == 2" in message
