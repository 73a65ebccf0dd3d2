"""Small floating-point formats used by NVFP4, MXFP4 and their GGUF storage.

Constants for the formats live here, together with vectorised numpy codecs whose
names say the direction and the storage:

====================  ======================================================  ==========================
function              what                                                    bit-exact reference
====================  ======================================================  ==========================
e2m1_codes_to_f32     4-bit E2M1 code (sign = bit 3) -> float32               ml_dtypes float4_e2m1fn,
                                                                              torch float4_e2m1fn_x2
f32_to_e2m1_codes     float32 -> E2M1 code, round half to even, saturate at 6 ml_dtypes float4_e2m1fn cast
e4m3_bytes_to_f32     float8_e4m3fn byte -> float32 (0x7F/0xFF are NaN)       torch / ml_dtypes
f32_to_e4m3_bytes     float32 -> float8_e4m3fn byte, RNE; overflow saturates  torch ``.to(float8_e4m3fn)``
                      (``saturate=False``: NaN beyond 464, as ml_dtypes)        / ml_dtypes ``astype``
ue4m3_byte_to_f32     ggml's NVFP4 scale byte -> float32 (E4M3 value * 0.5)   ggml_ue4m3_to_fp32
f32_to_ue4m3_byte     float32 -> ggml's NVFP4 scale byte (ggml's rounding)    ggml_fp32_to_ue4m3
e8m0_byte_to_f32      E8M0 byte -> 2**(e-127) (ggml: 0 -> 2**-127, 255 -> inf) ggml_e8m0_to_fp32
f32_to_e8m0_byte      float32 -> floor(log2 x) + 127 (ggml's MXFP4 exponent)   quantize_row_mxfp4_ref
====================  ======================================================  ==========================

Every encoder works on float32: half-precision inputs (float16, bfloat16, also as torch
tensors) are widened exactly; float64 is refused because narrowing it first to float32
would round twice. Decoders take uint8 byte arrays (a torch float8_e4m3fn or ml_dtypes
float8_e4m3fn array is viewed as its bytes). Codecs reproduce their reference on every
input, NaN and Inf included (except that E2M1, which has no NaN, refuses NaN); the
quantizers in :mod:`nexlab.formats.nvfp4` refuse non-finite input altogether.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nexlab.core.errors import NexlabError, NexlabTypeError

E2M1_MAX = 6.0  #: largest E2M1 magnitude


E4M3_MAX = 448.0  #: largest finite float8_e4m3fn magnitude (byte 0x7E)


E4M3_MIN_NORMAL = 2.0**-6  #: smallest normal E4M3 (byte 0x08)


E4M3_MIN_SUBNORMAL = 2.0**-9  #: smallest positive E4M3 (byte 0x01)


#: float8_e4m3fn has no infinity; ml_dtypes turns |x| > 464 (the midpoint between 448 and
#: the would-be 480) into NaN (464 itself rounds to even, to 448); torch 2.13 saturates to 448.
E4M3_NAN_THRESHOLD = 464.0


#: E2M1 value of each 4-bit code; bit 3 is the sign, so code 8 is -0.0.
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


#: The 8 non-negative E2M1 magnitudes in code order.
E2M1_GRID = E2M1_VALUES[:8].copy()


#: ggml's ``kvalues_fp4`` (ggml-common.h): the E2M1 table doubled so it fits int8; the
#: scale byte is decoded as E4M3 * 0.5 to compensate. Code 8 is +0 here, not -0.
GGML_E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)


NVFP4_GROUP = 16  #: values per E4M3 block scale (ModelOpt ``group_size`` and ggml's sub-block)


GGML_NVFP4_BLOCK = 64  #: values per ggml NVFP4 block (QK_NVFP4)


GGML_NVFP4_SUB = 16  #: values per scale inside a ggml NVFP4 block (QK_NVFP4_SUB)


GGML_NVFP4_BYTES = 36  #: 4 UE4M3 scale bytes + 32 bytes of nibbles


MXFP4_BLOCK = 32  #: values per ggml MXFP4 block (QK_MXFP4)


GGML_MXFP4_BYTES = 17  #: 1 E8M0 byte + 16 bytes of nibbles


INT4_GROUP = 16  #: values per scale of the INT4-g16 comparison format


GGML_TYPE_MXFP4 = 39


GGML_TYPE_NVFP4 = 40


# Decision thresholds for E2M1 round-half-to-even on magnitudes: a magnitude m gets the
# code count(bound < m). The midpoints whose upper neighbour has an even mantissa
# (0.75 -> 1.0, 1.75 -> 2.0, 3.5 -> 4.0) are replaced by the float32 just below them, so
# that a tie there rounds up; the other midpoints (0.25, 1.25, 2.5, 5.0) round down.
E2M1_RNE_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)


for _i in (1, 3, 5):
    E2M1_RNE_BOUNDS[_i] = np.nextafter(E2M1_RNE_BOUNDS[_i], np.float32(0))


del _i


def tensor_label(name: str | None, default: str) -> str:
    return f"{name!r}" if name else default


def to_numpy(x: Any, *, name: str | None = None) -> np.ndarray:
    """Return a numpy view/copy of ``x`` (numpy array, torch tensor or scalar/list).

    torch bfloat16 and float8 tensors have no numpy dtype: bfloat16 is widened to float32
    (exact) and float8_e4m3fn is returned as its uint8 bytes.
    """
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

        if not isinstance(x, torch.Tensor):
            raise NexlabTypeError(f"{tensor_label(name, 'input')}: expected a tensor or array, got {type(x).__name__}")
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16,):
            return t.float().numpy()
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).numpy()
        if t.dtype.is_floating_point and t.dtype not in (torch.float16, torch.float32, torch.float64):
            raise NexlabError(f"{tensor_label(name, 'input')}: unsupported torch dtype {t.dtype}")
        return t.numpy()
    return np.asarray(x)


def as_f32(x: Any, *, name: str | None = None, finite: bool = False) -> np.ndarray:
    """``x`` as a float32 numpy array, widening float16/bfloat16 exactly.

    Raises ValueError for float64 (narrowing would round), integer or other dtypes, and,
    with ``finite=True``, for NaN or Inf (the message names the tensor and the count).
    """
    a = to_numpy(x, name=name)
    dt = a.dtype
    if dt == np.float32:
        out = a
    elif dt == np.float16 or dt.name == "bfloat16":
        out = a.astype(np.float32)
    elif dt == np.float64:
        raise NexlabError(
            f"{tensor_label(name, 'input')}: float64 input is not accepted (convert to float32 first;"
            " an implicit narrowing would round before quantizing)"
        )
    else:
        raise NexlabError(f"{tensor_label(name, 'input')}: expected a floating tensor (float32/float16/bfloat16), "
                          f"got {dt}")
    if finite:
        bad = ~np.isfinite(out)
        if bad.any():
            n_nan = int(np.isnan(out).sum())
            raise NexlabError(
                f"{tensor_label(name, 'input')}: contains {n_nan} NaN and {int(bad.sum()) - n_nan} Inf values"
            )
    return out


def as_bytes(x: Any, *, name: str | None = None) -> np.ndarray:
    """``x`` as a uint8 numpy array (torch/ml_dtypes float8_e4m3fn are viewed as bytes)."""
    a = to_numpy(x, name=name)
    if a.dtype.name == "float8_e4m3fn":
        a = a.view(np.uint8)
    if a.dtype != np.uint8:
        raise NexlabError(f"{tensor_label(name, 'input')}: expected uint8 bytes, got {a.dtype}")
    return a


def e2m1_codes_to_f32(codes: Any, *, name: str | None = None) -> np.ndarray:
    """Decode 4-bit E2M1 codes (values 0..15, one per uint8) to float32.

    Bit 3 is the sign, bits 2..1 the exponent (bias 1), bit 0 the mantissa; code 8 is -0.0.
    Matches ml_dtypes float4_e2m1fn and torch float4_e2m1fn_x2 exactly.
    """
    c = as_bytes(codes, name=name)
    if c.size and int(c.max()) > 15:
        raise NexlabError(f"{tensor_label(name, 'codes')}: E2M1 codes must be in 0..15, found {int(c.max())}")
    return E2M1_VALUES[c]


def f32_to_e2m1_codes(x: Any, *, name: str | None = None) -> np.ndarray:
    """Encode float32 values as 4-bit E2M1 codes (uint8 in 0..15).

    Round half to even on the grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}; magnitudes above 6 (and
    Inf) saturate to 6; the sign bit (bit 3) copies the float's sign bit, so -0.0 and small
    negatives that round to zero give code 8 (-0), as ml_dtypes' float4_e2m1fn cast does.
    E2M1 has no NaN: NaN input raises ValueError (ml_dtypes silently returns a zero code).
    """
    a = as_f32(x, name=name)
    if np.isnan(a).any():
        raise NexlabError(f"{tensor_label(name, 'input')}: NaN cannot be encoded as E2M1")
    mag = np.abs(a)
    codes = np.searchsorted(E2M1_RNE_BOUNDS, mag, side="left").astype(np.uint8)
    codes |= (np.signbit(a).astype(np.uint8) << 3)
    return codes


def _build_e4m3_table() -> np.ndarray:
    b = np.arange(256, dtype=np.int64)
    exp = (b >> 3) & 0xF
    man = b & 7
    mag = np.where(exp == 0, np.ldexp(man.astype(np.float64), -9), np.ldexp((8 + man).astype(np.float64), exp - 10))
    mag[(b & 0x7F) == 0x7F] = np.nan
    return np.where((b & 0x80) != 0, -mag, mag).astype(np.float32)


#: float32 value of each float8_e4m3fn byte (index = byte).
E4M3_VALUES = _build_e4m3_table()


def e4m3_bytes_to_f32(b: Any, *, name: str | None = None) -> np.ndarray:
    """Decode float8_e4m3fn bytes to float32 (bias 7, subnormals man * 2**-9, no Inf,
    0x7F/0xFF are NaN, 0x80 is -0.0). Matches torch and ml_dtypes float8_e4m3fn."""
    return E4M3_VALUES[as_bytes(b, name=name)]


def f32_to_e4m3_bytes(x: Any, *, saturate: bool = True, name: str | None = None) -> np.ndarray:
    """Encode float32 as float8_e4m3fn bytes.

    Round to nearest, ties to even, on the 3 mantissa bits (normals) or on multiples of
    2**-9 (subnormals below 2**-6); the sign of zero is kept (-0.0 -> 0x80); NaN -> 0x7F
    with the input's sign bit. The format has no Inf, and the two references disagree on
    overflow, so both behaviours are offered:

    - ``saturate=True`` (default): ``torch.Tensor.to(torch.float8_e4m3fn)`` of torch 2.13,
      the cast ModelOpt uses: |x| > 448 and +-Inf become +-448 (0x7E / 0xFE).
    - ``saturate=False``: ml_dtypes' ``astype(float8_e4m3fn)``: |x| > 464 (the midpoint of
      448 and the missing 480; 464 itself rounds to even, i.e. to 448) and +-Inf become NaN
      (0x7F / 0xFF).

    Scale producers clamp to [2**-9, 448] before casting, so overflow never reaches a
    valid checkpoint either way.
    """
    a32 = as_f32(x, name=name)
    bits = np.ascontiguousarray(a32).view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    mag = bits & np.uint32(0x7FFFFFFF)
    # normal range: add 0x7FFFF plus the lowest kept bit, i.e. round half to even on the 20
    # dropped mantissa bits, then re-bias the exponent from 127 to 7 (120 << 3 = 960).
    rounded = (mag + np.uint32(0x7FFFF) + ((mag >> 20) & np.uint32(1))) >> 20
    normal = (rounded.astype(np.int64) - 960).clip(0, 0x7F).astype(np.uint8)
    # subnormal range (|x| < 2**-6): count multiples of 2**-9, half to even (np.rint);
    # x * 512 is exact in float32 (scaling by a power of two, upwards).
    with np.errstate(invalid="ignore", over="ignore"):
        sub = np.rint(np.abs(a32) * np.float32(512.0)).clip(0, 8).astype(np.uint8)
    out = np.where(mag < np.uint32(0x3C800000), sub, normal)
    if saturate:
        out = np.where(mag > np.uint32(0x43E00000), np.uint8(0x7E), out)  # > 448, Inf
    else:
        out = np.where(mag >= np.uint32(0x43E80001), np.uint8(0x7F), out)  # > 464, Inf
    out = np.where(mag > np.uint32(0x7F800000), np.uint8(0x7F), out)  # NaN
    return (out | sign).astype(np.uint8)


def ue4m3_byte_to_f32(b: Any, *, name: str | None = None) -> np.ndarray:
    """Decode ggml's NVFP4 scale byte, returning **half** the E4M3 value (ggml convention).

    Mirrors ``ggml_ue4m3_to_fp32`` (ggml-impl.h): the byte is read as an unsigned E4M3
    (4 exponent bits, bias 7, 3 mantissa bits; subnormals man * 2**-9) and multiplied by
    0.5, because ggml's E2M1 table ``kvalues_fp4`` is doubled (0, 1, 2, 3, 4, 6, 8, 12).
    ggml's quirks are kept: bytes 0x00 and 0x7F decode to 0 (not NaN); bit 7 is ignored,
    so 0x80 is 0 and 0xFF decodes to 480 * 0.5 = 240.
    """
    return UE4M3_HALF_VALUES[as_bytes(b, name=name)]


def _build_ue4m3_half_table() -> np.ndarray:
    c = np.arange(256, dtype=np.int64)
    exp = (c >> 3) & 0xF
    man = c & 7
    raw = np.where(exp == 0, np.ldexp(man.astype(np.float64), -9), np.ldexp((8 + man).astype(np.float64), exp - 10))
    raw[(c == 0) | (c == 0x7F)] = 0.0
    return (raw * 0.5).astype(np.float32)


#: float32 value ggml gives each NVFP4 scale byte (index = byte), i.e. E4M3 * 0.5.
UE4M3_HALF_VALUES = _build_ue4m3_half_table()


def f32_to_ue4m3_byte(x: Any, *, name: str | None = None) -> np.ndarray:
    """Encode a positive float32 as ggml's NVFP4 scale byte, exactly as ``ggml_fp32_to_ue4m3``.

    The input is the E4M3 value itself (ggml passes ``amax / 6``), not the halved value that
    :func:`ue4m3_byte_to_f32` returns. ggml's rounding differs from torch's E4M3 cast and is
    reproduced as is:

    - ``x <= 0`` or NaN -> 0; ``x > 448`` is clamped to 448;
    - below 2**-6 (subnormal): ``man = (int)(x * 512.0f + 0.5f)`` in float32 (half away
      from zero, after a float32 addition that can itself round up), clamped to 7, so values
      just below 2**-6 give 0x07 rather than 0x08;
    - normal: the 3 mantissa bits are rounded by the next bit only (half away from zero);
    - any result with exponent field >= 15 becomes 0x7E (448): every x >= 256 maps to 448.
    """
    a = as_f32(x, name=name)
    with np.errstate(invalid="ignore", over="ignore"):
        pos = a > 0  # False for NaN
        a = np.where(pos, np.minimum(a, np.float32(448.0)), np.float32(1.0)).astype(np.float32)
        bits = np.ascontiguousarray(a).view(np.uint32).astype(np.int64)
        exp = ((bits >> 23) & 0xFF) - 127 + 7
        man = ((bits >> 20) & 7) + ((bits >> 19) & 1)
        exp = exp + (man > 7)
        man = np.where(man > 7, 0, man)
        normal = np.where(exp >= 15, 0x7E, (exp.clip(0, 15) << 3) | man)
        sub = np.floor(a * np.float32(512.0) + np.float32(0.5)).clip(0, 7).astype(np.int64)
    out = np.where(((bits >> 23) & 0xFF) - 127 + 7 <= 0, sub, normal)
    return np.where(pos, out, 0).astype(np.uint8)


def e8m0_byte_to_f32(b: Any, *, half: bool = False, name: str | None = None) -> np.ndarray:
    """Decode E8M0 bytes: 2**(e - 127), as ggml's ``ggml_e8m0_to_fp32``.

    ggml's choices are kept: byte 0 gives 2**-127 (a float32 subnormal) and byte 255 gives
    +Inf (ggml does not handle the OCP NaN code). With ``half=True`` the result is
    2**(e - 128), ggml's ``ggml_e8m0_to_fp32_half`` used with the doubled E2M1 table
    (byte 0 -> 2**-128, byte 255 -> 2**127).
    """
    c = as_bytes(b, name=name).astype(np.uint32)
    if half:
        bits = np.where(c < 2, np.uint32(0x00200000) << c, (c - 1) << 23)
    else:
        bits = np.where(c == 0, np.uint32(0x00400000), c << 23)
    return bits.astype(np.uint32).view(np.float32)


def f32_to_e8m0_byte(x: Any, *, name: str | None = None) -> np.ndarray:
    """Encode positive float32 as the E8M0 byte of its power of two rounded down:
    ``floor(log2f(x)) + 127`` (truncation, as ggml's quantize_row_mxfp4_ref derives its
    block exponent; ggml's byte is this minus 2). ``log2f`` is emulated by a float64 log2
    rounded to float32, so values just below a large power of two round up to it exactly as
    glibc's log2f does (e.g. x = 16 * (1 - 2**-24) gives 131, not 130). ``x <= 0`` gives 0;
    results outside 0..255 wrap modulo 256 like the C float->uint8 conversion on x86-64.
    """
    a = as_f32(x, name=name)
    with np.errstate(divide="ignore", invalid="ignore"):
        lg = np.log2(a.astype(np.float64)).astype(np.float32)
        e = np.floor(lg)
        e = np.where(a > 0, e, -127.0)
    return ((e.astype(np.int64) + 127) & 0xFF).astype(np.uint8)


def f32_to_bf16_bits(x: Any) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16): round to nearest even, NaN made quiet.

    Matches ggml's ``ggml_compute_fp32_to_bf16`` (and gguf-py's ``BF16.quantize_blocks``) bit
    for bit; the sum is taken in uint64 so no input can wrap.
    """
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    r = ((n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)
    if nan.any():
        r = np.where(nan, ((n >> 16) | 64).astype(np.uint16), r)
    return r
