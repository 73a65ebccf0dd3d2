"""NVFP4 in ModelOpt's and ggml's layouts: quantize, pack, dequantize, and the lossless repack.

Two NVFP4 flavours share the same 4-bit E2M1 codes and E4M3 block scales:

* **ModelOpt** (what ``export_hf_checkpoint`` writes per quantized Linear): a per-tensor
  ``weight_scale_2 = amax(W) / (6 * 448)`` (float32), one E4M3 ``weight_scale`` per 16
  consecutive inputs, and ``weight`` uint8 ``[out, in/2]`` with two codes per byte, the even
  column in the low nibble. value = e2m1(code) * e4m3(weight_scale) * weight_scale_2.
  :func:`quantize_nvfp4_modelopt` / :func:`dequantize_nvfp4_modelopt` are byte-identical to
  nvidia-modelopt 0.47.0 (``NVFP4QTensor.get_weights_scaling_factor[_2]`` + ``quantize`` /
  ``dequantize``) on CPU.

* **ggml** (GGUF type 40, ``block_nvfp4``): 64 values in 36 bytes::

      byte 0..3    d[s]   UE4M3 scale of sub-block s (values 16s .. 16s+15)
      byte 4..35   qs     for sub-block s, byte 4 + 8s + j holds
                          value 16s+j in the low nibble and value 16s+j+8 in the high one

  decoded as ``kvalues_fp4[code] * ue4m3(d) * 0.5`` with ``kvalues_fp4`` the doubled E2M1
  table; there is no per-tensor scale inside the block (llama.cpp multiplies the matmul
  output by a separate ``.scale`` tensor). Functions here match libggml's
  ``quantize_row_nvfp4_ref`` / ``dequantize_row_nvfp4`` and gguf-py's dequantizer byte for
  byte. A ModelOpt scale byte decodes to the same product e2m1 * e4m3 in both layouts, so
  :func:`repack_modelopt_to_ggml` is lossless.

MXFP4 and INT4-g16, the formats NVFP4 is compared with, are :mod:`nexlab.formats.mxfp4`; the
minifloat codecs :mod:`nexlab.formats.minifloat`; other NVFP4 scale rules (4over6, search)
:mod:`nexlab.formats.scales`; error metrics :mod:`nexlab.formats.metrics`.

All quantizers validate input (dtype, NaN/Inf, length multiple) and raise ValueError naming
the tensor (``name=``); they process large tensors in row chunks to bound memory, using
float32 arithmetic throughout because that is what the references do.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.formats.minifloat import (
    E2M1_MAX,
    E2M1_RNE_BOUNDS,
    E2M1_VALUES,
    E4M3_MAX,
    E4M3_VALUES,
    GGML_E2M1_DOUBLED,
    GGML_NVFP4_BLOCK,
    GGML_NVFP4_BYTES,
    GGML_NVFP4_SUB,
    NVFP4_GROUP,
    as_bytes,
    as_f32,
    f32_to_e4m3_bytes,
    f32_to_ue4m3_byte,
    tensor_label,
    to_numpy,
    ue4m3_byte_to_f32,
)

#: elements processed per chunk (bounds temporary memory to a few hundred MB)
CHUNK_ELEMS = 1 << 22


#: ModelOpt's decode table (``nvfp4_tensor.e2m1_values``) has +0 for code 8, not -0.
_E2M1_TO_F32_MODELOPT = np.abs(E2M1_VALUES) * np.where(np.arange(16) >= 8, -1, 1).astype(np.float32) + np.float32(0)


_KV_POS = GGML_E2M1_DOUBLED[:8].astype(np.float32)  # 0 1 2 3 4 6 8 12


_KV_MID = ((_KV_POS[:-1] + _KV_POS[1:]) / 2).astype(np.float32)  # 0.5 1.5 2.5 3.5 5 7 10


KV_F32 = GGML_E2M1_DOUBLED.astype(np.float32)


#: ModelOpt's per-tensor scale divisor: the largest E2M1 value times the largest E4M3 value (6 * 448)
NVFP4_TENSOR_SCALE_DIVISOR = E2M1_MAX * E4M3_MAX


def nvfp4_tensor_scale(amax):
    """ModelOpt's tensor scale ``weight_scale_2`` for a tensor (or a group sharing one) whose largest
    magnitude is ``amax``: ``amax / (6 * 448)``, both in float32 and divided in float32, as ModelOpt's
    ``NVFP4QTensor.get_weights_scaling_factor_2`` does, so the tensor's largest block scale lands on
    E4M3's top value 448. An array of amaxes gives an array (float32); a scalar gives a numpy float32."""
    s = np.asarray(amax, dtype=np.float32) / np.float32(NVFP4_TENSOR_SCALE_DIVISOR)
    return s if s.ndim else np.float32(s)


def check_rows(a: np.ndarray, multiple: int, name: str | None, what: str = "tensor") -> None:
    if a.ndim == 0:
        raise NexlabError(f"{tensor_label(name, what)}: expected at least one dimension, got a scalar")
    if a.shape[-1] % multiple != 0:
        raise NexlabError(
            f"{tensor_label(name, what)}: last dimension {a.shape[-1]} is not a multiple of {multiple}"
            f" (shape {tuple(a.shape)})"
        )


def row_chunks(nrows: int, ncols: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMS // max(ncols, 1))
    for r0 in range(0, nrows, step):
        yield slice(r0, min(nrows, r0 + step))


def _scalar_f32(v: Any, name: str) -> np.float32:
    a = to_numpy(v, name=name)
    if a.size != 1:
        raise NexlabError(f"{name!r}: expected a scalar, got shape {tuple(a.shape)}")
    if a.dtype.kind != "f":
        raise NexlabError(f"{name!r}: expected a floating scalar, got {a.dtype}")
    s = np.float32(a.reshape(()))
    if not np.isfinite(s) or s <= 0:
        raise NexlabError(f"{name!r}: must be a positive finite float32, got {s}")
    return s


def pack_nibbles_adjacent(codes: Any, *, name: str | None = None) -> np.ndarray:
    """Pack 4-bit codes ``[..., n]`` into ``[..., n/2]`` bytes, ModelOpt's order: column 2i in
    the low nibble, column 2i+1 in the high nibble (``(q[..., 1::2] << 4) | q[..., 0::2]``)."""
    c = as_bytes(codes, name=name)
    check_rows(c, 2, name, "codes")
    if c.size and int(c.max()) > 15:
        raise NexlabError(f"{tensor_label(name, 'codes')}: 4-bit codes must be in 0..15")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles_adjacent(packed: Any, *, name: str | None = None) -> np.ndarray:
    """Inverse of :func:`pack_nibbles_adjacent`: ``[..., m]`` bytes -> ``[..., 2m]`` codes."""
    p = as_bytes(packed, name=name)
    if p.ndim == 0:
        raise NexlabError(f"{tensor_label(name, 'packed')}: expected at least one dimension")
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def block_absmax(xb: np.ndarray) -> np.ndarray:
    """max |x| over the last axis (a power of two, 16 or 32) by pairwise maxima: exact, and
    faster in numpy than ``np.abs(xb).max(-1)`` on such short rows."""
    m = np.abs(xb)
    while m.shape[-1] > 1:
        m = np.maximum(m[..., 0::2], m[..., 1::2])
    return m[..., 0]


def _count_above(m: np.ndarray, thresholds) -> np.ndarray:
    """uint8 count of thresholds strictly below each ``m`` (thresholds broadcast against m)."""
    codes = np.zeros(m.shape, dtype=np.uint8)
    tmp = np.empty(m.shape, dtype=bool)
    for t in thresholds:
        np.greater(m, t, out=tmp)
        codes += tmp.view(np.uint8)
    return codes


def _e2m1_codes_rne(y: np.ndarray) -> np.ndarray:
    """ModelOpt's ``_cast_fp4`` on float32 ``y``: RNE onto E2M1, saturating, sign = (y < 0).

    Counting the midpoints below |y|, with the three 'round up on tie' midpoints (0.75,
    1.75, 3.5) nudged down by one ulp, is the same decision as ModelOpt's searchsorted +
    odd-bound correction. Unlike :func:`nexlab.formats.minifloat.f32_to_e2m1_codes`, the sign comes
    from ``y < 0``, so an exact -0.0 gives code 0 (as ModelOpt does) while a small negative
    gives code 8.
    """
    codes = _count_above(np.abs(y), E2M1_RNE_BOUNDS)
    codes |= (y < 0).view(np.uint8) << 3
    return codes


def _pair_table(table: np.ndarray) -> np.ndarray:
    """[256] uint64: the two float32 values a byte holds (low nibble first), packed so one
    gather per byte decodes both (``_pair_table(t)[bytes].view(np.float32)``)."""
    b = np.arange(256)
    pairs = np.stack([table[b & 0x0F], table[b >> 4]], axis=1).astype(np.float32)
    return np.ascontiguousarray(pairs).view(np.uint64).reshape(256)


def quantize_nvfp4_modelopt(
    w: Any, weight_scale_2: Any = None, *, name: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Quantize ``w [..., in]`` to NVFP4 exactly as nvidia-modelopt 0.47.0 exports it.

    Returns ``(weight, weight_scale, weight_scale_2)``: ``weight`` uint8 ``[..., in/2]`` (even
    column in the low nibble), ``weight_scale`` uint8 ``[..., in/16]`` holding float8_e4m3fn
    bytes (view them as ``torch.float8_e4m3fn`` to store), ``weight_scale_2`` a np.float32.

    Bit-exact with ``NVFP4QTensor.get_weights_scaling_factor_2`` / ``get_weights_scaling_factor``
    / ``quantize`` (the dynamic path ``export_hf_checkpoint`` uses), every step in float32:

    1. ``weight_scale_2 = amax(|w|) / 2688`` (2688 = 6 * 448) unless given; gate and up of one
       expert pass the shared value here. An all-zero tensor is refused: ModelOpt would get
       a zero global scale and NaN block scales.
    2. block scale ``s = block_amax / (6 * weight_scale_2)`` (the product rounded first, then
       a true division), ``s == 0 -> 1.0`` (all-zero blocks), clamped to [2**-9, 448] and cast
       to E4M3 with round half to even.
    3. ``y = w / (e4m3(s) * weight_scale_2)`` (again product first, then division), rounded
       half to even onto {0, 0.5, ..., 4, 6}, saturating at 6; the sign bit is ``y < 0``.

    ``w`` may be a numpy float32/float16/bfloat16 array or a torch tensor; bfloat16 input
    is widened exactly, as torch promotes it when dividing by the float32 scale. Leading
    dimensions are allowed (``[E, out, in]``) but share one ``weight_scale_2``; ModelOpt
    gives each expert its own, so quantize expert by expert. ``weight_scale_2`` may be a
    float32 numpy/torch scalar or a Python float (rounded to float32 first).
    """
    x = as_f32(w, name=name, finite=True)
    check_rows(x, NVFP4_GROUP, name, "weight")
    if x.size == 0:
        raise NexlabError(f"{tensor_label(name, 'weight')}: empty tensor")
    if weight_scale_2 is None:
        amax = np.float32(max(x.max(), -x.min()))  # = max |x|, without an |x| copy
        if amax == 0:
            raise NexlabError(
                f"{tensor_label(name, 'weight')}: all-zero tensor; ModelOpt's amax/2688 global scale would be 0 "
                "and its block scales NaN. Pass weight_scale_2 explicitly."
            )
        wsf2 = nvfp4_tensor_scale(amax)
    else:
        wsf2 = _scalar_f32(weight_scale_2, "weight_scale_2")
    six_wsf2 = np.float32(np.float32(6.0) * wsf2)

    n = x.shape[-1]
    lead = x.shape[:-1]
    rows = x.reshape(-1, n)
    packed = np.empty((rows.shape[0], n // 2), dtype=np.uint8)
    scales = np.empty((rows.shape[0], n // NVFP4_GROUP), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        for sl in row_chunks(rows.shape[0], n):
            xb = rows[sl].reshape(-1, n // NVFP4_GROUP, NVFP4_GROUP)
            s = block_absmax(xb) / six_wsf2
            s[s == 0] = np.float32(1.0)
            np.clip(s, np.float32(2.0**-9), np.float32(448.0), out=s)
            sb = f32_to_e4m3_bytes(s)
            packed[sl] = _encode_blocks(xb, sb, wsf2)
            scales[sl] = sb
    return packed.reshape(lead + (n // 2,)), scales.reshape(lead + (n // NVFP4_GROUP,)), wsf2


def _encode_blocks(xb: np.ndarray, sb: np.ndarray, wsf2: np.float32) -> np.ndarray:
    """ModelOpt's step 3 for blocks ``xb [R, nb, 16]`` (float32) under E4M3 scale bytes ``sb [R, nb]``:
    ``y = x / (e4m3(sb) * weight_scale_2)`` (product first), RNE onto E2M1; returns the adjacent-pair
    packed bytes ``[R, nb * 8]``."""
    scale = E4M3_VALUES[sb] * wsf2
    y = xb / scale[..., None]
    codes = _e2m1_codes_rne(y).reshape(xb.shape[0], -1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def encode_nvfp4_modelopt(w: Any, weight_scale: Any, weight_scale_2: Any, *, name: str | None = None) -> np.ndarray:
    """E2M1 codes of ``w [..., in]`` under given block scales, as ModelOpt's ``NVFP4QTensor.quantize``
    computes them once the scales are chosen (step 3 of :func:`quantize_nvfp4_modelopt`).

    ``weight_scale``: uint8 E4M3 bytes ``[..., in/16]`` (positive, not NaN); ``weight_scale_2``: the
    float32 tensor scale. Returns the packed uint8 ``weight [..., in/2]`` (even column in the low
    nibble). With the scales :func:`quantize_nvfp4_modelopt` chose it returns its ``weight`` byte for
    byte; nexlab.formats.scales uses it to encode scales chosen by other rules.
    """
    x = as_f32(w, name=name, finite=True)
    check_rows(x, NVFP4_GROUP, name, "weight")
    n = x.shape[-1]
    sb = as_bytes(weight_scale, name=name)
    if sb.shape != x.shape[:-1] + (n // NVFP4_GROUP,):
        raise NexlabError(f"{tensor_label(name, 'weight')}: weight_scale shape {list(sb.shape)}, expected "
                         f"{list(x.shape[:-1]) + [n // NVFP4_GROUP]}")
    v = E4M3_VALUES[sb]
    if not (np.isfinite(v) & (v > 0)).all():
        raise NexlabError(f"{tensor_label(name, 'weight')}: weight_scale has zero, negative or NaN E4M3 bytes")
    wsf2 = _scalar_f32(weight_scale_2, "weight_scale_2")
    rows, srows = x.reshape(-1, n), sb.reshape(-1, n // NVFP4_GROUP)
    packed = np.empty((rows.shape[0], n // 2), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        for sl in row_chunks(rows.shape[0], n):
            packed[sl] = _encode_blocks(rows[sl].reshape(-1, n // NVFP4_GROUP, NVFP4_GROUP), srows[sl], wsf2)
    return packed.reshape(x.shape[:-1] + (n // 2,))


def dequantize_nvfp4_modelopt(
    weight: Any, weight_scale: Any, weight_scale_2: Any, *, name: str | None = None
) -> np.ndarray:
    """Dequantize a ModelOpt NVFP4 tensor to float32 ``[..., in]``.

    Matches ``NVFP4QTensor.dequantize(dtype=torch.float32, scale=..., double_scale=...)``
    bit for bit: ``e2m1(code) * (e4m3(weight_scale) * weight_scale_2)``, the scale product
    rounded to float32 first. ``weight_scale`` may be uint8 bytes or a torch float8_e4m3fn
    tensor. Code 8 decodes to +0.0, as ModelOpt's table has it.
    """
    wq = as_bytes(weight, name=name)
    sb = as_bytes(weight_scale, name=f"{name}.weight_scale" if name else "weight_scale")
    wsf2 = _scalar_f32(weight_scale_2, f"{name}.weight_scale_2" if name else "weight_scale_2")
    if wq.ndim == 0 or sb.shape[:-1] != wq.shape[:-1] or sb.shape[-1] * NVFP4_GROUP != wq.shape[-1] * 2:
        raise NexlabError(
            f"{tensor_label(name, 'weight')}: weight {tuple(wq.shape)} and weight_scale {tuple(sb.shape)} do not fit"
            f" (expected weight_scale [..., in/16] for weight [..., in/2])"
        )
    scale = E4M3_VALUES[sb] * wsf2  # float32 product, rounded once
    n = wq.shape[-1] * 2
    out = np.empty(wq.shape[:-1] + (n,), dtype=np.float32)
    rows_in = wq.reshape(-1, wq.shape[-1])
    rows_out = out.reshape(-1, n)
    srows = scale.reshape(-1, n // NVFP4_GROUP)
    for sl in row_chunks(rows_in.shape[0], n):
        vals = _MODELOPT_PAIRS[rows_in[sl]].view(np.float32).reshape(-1, n // NVFP4_GROUP, NVFP4_GROUP)
        rows_out[sl] = (vals * srows[sl][..., None]).reshape(-1, n)
    return out


def pack_nvfp4_ggml(codes: Any, scale_bytes: Any, *, name: str | None = None) -> np.ndarray:
    """Build ggml ``block_nvfp4`` bytes from E2M1 codes ``[..., n]`` and scale bytes ``[..., n/16]``.

    Returns uint8 ``[..., n/64*36]``: per block, the 4 scale bytes then 32 code bytes, byte
    8s+j of the codes holding value 16s+j (low nibble) and 16s+j+8 (high nibble).
    """
    c = as_bytes(codes, name=name)
    d = as_bytes(scale_bytes, name=f"{name}.scale" if name else "scale_bytes")
    check_rows(c, GGML_NVFP4_BLOCK, name, "codes")
    if d.shape != c.shape[:-1] + (c.shape[-1] // GGML_NVFP4_SUB,):
        raise NexlabError(
            f"{tensor_label(name, 'scale_bytes')}: shape {tuple(d.shape)} does not match codes {tuple(c.shape)}"
            " (expected [..., n/16])"
        )
    if c.size and int(c.max()) > 15:
        raise NexlabError(f"{tensor_label(name, 'codes')}: 4-bit codes must be in 0..15")
    nb = c.shape[-1] // GGML_NVFP4_BLOCK
    cb = c.reshape(-1, nb, 4, GGML_NVFP4_SUB)
    out = np.empty((cb.shape[0], nb, GGML_NVFP4_BYTES), dtype=np.uint8)
    out[..., :4] = d.reshape(-1, nb, 4)
    out[..., 4:] = (cb[..., :8] | (cb[..., 8:] << 4)).reshape(cb.shape[0], nb, 32)
    return out.reshape(c.shape[:-1] + (nb * GGML_NVFP4_BYTES,))


def as_ggml_blocks(data: Any, block_bytes: int, name: str | None) -> np.ndarray:
    b = as_bytes(data, name=name)
    if b.ndim == 0 or b.shape[-1] % block_bytes != 0:
        raise NexlabError(
            f"{tensor_label(name, 'data')}: last dimension {b.shape[-1] if b.ndim else '()'} is not a multiple of"
            f" the {block_bytes}-byte block"
        )
    return b


def unpack_nvfp4_ggml(data: Any, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ggml NVFP4 bytes ``[..., nb*36]`` into codes ``[..., nb*64]`` and scale bytes ``[..., nb*4]``."""
    b = as_ggml_blocks(data, GGML_NVFP4_BYTES, name)
    nb = b.shape[-1] // GGML_NVFP4_BYTES
    blk = b.reshape(-1, nb, GGML_NVFP4_BYTES)
    qs = blk[..., 4:].reshape(-1, nb, 4, 8)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return (
        codes.reshape(b.shape[:-1] + (nb * GGML_NVFP4_BLOCK,)),
        np.ascontiguousarray(blk[..., :4]).reshape(b.shape[:-1] + (nb * 4,)),
    )


def dequantize_nvfp4_ggml(data: Any, *, name: str | None = None) -> np.ndarray:
    """Decode ggml NVFP4 bytes to float32, bit-exact with ``dequantize_row_nvfp4``:
    ``kvalues_fp4[code] * ue4m3_half(d)`` (an exact float32 product; code 8 gives +0)."""
    b = as_ggml_blocks(data, GGML_NVFP4_BYTES, name)
    nb = b.shape[-1] // GGML_NVFP4_BYTES
    n = nb * GGML_NVFP4_BLOCK
    rows = b.reshape(-1, b.shape[-1])
    out = np.empty((rows.shape[0], n), dtype=np.float32)
    for sl in row_chunks(rows.shape[0], n):
        blk = rows[sl].reshape(-1, nb, GGML_NVFP4_BYTES)
        # [r, nb, 4 sub, 8 bytes, (lo, hi)] -> [r, nb, 4, (lo half, hi half), 8]
        pairs = _KV_PAIRS[blk[..., 4:]].view(np.float32).reshape(-1, nb, 4, 8, 2).transpose(0, 1, 2, 4, 3)
        d = ue4m3_byte_to_f32(blk[..., :4])
        out[sl] = (pairs * d[..., None, None]).reshape(-1, n)
    return out.reshape(b.shape[:-1] + (n,))


_KV_PAIRS = _pair_table(KV_F32)


_MODELOPT_PAIRS = _pair_table(_E2M1_TO_F32_MODELOPT)


def ggml_fp4_codes(x: np.ndarray, d: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """ggml's ``best_index_mxfp4`` for float32 blocks ``x [..., k]`` with scales ``d [..., 1]``
    and block maxima ``amax [..., 1]``.

    ggml picks, among ``kvalues_fp4[i] * d``, the first index with the smallest float32
    ``fabsf(kvalues[i]*d - x)``. On the grid's range (|x| <= 12d) the candidate products,
    the midpoints and the two nearest differences are exact in float32 (Sterbenz), so this
    is "nearest, ties toward the smaller magnitude": code = #{midpoints < |x|}. Above 12d
    the exact nearest is 12d (code 7), and float32 rounding of the differences (error at
    most ulp(|x|)/2) cannot tie it with 8d while ulp(|x|) < 4d, which holds for
    |x| <= 2**20 * d. Only blocks beyond that (saturated scales, or scale 0 with non-zero
    values, where every error equals |x| and ggml keeps index 0) are resolved by evaluating
    ggml's float32 errors directly. A negative x gets sign bit 8 unless it rounds to 0
    (ggml emits code 0, never 8).
    """
    m = np.abs(x)
    codes = _count_above(m, [t * d for t in _KV_MID])
    risky = (amax > np.float32(2.0**20) * d)[..., 0]
    if risky.any():
        mr, dr = m[risky], d[risky]
        err = np.abs(_KV_POS * dr[..., None] - mr[..., None])  # [blocks, k, 8] float32
        codes[risky] = np.argmin(err, axis=-1).astype(np.uint8)
    codes |= ((x < 0) & (codes > 0)).view(np.uint8) << 3
    return codes


def nvfp4_ggml_scale_bytes(x: Any, *, name: str | None = None) -> np.ndarray:
    """The UE4M3 byte ggml's quantize_row_nvfp4_ref picks for each 16-value group of ``x``:
    ``ggml_fp32_to_ue4m3(amax / 6.0f)``."""
    a = as_f32(x, name=name, finite=True)
    check_rows(a, GGML_NVFP4_SUB, name)
    amax = np.abs(a.reshape(a.shape[:-1] + (-1, GGML_NVFP4_SUB))).max(axis=-1)
    return f32_to_ue4m3_byte(amax / np.float32(6.0))


def quantize_nvfp4_ggml(x: Any, *, name: str | None = None) -> np.ndarray:
    """Quantize float values ``[..., n]`` (n % 64 == 0) to ggml NVFP4 bytes ``[..., n/64*36]``.

    Bit-exact with libggml's ``quantize_row_nvfp4_ref`` (which ``ggml_quantize_chunk`` uses
    for type 40; it ignores any imatrix). There is no global scale: each 16-value group gets
    ``ue4m3(amax / 6)`` with ggml's own rounding (see :func:`nexlab.formats.minifloat.f32_to_ue4m3_byte`),
    so groups with amax below about 6 * 2**-10 get scale 0 and decode to zeros, and groups
    with amax above 6 * 448 saturate. Codes are nearest with ties toward zero (not RNE).
    """
    a = as_f32(x, name=name, finite=True)
    check_rows(a, GGML_NVFP4_BLOCK, name)
    n = a.shape[-1]
    rows = a.reshape(-1, n)
    out = np.empty((rows.shape[0], n // GGML_NVFP4_BLOCK * GGML_NVFP4_BYTES), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        for sl in row_chunks(rows.shape[0], n):
            xb = rows[sl].reshape(-1, n // GGML_NVFP4_SUB, GGML_NVFP4_SUB)
            amax = block_absmax(xb)[..., None]
            ub = f32_to_ue4m3_byte(amax[..., 0] / np.float32(6.0))
            codes = ggml_fp4_codes(xb, ue4m3_byte_to_f32(ub)[..., None], amax)
            out[sl] = pack_nvfp4_ggml(codes.reshape(xb.shape[0], n), ub)
    return out.reshape(a.shape[:-1] + (out.shape[-1],))


def repack_modelopt_to_ggml(weight: Any, weight_scale: Any, *, name: str | None = None,
                            out: np.ndarray | None = None) -> np.ndarray:
    """Rearrange a ModelOpt NVFP4 ``weight [..., in/2]`` + ``weight_scale [..., in/16]`` into
    ggml NVFP4 rows ``[..., in/64*36]`` without changing any value.

    Codes are moved from adjacent-pair to split-half nibble order and scale bytes copied
    with bit 7 cleared (ModelOpt's scales are positive; ggml ignores that bit anyway).
    ``kvalues_fp4[c] * ue4m3_half(b) == e2m1(c) * e4m3(b)`` exactly for every code and every
    finite positive byte, so the ggml tensor times ``weight_scale_2`` equals ModelOpt's
    values (up to the rounding of that last product; ModelOpt's code 8 (-0) becomes +0).
    ``in`` must be a multiple of 64. ``weight_scale`` may be uint8 or torch float8_e4m3fn.
    ``out``: an optional C-contiguous uint8 array of the result's shape to write into (the
    converter stacks experts this way without an extra copy).
    """
    wq = as_bytes(weight, name=name)
    sb = as_bytes(weight_scale, name=f"{name}.weight_scale" if name else "weight_scale")
    if wq.ndim == 0:
        raise NexlabError(f"{tensor_label(name, 'weight')}: expected at least one dimension")
    n = wq.shape[-1] * 2
    if n % GGML_NVFP4_BLOCK:
        raise NexlabError(
            f"{tensor_label(name, 'weight')}: {n} input columns is not a multiple of 64 (ggml NVFP4 block);"
            " this tensor cannot be stored as GGUF type 40"
        )
    if sb.shape != wq.shape[:-1] + (n // NVFP4_GROUP,):
        raise NexlabError(
            f"{tensor_label(name, 'weight_scale')}: shape {tuple(sb.shape)} does not match weight {tuple(wq.shape)}"
            f" (expected {wq.shape[:-1] + (n // NVFP4_GROUP,)})"
        )
    if np.any((sb & 0x7F) == 0x7F):
        raise NexlabError(f"{tensor_label(name, 'weight_scale')}: contains NaN scale bytes (0x7F/0xFF)")
    nb = n // GGML_NVFP4_BLOCK
    shape = wq.shape[:-1] + (nb * GGML_NVFP4_BYTES,)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise NexlabError(f"{tensor_label(name, 'out')}: expected a C-contiguous uint8 array of shape {shape}")
    # A ggml block is 9 little-endian uint32 words: the 4 scale bytes, then 4 groups of 8 code bytes.
    words = out.reshape(-1).view(np.uint32).reshape(-1, 9)
    words[:, 0] = np.ascontiguousarray(sb).reshape(-1).view(np.uint32) & np.uint32(0x7F7F7F7F)
    _shuffle_nibbles(np.ascontiguousarray(wq).reshape(-1).view(np.uint64), words[:, 1:])
    return out


_U64 = np.uint64


_LO_NIBBLES = _U64(0x0F0F0F0F0F0F0F0F)


def _shuffle_nibbles(groups: np.ndarray, dst: np.ndarray, step: int = 1 << 15) -> None:
    """ModelOpt's adjacent-pair nibbles -> ggml's split halves, one 16-value group per uint64.

    In a group (8 bytes, little-endian) ModelOpt byte t holds values 2t / 2t+1 (low / high
    nibble); ggml byte j holds values j / j+8. With A = bytes 0..3 and B = bytes 4..7, ggml byte
    2t = lo(A[t]) | lo(B[t]) << 4 and byte 2t+1 = hi(A[t]) | hi(B[t]) << 4. On a uint64 ``v``:
    ``E = lo32(L) | hi32(L) << 4`` with ``L = v & 0x0F..`` puts ggml's even bytes in E's bytes
    0..3 (``O`` likewise from the high nibbles), and spreading E's bytes to the even and O's to
    the odd byte positions gives the ggml group. Works in cache-sized pieces of ``step`` groups
    with preallocated temporaries (about 4x faster than byte-wise strided numpy); ``dst`` is
    ``[n_groups / 4, 8]`` uint32 (the code words of each block).
    """
    L, H, T = (np.empty(step, _U64) for _ in range(3))
    for i in range(0, groups.size, step):
        v = groups[i:i + step]
        k = v.size
        lo, hi, t = L[:k], H[:k], T[:k]
        np.bitwise_and(v, _LO_NIBBLES, out=lo)
        np.right_shift(v, _U64(4), out=hi)
        np.bitwise_and(hi, _LO_NIBBLES, out=hi)
        for a in (lo, hi):  # a = lo32(a) | hi32(a) << 4 (bits 28..31 of a are zero)
            np.right_shift(a, _U64(28), out=t)
            np.bitwise_and(a, _U64(0xFFFFFFFF), out=a)
            np.bitwise_or(a, t, out=a)
            np.left_shift(a, _U64(16), out=t)  # spread bytes 0..3 to bytes 0, 2, 4, 6
            np.bitwise_or(a, t, out=a)
            np.bitwise_and(a, _U64(0x0000FFFF0000FFFF), out=a)
            np.left_shift(a, _U64(8), out=t)
            np.bitwise_or(a, t, out=a)
            np.bitwise_and(a, _U64(0x00FF00FF00FF00FF), out=a)
        np.left_shift(hi, _U64(8), out=hi)
        np.bitwise_or(lo, hi, out=lo)
        dst[i // 4:(i + k) // 4] = lo.view(np.uint32).reshape(-1, 8)
