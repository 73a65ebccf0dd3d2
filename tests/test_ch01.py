"""nexlab.chapters.ch01 (chapter 01's helpers) against the formats and the real implementations.

References: ModelOpt semantics through nexlab.formats.nvfp4 (itself proven byte-identical to
nvidia-modelopt in test_nvfp4.py) and ggml's C Q4_K quantizer through ctypes.
"""

from __future__ import annotations

import numpy as np
import pytest

from nexlab.chapters import ch01 as numerics
from nexlab.formats import metrics, mxfp4, nvfp4
from nexlab.formats import minifloat as formats
from nexlab.llamacpp import libggml as ggml_ref


def test_explain_block_reports_the_bytes_modelopt_would_store():
    rng = np.random.default_rng(1)
    block = rng.standard_normal(16).astype(np.float32)
    info = numerics.explain_block(block, tensor_amax=3.0)
    q, s, ws2 = nvfp4.quantize_nvfp4_modelopt(block[None], weight_scale_2=np.float32(3.0) / np.float32(2688.0))
    assert info["scale_byte"] == int(s[0, 0])
    assert np.array_equal(info["codes"], nvfp4.unpack_nibbles_adjacent(q)[0])
    assert np.array_equal(info["reconstruction"], nvfp4.dequantize_nvfp4_modelopt(q, s, ws2)[0])
    assert info["block_scale"] == float(formats.e4m3_bytes_to_f32(s[0, 0]))


def test_block_holding_the_tensor_amax_gets_the_top_scale_byte():
    block = np.linspace(-2, 2, 16, dtype=np.float32)
    assert numerics.explain_block(block, tensor_amax=2.0)["scale_byte"] == 0x7E  # 448


@pytest.mark.parametrize("bad", [dict(values=np.zeros(15, np.float32), tensor_amax=1.0),
                                 dict(values=np.zeros(16, np.float32), tensor_amax=0.0),
                                 dict(values=np.full(16, np.nan, np.float32), tensor_amax=1.0)])
def test_explain_block_refuses_bad_input(bad):
    with pytest.raises(ValueError):
        numerics.explain_block(bad["values"], tensor_amax=bad["tensor_amax"])


def test_compare_formats_q4_k_error_equals_ggml_round_trip():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = numerics.example_distributions(8 * 512, cols=512, seed=3)["laplace"]
    got = numerics.compare_formats({"laplace": x})["laplace"]
    raw = np.frombuffer(ggml_ref.ggml_quantize_chunk("Q4_K", x, x.shape[0], x.shape[1]), np.uint8)
    ref = dequantize(raw.reshape(x.shape[0], -1), GGMLQuantizationType.Q4_K).reshape(x.shape)
    assert got["Q4_K"]["rel_mse"] == metrics.relative_mse(x, ref)
    assert got["NVFP4"]["sqnr_db"] > got["MXFP4"]["sqnr_db"]
    assert set(got) == {"NVFP4", "MXFP4", "INT4-g16", "Q4_K"}


def test_compare_formats_skips_q4_k_when_rows_do_not_fit():
    x = numerics.example_distributions(4 * 64, cols=64)["gaussian"]
    assert "Q4_K" not in numerics.compare_formats({"g": x})["g"]


def test_example_distributions_have_outliers_where_promised():
    d = numerics.example_distributions(4096 * 4, cols=4096, seed=0)
    assert all(v.shape == (4, 4096) and v.dtype == np.float32 for v in d.values())
    assert np.abs(d["outliers"]).max() > 10 * np.abs(d["gaussian"]).max() / 2


def test_load_example_weight_falls_back_to_a_generated_weight(tmp_path):
    w, name = numerics.load_example_weight(tmp_path)
    assert w.dtype == np.float32 and w.ndim == 2 and w.shape[1] % 256 == 0 and "generated" in name


def test_e2m1_staircase_is_ml_dtypes_rounding_times_the_block_scale():
    import ml_dtypes

    x = np.linspace(-8, 8, 1281, dtype=np.float32)  # every tie 0.25, 0.75, ..., 5 is on this grid
    assert np.array_equal(numerics.e2m1_staircase(x), x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    s = float(formats.e4m3_bytes_to_f32(np.uint8(0x30)))  # 0.5
    got = numerics.e2m1_staircase(x * s, scale_byte=0x30)
    assert np.array_equal(got, x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s)
    assert numerics.e2m1_staircase(np.float32([5.0, 5.0001, 2.5, 7.0]), 0x38).tolist() == [4, 6, 2, 6]


def test_e8m0_vs_e4m3_scales_are_what_the_quantizers_store():
    rng = np.random.default_rng(3)
    w = (rng.standard_t(3, size=(8, 128)) * 0.02).astype(np.float32)
    r = numerics.e8m0_vs_e4m3(w)
    mx = mxfp4.quantize_mxfp4_ggml(w).reshape(8, 4, 17)
    q, s, ws2 = nvfp4.quantize_nvfp4_modelopt(w)
    assert np.array_equal(r["mx_byte"], mx[..., 0]) and np.array_equal(r["nv_byte"], s)
    assert np.array_equal(r["mx_recon"], mxfp4.dequantize_mxfp4_ggml(mx.reshape(8, -1)))
    assert np.array_equal(r["nv_recon"], nvfp4.dequantize_nvfp4_modelopt(q, s, ws2))
    # E8M0: a power of two putting the block max in [4, 8); E4M3 puts it within its rounding of 6
    assert np.all(np.log2(r["mx_scale"]) == np.round(np.log2(r["mx_scale"])))
    assert r["mx_top"].min() >= 4 and r["mx_top"].max() < 8
    assert np.all(np.abs(r["nv_top"] - 6) <= 6 / 15)
    # the reconstructions are codes on the E2M1 grid times the reported scales
    grid = set(formats.E2M1_VALUES.tolist())
    assert set(np.unique(r["mx_recon"].reshape(8, 4, 32) / r["mx_scale"][..., None]).tolist()) <= grid
    assert np.isclose(r["mx_err"][2, 1], metrics.relative_mse(w[2, 32:64], r["mx_recon"][2, 32:64]), rtol=1e-9)
    assert np.isclose(r["nv_err"][2, 1], metrics.relative_mse(w[2, 32:64], r["nv_recon"][2, 32:64]), rtol=1e-9)


def test_e8m0_vs_e4m3_refuses_rows_that_are_not_whole_mxfp4_blocks():
    with pytest.raises(ValueError, match="in % 32"):
        numerics.e8m0_vs_e4m3(np.ones((2, 48), np.float32))


def _fake_llamacpp(root, graph_line=None):
    (root / "src" / "models").mkdir(parents=True)
    (root / "ggml" / "src" / "ggml-cpu").mkdir(parents=True)
    (root / "src" / "llama-model.cpp").write_text(
        'layer.ffn_up_in_s = create_tensor(tn(LLM_TENSOR_FFN_UP, "input_scale", i), {1}, TENSOR_NOT_REQUIRED);\n'
        "ggml_tensor * xz = build_lora_mm(layer.ssm_in, cur, layer.ssm_in_s);\n")
    (root / "src" / "models" / "m.cpp").write_text(graph_line or "cur = build_lora_mm(layer.wq, cur, layer.wq_s);\n")
    (root / "ggml" / "src" / "ggml-cpu" / "ggml-cpu.c").write_text(
        "[GGML_TYPE_NVFP4] = {\n .from_float = quantize_row_nvfp4,\n .vec_dot_type = GGML_TYPE_Q8_0,\n},\n")


def test_input_scale_scan_finds_a_graph_that_reads_the_activation_scale(tmp_path):
    _fake_llamacpp(tmp_path / "clean")
    r = numerics.input_scale_in_llamacpp(tmp_path / "clean")
    assert (r["graph"] == {} and list(r["other"]) == ["src/llama-model.cpp"]
            and len(r["other"]["src/llama-model.cpp"]) == 1)
    assert r["nvfp4_vec_dot_type"] == "GGML_TYPE_Q8_0" and r["ggml"] == []
    _fake_llamacpp(tmp_path / "used", "cur = ggml_mul(ctx0, cur, layer.ffn_up_in_s);\n")
    assert list(numerics.input_scale_in_llamacpp(tmp_path / "used")["graph"]) == ["src/models/m.cpp"]


def test_llamacpp_loads_input_scale_but_no_graph_or_backend_reads_it():
    from nexlab.llamacpp import source as llamacpp

    src = llamacpp.llamacpp_source()  # the reference: fetched when missing, an error (never a skip) if it cannot be
    assert (src / "src" / "llama-model.cpp").is_file(), f"{src} is not llama.cpp's source tree"
    r = numerics.input_scale_in_llamacpp(src)
    assert r["graph"] == {} and r["ggml"] == []
    assert any("input_scale" in line for line in r["other"]["src/llama-model.cpp"])
    assert r["nvfp4_vec_dot_type"] == "GGML_TYPE_Q8_0"


def test_expert_amaxes_reads_fused_and_per_expert_projections(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    assert numerics.expert_amaxes(tmp_path) == {}  # no tiny model yet
    ck = tmp_path / "tiny" / "bf16"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    gate_up = torch.zeros(2, 4, 3, dtype=torch.bfloat16)
    gate_up[1, 0, 2], gate_up[1, 3, 0] = -0.5, 0.25  # expert 1: gate row 0, up row 3
    save_file({"model.layers.0.mlp.experts.gate_up_proj": gate_up,
               "model.layers.1.mlp.experts.0.down_proj.weight": torch.full((3, 2), -2.0, dtype=torch.bfloat16),
               "model.layers.1.mlp.gate.weight": torch.ones(2, 3, dtype=torch.bfloat16)}, ck / "model.safetensors")
    a = numerics.expert_amaxes(tmp_path)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert a == {f"{key}[0].gate": 0.0, f"{key}[1].gate": 0.5, f"{key}[0].up": 0.0, f"{key}[1].up": 0.25,
                 "model.layers.1.mlp.experts.0.down_proj.weight": 2.0}
