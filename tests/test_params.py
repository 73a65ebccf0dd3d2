"""Chapter parameters are checked at the top of each chapter (nexlab.workbook.params)."""

from __future__ import annotations

import ast
import json

import pytest

from nexlab.workbook import params as P
from nexlab.workbook import runner as workbook

NOTEBOOKS = workbook.list_notebooks()


def _cells(nb):
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    i = next(k for k, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    j = next(k for k in range(i + 1, len(cells)) if cells[k]["cell_type"] == "code")
    return "".join(cells[i]["source"]), "".join(cells[j]["source"])


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_checks_exactly_its_parameters_first(notebook):
    params_src, setup_src = _cells(notebook)
    body = ast.parse(params_src).body  # NAME: type = value (annotated, for papermill --help-notebook) or NAME = value
    names = [t.id for node in body for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    assert notebook.stem in P.CHAPTERS, f"add {notebook.stem}'s parameters to nexlab.workbook.params.CHAPTERS"
    assert names == list(P.CHAPTERS[notebook.stem]), ("nexlab.workbook.params.CHAPTERS must list "
                                                      "the parameters cell's names")
    first_call = next(n for n in ast.parse(setup_src).body if isinstance(n, ast.Expr))
    assert ast.unparse(first_call) == f"check_parameters('{notebook.stem}', globals())"
    # the committed defaults pass
    ns: dict = {}
    exec(params_src, ns)  # noqa: S102  literal assignments only
    assert P.check_parameters(notebook.stem, ns) == {k: ns[k] for k in names}


@pytest.mark.parametrize("chapter,name,value,words", [
    ("05_kv_cache_sizing", "VARIANT", "q5_k", "must be one of 'bf16', 'q8_0', 'q4_k_m'"),
    ("05_kv_cache_sizing", "RESERVE_GIB", -1.0, "must be a number >= 0"),
    ("05_kv_cache_sizing", "VERIFY_WITH_LLAMA", "yes", "must be True or False"),
    ("06_throughput", "DEPTH", -512, "must be an integer >= 0"),
    ("06_throughput", "THREADS", "1,,x", "positive integers separated by commas"),
    ("04_imatrix_quantization", "EVAL_CHUNK", 0, "must be an integer >= 1"),
    ("01_nvfp4_numerics", "BENCH_COLS", 100, "multiple of 64"),
    ("01_nvfp4_numerics", "SEED", 1.5, "must be an integer >= 0"),
    ("03_gguf_writing", "N_POSITIONS", 64, "must be an integer >= 128"),
])  # fmt: skip
def test_bad_value_names_chapter_parameter_value_and_rule(chapter, name, value, words, tmp_path):
    ns = {k: v for k, v in _defaults(chapter).items()}
    ns[name] = value
    with pytest.raises(P.ParameterError) as e:
        P.check_parameters(chapter, ns)
    msg = str(e.value)
    assert msg.startswith(f"notebook {chapter}: parameter {name} = {value!r}") and words in msg, msg


def test_missing_parameter_and_folders(tmp_path):
    ns = _defaults("02_checkpoint_repacking")
    del ns["LAYER"]
    (tmp_path / "file").write_text("x")
    ns["OUTPUT_DIR"] = str(tmp_path / "file")
    with pytest.raises(P.ParameterError, match="parameter OUTPUT_DIR = .* names a file, not a folder; "
                                               "parameter LAYER is missing"):
        P.check_parameters("02_checkpoint_repacking", ns)
    assert P.existing_folder(str(tmp_path / "nope")) == "does not exist"
    assert P.existing_folder(str(tmp_path)) is None


def _defaults(chapter: str) -> dict:
    nb = next(p for p in NOTEBOOKS if p.stem == chapter)
    ns: dict = {}
    exec(_cells(nb)[0], ns)  # noqa: S102
    return {k: ns[k] for k in P.CHAPTERS[chapter]}


@pytest.mark.notebook
def test_bad_parameter_stops_the_chapter_with_its_message(tmp_path):
    nb = next(p for p in NOTEBOOKS if p.stem == "05_kv_cache_sizing")
    paths = workbook.WorkbookPaths(tmp_path)
    params = workbook.notebook_parameters(nb, paths, smoke=True, seed=0, extra={"VARIANT": "q5_k"})
    with pytest.raises(workbook.NotebookFailed) as e:
        workbook.run_notebook(nb, paths.executed / nb.name, params)
    assert e.value.ename == "ParameterError" and e.value.cell_index == 2
    assert "notebook 05_kv_cache_sizing: parameter VARIANT = 'q5_k' must be one of" in e.value.evalue
    assert not (paths.outputs / nb.stem / "results.json").exists()
