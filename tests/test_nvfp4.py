"""NVFP4 / MXFP4 / INT4-g16 in nexlab.formats.nvfp4 against nvidia-modelopt, libggml and gguf-py.

The ModelOpt oracle is the code ``export_hf_checkpoint`` runs for a dynamic NVFP4 weight
quantizer: ``NVFP4QTensor.get_weights_scaling_factor_2`` (amax / 2688),
``NVFP4QTensor.get_weights_scaling_factor`` (E4M3 block scales) and
``quant_utils.to_quantized_weight`` (packed codes); plus one end-to-end run of
``mtq.quantize`` + ``_export_quantized_weight`` on a real nn.Linear. The ggml oracle is
libggml-base.so from llama-cpp-python (ctypes), and gguf-py's numpy dequantizers.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from nexlab.analysis import speed
from nexlab.formats import metrics, mxfp4
from nexlab.formats import minifloat as F
from nexlab.formats import nvfp4 as N
from nexlab.llamacpp import libggml as ggml_ref

RNG_SEED = 1234


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32)).view(np.uint32)


def bits_signless_zero(a) -> np.ndarray:
    """Bit patterns with -0.0 folded onto +0.0 (ggml has no -0 code)."""
    a = np.asarray(a, dtype=np.float32) + np.float32(0.0)
    return bits(a)


# --------------------------------------------------------------------------- test tensors


def _tie_heavy(rng, rows, cols):
    """Every block scale and every scaled value lands exactly on an E4M3 value and on an
    E2M1 grid point or midpoint: the global amax is 2688 * 2**-4, so weight_scale_2 = 2**-4
    exactly, each block's amax is 6 * S * 2**-4 for an E4M3 value S, and the other values
    are +-(grid point or midpoint) * S * 2**-4. All are exact in bfloat16 too."""
    s_vals = F.E4M3_VALUES[8:0x7F]  # normal E4M3 values
    grid_and_mids = np.array([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6], np.float32)
    nb = cols // 16
    S = rng.choice(s_vals, size=(rows, nb)).astype(np.float32)
    v = rng.choice(grid_and_mids, size=(rows, nb, 16)) * rng.choice([-1, 1], size=(rows, nb, 16))
    v[..., 0] = 6.0
    x = (v * S[..., None] * np.float32(2.0**-4)).astype(np.float32)
    x[0, :16] = 0
    x[0, 0] = 2688 * 2.0**-4
    return x.reshape(rows, cols)


def _case(kind: str, rows=32, cols=256) -> np.ndarray:
    rng = np.random.default_rng(RNG_SEED + zlib.crc32(kind.encode()) % 1000)
    if kind == "gaussian":
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    if kind == "student_t":
        return rng.standard_t(2.0, size=(rows, cols)).astype(np.float32)
    if kind == "zero_blocks":
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        x.reshape(rows, -1, 16)[:, ::3] = 0
        x[1] = 0  # a whole zero row
        x[2, 5] = -0.0
        return x
    if kind == "tie_heavy":
        return _tie_heavy(rng, rows, cols)
    if kind == "tiny":
        mag = np.exp(rng.uniform(np.log(1e-30), np.log(1e-6), (rows, cols)))
        return (mag * rng.choice([-1, 1], (rows, cols))).astype(np.float32)
    if kind in ("subnormal", "huge"):  # float32 subnormals / values near float32 max
        lo, hi = (1e-45, 1e-38) if kind == "subnormal" else (1e30, 3e38)
        mag = np.exp(rng.uniform(np.log(lo), np.log(hi), (rows, cols)))
        return (mag * rng.choice([-1, 1], (rows, cols))).astype(np.float32)
    if kind == "wide_range":  # block amaxes across 12 decades: many clamped block scales
        scale = np.exp(rng.uniform(np.log(1e-8), np.log(1e4), (rows, cols // 16, 1)))
        return (rng.standard_normal((rows, cols // 16, 16)) * scale).astype(np.float32).reshape(rows, cols)
    raise ValueError(kind)


CASES = ["gaussian", "student_t", "zero_blocks", "tie_heavy", "tiny", "wide_range", "subnormal", "huge"]


# --------------------------------------------------------------------------- ModelOpt oracle


def modelopt_export(w: torch.Tensor, weight_scale_2: torch.Tensor | None = None):
    from modelopt.torch.export.model_config import QUANTIZATION_NVFP4
    from modelopt.torch.export.quant_utils import to_quantized_weight
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    if weight_scale_2 is None:
        weight_scale_2 = NVFP4QTensor.get_weights_scaling_factor_2(w)
    ws = NVFP4QTensor.get_weights_scaling_factor(w, 16, weight_scale_2)[0]
    q = to_quantized_weight(w, ws, QUANTIZATION_NVFP4, weight_scale_2, 16)
    return q.numpy(), ws.view(torch.uint8).numpy(), weight_scale_2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", CASES)
def test_modelopt_quantizer_is_byte_identical_to_nvidia_modelopt(kind, dtype):
    w = torch.from_numpy(_case(kind)).to(dtype)
    ref_q, ref_s, ref_g = modelopt_export(w)
    q, s, g = N.quantize_nvfp4_modelopt(w)
    assert g.dtype == np.float32 and bits(g) == bits(ref_g.float().numpy())
    assert np.array_equal(s, ref_s)
    assert np.array_equal(q, ref_q)


def test_modelopt_quantizer_tie_case_really_hits_ties():
    # guard for the test above: the tie-heavy tensor must contain exact E2M1 midpoints
    x = _case("tie_heavy")
    q, s, g = N.quantize_nvfp4_modelopt(x)
    assert g == np.float32(2.0**-4)
    scaled = x.reshape(x.shape[0], -1, 16) / (F.e4m3_bytes_to_f32(s) * g)[..., None]
    mids = np.isin(np.abs(scaled), [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert mids.mean() > 0.3


def test_modelopt_quantizer_with_shared_weight_scale_2_is_byte_identical():
    gate = torch.from_numpy(_case("gaussian")).to(torch.bfloat16)
    up = torch.from_numpy(_case("student_t")).to(torch.bfloat16) * 0.01
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    shared = torch.maximum(NVFP4QTensor.get_weights_scaling_factor_2(gate),
                           NVFP4QTensor.get_weights_scaling_factor_2(up))
    for w in (gate, up):
        ref_q, ref_s, _ = modelopt_export(w, shared)
        q, s, g = N.quantize_nvfp4_modelopt(w, weight_scale_2=shared)
        assert np.array_equal(s, ref_s) and np.array_equal(q, ref_q)
        assert bits(g) == bits(shared.numpy())


@pytest.mark.parametrize("factor", [1e-2, 1e6], ids=["scales_clamp_at_448", "scales_clamp_at_2^-9"])
def test_modelopt_quantizer_with_extreme_explicit_weight_scale_2_clamps_like_modelopt(factor):
    x = torch.from_numpy(_case("gaussian"))
    shared = torch.tensor(np.float32(float(x.abs().max()) / 2688 * factor))
    ref_q, ref_s, _ = modelopt_export(x, shared)
    q, s, _ = N.quantize_nvfp4_modelopt(x, weight_scale_2=shared)
    assert np.all(ref_s == (0x7E if factor < 1 else 0x01))  # the clamp really happened
    assert np.array_equal(s, ref_s) and np.array_equal(q, ref_q)


def test_modelopt_quantizer_matches_a_real_mtq_quantize_and_export_of_a_linear():
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 48, bias=False)).to(torch.bfloat16)
    w = model[0].weight.detach().clone()
    calib = torch.randn(8, 256, dtype=torch.bfloat16)
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(calib))
    with torch.no_grad():
        _export_quantized_weight(model[0], torch.bfloat16)
    lin = model[0]
    q, s, g = N.quantize_nvfp4_modelopt(w)
    assert np.array_equal(lin.weight.detach().numpy(), q)
    assert np.array_equal(lin.weight_scale.view(torch.uint8).numpy(), s)
    assert bits(g) == bits(lin.weight_scale_2.float().numpy())


def test_modelopt_dequantizer_is_bit_exact_with_nvfp4qtensor_dequantize():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    w = torch.from_numpy(_case("student_t"))
    q, s, g = N.quantize_nvfp4_modelopt(w)
    qt = NVFP4QTensor(w.shape, torch.float32, torch.from_numpy(q))
    ref = qt.dequantize(
        dtype=torch.float32,
        scale=torch.from_numpy(s).view(torch.float8_e4m3fn),
        double_scale=torch.tensor(g),
        block_sizes={-1: 16},
    ).numpy()
    out = N.dequantize_nvfp4_modelopt(q, torch.from_numpy(s).view(torch.float8_e4m3fn), g)
    assert np.array_equal(bits(out), bits(ref))


def test_modelopt_round_trip_keeps_sqnr_above_floor():
    for kind, floor_db in [("gaussian", 18.0), ("student_t", 14.0)]:
        x = _case(kind, 64, 1024)
        q, s, g = N.quantize_nvfp4_modelopt(x)
        assert metrics.sqnr_db(x, N.dequantize_nvfp4_modelopt(q, s, g)) > floor_db


# --------------------------------------------------------------------------- ggml layout


GGML_CASES = CASES + ["saturating", "ggml_ties"]


def _ggml_case(kind: str) -> np.ndarray:
    rng = np.random.default_rng(RNG_SEED + 7)
    if kind == "saturating":  # block scales clamp at 448; far beyond, ggml's float32 errors tie
        return (rng.standard_normal((16, 256)) * np.logspace(0, 30, 16)[:, None]).astype(np.float32)
    if kind == "ggml_ties":  # values exactly on midpoints of ggml's doubled grid
        d = F.ue4m3_byte_to_f32(rng.integers(1, 0x7E, (16, 16)).astype(np.uint8))
        m = rng.choice([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12], (16, 16, 16))
        x = (m * rng.choice([-1, 1], m.shape) * d[..., None]).astype(np.float32)
        x[..., 0] = 12 * d  # amax / 6 == 2d: the scale byte reproduces d exactly
        return x.reshape(16, 256)
    return _case(kind)


@pytest.mark.parametrize("kind", GGML_CASES)
def test_ggml_quantizer_is_byte_identical_to_quantize_row_nvfp4_ref(kind):
    x = _ggml_case(kind)
    ours = N.quantize_nvfp4_ggml(x)
    ref = ggml_ref.quantize_row_nvfp4_ref(x.reshape(-1))
    assert np.array_equal(ours.reshape(-1), ref)
    assert np.array_equal(ours.reshape(-1), np.frombuffer(ggml_ref.ggml_quantize_chunk(40, x, *x.shape), np.uint8))


def test_ggml_dequantizer_matches_libggml_and_gguf_py_on_every_byte_value():
    rng = np.random.default_rng(RNG_SEED)
    data = rng.integers(0, 256, (64, 36 * 8), dtype=np.uint8)  # all scale bytes incl. 0x7F, >= 0x80
    data[0, :4] = [0x00, 0x7F, 0x80, 0xFF]
    ours = N.dequantize_nvfp4_ggml(data)
    ref = ggml_ref.dequantize_row_nvfp4(data.reshape(-1), data.size // 36 * 64)
    assert np.array_equal(bits(ours.reshape(-1)), bits(ref))
    ref_py = gguf_quants.dequantize(data, GGMLQuantizationType.NVFP4)
    assert np.array_equal(bits(ours), bits(ref_py))
    assert np.array_equal(bits(ggml_ref.ggml_dequantize(40, data, data.size // 36 * 64)), bits(ref))


def test_modelopt_nibble_pack_unpack_round_trip_and_order():
    rng = np.random.default_rng(RNG_SEED)
    data = rng.integers(0, 256, (3, 40), dtype=np.uint8)
    codes = N.unpack_nibbles_adjacent(data)
    assert np.array_equal(codes[:, 0::2], data & 0x0F) and np.array_equal(N.pack_nibbles_adjacent(codes), data)


def test_ggml_e4m3_probe_reads_the_scale_byte_libggml_picks():
    x = F.E4M3_VALUES[1:0x7F]
    assert np.array_equal(ggml_ref.fp32_to_e4m3_fn()(x), F.f32_to_ue4m3_byte(x))


def test_ggml_pack_unpack_round_trip_is_identity_on_random_bytes():
    rng = np.random.default_rng(RNG_SEED)
    data = rng.integers(0, 256, (5, 36 * 3), dtype=np.uint8)
    codes, scales = N.unpack_nvfp4_ggml(data)
    assert codes.shape == (5, 192) and scales.shape == (5, 12) and codes.max() <= 15
    assert np.array_equal(N.pack_nvfp4_ggml(codes, scales), data)


def test_ggml_layout_puts_value_16s_plus_j_plus_8_in_the_high_nibble():
    codes = np.zeros(64, np.uint8)
    codes[16 * 2 + 3 + 8] = 5  # sub-block 2, j = 3, high half
    packed = N.pack_nvfp4_ggml(codes, np.full(4, 0x38, np.uint8))
    assert packed[4 + 8 * 2 + 3] == 0x50 and packed[4:].sum() == 0x50


# --------------------------------------------------------------------------- repack ModelOpt -> ggml


@pytest.mark.parametrize("kind", CASES)
def test_repack_modelopt_to_ggml_is_lossless(kind):
    x = _case(kind)
    q, s, g = N.quantize_nvfp4_modelopt(x)
    packed = N.repack_modelopt_to_ggml(q, torch.from_numpy(s).view(torch.float8_e4m3fn))
    # same codes and scale bytes, only rearranged
    codes, scale_bytes = N.unpack_nvfp4_ggml(packed)
    assert np.array_equal(scale_bytes, s)
    mo_codes = N.unpack_nibbles_adjacent(q)
    assert np.array_equal(codes, mo_codes)
    # values: ggml (C) decodes exactly e2m1 * e4m3, ModelOpt's values with weight_scale_2 = 1
    ggml_vals = ggml_ref.dequantize_row_nvfp4(packed.reshape(-1), x.size).reshape(x.shape)
    assert np.array_equal(bits_signless_zero(ggml_vals), bits_signless_zero(N.dequantize_nvfp4_modelopt(q, s, 1.0)))
    # with the per-tensor scale applied after the fact (llama.cpp's `.scale`), at most 1 ulp
    # from ModelOpt (which rounds e4m3 * weight_scale_2 before multiplying by the code)
    mo = N.dequantize_nvfp4_modelopt(q, s, g)
    ulps = np.abs(bits(np.abs(ggml_vals * g)).astype(np.int64) - bits(np.abs(mo)).astype(np.int64))
    assert ulps.max() <= 1


def test_repack_refuses_columns_not_multiple_of_64():
    q, s, _ = N.quantize_nvfp4_modelopt(np.ones((2, 48), np.float32))
    with pytest.raises(ValueError, match="multiple of 64"):
        N.repack_modelopt_to_ggml(q, s, name="blk.0.ffn_up")


# --------------------------------------------------------------------------- MXFP4


@pytest.mark.parametrize("kind", CASES + ["saturating"])
def test_mxfp4_quantizer_and_dequantizer_are_bit_exact_with_libggml(kind):
    x = _ggml_case(kind)
    ours = mxfp4.quantize_mxfp4_ggml(x)
    ref = ggml_ref.quantize_row_mxfp4_ref(x.reshape(-1))
    assert np.array_equal(ours.reshape(-1), ref)
    deq = mxfp4.dequantize_mxfp4_ggml(ours)
    assert np.array_equal(bits(deq.reshape(-1)), bits(ggml_ref.dequantize_row_mxfp4(ref, x.size)))
    assert np.array_equal(bits(deq), bits(gguf_quants.dequantize(ours, GGMLQuantizationType.MXFP4)))


def test_mxfp4_block_exponent_matches_libggml_just_below_powers_of_two():
    k = np.arange(-100, 100)
    amax = (np.ldexp(1.0, k) * (1 - 2.0**-24)).astype(np.float32)
    x = np.zeros((amax.size, 32), np.float32)
    x[:, 7] = amax
    x[:, 8] = -amax / 3
    assert np.array_equal(mxfp4.quantize_mxfp4_ggml(x).reshape(-1), ggml_ref.quantize_row_mxfp4_ref(x.reshape(-1)))


# --------------------------------------------------------------------------- INT4-g16 and metrics


def test_int4_g16_levels_are_symmetric_and_error_is_at_most_half_a_step():
    x = _case("student_t", 16, 256)
    q, scale = mxfp4.quantize_int4_g16(x)
    assert q.min() >= -7 and q.max() <= 7 and scale.dtype == np.float16
    y = mxfp4.dequantize_int4_g16(q, scale)
    step = scale.astype(np.float32).repeat(16, axis=-1).reshape(x.shape)
    # fp16 rounding of amax/7 may push amax just past 7 steps: allow that saturation
    assert np.all(np.abs(y - x) <= step * 0.5 + np.abs(x) * 2.0**-10 + 1e-30)


def test_error_metrics_on_known_values():
    ref = np.array([3.0, 4.0], np.float32)
    assert metrics.relative_mse(ref, ref) == 0 and metrics.sqnr_db(ref, ref) == float("inf")
    assert metrics.relative_mse(ref, np.array([3.0, 3.0], np.float32)) == pytest.approx(1 / 25)
    assert metrics.sqnr_db(ref, np.array([3.0, 3.0], np.float32)) == pytest.approx(10 * np.log10(25))


def test_nvfp4_beats_mxfp4_and_int4_is_in_between_on_gaussian_weights():
    x = _case("gaussian", 64, 1024)
    nv = metrics.sqnr_db(x, N.dequantize_nvfp4_modelopt(*N.quantize_nvfp4_modelopt(x)))
    mx = metrics.sqnr_db(x, mxfp4.dequantize_mxfp4_ggml(mxfp4.quantize_mxfp4_ggml(x)))
    assert nv > mx + 1.0


# --------------------------------------------------------------------------- ggml_ref plumbing


def test_ggml_row_sizes_and_traits_match_the_block_layouts():
    assert ggml_ref.ggml_row_size(40, 2048) == 2048 // 64 * 36
    assert ggml_ref.ggml_row_size("MXFP4", 2048) == 2048 // 32 * 17
    assert ggml_ref.type_traits(40)["blck_size"] == 64 and ggml_ref.type_traits(40)["type_size"] == 36
    assert ggml_ref.type_traits("Q4_K")["name"] == "q4_K"


def test_ggml_quantize_chunk_q8_0_matches_gguf_py_quantizer():
    x = _case("gaussian", 4, 256)
    ours = np.frombuffer(ggml_ref.ggml_quantize_chunk("Q8_0", x, 4, 256), np.uint8).reshape(4, -1)
    assert np.array_equal(ours, gguf_quants.quantize(x, GGMLQuantizationType.Q8_0))


def test_ggml_quantize_chunk_uses_the_imatrix_for_q4_k():
    x = _case("student_t", 4, 256)
    im = np.linspace(0.01, 10, 256).astype(np.float32)
    a = ggml_ref.ggml_quantize_chunk("Q4_K", x, 4, 256)
    b = ggml_ref.ggml_quantize_chunk("Q4_K", x, 4, 256, imatrix=im)
    assert len(a) == len(b) == 4 * 144 and a != b


def test_ggml_ref_wrappers_refuse_wrong_lengths():
    with pytest.raises(ValueError, match="multiple of 64"):
        ggml_ref.quantize_row_nvfp4_ref(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="expected nrows"):
        ggml_ref.ggml_quantize_chunk(40, np.zeros(128, np.float32), 3, 64)
    with pytest.raises(ValueError, match="imatrix"):
        ggml_ref.ggml_quantize_chunk("Q4_K", np.zeros(256, np.float32), 1, 256, imatrix=np.ones(8, np.float32))
    for bad_type in (4, 43, -1):  # removed Q4_2, GGML_TYPE_COUNT (would abort in C), negative
        with pytest.raises(ValueError, match="not a valid type"):
            ggml_ref.ggml_row_size(bad_type, 64)


# --------------------------------------------------------------------------- bad input


QUANTIZERS = [
    (N.quantize_nvfp4_modelopt, 16),
    (N.quantize_nvfp4_ggml, 64),
    (mxfp4.quantize_mxfp4_ggml, 32),
    (mxfp4.quantize_int4_g16, 16),
]


@pytest.mark.parametrize("fn,mult", QUANTIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize(
    "bad,match",
    [
        ("nan", "NaN"),
        ("inf", "Inf"),
        ("float64", "float64"),
        ("int", "floating"),
        ("length", "not a multiple of"),
    ],
)
def test_quantizers_refuse_bad_input_and_name_the_tensor(fn, mult, bad, match):
    x = np.ones((2, 128), np.float32)
    if bad == "nan":
        x[1, 3] = np.nan
    elif bad == "inf":
        x[0, 0] = -np.inf
    elif bad == "float64":
        x = x.astype(np.float64)
    elif bad == "int":
        x = x.astype(np.int32)
    elif bad == "length":
        x = np.ones((2, 128 + mult // 2), np.float32)
    with pytest.raises(ValueError, match=match) as err:
        fn(x, name="blk.3.ffn_down")
    assert "blk.3.ffn_down" in str(err.value)


def test_modelopt_quantizer_refuses_all_zero_tensor_and_bad_weight_scale_2():
    with pytest.raises(ValueError, match="all-zero"):
        N.quantize_nvfp4_modelopt(np.zeros((2, 32), np.float32), name="w")
    for bad in (0.0, -1.0, float("nan"), np.ones(2, np.float32)):
        with pytest.raises(ValueError, match="weight_scale_2"):
            N.quantize_nvfp4_modelopt(np.ones((2, 32), np.float32), weight_scale_2=bad)


def test_modelopt_quantizer_with_explicit_scale_handles_all_zero_tensor():
    q, s, g = N.quantize_nvfp4_modelopt(np.zeros((2, 32), np.float32), weight_scale_2=np.float32(0.5))
    assert not q.any() and np.all(s == 0x38)  # code 0, scale byte 1.0


def test_dequantizers_refuse_mismatched_shapes():
    q, s, g = N.quantize_nvfp4_modelopt(np.ones((2, 64), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        N.dequantize_nvfp4_modelopt(q, s[:, :2], g, name="w")
    with pytest.raises(ValueError, match="36-byte block"):
        N.dequantize_nvfp4_ggml(np.zeros(35, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        N.dequantize_nvfp4_ggml(np.zeros(36, np.int8))


# --------------------------------------------------------------------------- benchmark convention


def test_benchmark_ratios_are_nexlab_time_over_ggml_time():
    """The workbook's one benchmark convention (README): time nexlab / time reference, below 1 = nexlab faster."""
    r = speed.nvfp4_speed_vs_ggml(rows=4, cols=128, repeat=1)
    assert r["quantize_time_ratio"] == pytest.approx(r["nexlab_quantize_s"] / r["ggml_quantize_s"], rel=1e-12)
    assert r["dequantize_time_ratio"] == pytest.approx(r["nexlab_dequantize_s"] / r["ggml_dequantize_s"], rel=1e-12)
    assert sorted(k for k in r if "ratio" in k) == ["dequantize_time_ratio", "quantize_time_ratio"]
    assert r["quantize_bytes_identical"] and r["dequantize_values_identical"]
