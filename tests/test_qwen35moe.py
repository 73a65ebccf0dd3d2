"""The one model of qwen35moe (nexlab.model.qwen35moe): the plan predicts every byte nexlab convert writes.

References: the files nexlab's converter writes (themselves proven equal to llama.cpp's
convert_hf_to_gguf.py and llama_model_quantize in test_convert.py / test_variants.py), read back
with gguf-py's GGUFReader and os.path.getsize.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from nexlab.artifacts.tiny import ensure_tiny
from nexlab.convert import text as cv
from nexlab.model import hparams
from nexlab.model import qwen35moe as Q

VARIANTS = ("bf16", "q8_0", "q4_k_m")
PKG = Path(__file__).resolve().parent.parent / "nexlab"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    ckpt = ensure_tiny(smoke=True)["nvfp4"]
    root = tmp_path_factory.mktemp("q35")
    return ckpt, {v: cv.convert_checkpoint(ckpt, root / f"tiny-{v}.gguf", variant=v, show_progress=False).path
                  for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_predicted_size_equals_written_file(tiny_files, variant):
    ckpt, files = tiny_files
    assert cv.predict_file_size(ckpt, variant) == os.path.getsize(files[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_plan_from_config_alone_equals_written_tensors(tiny_files, variant):
    """Names, types, shapes and order of the file from config.json alone (no weights read)."""
    ckpt, files = tiny_files
    hp = hparams.hparams_from_hf_config(json.loads((Path(ckpt) / "config.json").read_text()))
    plan = Q.tensor_plan(hp, variant, nvfp4="mlp")
    got = [(t.name, gguf.GGMLQuantizationType(int(t.tensor_type)), tuple(int(x) for x in reversed(t.shape)))
           for t in gguf.GGUFReader(str(files[variant])).tensors]
    assert [(t.name, t.ggml_type, t.shape) for t in plan] == got


def test_hparams_read_back_from_the_written_file(tiny_files):
    ckpt, files = tiny_files
    want = hparams.hparams_from_hf_config(json.loads((Path(ckpt) / "config.json").read_text()))
    got = hparams.hparams_from_gguf(files["bf16"])
    f32 = lambda x: float(np.float32(x))  # noqa: E731  (GGUF stores floats as float32)
    assert got == Q.replace(want, name=got.name, rms_eps=f32(want.rms_eps), rope_theta=f32(want.rope_theta))


def test_real_plan_counts_match_the_model_card_arithmetic():
    """Nex-N2-mini: 40 layers x 3 stacked expert tensors of 256 experts, 32.21 B routed parameters."""
    hp = hparams.nex_n2_mini()
    plan = Q.tensor_plan(hp, "bf16")
    exps = [t for t in plan if t.name.endswith("_exps.weight")]
    assert len(exps) == 120 and all(t.ggml_type == Q.QT.NVFP4 for t in exps)
    assert sum(t.shape[0] * t.shape[1] * t.shape[2] for t in exps) == 40 * 256 * 3 * 512 * 2048
    assert len({t.name for t in plan}) == len(plan)


def test_unknown_variant_and_scope_are_refused():
    hp = hparams.nex_n2_mini()
    with pytest.raises(ValueError, match="variant"):
        Q.tensor_plan(hp, "q2_k")
    with pytest.raises(ValueError, match="scope"):
        Q.tensor_plan(hp, "bf16", nvfp4="attention")


def _nexlab_imports(path: Path) -> set[str]:
    """Every nexlab module a file imports, at top level or inside functions (``from nexlab.x import y``
    names module ``nexlab.x.y`` when that is a module, else ``nexlab.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nexlab")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nexlab"):
            assert node.level == 0, f"{path}: relative import"
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module_name(p: Path) -> str:
    parts = p.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_in_nexlab():
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: sorted(d for d in _nexlab_imports(p) if d in mods and d != m and not m.startswith(d + "."))
             for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert graph["nexlab.model.qwen35moe"] and not any(d.startswith("nexlab.convert.text")
                                                       for d in graph["nexlab.analysis.imatrix"])
