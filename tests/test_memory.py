"""nexlab.analysis.memory against the real implementations.

- GGUF encoding: header/metadata/tensor-info bytes against gguf-py's GGUFWriter/GGUFReader;
  predicted Q8_0 / Q4_K_M file sizes against files llama.cpp's own llama_model_quantize writes.
- Weights in memory against llama.cpp's llama_model_size().
- KV cache and recurrent state against what llama.cpp allocates when it creates a context
  (llama-cpp-python 0.3.36): its ``llama_context: n_ctx / n_ctx_seq`` and ``llama_kv_cache`` /
  ``llama_memory_recurrent`` lines give the cell, layer, sequence and stream counts as exact
  integers; the bytes are then ``ggml_nbytes`` of the cache tensors with those dimensions,
  computed by libggml itself (ctypes), and must equal nexlab's bytes exactly; the MiB strings
  llama.cpp prints must equal nexlab's bytes printed the same way.
"""

from __future__ import annotations

import ctypes
import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from nexlab.analysis import memory as M
from nexlab.convert.mmproj import mmproj_size
from nexlab.convert.text import write_shape_gguf
from nexlab.ggufio import layout
from nexlab.ggufio.layout import file_nbytes, header_nbytes
from nexlab.llamacpp import runtime as LL
from nexlab.llamacpp import source
from nexlab.model import hparams as Q
from nexlab.model import qwen35moe
from nexlab.model.config import slice_config, tiny_config

QT = gguf.GGMLQuantizationType

CACHE_TYPES = ["f16", "bf16", "q8_0", "q4_0"]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny():
    return Q.hparams_from_hf_config(tiny_config(), name="tiny")


@pytest.fixture(scope="module")
def slice_model():
    # real per-layer shapes (one period: 3 linear + 1 full attention); 8 experts and a 1024 vocab
    # keep the file small -- neither enters the KV cache or the recurrent state
    m = Q.hparams_from_hf_config(slice_config(vocab_size=1024), name="slice")
    return replace(m, n_expert=8)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny):
    p = tmp_path_factory.mktemp("mem") / "tiny-bf16.gguf"
    specs = write_shape_gguf(p, tiny, "bf16")
    return p, specs


@pytest.fixture(scope="module")
def slice_gguf(tmp_path_factory, slice_model):
    p = tmp_path_factory.mktemp("mem") / "slice-q4_k_m.gguf"
    specs = write_shape_gguf(p, slice_model, "q4_k_m")
    return p, specs


# ------------------------------------------------------------------ libggml oracle


def _libggml():
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(lib_dir.glob("libggml-base.*"))
    assert cands, f"libggml-base not found in {lib_dir} (llama-cpp-python {source.LLAMA_CPP_PYTHON_VERSION} ships it)"
    lib = ctypes.CDLL(str(cands[0]))

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_init.argtypes = [InitParams]
    lib.ggml_init.restype = ctypes.c_void_p
    lib.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_new_tensor_2d.restype = ctypes.c_void_p
    lib.ggml_new_tensor_3d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_new_tensor_3d.restype = ctypes.c_void_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib, InitParams


def ggml_nbytes(qtype: int, *ne: int) -> int:
    """ggml_nbytes of a tensor created by libggml (no data allocated)."""
    lib, InitParams = _libggml()
    ctx = lib.ggml_init(InitParams(16 * lib.ggml_tensor_overhead(), None, True))
    try:
        t = (lib.ggml_new_tensor_2d(ctx, int(qtype), *ne) if len(ne) == 2
             else lib.ggml_new_tensor_3d(ctx, int(qtype), *ne))
        return int(lib.ggml_nbytes(t))
    finally:
        lib.ggml_free(ctx)


# ------------------------------------------------------------------ pure arithmetic


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.NVFP4])
def test_tensor_nbytes_equals_gguf_byte_shape(qtype):
    ne = (512, 3, 2)
    byte_shape = gguf.quant_shape_to_byte_shape(tuple(reversed(ne)), qtype)
    assert M.tensor_nbytes(ne, qtype) == int(np.prod(byte_shape))


def test_tensor_nbytes_rejects_partial_block():
    with pytest.raises(ValueError, match="Q4_K"):
        M.tensor_nbytes((128, 4), QT.Q4_K)


def test_header_bytes_equal_gguf_writer(tmp_path):
    """gguf_layout sizes a writer exactly as gguf-py writes it (strings, arrays of strings/ints/bools,
    scalars, tensor infos, alignment padding): header == GGUFReader's data offset, total == file size."""
    p = tmp_path / "h.gguf"
    md = [("general.name", "héllo wörld", gguf.GGUFValueType.STRING, None),
          ("x.u32", 7, gguf.GGUFValueType.UINT32, None), ("x.f32", 1.5, gguf.GGUFValueType.FLOAT32, None),
          ("x.bool", True, gguf.GGUFValueType.BOOL, None), ("x.u64", 9, gguf.GGUFValueType.UINT64, None),
          ("x.arr_i32", [1, 2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
          ("x.arr_bool", [True, False, True], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL),
          ("x.arr_str", ["a", "bcd", "€"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)]
    tensors = [layout.TensorSpec("a.weight", (3, 64), QT.F32), layout.TensorSpec("bb.weight", (5,), QT.F32),
               layout.TensorSpec("c", (2, 2, 32), QT.F32)]

    def add_metadata(w):
        for k, v, t, st in md:
            w.add_key_value(k, v, t, sub_type=st)

    from nexlab.ggufio.layout import make_writer
    from nexlab.ggufio.writer import PlannedTensor, write_gguf
    write_gguf(p, "qwen35moe", add_metadata, [PlannedTensor(t, lambda t=t: np.zeros(t.shape, np.float32))
                                             for t in tensors], show_progress=False)
    w = make_writer("qwen35moe", add_metadata, tensors)
    assert header_nbytes(w) == gguf.GGUFReader(str(p)).data_offset
    assert file_nbytes(w) == os.path.getsize(p)


def test_shape_gguf_size_equals_prediction(tiny_gguf):
    p, specs = tiny_gguf
    g = M.gguf_file_size_from_gguf(p)
    assert g["file_bytes"] == os.path.getsize(p)
    assert g["weights_bytes"] == M.weights_bytes(specs)
    # the tensor list read back is the planned one
    assert [(s.name, s.ne, s.ggml_type) for s in g["specs"]] == [(s.name, s.ne, s.ggml_type) for s in specs]


def test_ctx_layout_padding_and_streams():
    assert M.llama_ctx_layout(1) == (256, 256, 1)
    assert M.llama_ctx_layout(257) == (512, 512, 1)
    assert M.llama_ctx_layout(1280, 4) == (2048, 512, 4)  # 1280/4 = 320 -> 512 per stream
    assert M.llama_ctx_layout(1280, 4, kv_unified=True) == (1280, 1280, 1)


def test_hybrid_kv_is_a_quarter_of_full_attention():
    m = Q.nex_n2_mini()
    hyb = M.kv_cache_size(m, 262144).bytes
    full = M.kv_cache_size(m.with_full_attention(), 262144).bytes
    assert hyb * 4 == full
    assert hyb == 10 * 2 * 262144 * 2 * 256 * 2  # 10 layers, K+V, cells, 2 heads x 256, f16


@pytest.mark.parametrize("bad", ["q3_k", "fp8", "", "f64"])
def test_unknown_cache_type_raises(tiny, bad):
    with pytest.raises(ValueError, match="cache type"):
        M.kv_cache_size(tiny, 4096, type_k=bad)
    with pytest.raises(ValueError, match="cache type"):
        M.kv_cache_size(tiny, 4096, type_v=bad)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_bad_n_ctx_raises(tiny, bad):
    with pytest.raises(ValueError, match="n_ctx"):
        M.kv_cache_size(tiny, bad)


def test_bad_sequences_raise(tiny):
    with pytest.raises(ValueError, match="n_seq"):
        M.kv_cache_size(tiny, 4096, n_seq=0)
    with pytest.raises(ValueError, match="n_seq"):
        M.recurrent_size(tiny, n_seq=257)


def test_quantized_v_without_flash_attention_raises(tiny):
    with pytest.raises(ValueError, match="flash_attn"):
        M.kv_cache_size(tiny, 4096, type_v="q8_0", flash_attn=False)


def test_unsupported_architecture_raises(tmp_path):
    with pytest.raises(ValueError, match="unsupported architecture"):
        Q.hparams_from_hf_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64})
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'llama'"):
        Q.hparams_from_gguf(p)


def test_context_above_training_warns_and_still_sizes(tiny):
    with pytest.warns(M.ContextOverflowWarning, match=r"n_ctx_seq \(8192\) > n_ctx_train \(4096\)"):
        kv = M.kv_cache_size(tiny, 8192)
    assert kv.n_ctx_seq == 8192 and kv.bytes == M.kv_cache_size(tiny, 4096).bytes * 2


def test_nested_text_config_equals_flat_text_config():
    cfg = tiny_config()
    flat = {**cfg["text_config"], "architectures": ["Qwen3_5MoeForCausalLM"]}
    a = Q.hparams_from_hf_config(cfg)
    b = Q.hparams_from_hf_config(flat)
    assert replace(a, vision=None) == replace(b, vision=None)


def test_mmproj_size_near_model_card():
    """903 MB per the Nex-N2-mini model card (F16 mmproj); the tensor arithmetic must be within 1 %."""
    b = mmproj_size(Q.nex_n2_mini().vision, "f16")
    assert abs(b - 903e6) / 903e6 < 0.01


def test_cli_json_breakdown(capsys, tiny_gguf):
    from nexlab.cli import main  # noqa: PLC0415
    p, specs = tiny_gguf
    rc = main(["memory", "--model", str(p), "--ctx", "3000", "--parallel", "2", "--cache-type-k", "q8_0",
               "--cache-type-v", "q4_0", "--mmproj", "12345", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["weights_bytes"] == M.weights_bytes(specs)
    assert d["mmproj_bytes"] == 12345
    assert d["total_bytes"] == d["weights_bytes"] + d["kv_bytes"] + d["recurrent_bytes"] + d["mmproj_bytes"]
    assert d["n_ctx"] == 3072


def test_cli_errors_are_clear(capsys):
    from nexlab.cli import main  # noqa: PLC0415
    assert main(["memory", "--cache-type-k", "q9_9"]) == 1
    assert "unknown cache type" in capsys.readouterr().err
    assert main(["memory", "--ctx", "0"]) == 1
    assert "n_ctx" in capsys.readouterr().err
    assert main(["memory", "--ctx", "300000"]) == 0
    assert "n_ctx_seq (300032) > n_ctx_train (262144) -- possible training context overflow" in capsys.readouterr().err
    assert main(["memory", "--model", "/nonexistent/config.json"]) == 1
    assert "neither" in capsys.readouterr().err


# ------------------------------------------------------------------ llama.cpp as the oracle


def _check_against_llama(probe, model: Q.HParams, n_ctx, tk, tv, n_seq, kv_unified=False, flash_attn=True):
    got = probe.allocate(n_ctx, tk, tv, n_seq, kv_unified=kv_unified, flash_attn=flash_attn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kv = M.kv_cache_size(model, n_ctx, tk, tv, n_seq, kv_unified=kv_unified, flash_attn=flash_attn)
    rs = M.recurrent_size(model, n_seq)
    # the layout llama.cpp derived
    assert (got["n_ctx"], got["n_ctx_seq"]) == (kv.n_ctx, kv.n_ctx_seq)
    k, r = got["kv"], got["rs"]
    assert (k["cells"], k["layers"], k["n_seq"], k["n_stream"]) == (kv.n_ctx_seq, kv.n_layers, n_seq, kv.n_stream)
    assert (k["type_k"], k["type_v"]) == (tk, tv)
    assert (r["cells"], r["n_seq"], r["n_rs_seq"]) == (rs.cells, n_seq, 0)
    assert r["layers"] == model.n_layer  # llama.cpp prints all layers; only recurrent ones hold state
    # exact bytes: libggml's ggml_nbytes of the cache tensors with llama.cpp's dimensions
    k_bytes = k["layers"] * ggml_nbytes(QT[tk.upper()], model.n_embd_k_gqa, k["cells"], k["n_stream"])
    v_bytes = k["layers"] * ggml_nbytes(QT[tv.upper()], model.n_embd_v_gqa, k["cells"], k["n_stream"])
    r_bytes = model.n_recr_layers * ggml_nbytes(QT.F32, model.n_embd_r, r["cells"] * (1 + r["n_rs_seq"]))
    s_bytes = model.n_recr_layers * ggml_nbytes(QT.F32, model.n_embd_s, r["cells"] * (1 + r["n_rs_seq"]))
    assert (kv.k_bytes, kv.v_bytes, rs.r_bytes, rs.s_bytes) == (k_bytes, v_bytes, r_bytes, s_bytes)
    # and llama.cpp's printed MiB equal nexlab's bytes printed the same way
    assert (k["mib"], k["k_mib"], k["v_mib"]) == (LL.llama_mib(kv.bytes), LL.llama_mib(kv.k_bytes),
                                                  LL.llama_mib(kv.v_bytes))
    assert (r["mib"], r["r_mib"], r["s_mib"]) == (LL.llama_mib(rs.bytes), LL.llama_mib(rs.r_bytes),
                                                  LL.llama_mib(rs.s_bytes))
    # the overflow warning appears in both or in neither
    assert got["overflow_warning"] == bool(kv.warnings) == any(
        issubclass(w.category, M.ContextOverflowWarning) for w in caught)


@pytest.fixture(scope="module")
def tiny_probe(tiny_gguf):
    with LL.LlamaCppProbe(tiny_gguf[0]) as probe:
        yield probe


@pytest.fixture(scope="module")
def slice_probe(slice_gguf):
    with LL.LlamaCppProbe(slice_gguf[0]) as probe:
        yield probe


def test_weights_bytes_equal_llama_model_size(tiny_probe, tiny_gguf, slice_probe, slice_gguf):
    assert tiny_probe.model_size() == M.weights_bytes(tiny_gguf[1])
    assert slice_probe.model_size() == M.weights_bytes(slice_gguf[1])


@pytest.mark.parametrize("n_seq", [1, 4])
@pytest.mark.parametrize("cache", CACHE_TYPES)
@pytest.mark.parametrize("n_ctx", [100, 4097, 100000, 262144])
def test_tiny_cache_bytes_equal_llama_cpp(tiny_probe, tiny, n_ctx, cache, n_seq):
    _check_against_llama(tiny_probe, tiny, n_ctx, cache, cache, n_seq)


def test_one_token_context_is_padded_like_llama_cpp(tiny_probe, tiny):
    # (llama.cpp aborts for n_ctx < n_seq_max: n_batch is clamped to the unpadded n_ctx first)
    _check_against_llama(tiny_probe, tiny, 1, "f16", "f16", 1)


@pytest.mark.parametrize("tk,tv,n_seq,unified,fa", [
    ("q8_0", "f16", 4, False, True), ("f16", "q4_0", 1, False, True), ("bf16", "q8_0", 3, False, True),
    ("f16", "f16", 4, True, True), ("f16", "f16", 2, False, False), ("q4_0", "bf16", 4, True, False),
])
def test_tiny_mixed_cache_types_streams_and_v_transposed(tiny_probe, tiny, tk, tv, n_seq, unified, fa):
    _check_against_llama(tiny_probe, tiny, 5000, tk, tv, n_seq, kv_unified=unified, flash_attn=fa)


@pytest.mark.parametrize("n_seq", [1, 4])
@pytest.mark.parametrize("cache", CACHE_TYPES)
@pytest.mark.parametrize("n_ctx", [4096, 262144])
def test_slice_cache_bytes_equal_llama_cpp(slice_probe, slice_model, n_ctx, cache, n_seq):
    """The slice has the real model's per-layer shapes: these are Nex-N2-mini's per-layer bytes."""
    _check_against_llama(slice_probe, slice_model, n_ctx, cache, cache, n_seq)


@pytest.mark.parametrize("variant,ftype", [("q8_0", 7), ("q4_k_m", 15)])
def test_predicted_gguf_size_equals_llama_quantize_output(tmp_path, tiny_gguf, variant, ftype):
    """llama.cpp's llama_model_quantize (NVFP4 kept by a tensor-type override) writes exactly the predicted size."""
    src, _ = tiny_gguf
    out = tmp_path / f"tiny-{variant}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    params.allow_requantize = True
    ov = (llama_cpp.llama_model_tensor_override * 2)()
    ov[0].pattern = rb"ffn_(gate|up|down)_(exps|shexp)\.weight"
    ov[0].type = int(QT.NVFP4)
    ov[1].pattern = None
    params.tt_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0
    pred = M.gguf_file_size_from_gguf(src, variant)
    written = {t.name: QT(int(t.tensor_type)) for t in gguf.GGUFReader(str(out)).tensors}
    assert {s.name: s.ggml_type for s in pred["specs"]} == written
    assert pred["file_bytes"] == os.path.getsize(out)
    # the plan from the hyper-parameters alone (qwen35moe.tensor_plan) agrees too
    model = Q.hparams_from_gguf(src)
    assert {s.name: s.ggml_type for s in qwen35moe.tensor_plan(model, variant)} == written


@pytest.mark.slow
def test_nexlab_written_gguf_sizes_equal_prediction(tmp_path):
    """Files nexlab's converter writes for the tiny model: every size predicted from the BF16 file's header."""
    from nexlab.artifacts.tiny import ensure_tiny
    from nexlab.convert.text import convert_checkpoint

    ckpt = ensure_tiny(smoke=True)["nvfp4"]
    files = {v: convert_checkpoint(ckpt, tmp_path / f"tiny-{v}.gguf", variant=v, show_progress=False).path
             for v in ("bf16", "q8_0", "q4_k_m")}
    for variant, f in files.items():
        own = M.gguf_file_size_from_gguf(f)
        assert own["file_bytes"] == os.path.getsize(f)
        pred = M.gguf_file_size_from_gguf(files["bf16"], variant)
        written = {t.name: QT(int(t.tensor_type)) for t in gguf.GGUFReader(str(f)).tensors}
        assert {s.name: s.ggml_type for s in pred["specs"]} == written, variant
        assert pred["weights_bytes"] == own["weights_bytes"], variant
        assert pred["file_bytes"] == os.path.getsize(f), variant
