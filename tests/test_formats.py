"""Codecs of nexlab.formats.minifloat against the real dtypes: torch, ml_dtypes, libggml, gguf-py.

Every comparison is bit-exact on float32 bit patterns (so -0.0 and NaN positions count).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from gguf.quants import NVFP4 as GGUF_NVFP4

from nexlab.formats import minifloat as F
from nexlab.llamacpp import libggml as ggml_ref


def bits(a) -> np.ndarray:
    """float32 bit patterns, with every NaN canonicalised to one pattern per sign."""
    a = np.asarray(a, dtype=np.float32)
    b = a.view(np.uint32).copy()
    b[np.isnan(a)] = np.where(np.signbit(a[np.isnan(a)]), 0xFFC00000, 0x7FC00000)
    return b


def neighbours(vals: np.ndarray) -> np.ndarray:
    """Each value and the float32 one ulp below and above it."""
    v = vals.astype(np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(-np.inf)), np.nextafter(v, np.float32(np.inf))])


def with_negatives(v: np.ndarray) -> np.ndarray:
    return np.concatenate([v, -v]).astype(np.float32)


# --------------------------------------------------------------------------- E2M1


def test_e2m1_all_16_codes_decode_like_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(bits(F.e2m1_codes_to_f32(codes)), bits(ref))


# torch's float4_e2m1fn_x2 is no reference here: torch 2.13 on CPU cannot convert it to float32 (no
# copy kernel), so a test against it could only skip. The decoding is proven against ml_dtypes above, and
# the two-codes-per-byte order (first code in the low nibble) against nvidia-modelopt's own packing in
# tests/test_nvfp4.py (byte-identical quantizer and a real export).


def _e2m1_probe_values() -> np.ndarray:
    grid = F.E2M1_GRID
    mids = (grid[:-1] + grid[1:]) / 2
    extra = np.array([0.0, 6.0, 6.5, 7.0, 1e3, 3e38, np.inf, 1e-40, 1e-45, 0.1], dtype=np.float32)  # no NaN: refused
    return with_negatives(neighbours(np.concatenate([grid, mids, extra])))


def test_e2m1_encoder_matches_ml_dtypes_at_ties_beyond_max_and_zero():
    x = _e2m1_probe_values()
    ref = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F
    assert np.array_equal(F.f32_to_e2m1_codes(x), ref)


def test_e2m1_encoder_matches_ml_dtypes_on_random_values():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(50_000) * 3).astype(np.float32)
    ref = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F
    assert np.array_equal(F.f32_to_e2m1_codes(x), ref)


def test_e2m1_encoder_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        F.f32_to_e2m1_codes(np.array([1.0, np.nan], np.float32), name="y")


def test_e2m1_encoder_rounds_half_to_even():
    # 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (even mantissas)
    x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
    assert F.e2m1_codes_to_f32(F.f32_to_e2m1_codes(x)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


# --------------------------------------------------------------------------- E4M3


def test_e4m3_all_256_bytes_decode_like_torch_and_ml_dtypes():
    b = np.arange(256, dtype=np.uint8)
    ours = bits(F.e4m3_bytes_to_f32(b))
    ref_torch = torch.from_numpy(b.copy()).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    ref_ml = b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(ours, bits(ref_torch))
    assert np.array_equal(ours, bits(ref_ml))
    assert F.e4m3_bytes_to_f32(np.array([0x7E], np.uint8))[0] == F.E4M3_MAX


def _e4m3_probe_values() -> np.ndarray:
    finite = F.E4M3_VALUES[:0x7F].astype(np.float64)  # 0 .. 448, ascending
    mids = (finite[:-1] + finite[1:]) / 2
    beyond = np.array([448, 449, 460, 463.99, 464, 464.01, 470, 479.99, 480, 500, 1e4, 3e38, np.inf, np.nan])
    tiny = np.array([2.0**-10, 3 * 2.0**-11, 2.0**-12, 1e-20, 1e-40, 1e-45, 2.0**-6 - 2.0**-12])
    return with_negatives(neighbours(np.concatenate([finite, mids, beyond, tiny]).astype(np.float32)))


def test_e4m3_encoder_matches_torch_cast_at_every_tie_beyond_max_and_subnormals():
    x = _e4m3_probe_values()
    ref = torch.from_numpy(x.copy()).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(F.f32_to_e4m3_bytes(x), ref)  # torch 2.13 saturates at 448


def test_e4m3_encoder_without_saturation_matches_ml_dtypes_cast():
    x = _e4m3_probe_values()
    ref = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)  # NaN beyond 464
    assert np.array_equal(F.f32_to_e4m3_bytes(x, saturate=False), ref)


def test_e4m3_encoder_overflow_behaviours_differ_only_beyond_448():
    x = np.array([448, 464, 464.01, 1e9, np.inf, -np.inf], np.float32)
    assert F.f32_to_e4m3_bytes(x).tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE]
    assert F.f32_to_e4m3_bytes(x, saturate=False).tolist() == [0x7E, 0x7E, 0x7F, 0x7F, 0x7F, 0xFF]


def test_e4m3_encoder_matches_torch_on_random_log_uniform_values():
    rng = np.random.default_rng(2)
    x = (np.exp(rng.uniform(np.log(1e-5), np.log(600), 100_000)) * rng.choice([-1, 1], 100_000)).astype(np.float32)
    ref = torch.from_numpy(x.copy()).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(F.f32_to_e4m3_bytes(x), ref)


def test_e4m3_encoder_accepts_bfloat16_exactly():
    rng = np.random.default_rng(3)
    t = torch.from_numpy(rng.standard_normal(4096).astype(np.float32) * 50).to(torch.bfloat16)
    ref = t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(F.f32_to_e4m3_bytes(t), ref)


# --------------------------------------------------------------------------- UE4M3 (ggml)


def _ggml_scale_probe(scale_bytes: np.ndarray) -> np.ndarray:
    """Decode each scale byte with libggml: a block whose codes are all 1 (kvalue 1)
    dequantizes to exactly ue4m3_half(byte)."""
    n = scale_bytes.size
    blocks = np.zeros((n, 36), dtype=np.uint8)
    blocks[:, :4] = scale_bytes[:, None]
    blocks[:, 4:] = 0x11
    out = ggml_ref.dequantize_row_nvfp4(blocks.reshape(-1), n * 64).reshape(n, 64)
    assert np.all(bits(out) == bits(out[:, :1]))
    return out[:, 0]


def test_ue4m3_all_256_bytes_decode_like_libggml_and_gguf_py():
    b = np.arange(256, dtype=np.uint8)
    ours = bits(F.ue4m3_byte_to_f32(b))
    assert np.array_equal(ours, bits(_ggml_scale_probe(b)))
    assert np.array_equal(ours, bits(GGUF_NVFP4.ue4m3_to_fp32(b).astype(np.float32)))


def test_ue4m3_is_half_of_e4m3_for_every_finite_positive_byte():
    b = np.arange(1, 0x7F, dtype=np.uint8)
    assert np.array_equal(F.ue4m3_byte_to_f32(b) * 2, F.e4m3_bytes_to_f32(b))


def _ue4m3_probe_inputs() -> np.ndarray:
    e = F.E4M3_VALUES[1:0x7F].astype(np.float64)
    mids = (e[:-1] + e[1:]) / 2
    rng = np.random.default_rng(4)
    rnd = np.exp(rng.uniform(np.log(2.0**-12), np.log(600.0), 20_000))
    special = [2.0**-6 * (1 - 2.0**-20), 2.0**-6 * (1 - 2.0**-5), 2.0**-11, 2.0**-10, 2.0**-10 * 0.999,
               256, 300, 448, 460, 1e5]
    return neighbours(np.concatenate([e, mids, rnd, special]).astype(np.float32))


def test_ue4m3_encoder_matches_libggml_quantizer_scale_bytes():
    # ggml picks byte = ggml_fp32_to_ue4m3(amax / 6.0f); feed blocks whose amax is 6 * x.
    x = _ue4m3_probe_inputs()
    amax = (x * np.float32(6.0)).astype(np.float32)
    blocks = np.zeros((amax.size, 64), dtype=np.float32)
    blocks[:, 5] = amax
    got = ggml_ref.quantize_row_nvfp4_ref(blocks.reshape(-1)).reshape(-1, 36)[:, 0]
    assert np.array_equal(F.f32_to_ue4m3_byte(amax / np.float32(6.0)), got)


def test_ue4m3_encoder_matches_gguf_py():
    x = _ue4m3_probe_inputs()
    assert np.array_equal(F.f32_to_ue4m3_byte(x), GGUF_NVFP4.fp32_to_ue4m3(x))


def test_ue4m3_encoder_maps_nonpositive_and_nan_to_zero():
    assert F.f32_to_ue4m3_byte(np.array([0.0, -0.0, -3.0, np.nan], np.float32)).tolist() == [0, 0, 0, 0]


# --------------------------------------------------------------------------- E8M0


def test_e8m0_decode_matches_ml_dtypes_and_torch_except_ggml_255():
    b = np.arange(255, dtype=np.uint8)
    ours = F.e8m0_byte_to_f32(b)
    assert np.array_equal(bits(ours), bits(b.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)))
    ref_t = torch.from_numpy(b.copy()).view(torch.float8_e8m0fnu).to(torch.float32).numpy()
    assert np.array_equal(bits(ours), bits(ref_t))
    assert F.e8m0_byte_to_f32(np.array([255], np.uint8))[0] == np.inf  # ggml: no NaN code


def test_e8m0_half_decode_matches_libggml_mxfp4_dequantizer():
    b = np.arange(256, dtype=np.uint8)
    blocks = np.zeros((256, 17), dtype=np.uint8)
    blocks[:, 0] = b
    blocks[:, 1:] = 0x11  # kvalue 1 everywhere -> value == e8m0_half(byte)
    out = ggml_ref.dequantize_row_mxfp4(blocks.reshape(-1), 256 * 32).reshape(256, 32)
    assert np.array_equal(bits(F.e8m0_byte_to_f32(b, half=True)), bits(out[:, 0]))


def test_e8m0_encoder_matches_libggml_mxfp4_exponent_near_powers_of_two():
    k = np.arange(-120, 120, dtype=np.float64)
    base = np.ldexp(1.0, k.astype(int)).astype(np.float32)
    ulps = [np.float32(1 - 2.0**-24), np.float32(1 - 2.0**-23), np.float32(1 - 2.0**-20), np.float32(1),
            np.float32(1.5)]
    amax = np.concatenate([base * u for u in ulps]).astype(np.float32)
    rng = np.random.default_rng(5)
    amax = np.concatenate([amax, np.exp(rng.uniform(-80, 80, 5000)).astype(np.float32)])
    blocks = np.zeros((amax.size, 32), dtype=np.float32)
    blocks[:, 3] = amax
    got = ggml_ref.quantize_row_mxfp4_ref(blocks.reshape(-1)).reshape(-1, 17)[:, 0]
    ours = ((F.f32_to_e8m0_byte(amax).astype(np.int64) - 2) & 0xFF).astype(np.uint8)
    assert np.array_equal(ours, got)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "fn", [F.f32_to_e2m1_codes, F.f32_to_e4m3_bytes, F.f32_to_ue4m3_byte, F.f32_to_e8m0_byte], ids=lambda f: f.__name__
)
@pytest.mark.parametrize("bad", [np.zeros(4, np.float64), np.zeros(4, np.int32)], ids=["float64", "int32"])
def test_encoders_refuse_non_float32_dtypes_and_name_the_tensor(fn, bad):
    with pytest.raises(ValueError, match="my.tensor"):
        fn(bad, name="my.tensor")


@pytest.mark.parametrize(
    "fn", [F.e2m1_codes_to_f32, F.e4m3_bytes_to_f32, F.ue4m3_byte_to_f32, F.e8m0_byte_to_f32], ids=lambda f: f.__name__
)
def test_decoders_refuse_non_byte_input(fn):
    with pytest.raises(ValueError, match="uint8"):
        fn(np.zeros(4, np.int16))


def test_e2m1_decoder_refuses_codes_above_15():
    with pytest.raises(ValueError, match="0..15"):
        F.e2m1_codes_to_f32(np.array([3, 16], np.uint8))
