"""MXFP4 in ggml's layout and INT4-g16: the 4-bit formats NVFP4 is compared with.

* **MXFP4** (GGUF type 39, ``block_mxfp4``): 32 values in 17 bytes, one E8M0 exponent byte then 16
  bytes where byte j holds value j (low nibble) and value j+16 (high nibble), E2M1 codes against
  ggml's doubled table. :func:`quantize_mxfp4_ggml` / :func:`dequantize_mxfp4_ggml` match libggml's
  ``quantize_row_mxfp4_ref`` / ``dequantize_row_mxfp4`` (ggml/src/ggml-quants.c) byte for byte.
* **INT4-g16**: a comparison format of our own choice (no reference implementation): symmetric
  levels -7..7, one float16 scale ``amax / 7`` per 16 values (5 bits per weight), rounding half to
  even (:func:`quantize_int4_g16` / :func:`dequantize_int4_g16`).

The block helpers are shared with :mod:`nexlab.formats.nvfp4`; input is validated the same way
(ValueError naming the tensor, ``name=``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.formats.minifloat import (
    GGML_MXFP4_BYTES,
    INT4_GROUP,
    MXFP4_BLOCK,
    as_f32,
    e8m0_byte_to_f32,
    f32_to_e8m0_byte,
    tensor_label,
    to_numpy,
)
from nexlab.formats.nvfp4 import KV_F32, as_ggml_blocks, block_absmax, check_rows, ggml_fp4_codes, row_chunks


def quantize_mxfp4_ggml(x: Any, *, name: str | None = None) -> np.ndarray:
    """Quantize ``[..., n]`` (n % 32 == 0) to ggml MXFP4 bytes ``[..., n/32*17]``,
    bit-exact with ``quantize_row_mxfp4_ref``: ``e = floor(log2f(amax)) - 2 + 127``
    (0 for an all-zero block), scale ``2**(e-128)`` against the doubled E2M1 table, codes
    nearest with ties toward zero; byte j of the 16 holds values j and j+16."""
    a = as_f32(x, name=name, finite=True)
    check_rows(a, MXFP4_BLOCK, name)
    n = a.shape[-1]
    rows = a.reshape(-1, n)
    nb = n // MXFP4_BLOCK
    out = np.empty((rows.shape[0], nb, GGML_MXFP4_BYTES), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        for sl in row_chunks(rows.shape[0], n):
            xb = rows[sl].reshape(-1, nb, MXFP4_BLOCK)
            amax = block_absmax(xb)
            e = np.where(amax > 0, (f32_to_e8m0_byte(amax).astype(np.int64) - 2) & 0xFF, 0).astype(np.uint8)
            codes = ggml_fp4_codes(xb, e8m0_byte_to_f32(e, half=True)[..., None], amax[..., None])
            out[sl, :, 0] = e
            out[sl, :, 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(a.shape[:-1] + (nb * GGML_MXFP4_BYTES,))


def dequantize_mxfp4_ggml(data: Any, *, name: str | None = None) -> np.ndarray:
    """Decode ggml MXFP4 bytes to float32, bit-exact with ``dequantize_row_mxfp4``."""
    b = as_ggml_blocks(data, GGML_MXFP4_BYTES, name)
    nb = b.shape[-1] // GGML_MXFP4_BYTES
    blk = b.reshape(-1, nb, GGML_MXFP4_BYTES)
    qs = blk[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    vals = KV_F32[codes] * e8m0_byte_to_f32(blk[..., 0], half=True)[..., None]
    return vals.reshape(b.shape[:-1] + (nb * MXFP4_BLOCK,))


def quantize_int4_g16(x: Any, *, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 with one float16 scale per 16 values (our comparison format).

    ``scale = fp16(amax / 7)`` (RNE; an all-zero group gets scale 0), ``q = clip(rint(x /
    scale), -7, 7)`` with half-to-even rounding; returns ``(q int8 [..., n], scale float16
    [..., n/16])``. 5 bits per weight.
    """
    a = as_f32(x, name=name, finite=True)
    check_rows(a, INT4_GROUP, name)
    xb = a.reshape(a.shape[:-1] + (-1, INT4_GROUP))
    scale = (np.abs(xb).max(axis=-1) / np.float32(7.0)).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(xb / np.where(s32 > 0, s32, 1)), 0)
    return np.clip(q, -7, 7).astype(np.int8).reshape(a.shape), scale


def dequantize_int4_g16(q: Any, scale: Any, *, name: str | None = None) -> np.ndarray:
    """Inverse of :func:`quantize_int4_g16`: ``q * scale`` in float32."""
    qa = to_numpy(q)
    sa = to_numpy(scale)
    if qa.dtype != np.int8 or sa.dtype != np.float16:
        raise NexlabError(f"{tensor_label(name, 'int4')}: expected int8 codes and float16 scales, "
                          f"got {qa.dtype}, {sa.dtype}")
    check_rows(qa, INT4_GROUP, name)
    if sa.shape != qa.shape[:-1] + (qa.shape[-1] // INT4_GROUP,):
        raise NexlabError(f"{tensor_label(name, 'scale')}: shape {tuple(sa.shape)} "
                          f"does not match codes {tuple(qa.shape)}")
    vals = qa.reshape(qa.shape[:-1] + (-1, INT4_GROUP)).astype(np.float32) * sa.astype(np.float32)[..., None]
    return vals.reshape(qa.shape)
