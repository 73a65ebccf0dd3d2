"""Type mixes of nexlab.model.mixes against llama.cpp's llama_model_quantize (llama-cpp-python).

Each test builds a small qwen35moe GGUF with gguf-py (BF16 weights, F32 norms/routers/conv, NVFP4
routed and shared experts with .scale sidecars; llama_model_quantize reads only the hyperparameters,
so the tensors can be small), runs llama.cpp's quantizer on it with the NVFP4 tensors kept by
tensor-type overrides (and optionally an imatrix), and compares, tensor by tensor, the types with
nexlab.model.mixes.plan_types and the bytes with nexlab.formats.registry.quantize_tensor.
"""

from __future__ import annotations

import ctypes
import re

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from nexlab.formats import minifloat as F
from nexlab.formats import registry
from nexlab.model import mixes as Q

FTYPES = {"q4_k_m": 15, "q8_0": 7}
GGML_NVFP4 = 40


def _bf16(x):
    return F.f32_to_bf16_bits(np.asarray(x, np.float32))


def build_gguf(path, n_layer: int, *, experts: bool | str = True, odd_shapes: bool = False, seed: int = 0):
    """A qwen35moe GGUF with llama.cpp's tensor names; returns {name: float32 values or None (NVFP4)}."""
    rng = np.random.default_rng(seed)
    H, E, I = 256, 16, 256
    w = gguf.GGUFWriter(str(path), "qwen35moe")
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_block_count(n_layer)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(4)
    w.add_expert_feed_forward_length(I)
    w.add_expert_shared_feed_forward_length(I)
    w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_key_length(64)
    w.add_value_length(64)
    w.add_ssm_conv_kernel(4)
    w.add_ssm_inner_size(256)
    w.add_ssm_state_size(32)
    w.add_ssm_time_step_rank(8)
    w.add_ssm_group_count(4)
    w.add_full_attention_interval(4)
    values = {}

    def t(name, shape, kind="bf16"):
        x = (rng.standard_normal(shape) * rng.uniform(0.01, 0.1)).astype(np.float32)
        if kind == "bf16":
            bits = _bf16(x)
            w.add_tensor(name, bits, raw_shape=shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
            values[name] = (bits.astype(np.uint32) << 16).view(np.float32)
        elif kind == "f32":
            w.add_tensor(name, x)
            values[name] = x
        else:  # NVFP4 bytes with valid (positive, finite) UE4M3 scale bytes
            rows, nb = int(np.prod(shape[:-1])), shape[-1] // 64
            raw = rng.integers(0, 256, (rows, nb, 36), dtype=np.uint8)
            raw[:, :, :4] = rng.integers(0x30, 0x40, (rows, nb, 4), dtype=np.uint8)
            w.add_tensor(name, raw.reshape(*shape[:-1], nb * 36), raw_dtype=gguf.GGMLQuantizationType.NVFP4)
            values[name] = None

    t("token_embd.weight", (600, H))
    t("output.weight", (600, H))
    t("output_norm.weight", (H,), "f32")
    for i in range(n_layer):
        p = f"blk.{i}."
        t(p + "attn_norm.weight", (H,), "f32")
        t(p + "post_attention_norm.weight", (H,), "f32")
        if (i + 1) % 4 == 0:
            t(p + "attn_q.weight", (512, H))
            t(p + "attn_k.weight", (64, H))
            t(p + "attn_v.weight", (64, H))
            t(p + "attn_output.weight", (H, 256))
            t(p + "attn_q_norm.weight", (64,), "f32")
            t(p + "attn_k_norm.weight", (64,), "f32")
        else:
            t(p + "attn_qkv.weight", (384, H))
            t(p + "attn_gate.weight", (256, H))
            t(p + "ssm_beta.weight", (8, H))
            t(p + "ssm_alpha.weight", (8, H))
            t(p + "ssm_out.weight", (H, 256))
            t(p + "ssm_conv1d.weight", (384, 4), "f32")
            t(p + "ssm_a", (8,), "f32")
            t(p + "ssm_dt.bias", (8,), "f32")
            t(p + "ssm_norm.weight", (32,), "f32")
        t(p + "ffn_gate_inp.weight", (E, H), "f32")
        t(p + "ffn_gate_inp_shexp.weight", (H,))
        if experts == "bf16":  # a stock model: experts in BF16, no sidecars
            for k in ("gate", "up", "down"):
                shape = (E, I, H) if k != "down" else (E, H, I)
                t(p + f"ffn_{k}_exps.weight", shape)
                t(p + f"ffn_{k}_shexp.weight", shape[1:])
        elif experts:
            for k in ("gate", "up", "down"):
                shape = (E, I, H) if k != "down" else (E, H, I)
                t(p + f"ffn_{k}_exps.weight", shape, "nvfp4")
                t(p + f"ffn_{k}_exps.scale", (E,), "f32")
                t(p + f"ffn_{k}_shexp.weight", shape[1:], "nvfp4")
        else:  # a BF16 shared expert exercises the ffn_down layer rule
            t(p + "ffn_down_shexp.weight", (H, I))
            t(p + "ffn_up_shexp.weight", (I, H))
    if odd_shapes:  # rows that do not fit 256 (-> Q5_0/Q8_0) or even 32 (-> F16)
        t("blk.0.ssm_odd_a.weight", (16, 160))
        t("blk.1.ssm_odd_b.weight", (16, 48))
        t("blk.2.ffn_down_odd.weight", (16, 96))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def run_llama_quantize(src, dst, variant, imatrix: dict[str, np.ndarray] | None = None):
    names = [t.name for t in gguf.GGUFReader(str(src)).tensors if t.tensor_type == gguf.GGMLQuantizationType.NVFP4]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[variant]
    p.nthread = 1
    keep = []
    ov = (llama_cpp.llama_model_tensor_override * (len(names) + 1))()
    for i, n in enumerate(names):
        s = ctypes.c_char_p(("^" + re.escape(n) + "$").encode())
        keep.append(s)
        ov[i].pattern = s
        ov[i].type = GGML_NVFP4
    ov[len(names)].pattern = None
    p.tt_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (n, v) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(v)
            arr[i].name = n.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return gguf.GGUFReader(str(dst))


def source_triples(path):
    r = gguf.GGUFReader(str(path))
    return [(t.name, tuple(int(s) for s in reversed(t.shape)), t.tensor_type.name) for t in r.tensors]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    src = d / "tiny-NVFP4-BF16.gguf"
    values = build_gguf(src, 8, odd_shapes=True)
    return d, src, values


def check_against_llama(src, values, out, variant, n_layer, imatrix=None, n_expert=16):
    plans = {p.name: p for p in Q.plan_types(source_triples(src), variant, n_layer, n_expert=n_expert)}
    r_out = gguf.GGUFReader(str(out))
    # llama_model_quantize writes tensors in weights_map order: nexlab's plan order is the same
    assert [t.name for t in r_out.tensors] == list(plans)
    src_bytes = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(str(src)).tensors}
    n_bytes_checked = 0
    for t in r_out.tensors:
        plan = plans[t.name]
        assert t.tensor_type.name == plan.ggml_type, (f"{t.name}: llama.cpp {t.tensor_type.name}, "
                                                      f"nexlab {plan.ggml_type}")
        got = np.asarray(t.data).tobytes()
        if plan.copy:
            assert got == src_bytes[t.name], t.name
            continue
        if plan.ggml_type not in ("Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16"):
            continue  # Q5_0 / Q5_1 fallbacks: type checked only (nexlab does not implement them)
        x = values[t.name].reshape(plan.shape)
        ne0 = plan.shape[-1]
        im = None
        if imatrix is not None and t.name in imatrix and plan.ggml_type != "F16":
            im = imatrix[t.name].reshape(-1, ne0)  # one row per expert for stacked tensors
        ours = registry.quantize_tensor(x, plan.ggml_type, im, name=t.name).tobytes()
        assert ours == got, f"{t.name} ({plan.ggml_type}): bytes differ from llama.cpp"
        n_bytes_checked += 1
    assert n_bytes_checked > 0


@pytest.mark.parametrize("variant", ["q4_k_m", "q8_0"])
def test_types_and_bytes_equal_llama_model_quantize(tiny, variant):
    d, src, values = tiny
    out = d / f"tiny-NVFP4-{variant}.gguf"
    run_llama_quantize(src, out, variant)
    check_against_llama(src, values, out, variant, 8)


def test_q4_k_m_with_imatrix_equals_llama_model_quantize(tiny):
    d, src, values = tiny
    rng = np.random.default_rng(1)
    r = gguf.GGUFReader(str(src))
    imatrix = {}
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.BF16 and len(t.shape) >= 2 and t.shape[1] > 1:
            ne0 = int(t.shape[0])
            v = (rng.random(ne0) * 4) ** 2
            v[rng.random(ne0) < 0.2] = 0.0
            imatrix[t.name] = v.astype(np.float32)
    del imatrix["blk.2.attn_gate.weight"]  # no entry: llama.cpp (and nexlab) quantize it without weights
    imatrix["token_embd.weight"] = np.ones(7, np.float32)  # wrong size: ignored for token_embd only
    out = d / "tiny-NVFP4-Q4_K_M-imatrix.gguf"
    run_llama_quantize(src, out, "q4_k_m", imatrix)
    im_used = {k: v for k, v in imatrix.items() if k != "token_embd.weight"}
    check_against_llama(src, values, out, "q4_k_m", 8, imatrix=im_used)
    # and the imatrix made a difference somewhere
    plain = d / "tiny-NVFP4-q4_k_m.gguf"
    if not plain.exists():
        run_llama_quantize(src, plain, "q4_k_m")
    a = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(str(out)).tensors}
    b = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(str(plain)).tensors}
    assert a["blk.0.attn_qkv.weight"] != b["blk.0.attn_qkv.weight"]
    assert a["blk.2.attn_gate.weight"] == b["blk.2.attn_gate.weight"]


def test_stock_q4_k_m_with_bf16_experts_and_per_expert_imatrix(tmp_path):
    # the "stock Q4_K_M" comparison model: experts quantized too, expert j with imatrix row j
    src = tmp_path / "stock.gguf"
    values = build_gguf(src, 4, experts="bf16", seed=9)
    rng = np.random.default_rng(3)
    imatrix = {}
    for t in gguf.GGUFReader(str(src)).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.BF16 and len(t.shape) >= 2 and t.shape[1] > 1:
            n_mat = int(t.shape[2]) if len(t.shape) == 3 else 1
            imatrix[t.name] = ((rng.random(int(t.shape[0]) * n_mat) * 3) ** 2).astype(np.float32)
    out = tmp_path / "stock-q4_k_m.gguf"
    run_llama_quantize(src, out, "q4_k_m", imatrix)
    check_against_llama(src, values, out, "q4_k_m", 4, imatrix=imatrix)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K" and types["blk.0.ffn_down_exps.weight"] == "Q4_K"
    assert types["blk.3.ffn_down_exps.weight"] == "Q6_K"  # use_more_bits(3, 4): i >= 7*4//8


def test_40_layer_rules_match_llama_model_quantize(tmp_path):
    # the real model's depth: attn_v / attn_qkv and ffn_down layer rules over 40 layers
    src = tmp_path / "deep.gguf"
    build_gguf(src, 40, experts=False, seed=4)
    out = tmp_path / "deep-q4_k_m.gguf"
    run_llama_quantize(src, out, "q4_k_m")
    plans = {p.name: p.ggml_type for p in Q.plan_types(source_triples(src), "q4_k_m", 40, n_expert=16)}
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert got == plans
    more = [i for i in range(40) if Q.use_more_bits(i, 40)]
    assert more == [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39]
    for i in range(40):
        wv = f"blk.{i}.attn_v.weight" if (i + 1) % 4 == 0 else f"blk.{i}.attn_qkv.weight"
        assert got[wv] == ("Q6_K" if i in more else "Q4_K")
        assert got[f"blk.{i}.ffn_down_shexp.weight"] == ("Q6_K" if i in more else "Q4_K")


# --------------------------------------------------------------------------- rules in isolation


def test_choose_type_documented_rules():
    kw = dict(n_layer=40, n_expert=256)
    assert Q.choose_type("output.weight", (248320, 2048), "q4_k_m", **kw) == "Q6_K"
    assert Q.choose_type("token_embd.weight", (248320, 2048), "q4_k_m", **kw) == "Q4_K"
    assert Q.choose_type("blk.5.ssm_out.weight", (2048, 4096), "q4_k_m", **kw) == "Q4_K"
    assert Q.choose_type("blk.3.ffn_gate_exps.weight", (256, 512, 2048), "q4_k_m", source_ggml_type="NVFP4",
                         **kw) == "NVFP4"
    assert Q.choose_type("blk.3.ffn_down_shexp.weight", (2048, 512), "q8_0", source_ggml_type="NVFP4", **kw) == "NVFP4"
    assert Q.choose_type("blk.3.ffn_gate_exps.scale", (256,), "q4_k_m", source_ggml_type="F32", **kw) == "F32"
    assert Q.choose_type("blk.0.ssm_conv1d.weight", (8192, 4), "q8_0", source_ggml_type="F32", **kw) == "F32"
    assert Q.choose_type("blk.0.ffn_gate_inp.weight", (256, 2048), "q8_0", source_ggml_type="F32", **kw) == "F32"
    assert Q.choose_type("blk.0.ffn_gate_inp_shexp.weight", (1, 2048), "q8_0", **kw) == "BF16"  # 1 ggml dim
    assert Q.choose_type("blk.0.attn_qkv.weight", (8192, 2048), "bf16", **kw) == "BF16"
    assert Q.choose_type("output.weight", (248320, 2048), "q8_0", **kw) == "Q8_0"
    # fallbacks when ne0 % 256 != 0
    assert Q.choose_type("blk.9.attn_gate.weight", (64, 160), "q4_k_m", **kw) == "Q5_0"
    assert Q.choose_type("blk.0.attn_qkv.weight", (64, 160), "q4_k_m", **kw) == "Q8_0"  # Q6_K -> Q8_0
    assert Q.choose_type("blk.9.attn_gate.weight", (64, 48), "q4_k_m", **kw) == "F16"
    assert Q.choose_type("blk.9.attn_gate.weight", (64, 48), "q8_0", **kw) == "F16"
    # the 8-expert rules
    assert Q.choose_type("blk.9.attn_v.weight", (512, 2048), "q4_k_m", n_layer=40, n_expert=8) == "Q8_0"
    assert Q.choose_type("blk.9.attn_output.weight", (2048, 4096), "q4_k_m", n_layer=40, n_expert=8) == "Q5_K"


def test_bad_variant_and_layer_raise():
    with pytest.raises(ValueError, match="unknown variant"):
        Q.choose_type("output.weight", (10, 256), "q3_k_m", 40)
    with pytest.raises(ValueError, match="Bad layer 40"):
        Q.choose_type("blk.40.ffn_down_shexp.weight", (2048, 512), "q4_k_m", 40)


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1e3
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(F.f32_to_bf16_bits(x), ref)


# --------------------------------------------------------------------------- the tiny model end to end


@pytest.mark.slow
def test_tiny_model_variants_equal_llama_model_quantize(tmp_path):
    """NVFP4-BF16 GGUF of the tiny ModelOpt checkpoint (nexlab.convert.text) -> llama_model_quantize q4_k_m
    (with and without an imatrix collected by nexlab.analysis.imatrix.collect_imatrix) and q8_0, NVFP4 kept:
    every tensor's type and bytes equal nexlab's plan and quantizer."""
    from tokenizers import Tokenizer

    from nexlab.analysis import imatrix_torch, reference
    from nexlab.artifacts.tiny import ensure_tiny
    from nexlab.convert import text as convert
    from nexlab.ggufio import imatrix_file as IM

    tiny = ensure_tiny(smoke=True)  # the notebooks' artifacts when there, else built here (seconds)
    ckpt, calib = tiny["nvfp4"], tiny["calib_text"]

    src = tmp_path / "tiny-NVFP4-BF16.gguf"
    convert.convert_checkpoint(ckpt, src, variant="bf16", show_progress=False)
    tok = next(p for p in (ckpt / "tokenizer.json", ckpt.parent / "tokenizer" / "tokenizer.json") if p.exists())
    ids = Tokenizer.from_file(str(tok)).encode(calib.read_text(encoding="utf-8")[:20000]).ids
    im = imatrix_torch.collect_imatrix(reference.build_hf_model(ckpt), ids, chunk_size=128, n_chunks=2,
                                       dataset=str(calib), show_progress=False)
    weights = IM.quantize_weights(IM.read_imatrix(IM.write_imatrix(tmp_path / "tiny.imatrix.gguf", im)))
    r = gguf.GGUFReader(str(src))
    n_layer = int(r.fields["qwen35moe.block_count"].parts[-1][0])
    n_exp = int(r.fields["qwen35moe.expert_count"].parts[-1][0])
    values = {}
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            values[t.name] = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1)
        elif t.tensor_type == gguf.GGMLQuantizationType.F32:
            values[t.name] = np.asarray(t.data, np.float32).reshape(-1)
    for variant, w in (("q4_k_m", None), ("q4_k_m", weights), ("q8_0", None)):
        out = tmp_path / f"tiny-{variant}-{w is not None}.gguf"
        run_llama_quantize(src, out, variant, w)
        check_against_llama(src, values, out, variant, n_layer, imatrix=w, n_expert=n_exp)
