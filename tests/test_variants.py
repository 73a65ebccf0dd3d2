"""The proof of issue 5: nexlab's NVFP4-Q4_K_M / NVFP4-Q8_0 files equal llama.cpp's.

nexlab writes the variants straight from the ModelOpt checkpoint
(``nexlab.convert.text.convert_checkpoint(ckpt, out, variant=..., imatrix=FILE)`` and
``nexlab convert --variant ... --imatrix FILE``). The oracle is llama.cpp's own quantizer,
``llama_model_quantize`` through llama-cpp-python (``run_llama_quantize`` from tests/test_quantize.py:
NVFP4 expert tensors kept by tensor-type overrides, the same imatrix passed as column weights), run on
nexlab's NVFP4-BF16 GGUF of the same checkpoint. The files are compared with gguf-py's GGUFReader:
tensor names, order, ggml types, ggml shapes, data bytes, every metadata key and value, and finally the
whole file byte for byte.

tests/test_quantize.py's end-to-end test checks llama.cpp's output against nexlab's *planner and
quantizer*; this file checks nexlab's *converter output file* against llama.cpp's file, and how the
converter treats bad imatrix files (missing entry: fall back like llama.cpp and say so; wrong length or
non-finite values: a clear error and no file left behind).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_quantize import run_llama_quantize  # noqa: E402

from nexlab.analysis import imatrix_torch
from nexlab.ggufio import imatrix_file as IM  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    """The tiny NVFP4 checkpoint, nexlab's NVFP4-BF16 GGUF of it, and an imatrix collected on calib text."""
    from tokenizers import Tokenizer

    from nexlab.analysis import reference
    from nexlab.artifacts.tiny import ensure_tiny
    from nexlab.convert import text as convert

    p = ensure_tiny(smoke=True)
    d = tmp_path_factory.mktemp("variants")
    src = d / "tiny-NVFP4-BF16.gguf"
    convert.convert_checkpoint(p["nvfp4"], src, variant="bf16", show_progress=False)
    ids = Tokenizer.from_file(str(p["tokenizer"] / "tokenizer.json")).encode(
        p["calib_text"].read_text(encoding="utf-8")[:20000]).ids
    im = imatrix_torch.collect_imatrix(reference.build_hf_model(p["nvfp4"]), ids, chunk_size=128, n_chunks=2,
                            dataset="calib.txt", show_progress=False)
    imf = IM.write_imatrix(d / "tiny.imatrix.gguf", im)
    return {"dir": d, "ckpt": p["nvfp4"], "src": src, "imatrix": Path(imf), "cache": {}}


def _pair(proof, variant: str, with_imatrix: bool):
    """(nexlab's file, llama.cpp's file) for one variant, made once per module."""
    from nexlab.convert import text as convert

    key = (variant, with_imatrix)
    if key not in proof["cache"]:
        d = proof["dir"]
        tag = f"{variant}{'-imatrix' if with_imatrix else ''}"
        ours, theirs = d / f"nexlab-{tag}.gguf", d / f"llama-{tag}.gguf"
        imf = proof["imatrix"] if with_imatrix else None
        convert.convert_checkpoint(proof["ckpt"], ours, variant=variant, imatrix=imf, show_progress=False)
        weights = IM.quantize_weights(IM.read_imatrix(imf)) if with_imatrix else None
        run_llama_quantize(proof["src"], theirs, variant, weights)
        proof["cache"][key] = (ours, theirs)
    return proof["cache"][key]


def _tensors(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.asarray(t.data).tobytes()) for t in r.tensors}


def _kvs(path) -> list:
    r = gguf.GGUFReader(str(path))
    out = []
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        out.append((k, [int(t) for t in f.types], [bytes(np.asarray(f.parts[i]).tobytes()) for i in f.data]))
    return out


def _ne(shape: list[int]) -> list[int]:
    """ggml ne with trailing 1s dropped (ggml_n_dims: [256, 1] and [256] are the same tensor shape)."""
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def assert_same_tensors(ours, theirs):
    """Same names, ggml types, data bytes and ggml shapes (trailing 1s ignored; n_dims is checked with
    the whole file)."""
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b), f"tensor names differ: only nexlab {sorted(set(a) - set(b))[:5]}, " \
                                   f"only llama.cpp {sorted(set(b) - set(a))[:5]}"
    types = {n: (a[n][0], b[n][0]) for n in a if a[n][0] != b[n][0]}
    assert not types, f"ggml types differ (nexlab, llama.cpp): {dict(list(types.items())[:5])}"
    data = [n for n in a if a[n][2] != b[n][2]]
    assert not data, f"{len(data)} tensors' bytes differ, e.g. {data[:5]}"
    shapes = {n: (a[n][1], b[n][1]) for n in a if _ne(a[n][1]) != _ne(b[n][1])}
    assert not shapes, f"{len(shapes)} ggml shapes differ (nexlab, llama.cpp), e.g. {dict(list(shapes.items())[:3])}"
    return a


VARIANTS = [("q4_k_m", True), ("q4_k_m", False), ("q8_0", True), ("q8_0", False)]
IDS = ["q4_k_m+imatrix", "q4_k_m", "q8_0+imatrix", "q8_0"]


@pytest.mark.parametrize(("variant", "with_imatrix"), VARIANTS, ids=IDS)
def test_every_tensor_type_shape_and_byte_equals_llama_model_quantize(proof, variant, with_imatrix):
    ours, theirs = _pair(proof, variant, with_imatrix)
    t = assert_same_tensors(ours, theirs)
    kinds = {v[0] for v in t.values()}
    assert "NVFP4" in kinds  # experts kept
    assert kinds >= ({"Q4_K", "Q6_K"} if variant == "q4_k_m" else {"Q8_0"})


@pytest.mark.parametrize(("variant", "with_imatrix"), VARIANTS[:1] + VARIANTS[2:3], ids=[IDS[0], IDS[2]])
def test_metadata_equals_llama_model_quantize(proof, variant, with_imatrix):
    """Every key, its type and value (general.file_type 15 / 7, quantization_version 2, qwen35moe.*,
    tokenizer.*); the order is checked with the whole file."""
    ours, theirs = _pair(proof, variant, with_imatrix)
    a, b = _kvs(ours), _kvs(theirs)
    da, db = dict((k, v) for k, *v in a), dict((k, v) for k, *v in b)
    assert sorted(da) == sorted(db), \
        f"keys only in nexlab {sorted(set(da) - set(db))}, only in llama.cpp {sorted(set(db) - set(da))}"
    diff = [k for k in da if da[k] != db[k]]
    assert not diff, f"metadata values differ: {diff}"
    ft = gguf.GGUFReader(str(ours)).fields["general.file_type"]
    assert int(ft.parts[ft.data[0]][0]) == {"q4_k_m": 15, "q8_0": 7}[variant]


@pytest.mark.parametrize(("variant", "with_imatrix"), VARIANTS[:1] + VARIANTS[2:3], ids=[IDS[0], IDS[2]])
def test_whole_file_is_byte_identical_to_llama_model_quantize(proof, variant, with_imatrix):
    """Tensor order (llama.cpp writes weights_map order: layer, then name), metadata key order
    (gguf_set_val_u32 removes and re-appends general.quantization_version and general.file_type, so
    they come last) and ggml n_dims (llama.cpp writes ggml_n_dims, trailing 1s dropped) included."""
    ours, theirs = _pair(proof, variant, with_imatrix)
    na = [t.name for t in gguf.GGUFReader(str(ours)).tensors]
    nb = [t.name for t in gguf.GGUFReader(str(theirs)).tensors]
    assert na == nb, f"tensor order differs: nexlab starts {na[:3]}, llama.cpp {nb[:3]}"
    ka, kb = [k for k, *_ in _kvs(ours)], [k for k, *_ in _kvs(theirs)]
    assert ka == kb, f"metadata key order differs: nexlab ends {ka[-3:]}, llama.cpp ends {kb[-3:]}"
    ta, tb = _tensors(ours), _tensors(theirs)
    dims = {n: (ta[n][1], tb[n][1]) for n in ta if ta[n][1] != tb[n][1]}
    assert not dims, f"{len(dims)} tensors' ggml n_dims differ (nexlab, llama.cpp), e.g. {dict(list(dims.items())[:2])}"
    a, b = Path(ours).read_bytes(), Path(theirs).read_bytes()
    assert len(a) == len(b), f"file sizes differ: nexlab {len(a)}, llama.cpp {len(b)}"
    assert a == b, f"files differ from byte {next(i for i in range(len(a)) if a[i] != b[i])}"


def test_cli_convert_variant_imatrix_writes_the_api_file(proof):
    from nexlab.cli import main

    ours, _ = _pair(proof, "q4_k_m", True)
    out = proof["dir"] / "cli-q4_k_m.gguf"
    rc = main(["convert", str(proof["ckpt"]), "-o", str(out), "--variant", "q4_k_m", "--imatrix",
               str(proof["imatrix"]), "-q"])
    assert rc == 0
    assert out.read_bytes() == Path(ours).read_bytes()


def test_imatrix_changes_the_q4_k_m_bytes(proof):
    """The imatrix is really used (so the equality above is not the no-imatrix path twice)."""
    with_im, _ = _pair(proof, "q4_k_m", True)
    without, _ = _pair(proof, "q4_k_m", False)
    a, b = _tensors(with_im), _tensors(without)
    assert a["blk.0.attn_qkv.weight"][2] != b["blk.0.attn_qkv.weight"][2]
    assert a["output.weight"][2] == b["output.weight"][2]  # no entry in the imatrix (llama-imatrix skips output)
    assert a["blk.0.ffn_gate_exps.weight"][2] == b["blk.0.ffn_gate_exps.weight"][2]  # NVFP4 kept


# --------------------------------------------------------------------------- bad imatrix input


def _edited_imatrix(proof, path, edit):
    im = IM.read_imatrix(proof["imatrix"])
    edit(im.entries)
    return IM.write_imatrix(path, im)


def _files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_imatrix_missing_a_tensor_falls_back_like_llama_and_says_so(proof, tmp_path, capfd, caplog, recwarn):
    from nexlab.convert import text as convert

    name = "blk.0.attn_qkv.weight"
    imf = _edited_imatrix(proof, tmp_path / "missing.imatrix.gguf", lambda e: e.pop(name))
    ours, theirs = tmp_path / "nexlab.gguf", tmp_path / "llama.gguf"
    capfd.readouterr()
    convert.convert_checkpoint(proof["ckpt"], ours, variant="q4_k_m", imatrix=imf, show_progress=False)
    out = capfd.readouterr()
    said = out.out + out.err + caplog.text + " ".join(str(w.message) for w in recwarn)
    weights = IM.quantize_weights(IM.read_imatrix(imf))
    assert name not in weights
    run_llama_quantize(proof["src"], theirs, "q4_k_m", weights)
    t = assert_same_tensors(ours, theirs)
    no_im = _tensors(_pair(proof, "q4_k_m", False)[0])
    assert t[name][2] == no_im[name][2]  # quantized without importance weights
    assert name in said and "did not find weights" in said, \
        f"nexlab.convert.text fell back silently for {name} (llama.cpp logs 'did not find weights for {name}')"


def test_imatrix_of_the_wrong_length_is_refused_by_both(proof, tmp_path):
    from nexlab.convert import text as convert

    name = "blk.0.attn_qkv.weight"

    def halve(e):
        s = e[name]
        e[name] = IM.ImatrixEntry(np.ascontiguousarray(s.in_sum2[:, : s.in_sum2.shape[1] // 2]), s.counts)

    imf = _edited_imatrix(proof, tmp_path / "short.imatrix.gguf", halve)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ValueError, match=r"imatrix size 128 is different from tensor size 256 for blk\.0\.attn_qkv"):
        convert.convert_checkpoint(proof["ckpt"], out_dir / "x.gguf", variant="q4_k_m", imatrix=imf,
                                   show_progress=False)
    assert _files_in(out_dir) == set(), "a failed conversion left files behind"
    with pytest.raises(AssertionError, match="llama_model_quantize failed"):
        run_llama_quantize(proof["src"], out_dir / "llama.gguf", "q4_k_m", IM.quantize_weights(IM.read_imatrix(imf)))


def test_imatrix_with_wrong_expert_count_is_refused(proof, tmp_path):
    from nexlab.convert import text as convert

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name2 = "blk.3.attn_q.weight"

    def double2(e):
        s = e[name2]
        e[name2] = IM.ImatrixEntry(np.concatenate([s.in_sum2, s.in_sum2]), np.concatenate([s.counts, s.counts]))

    imf2 = _edited_imatrix(proof, tmp_path / "twice2.imatrix.gguf", double2)
    with pytest.raises(ValueError, match=r"blk\.3\.attn_q\.weight"):
        convert.convert_checkpoint(proof["ckpt"], out_dir / "y.gguf", variant="q4_k_m", imatrix=imf2,
                                   show_progress=False)
    assert _files_in(out_dir) == set()


def test_imatrix_with_non_finite_values_is_refused(proof, tmp_path):
    from nexlab.convert import text as convert

    im = IM.read_imatrix(proof["imatrix"])
    w = gguf.GGUFWriter(str(tmp_path / "nan.imatrix.gguf"), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", im.datasets)
    w.add_uint32("imatrix.chunk_count", im.chunk_count)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for n, e in sorted(im.entries.items()):
        s = np.array(e.in_sum2, np.float32)
        if n == "blk.1.attn_gate.weight":
            s.reshape(-1)[7] = np.nan
        w.add_tensor(n + ".in_sum2", s if s.shape[0] > 1 else s.reshape(-1))
        w.add_tensor(n + ".counts", np.asarray(e.counts, np.float32).reshape(-1, 1) if s.shape[0] > 1
                     else np.asarray(e.counts, np.float32).reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ValueError, match=r"blk\.1\.attn_gate\.weight.*non-finite"):
        convert.convert_checkpoint(proof["ckpt"], out_dir / "x.gguf", variant="q4_k_m",
                                   imatrix=tmp_path / "nan.imatrix.gguf", show_progress=False)
    assert _files_in(out_dir) == set()


def test_missing_imatrix_file_is_named(proof, tmp_path):
    from nexlab.convert import text as convert

    with pytest.raises(FileNotFoundError, match="nope.imatrix.gguf"):
        convert.convert_checkpoint(proof["ckpt"], tmp_path / "x.gguf", variant="q4_k_m",
                                   imatrix=tmp_path / "nope.imatrix.gguf", show_progress=False)
    assert not (tmp_path / "x.gguf").exists()

