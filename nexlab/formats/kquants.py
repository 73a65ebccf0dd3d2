"""Q8_0 and the K-quants Q4_K, Q5_K, Q6_K in vectorised numpy, byte for byte as ggml makes them.

What this module matches
------------------------
``quantize(x, ggml_type, imatrix)`` returns the bytes that ggml's
``ggml_quantize_chunk(type, x, dst, 0, nrows, n_per_row, imatrix)`` writes (llama.cpp as vendored by
llama-cpp-python 0.3.36, ``ggml/src/ggml-quants.c``):

============  =============================================  =============================================
type          without an imatrix                             with an imatrix (column importance weights)
============  =============================================  =============================================
Q8_0          ``quantize_row_q8_0_ref``                      same (Q8_0 ignores the imatrix)
Q4_K          ``quantize_row_q4_K_ref`` (make_qkx2_quants)   ``quantize_row_q4_K_impl`` (make_qkx3_quants,
                                                             make_qp_quants for the 6-bit scales)
Q5_K          ``quantize_row_q5_K_ref``                      ``quantize_row_q5_K_impl``
Q6_K          ``quantize_row_q6_K_ref`` (make_qx_quants)     ``quantize_row_q6_K_impl`` (make_qx_quants
                                                             weighted by the imatrix)
============  =============================================  =============================================

How bit-exactness is kept
-------------------------
ggml-base is compiled with ``-O3`` and no ``-march`` flag (x86-64 baseline, no FMA, no
``-ffast-math``), so every C expression is evaluated in float32, left to right, with no fused
multiply-add and no reassociation. This module therefore

* computes everything in ``np.float32`` and writes each C expression with the same association
  (``w*x*l`` is ``(w*x)*l``; ``w*diff*diff`` in make_qp_quants is ``(w*diff)*diff`` while
  make_qkx3_quants squares first);
* adds sums in the C order, element 0 first: arrays are laid out "element-major" (``[32, n_blocks]``,
  C-contiguous) and reduced over axis 0, which numpy does as one vector add per row, that is
  sequentially (pairwise summation only happens along a contiguous axis;
  :func:`nexlab.formats.kquant_search.seqsum` falls back to an explicit loop where numpy could pick
  that path, and a test guards the property);
* vectorises *across blocks* only: the candidate searches of the C code (21, 16 or 37 trial scales for
  make_qkx2/3_quants, 18 for make_qx_quants, the 5 refinement passes of make_qp_quants) become a short
  Python loop over candidates, each step updating every block at once. The searches are stateful (a
  better candidate changes ``min`` for the next one), which this keeps;
* rounds like ``nearest_int``: add 1.5*2^23 in float32 and read the low mantissa bits
  (:func:`nexlab.formats.kquant_search.nearest_int`). That is round-half-even for |v| < 2^22 and the
  same garbage as C beyond;
* rounds like ``roundf`` (half away from zero) in Q8_0, and stores ``uint8``/``int8`` temporaries with
  C's truncation;
* converts to half precision with numpy's round-to-nearest-even cast, which equals
  ``ggml_compute_fp32_to_fp16`` for finite inputs (overflow gives inf in both).

Errors: NaN/Inf in the input or the imatrix, row lengths that are not a multiple of the block size
(256 for K-quants, 32 for Q8_0) and an imatrix whose length differs from the row length raise
``ValueError`` naming the tensor.

The searches themselves (make_qx_quants, make_qkx2/3_quants, make_qp_quants) are
:mod:`nexlab.formats.kquant_search`; encoding a whole tensor for a GGUF is
:func:`nexlab.formats.registry.quantize_tensor`.
"""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.formats.kquant_search import (
    F32,
    GROUP_MAX_EPS,
    f16_bits_to_f32,
    f32_to_f16_bits,
    first_absmax,
    make_qkx,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    seqsum,
)

QK_K = 256  # elements per K-quant super-block


QK8_0 = 32  # elements per Q8_0 block


K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K/Q5_K


#: the types this module quantizes
QUANT_TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")

#: their ggml_type enum values (ggml/include/ggml.h), from gguf-py's GGMLQuantizationType
GGML_TYPE_IDS = {t: int(gguf.GGMLQuantizationType[t]) for t in QUANT_TYPES}

#: elements and bytes per block (ggml-common.h block_q8_0, block_q4_K, block_q5_K, block_q6_K), from
#: gguf-py's GGML_QUANT_SIZES: the one table of block sizes (a test checks it against libggml's traits)
BLOCK_SIZES = {t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] for t in QUANT_TYPES}
TYPE_SIZES = {t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][1] for t in QUANT_TYPES}


# Sub-blocks handled per vectorised step: large enough to amortise numpy call overhead, small enough
# that the [32, n] float32 work arrays stay in the CPU's L2/L3 cache.
_CHUNK_SUPERBLOCKS = 1024


def _as_rows(x, ggml_type: str, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise NexlabTypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.ndim == 0:
        raise NexlabError(f"{name}: expected at least one dimension, got a scalar")
    if a.ndim == 1:
        a = a[None, :]
    elif a.ndim > 2:
        a = a.reshape(-1, a.shape[-1])
    qk = BLOCK_SIZES[ggml_type]
    n = a.shape[-1]
    if n == 0 or n % qk != 0:
        raise NexlabError(
            f"{name}: row length {n} is not a multiple of {qk}, the {ggml_type} block size"
            + (" (K-quants need ne[0] % 256 == 0; llama.cpp falls back to another type)" if qk == QK_K else "")
        )
    a = np.ascontiguousarray(a, dtype=F32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise NexlabError(f"{name}: {bad} non-finite value(s) (NaN/Inf) cannot be quantized to {ggml_type}")
    return a


def _as_imatrix(imatrix, n_per_row: int, name: str) -> np.ndarray | None:
    if imatrix is None:
        return None
    q = np.asarray(imatrix)
    if q.dtype.kind not in "fiu":
        raise NexlabTypeError(f"{name}: imatrix must be numeric, got dtype {q.dtype}")
    q = np.ascontiguousarray(q, dtype=F32).reshape(-1)
    if q.shape[0] != n_per_row:
        raise NexlabError(f"{name}: imatrix has {q.shape[0]} values but rows have {n_per_row} columns")
    if not np.isfinite(q).all():
        raise NexlabError(f"{name}: imatrix has non-finite values (NaN/Inf)")
    if (q < 0).any():
        raise NexlabError(f"{name}: imatrix has negative values (importance weights are sums of squares)")
    return q


def row_size(ggml_type: str, n_per_row: int) -> int:
    """Bytes of one quantized row (ggml_row_size)."""
    ggml_type = _canon(ggml_type)
    return n_per_row // BLOCK_SIZES[ggml_type] * TYPE_SIZES[ggml_type]


def _canon(ggml_type) -> str:
    """Type name from a string ("q4_k"), a gguf.GGMLQuantizationType member or a ggml type id."""
    if hasattr(ggml_type, "name") and not isinstance(ggml_type, str):
        t = str(ggml_type.name).upper()
    elif isinstance(ggml_type, (int, np.integer)):
        ids = {v: k for k, v in GGML_TYPE_IDS.items()}
        t = ids.get(int(ggml_type), str(ggml_type))
    else:
        t = str(ggml_type).upper()
    if t not in GGML_TYPE_IDS:
        raise NexlabError(f"unknown quantization type {ggml_type!r}; expected one of {', '.join(QUANT_TYPES)}")
    return t


def _roundf_inplace(v: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """C ``roundf`` (round half away from zero), in place on float32.

    ``np.rint`` rounds half to even; the two differ only on exact ties, where ``v - rint(v)`` (exact in
    float32) is +-0.5 with the sign of ``v`` for the ties rint sent towards zero.
    """
    e = np.rint(v, out=scratch)
    np.subtract(v, e, out=e)  # e = v - rint(v), exact
    np.subtract(v, e, out=v)  # v = rint(v)
    if e.max(initial=F32(0)) < F32(0.5) and e.min(initial=F32(0)) > F32(-0.5):  # fast path: no ties
        return v
    ties = np.nonzero(np.abs(e) == F32(0.5))
    if ties[0].size:
        orig = v[ties] + e[ties]  # the tie value, exactly
        v[ties] = np.trunc(orig) + np.sign(orig)  # away from zero
    return v


_Q8_CHUNK_BLOCKS = 2048  # 64K values per step: work arrays stay in cache and in malloc's heap


def quantize_q8_0(x, imatrix=None, *, name: str = "tensor") -> np.ndarray:
    """Q8_0 bytes ``uint8 [rows, n/32*34]``; matches ggml's quantize_row_q8_0_ref.

    Block: fp16 ``d = amax/127`` then 32 int8 ``roundf(x * (1/d))`` (reciprocal multiply and
    round-half-away, as the C code; the reciprocal is of the float32 d, not of the stored half).
    ``imatrix`` is checked but unused, as in ggml.
    """
    a = _as_rows(x, "Q8_0", name)
    _as_imatrix(imatrix, a.shape[1], name)
    R, n = a.shape
    Ball = a.reshape(-1, QK8_0)
    nblk = Ball.shape[0]
    out = np.empty((nblk, 34), dtype=np.uint8)
    cb = min(_Q8_CHUNK_BLOCKS, nblk)
    A_buf = np.empty((cb, QK8_0), dtype=F32)
    E_buf = np.empty((cb, QK8_0), dtype=F32)
    m_bufs = [np.empty((cb, w), dtype=F32) for w in (16, 8, 4, 2)]
    q_buf = np.empty((cb, QK8_0), dtype=np.int8)
    out16 = out.view(np.uint16).reshape(nblk, 17)  # column 0 = the fp16 d of each block
    with np.errstate(all="ignore"):  # subnormal amax: 1/d overflows to inf; C casts the same way
        for b0 in range(0, nblk, cb):
            B = Ball[b0 : b0 + cb]
            k = B.shape[0]
            A, E, q = A_buf[:k], E_buf[:k], q_buf[:k]
            np.abs(B, out=A)
            # block max by halving (max is exact in any order; faster than a reduce over 32-wide rows)
            m = A
            for buf in m_bufs:
                h = buf.shape[1]
                np.maximum(m[:, :h], m[:, h : 2 * h], out=buf[:k])
                m = buf[:k]
            amax = np.maximum(m[:, 0], m[:, 1])
            d = amax / F32(127)
            idv = F32(1) / d
            idv[d == 0] = 0
            np.multiply(B, idv[:, None], out=A)
            _roundf_inplace(A, E)
            np.copyto(q, A, casting="unsafe")
            out16[b0 : b0 + k, 0] = f32_to_f16_bits(d)
            out[b0 : b0 + k, 2:] = q.view(np.uint8)
    return out.reshape(R, n // QK8_0 * 34)


def dequantize_q8_0(data, n_per_row: int | None = None) -> np.ndarray:
    """Q8_0 bytes -> float32 ``[rows, n]`` (dequantize_row_q8_0: ``qs * d``)."""
    blocks, R = _blocks(data, "Q8_0", n_per_row)
    d = f16_bits_to_f32(blocks[:, 0:2].copy().view(np.uint16)[:, 0])
    q = blocks[:, 2:].view(np.int8).astype(F32)
    return (q * d[:, None]).reshape(R, -1)


def _blocks(data, ggml_type: str, n_per_row: int | None):
    a = np.asarray(data)
    if a.dtype != np.uint8:
        raise NexlabTypeError(f"{ggml_type} data must be uint8 bytes, got {a.dtype}")
    if a.ndim == 1:
        if n_per_row is None:
            a = a[None, :]
        else:
            a = a.reshape(-1, row_size(ggml_type, n_per_row))
    R = a.shape[0]
    bs = TYPE_SIZES[ggml_type]
    if a.shape[-1] % bs:
        raise NexlabError(f"{ggml_type} row of {a.shape[-1]} bytes is not a whole number of {bs}-byte blocks")
    return np.ascontiguousarray(a).reshape(-1, bs), R


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and mins per super-block into 12 bytes (Q4_K/Q5_K ``scales``).

    ls, lm: uint8 [8, S]. Reproduces the C stores, including bits above 6 of ``ls`` for j < 4.
    """
    S = ls.shape[1]
    sc = np.zeros((K_SCALE_SIZE, S), dtype=np.uint8)
    sc[0:4] = ls[0:4]
    sc[4:8] = lm[0:4]
    sc[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    sc[0:4] |= (ls[4:8] >> 4) << 6
    sc[4:8] |= (lm[4:8] >> 4) << 6
    return sc


def _unpack_scales_k4(sc: np.ndarray):
    """get_scale_min_k4 for j = 0..7: sc uint8 [12, S] -> (scale [8, S], min [8, S]) uint8."""
    d = np.empty((8, sc.shape[1]), dtype=np.uint8)
    m = np.empty_like(d)
    d[0:4] = sc[0:4] & 63
    m[0:4] = sc[4:8] & 63
    d[4:8] = (sc[8:12] & 0xF) | ((sc[0:4] >> 6) << 4)
    m[4:8] = (sc[8:12] >> 4) | ((sc[4:8] >> 6) << 4)
    return d, m


def _quantize_kx_chunk(xs: np.ndarray, qw: np.ndarray | None, nmax: int):
    """Q4_K (nmax 15) / Q5_K (nmax 31) core for S super-blocks.

    xs: float32 [S, 256]; qw: float32 [S, 256] importance weights or None.
    Returns (d_bits uint16 [S], dmin_bits uint16 [S], scales uint8 [S, 12], L uint8 [S, 256]).
    """
    S = xs.shape[0]
    # element-major sub-blocks: X[l, s*8 + j] = xs[s, 32*j + l]
    X = np.ascontiguousarray(xs.reshape(S * 8, 32).T)
    with np.errstate(all="ignore"):
        if qw is None:
            # quantize_row_qN_K_ref: per sub-block weights av_x + |x|, make_qkx2_quants
            sum_x2 = seqsum(X * X)
            av_x = np.sqrt(sum_x2 / F32(32))
            W = av_x + np.abs(X)
            if nmax == 15:
                scales, mins, levels = make_qkx(X, W, 15, -1.0, 0.1, 20)
            else:
                scales, mins, levels = make_qkx(X, W, 31, -0.5, 0.1, 15)
            sc8 = np.ascontiguousarray(scales.reshape(S, 8).T)
            mn8 = np.ascontiguousarray(mins.reshape(S, 8).T)
            max_scale = np.maximum.reduce(np.maximum(sc8, F32(0)), axis=0)
            max_min = np.maximum.reduce(np.maximum(mn8, F32(0)), axis=0)
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
            ls = np.minimum(nearest_int(inv_scale * sc8) & 0xFF, 63).astype(np.uint8)
            lm = np.minimum(nearest_int(inv_min * mn8) & 0xFF, 63).astype(np.uint8)
            d_bits = f32_to_f16_bits(max_scale / F32(63))
            dmin_bits = f32_to_f16_bits(max_min / F32(63))
        else:
            # quantize_row_qN_K_impl: weights qw * sqrt(sigma2 + x^2), make_qkx3_quants, make_qp_quants
            XT = np.ascontiguousarray(xs.T)  # [256, S]
            sum_x2 = seqsum(XT * XT)
            sigma2 = (F32(2) * sum_x2) / F32(QK_K)
            QWX = np.ascontiguousarray(qw.reshape(S * 8, 32).T)
            sig = np.repeat(sigma2, 8)[None, :]
            W = QWX * np.sqrt(sig + X * X)
            sw = seqsum(W)
            scales, mins, levels = make_qkx(X, W, nmax, -0.9, 0.05, 36)
            sc8 = np.ascontiguousarray(scales.reshape(S, 8).T)
            mn8 = np.ascontiguousarray(mins.reshape(S, 8).T)
            sw8 = np.ascontiguousarray(sw.reshape(S, 8).T)
            d_block, ls = make_qp_quants(sc8, sw8, 63)
            m_block, lm = make_qp_quants(mn8, sw8, 63)
            if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
                ls = np.minimum(ls, 63)
                lm = np.minimum(lm, 63)
            d_bits = f32_to_f16_bits(d_block)
            dmin_bits = f32_to_f16_bits(m_block)

        packed = _pack_scales_k4(ls, lm)  # [12, S]
        sc_u, m_u = _unpack_scales_k4(packed)
        d = f16_bits_to_f32(d_bits)[None, :] * sc_u.astype(F32)  # [8, S]
        dm = f16_bits_to_f32(dmin_bits)[None, :] * m_u.astype(F32)
        dd = d.T.reshape(-1)[None, :]  # per sub-block, [1, S*8]
        dmm = dm.T.reshape(-1)[None, :]
        l = nearest_int((X + dmm) / dd)
        np.clip(l, 0, nmax, out=l)
        L = l.astype(np.uint8)
        keep = np.nonzero(dd[0] == 0)[0]  # C skips these sub-blocks: L stays as the search left it
        if keep.size:
            L[:, keep] = levels(keep)
    Lb = np.ascontiguousarray(L.T).reshape(S, QK_K)
    return d_bits, dmin_bits, np.ascontiguousarray(packed.T), Lb


def _quantize_k(x, imatrix, ggml_type: str, name: str, nmax: int) -> np.ndarray:
    a = _as_rows(x, ggml_type, name)
    R, n = a.shape
    qw = _as_imatrix(imatrix, n, name)
    nb = n // QK_K
    xs_all = a.reshape(R * nb, QK_K)
    qw_row = None if qw is None else qw.reshape(nb, QK_K)
    bs = TYPE_SIZES[ggml_type]
    out = np.empty((R * nb, bs), dtype=np.uint8)
    step = max(nb, (_CHUNK_SUPERBLOCKS // nb) * nb)  # whole rows per chunk (the imatrix repeats per row)
    for s0 in range(0, R * nb, step):
        xs = xs_all[s0 : s0 + step]
        qwc = None if qw_row is None else np.tile(qw_row, (xs.shape[0] // nb, 1))
        d_bits, dmin_bits, scales, L = _quantize_kx_chunk(xs, qwc, nmax)
        o = out[s0 : s0 + step]
        o[:, 0:2] = d_bits.view(np.uint8).reshape(-1, 2)
        o[:, 2:4] = dmin_bits.view(np.uint8).reshape(-1, 2)
        o[:, 4:16] = scales
        if nmax == 15:
            L4 = L.reshape(-1, 4, 2, 32)  # [S, chunk of 64, half, 32]
            o[:, 16:] = (L4[:, :, 0, :] | (L4[:, :, 1, :] << 4)).reshape(-1, 128)
        else:
            L4 = L.reshape(-1, 4, 2, 32)
            lo = L4 & 0xF
            hi = (L4 >> 4) & 1  # bit 4 of each 5-bit value
            qh = np.zeros((L4.shape[0], 32), dtype=np.uint8)
            for c in range(4):
                qh |= hi[:, c, 0, :] << (2 * c)
                qh |= hi[:, c, 1, :] << (2 * c + 1)
            o[:, 16:48] = qh
            o[:, 48:] = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(-1, 128)
    return out.reshape(R, nb * bs)


def quantize_q4_k(x, imatrix=None, *, name: str = "tensor") -> np.ndarray:
    """Q4_K bytes ``uint8 [rows, n/256*144]``.

    Matches ggml's quantize_row_q4_K_ref (no imatrix: make_qkx2_quants with weights ``av_x + |x|``,
    21 trial scales from -1.0 in steps of 0.1, 6-bit scales by ``63/max``) and quantize_row_q4_K_impl
    (imatrix: weights ``qw * sqrt(2*sum(x^2)/256 + x^2)``, make_qkx3_quants with 37 trial scales from
    -0.9 in steps of 0.05, 6-bit scales by make_qp_quants weighted by the sub-block weight sums).
    Block layout: fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles
    (byte l of each 32-byte group holds value l in the low nibble and value l+32 in the high one).
    """
    return _quantize_k(x, imatrix, "Q4_K", name, 15)


def quantize_q5_k(x, imatrix=None, *, name: str = "tensor") -> np.ndarray:
    """Q5_K bytes ``uint8 [rows, n/256*176]``; matches quantize_row_q5_K_ref / quantize_row_q5_K_impl.

    Like Q4_K with 5-bit values (ref search: 16 trial scales from -0.5 in steps of 0.1). Block: fp16 d,
    fp16 dmin, 12 scale bytes, 32 bytes ``qh`` (bit 2c / 2c+1 of byte l = bit 4 of value 64c+l /
    64c+l+32), 128 bytes of low nibbles laid out as in Q4_K.
    """
    return _quantize_k(x, imatrix, "Q5_K", name, 31)


def _quantize_q6_chunk(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    S = xs.shape[0]
    X = np.ascontiguousarray(xs.reshape(S * 16, 16).T)  # [16, S*16]
    with np.errstate(all="ignore"):
        W = X * X if qw is None else np.ascontiguousarray(qw.reshape(S * 16, 16).T)
        scales, levels = make_qx_quants(X, W, 32)
        sc16 = scales.reshape(S, 16)
        scT = np.ascontiguousarray(sc16.T)
        max_abs, max_scale = first_absmax(np.abs(scT), scT)
        zero_blk = max_abs < GROUP_MAX_EPS
        iscale = F32(-128) / max_scale
        d_bits = f32_to_f16_bits(F32(1) / iscale)
        q_sc = (np.minimum(nearest_int(iscale[:, None] * sc16), 127) & 0xFF).astype(np.uint8).view(np.int8)
        d = f16_bits_to_f32(d_bits)[:, None] * q_sc.astype(F32)  # [S, 16]
        dd = d.reshape(-1)
        l = nearest_int(X / dd)
        np.clip(l, -32, 31, out=l)
        l += 32
        L = l.astype(np.uint8)
        keep = np.nonzero(dd == 0)[0]  # C skips these sub-blocks: L stays as make_qx_quants left it
        if keep.size:
            L[:, keep] = levels(keep)
    Lb = np.ascontiguousarray(L.T).reshape(S, 2, 4, 32)  # [S, half of 128, quarter, 32]
    out = np.empty((S, 210), dtype=np.uint8)
    lo = Lb & 0xF
    hi = Lb >> 4
    ql = np.empty((S, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = lo[:, :, 0] | (lo[:, :, 2] << 4)
    ql[:, :, 32:64] = lo[:, :, 1] | (lo[:, :, 3] << 4)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out[:, 0:128] = ql.reshape(S, 128)
    out[:, 128:192] = qh.reshape(S, 64)
    out[:, 192:208] = q_sc.view(np.uint8)
    out[:, 208:210] = d_bits.view(np.uint8).reshape(-1, 2)
    if zero_blk.any():
        out[zero_blk] = 0
    return out


def quantize_q6_k(x, imatrix=None, *, name: str = "tensor") -> np.ndarray:
    """Q6_K bytes ``uint8 [rows, n/256*210]``; matches quantize_row_q6_K_ref / quantize_row_q6_K_impl.

    16 sub-blocks of 16 values, each fitted by make_qx_quants(nmax 32, rmse_type 1) with weights
    ``x*x`` or the imatrix (18 trial scales ``-(32 + 0.1*is)/max``); int8 sub-block scales from
    ``-128/max_scale`` (the scale of largest magnitude, first one on ties); fp16 ``d = 1/iscale``.
    Block: ql[128] (low nibbles), qh[64] (2-bit high parts), int8 scales[16], fp16 d (last).
    """
    a = _as_rows(x, "Q6_K", name)
    R, n = a.shape
    qw = _as_imatrix(imatrix, n, name)
    nb = n // QK_K
    xs_all = a.reshape(R * nb, QK_K)
    qw_row = None if qw is None else qw.reshape(nb, QK_K)
    out = np.empty((R * nb, 210), dtype=np.uint8)
    step = max(nb, (_CHUNK_SUPERBLOCKS // nb) * nb)
    for s0 in range(0, R * nb, step):
        xs = xs_all[s0 : s0 + step]
        qwc = None if qw_row is None else np.tile(qw_row, (xs.shape[0] // nb, 1))
        out[s0 : s0 + step] = _quantize_q6_chunk(xs, qwc)
    return out.reshape(R, nb * 210)


def dequantize_q4_k(data, n_per_row: int | None = None) -> np.ndarray:
    """Q4_K bytes -> float32 ``[rows, n]``: ``(d*sc) * q - (dmin*m)`` as dequantize_row_q4_K."""
    blocks, R = _blocks(data, "Q4_K", n_per_row)
    d, dmin, sc, m = _k4_header(blocks)
    q = blocks[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([q & 0xF, q >> 4], axis=2).reshape(-1, 8, 32).astype(F32)
    y = (d[:, None] * sc)[:, :, None] * q - (dmin[:, None] * m)[:, :, None]
    return y.reshape(R, -1)


def dequantize_q5_k(data, n_per_row: int | None = None) -> np.ndarray:
    """Q5_K bytes -> float32 ``[rows, n]`` as dequantize_row_q5_K."""
    blocks, R = _blocks(data, "Q5_K", n_per_row)
    d, dmin, sc, m = _k4_header(blocks)
    qh = blocks[:, 16:48]
    ql = blocks[:, 48:].reshape(-1, 4, 1, 32)
    lo = np.concatenate([ql & 0xF, ql >> 4], axis=2).reshape(-1, 8, 32)
    bit = np.stack([(qh >> k) & 1 for k in range(8)], axis=1)  # [nb, 8 (sub-block), 32]
    q = (lo + (bit << 4)).astype(F32)
    y = (d[:, None] * sc)[:, :, None] * q - (dmin[:, None] * m)[:, :, None]
    return y.reshape(R, -1)


def _k4_header(blocks):
    d = f16_bits_to_f32(blocks[:, 0:2].copy().view(np.uint16)[:, 0])
    dmin = f16_bits_to_f32(blocks[:, 2:4].copy().view(np.uint16)[:, 0])
    sc, m = _unpack_scales_k4(np.ascontiguousarray(blocks[:, 4:16].T))
    return d, dmin, sc.T.astype(F32), m.T.astype(F32)


def dequantize_q6_k(data, n_per_row: int | None = None) -> np.ndarray:
    """Q6_K bytes -> float32 ``[rows, n]``: ``(d*sc) * (q - 32)`` as dequantize_row_q6_K."""
    blocks, R = _blocks(data, "Q6_K", n_per_row)
    ql = blocks[:, 0:128].reshape(-1, 2, 64)
    qh = blocks[:, 128:192].reshape(-1, 2, 32)
    sc = blocks[:, 192:208].view(np.int8).astype(F32)  # [nb, 16]
    d = f16_bits_to_f32(blocks[:, 208:210].copy().view(np.uint16)[:, 0])
    q = np.empty((blocks.shape[0], 2, 4, 32), dtype=np.int16)
    q[:, :, 0] = (ql[:, :, 0:32] & 0xF) | (((qh >> 0) & 3) << 4)
    q[:, :, 1] = (ql[:, :, 32:64] & 0xF) | (((qh >> 2) & 3) << 4)
    q[:, :, 2] = (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    q[:, :, 3] = (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    q = (q - 32).astype(F32).reshape(-1, 16, 16)
    y = (d[:, None] * sc)[:, :, None] * q
    return y.reshape(R, -1)


_QUANTIZERS: dict[str, Callable] = {
    "Q8_0": quantize_q8_0,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}


_DEQUANTIZERS: dict[str, Callable] = {
    "Q8_0": dequantize_q8_0,
    "Q4_K": dequantize_q4_k,
    "Q5_K": dequantize_q5_k,
    "Q6_K": dequantize_q6_k,
}


def quantize(x, ggml_type: str, imatrix=None, *, name: str = "tensor") -> np.ndarray:
    """Quantize rows of ``x`` (last axis = ggml ne[0]) to ``ggml_type`` in {Q8_0, Q4_K, Q5_K, Q6_K}.

    Returns ``uint8 [rows, row_bytes]``, equal byte for byte to ggml_quantize_chunk with the same
    imatrix (``None`` = no importance weights).
    """
    return _QUANTIZERS[_canon(ggml_type)](x, imatrix, name=name)


def dequantize(data, ggml_type: str, n_per_row: int | None = None) -> np.ndarray:
    """Inverse of :func:`quantize` up to rounding: float32 ``[rows, n_per_row]``."""
    return _DEQUANTIZERS[_canon(ggml_type)](data, n_per_row)
