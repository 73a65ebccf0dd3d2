"""Chapter 01 helpers (nexlab.numerics): the explorer's numbers and the format comparison.

References: ModelOpt semantics through nexlab.nvfp4 (itself proven byte-identical to
nvidia-modelopt in test_nvfp4.py) and ggml's C Q4_K quantizer through ctypes.
"""

from __future__ import annotations

import numpy as np
import pytest

from nexlab import formats, ggml_ref, numerics, nvfp4


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
    assert got["Q4_K"]["rel_mse"] == nvfp4.relative_mse(x, ref)
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
