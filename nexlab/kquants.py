"""Q8_0 and the K-quants Q4_K, Q5_K, Q6_K in vectorised numpy, byte for byte as ggml makes them.

What this module matches
------------------------
``quantize(x, type_name, imatrix)`` returns the bytes that ggml's
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
  sequentially (pairwise summation only happens along a contiguous axis; :func:`_seqsum` falls back to an
  explicit loop where numpy could pick that path, and a test guards the property);
* vectorises *across blocks* only: the candidate searches of the C code (21, 16 or 37 trial scales for
  make_qkx2/3_quants, 18 for make_qx_quants, the 5 refinement passes of make_qp_quants) become a short
  Python loop over candidates, each step updating every block at once. The searches are stateful (a
  better candidate changes ``min`` for the next one), which this keeps;
* rounds like ``nearest_int``: add 1.5*2^23 in float32 and read the low mantissa bits
  (:func:`_nearest_int`). That is round-half-even for |v| < 2^22 and the same garbage as C beyond;
* rounds like ``roundf`` (half away from zero) in Q8_0, and stores ``uint8``/``int8`` temporaries with
  C's truncation;
* converts to half precision with numpy's round-to-nearest-even cast, which equals
  ``ggml_compute_fp32_to_fp16`` for finite inputs (overflow gives inf in both).

Errors: NaN/Inf in the input or the imatrix, row lengths that are not a multiple of the block size
(256 for K-quants, 32 for Q8_0) and an imatrix whose length differs from the row length raise
``ValueError`` naming the tensor.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

__all__ = [
    "QK_K",
    "QK8_0",
    "GGML_TYPE_IDS",
    "BLOCK_SIZES",
    "TYPE_SIZES",
    "QUANT_TYPES",
    "row_size",
    "quantize",
    "quantize_q8_0",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
    "dequantize",
    "dequantize_q8_0",
    "dequantize_q4_k",
    "dequantize_q5_k",
    "dequantize_q6_k",
    "benchmark_vs_ggml",
]

QK_K = 256  # elements per K-quant super-block
QK8_0 = 32  # elements per Q8_0 block
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K/Q5_K

#: ggml_type enum values (ggml/include/ggml.h)
GGML_TYPE_IDS = {"Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
#: elements per block
BLOCK_SIZES = {"Q8_0": QK8_0, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
#: bytes per block (ggml-common.h block_q8_0, block_q4_K, block_q5_K, block_q6_K)
TYPE_SIZES = {"Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
QUANT_TYPES = tuple(GGML_TYPE_IDS)

F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2^23, nearest_int's rounding constant
GROUP_MAX_EPS = F32(1e-15)

# Sub-blocks handled per vectorised step: large enough to amortise numpy call overhead, small enough
# that the [32, n] float32 work arrays stay in the CPU's L2/L3 cache.
_CHUNK_SUPERBLOCKS = 1024


# ----------------------------------------------------------------------------------------------------
# Scalar helpers of ggml-quants.c, vectorised
# ----------------------------------------------------------------------------------------------------


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: ``bits(v + 12582912.f) & 0x7fffff) - 0x400000`` as int32.

    Equals round-half-to-even for |v| <= 4194303 (the C code only asserts this in debug builds); beyond
    that it reproduces the same wrapped value the release C build returns.
    """
    f = np.asarray(v, dtype=F32) + _MAGIC
    i = f.view(np.int32)
    i &= 0x007FFFFF
    i -= 0x00400000
    return i


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 strictly in index order (``s = a[0]; s += a[1]; ...``), as a C for loop does.

    numpy reduces a C-contiguous 2-D array over axis 0 with one vector add per row, which is that order;
    along a contiguous axis it would use pairwise/unrolled summation instead, so 1-column or
    non-contiguous inputs take the explicit loop.
    """
    if a.ndim == 2 and a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    s = a[0].copy()
    for k in range(1, a.shape[0]):
        s += a[k]
    return s


def _f32_to_f16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as uint16 bits."""
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def _f16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return np.asarray(b, dtype=np.uint16).view(np.float16).astype(F32)


def _round_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """In place: ``v = clamp(nearest_int(v), lo, hi)`` as float32, for |v| <= 4194303.

    In that range ``nearest_int`` is round-half-even, i.e. ``np.rint``; callers guarantee the range
    (or use :func:`_nearest_int`).
    """
    np.rint(v, out=v)
    np.clip(v, F32(lo), F32(hi), out=v)
    return v


_NEAREST_INT_SAFE = F32(4194303.0)


def _qkx_levels(X: np.ndarray, mn: np.ndarray, isc: np.ndarray, nmax: int, xmin: np.ndarray,
                xmax: np.ndarray, skip: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = clamp(nearest_int(isc*(X - mn)), 0, nmax)`` as float32 (the L of make_qkx*_quants).

    Uses ``np.rint`` when a per-block bound shows every argument is within nearest_int's exact range
    (the usual case), the bit-level emulation otherwise. Blocks flagged in ``skip`` (degenerate ones,
    whose result the caller discards) are left out of the bound.
    """
    np.subtract(X, mn, out=out)
    out *= isc
    bound = np.abs(isc) * np.maximum(np.abs(xmax - mn), np.abs(xmin - mn))
    if bool(((bound <= _NEAREST_INT_SAFE) | skip).all()):
        return _round_clip(out, 0, nmax)
    l = _nearest_int(out)
    np.clip(l, 0, nmax, out=l)
    out[...] = l
    return out


def _make_qkx(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants / make_qkx3_quants (with weights) for many blocks at once.

    X, W: float32 [n, M] (element-major: column m is one block of n values and their weights).
    Returns ``(scale [M], the_min [M], levels)`` where ``scale`` and ``the_min`` are what the C
    function returns and writes to ``*the_min``, and ``levels(cols)`` gives the C function's ``L``
    (uint8 [n, len(cols)]) for the requested blocks. The two C functions differ only in the
    degenerate-block test (``max == min`` vs ``max <= min``), which select the same blocks because
    ``min`` is clamped to <= 0.

    The C search is sequential: candidate ``is`` uses the ``min`` of the best candidate so far, and that
    is kept here (``mn`` is updated per block). Instead of carrying L through the search, the winning
    ``(iscale, min)`` pair is remembered and L rebuilt from it on request (same arithmetic); callers only
    need L where the final 6-bit scale is zero.
    """
    n, M = X.shape
    nmax_f = F32(nmax)
    with np.errstate(all="ignore"):
        xmin = X.min(axis=0)
        xmax = X.max(axis=0)
        sum_w = _seqsum(W)
        sum_x = _seqsum(W * X)
        mn = np.where(xmin > 0, F32(0), xmin).astype(F32)
        degenerate = xmax <= mn

        iscale = nmax_f / (xmax - mn)
        scale = F32(1) / iscale
        lf = np.empty_like(X)
        t = np.empty_like(X)
        wl = np.empty_like(X)
        _qkx_levels(X, mn, iscale, nmax, xmin, xmax, degenerate, lf)
        np.multiply(lf, scale, out=t)
        t += mn
        t -= X
        t *= t
        t *= W
        best = _seqsum(t)
        best_iscale = iscale.copy()
        best_ref = mn.copy()  # the min that the best L was computed from

        for step in range(nstep + 1):
            num = F32(rmin) + F32(rdelta) * F32(step) + nmax_f
            isc = num / (xmax - mn)
            _qkx_levels(X, mn, isc, nmax, xmin, xmax, degenerate, lf)
            np.multiply(W, lf, out=wl)
            sum_l = _seqsum(wl)
            np.multiply(wl, lf, out=t)
            sum_l2 = _seqsum(t)
            np.multiply(wl, X, out=t)
            sum_xl = _seqsum(t)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                this_min = np.where(pos, F32(0), this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            np.multiply(lf, this_scale, out=t)
            t += this_min
            t -= X
            t *= t
            t *= W
            mad = _seqsum(t)
            upd = (D > 0) & (mad < best)
            if upd.any():
                best = np.where(upd, mad, best)
                scale = np.where(upd, this_scale, scale)
                best_iscale = np.where(upd, isc, best_iscale)
                best_ref = np.where(upd, mn, best_ref)
                mn = np.where(upd, this_min, mn)
    scale = np.where(degenerate, F32(0), scale).astype(F32)

    def levels(cols: np.ndarray) -> np.ndarray:
        Xc = X[:, cols]
        with np.errstate(all="ignore"):
            l = _nearest_int(best_iscale[cols] * (Xc - best_ref[cols]))
        np.clip(l, 0, nmax, out=l)
        L = l.astype(np.uint8)
        L[:, degenerate[cols]] = 0
        return L

    return scale, (-mn).astype(F32), levels


def _make_qp_quants(X: np.ndarray, QW: np.ndarray, nmax: int):
    """make_qp_quants(n, nmax, x, L, quant_weights) for many groups at once.

    X, QW: float32 [n, S] (here n = 8 sub-block scales or mins of one super-block, S super-blocks).
    Returns ``(scale [S], L uint8 [n, S])``. Emulates the uint8 store of ``L`` (C truncation) and the
    five refinement passes; a pass that changes nothing leaves the state unchanged, so running all five
    for every group gives what C's early ``break`` gives.
    """
    n, S = X.shape
    with np.errstate(all="ignore"):
        mx = np.maximum.reduce(np.maximum(X, F32(0)), axis=0)
        zero = mx < GROUP_MAX_EPS
        iscale = F32(nmax) / mx
        Lu = (_nearest_int(iscale * X) & 0xFF).astype(F32)
        scale = F32(1) / iscale
        diff = X - scale * Lu
        best = _seqsum((QW * diff) * diff)
        for is_ in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (F32(0.1) * F32(is_) + F32(nmax)) / mx
            sc = F32(1) / isc
            l = np.minimum(_nearest_int(isc * X), nmax).astype(F32)
            diff = X - sc * l
            mse = _seqsum((QW * diff) * diff)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, isc, iscale)
        l = np.minimum(_nearest_int(iscale * X), nmax)
        lf = l.astype(F32)
        L = (l & 0xFF).astype(np.int32)
        sumlx = _seqsum((QW * X) * lf)
        suml2 = _seqsum((QW * lf) * lf)
        for _ in range(5):
            for i in range(n):
                w = QW[i]
                xi = X[i]
                Li = L[i].astype(F32)
                slx = sumlx - (w * xi) * Li
                sl2 = suml2 - (w * Li) * Li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(_nearest_int((xi * sl2) / slx), nmax)
                ok &= new_l != L[i]
                nlf = new_l.astype(F32)
                slx = slx + (w * xi) * nlf
                sl2 = sl2 + (w * nlf) * nlf
                ok &= ((slx * slx) * suml2) > ((sumlx * sumlx) * sl2)
                L[i] = np.where(ok, new_l & 0xFF, L[i])
                sumlx = np.where(ok, slx, sumlx)
                suml2 = np.where(ok, sl2, suml2)
        out = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    out = np.where(zero, F32(0), out).astype(F32)
    L = np.where(zero[None, :], 0, L).astype(np.uint8)
    return out, L


def _first_absmax(ax: np.ndarray, X: np.ndarray):
    """Per column: (largest |x|, the first x reaching it), as C's ``if (ax > amax)`` scan from 0.

    ``ax = |X|``, both [n, M]; rows are visited last to first so the first maximal row wins.
    (Faster than ``argmax(axis=0)``, which numpy does not vectorise across columns.)
    """
    amax = np.maximum.reduce(ax, axis=0) if ax.shape[1] >= 2 else ax.max(axis=0)
    val = np.zeros_like(amax)
    for i in range(ax.shape[0] - 1, -1, -1):
        hit = ax[i] == amax
        np.copyto(val, X[i], where=hit)
    return amax, val


def _make_qx_quants(X: np.ndarray, W: np.ndarray, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for many blocks at once.

    X, W: float32 [n, M]; W is ``qw`` broadcast to the blocks, or ``x*x`` when ``qw`` is NULL (the C
    code's ``rmse_type == 1`` weight). Returns ``(scale [M], levels)``; ``levels(cols)`` gives the C
    function's ``L`` (uint8, l + nmax) for those blocks. ``max`` is the first element of largest
    magnitude (C's strict ``>`` scan), so sign ties resolve the same way. Every trial ``iscale*x`` lies
    within [-(nmax+0.9), nmax+0.9], so ``nearest_int`` is exactly ``np.rint`` here.
    """
    n, M = X.shape
    with np.errstate(all="ignore"):
        ax = np.abs(X)
        amax, mxv = _first_absmax(ax, X)
        zero = amax < GROUP_MAX_EPS
        iscale = F32(-nmax) / mxv
        lf = np.multiply(X, iscale)
        _round_clip(lf, -nmax, nmax - 1)
        wx = W * X
        t = wx * lf
        sumlx = _seqsum(t)
        np.multiply(W, lf, out=t)
        t *= lf
        suml2 = _seqsum(t)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        best_isc = iscale
        for is_ in range(-9, 10):
            if is_ == 0:
                continue
            isc = -(F32(nmax) + F32(0.1) * F32(is_)) / mxv
            np.multiply(X, isc, out=lf)
            _round_clip(lf, -nmax, nmax - 1)
            np.multiply(wx, lf, out=t)
            sumlx = _seqsum(t)
            np.multiply(W, lf, out=t)
            t *= lf
            suml2 = _seqsum(t)
            upd = (suml2 > 0) & ((sumlx * sumlx) > (best * suml2))
            if upd.any():
                s_new = sumlx / suml2
                scale = np.where(upd, s_new, scale)
                best = np.where(upd, s_new * sumlx, best)
                best_isc = np.where(upd, isc, best_isc)
    scale = np.where(zero, F32(0), scale).astype(F32)

    def levels(c: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            v = X[:, c] * best_isc[c]
        _round_clip(v, -nmax, nmax - 1)
        L = (v + F32(nmax)).astype(np.uint8)
        L[:, zero[c]] = 0
        return L

    return scale, levels


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _as_rows(x, type_name: str, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.ndim == 0:
        raise ValueError(f"{name}: expected at least one dimension, got a scalar")
    if a.ndim == 1:
        a = a[None, :]
    elif a.ndim > 2:
        a = a.reshape(-1, a.shape[-1])
    qk = BLOCK_SIZES[type_name]
    n = a.shape[-1]
    if n == 0 or n % qk != 0:
        raise ValueError(
            f"{name}: row length {n} is not a multiple of {qk}, the {type_name} block size"
            + (" (K-quants need ne[0] % 256 == 0; llama.cpp falls back to another type)" if qk == QK_K else "")
        )
    a = np.ascontiguousarray(a, dtype=F32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{name}: {bad} non-finite value(s) (NaN/Inf) cannot be quantized to {type_name}")
    return a


def _as_imatrix(imatrix, n_per_row: int, name: str) -> np.ndarray | None:
    if imatrix is None:
        return None
    q = np.asarray(imatrix)
    if q.dtype.kind not in "fiu":
        raise TypeError(f"{name}: imatrix must be numeric, got dtype {q.dtype}")
    q = np.ascontiguousarray(q, dtype=F32).reshape(-1)
    if q.shape[0] != n_per_row:
        raise ValueError(f"{name}: imatrix has {q.shape[0]} values but rows have {n_per_row} columns")
    if not np.isfinite(q).all():
        raise ValueError(f"{name}: imatrix has non-finite values (NaN/Inf)")
    if (q < 0).any():
        raise ValueError(f"{name}: imatrix has negative values (importance weights are sums of squares)")
    return q


def row_size(type_name: str, n_per_row: int) -> int:
    """Bytes of one quantized row (ggml_row_size)."""
    type_name = _canon(type_name)
    return n_per_row // BLOCK_SIZES[type_name] * TYPE_SIZES[type_name]


def _canon(type_name) -> str:
    """Type name from a string ("q4_k"), a gguf.GGMLQuantizationType member or a ggml type id."""
    if hasattr(type_name, "name") and not isinstance(type_name, str):
        t = str(type_name.name).upper()
    elif isinstance(type_name, (int, np.integer)):
        ids = {v: k for k, v in GGML_TYPE_IDS.items()}
        t = ids.get(int(type_name), str(type_name))
    else:
        t = str(type_name).upper()
    if t not in GGML_TYPE_IDS:
        raise ValueError(f"unknown quantization type {type_name!r}; expected one of {', '.join(QUANT_TYPES)}")
    return t


# ----------------------------------------------------------------------------------------------------
# Q8_0
# ----------------------------------------------------------------------------------------------------


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
            out16[b0 : b0 + k, 0] = _f32_to_f16_bits(d)
            out[b0 : b0 + k, 2:] = q.view(np.uint8)
    return out.reshape(R, n // QK8_0 * 34)


def dequantize_q8_0(data, n_per_row: int | None = None) -> np.ndarray:
    """Q8_0 bytes -> float32 ``[rows, n]`` (dequantize_row_q8_0: ``qs * d``)."""
    blocks, R = _blocks(data, "Q8_0", n_per_row)
    d = _f16_bits_to_f32(blocks[:, 0:2].copy().view(np.uint16)[:, 0])
    q = blocks[:, 2:].view(np.int8).astype(F32)
    return (q * d[:, None]).reshape(R, -1)


def _blocks(data, type_name: str, n_per_row: int | None):
    a = np.asarray(data)
    if a.dtype != np.uint8:
        raise TypeError(f"{type_name} data must be uint8 bytes, got {a.dtype}")
    if a.ndim == 1:
        if n_per_row is None:
            a = a[None, :]
        else:
            a = a.reshape(-1, row_size(type_name, n_per_row))
    R = a.shape[0]
    bs = TYPE_SIZES[type_name]
    if a.shape[-1] % bs:
        raise ValueError(f"{type_name} row of {a.shape[-1]} bytes is not a whole number of {bs}-byte blocks")
    return np.ascontiguousarray(a).reshape(-1, bs), R


# ----------------------------------------------------------------------------------------------------
# Q4_K / Q5_K
# ----------------------------------------------------------------------------------------------------


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
            sum_x2 = _seqsum(X * X)
            av_x = np.sqrt(sum_x2 / F32(32))
            W = av_x + np.abs(X)
            if nmax == 15:
                scales, mins, levels = _make_qkx(X, W, 15, -1.0, 0.1, 20)
            else:
                scales, mins, levels = _make_qkx(X, W, 31, -0.5, 0.1, 15)
            sc8 = np.ascontiguousarray(scales.reshape(S, 8).T)
            mn8 = np.ascontiguousarray(mins.reshape(S, 8).T)
            max_scale = np.maximum.reduce(np.maximum(sc8, F32(0)), axis=0)
            max_min = np.maximum.reduce(np.maximum(mn8, F32(0)), axis=0)
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
            ls = np.minimum(_nearest_int(inv_scale * sc8) & 0xFF, 63).astype(np.uint8)
            lm = np.minimum(_nearest_int(inv_min * mn8) & 0xFF, 63).astype(np.uint8)
            d_bits = _f32_to_f16_bits(max_scale / F32(63))
            dmin_bits = _f32_to_f16_bits(max_min / F32(63))
        else:
            # quantize_row_qN_K_impl: weights qw * sqrt(sigma2 + x^2), make_qkx3_quants, make_qp_quants
            XT = np.ascontiguousarray(xs.T)  # [256, S]
            sum_x2 = _seqsum(XT * XT)
            sigma2 = (F32(2) * sum_x2) / F32(QK_K)
            QWX = np.ascontiguousarray(qw.reshape(S * 8, 32).T)
            sig = np.repeat(sigma2, 8)[None, :]
            W = QWX * np.sqrt(sig + X * X)
            sw = _seqsum(W)
            scales, mins, levels = _make_qkx(X, W, nmax, -0.9, 0.05, 36)
            sc8 = np.ascontiguousarray(scales.reshape(S, 8).T)
            mn8 = np.ascontiguousarray(mins.reshape(S, 8).T)
            sw8 = np.ascontiguousarray(sw.reshape(S, 8).T)
            d_block, ls = _make_qp_quants(sc8, sw8, 63)
            m_block, lm = _make_qp_quants(mn8, sw8, 63)
            if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K_impl does not
                ls = np.minimum(ls, 63)
                lm = np.minimum(lm, 63)
            d_bits = _f32_to_f16_bits(d_block)
            dmin_bits = _f32_to_f16_bits(m_block)

        packed = _pack_scales_k4(ls, lm)  # [12, S]
        sc_u, m_u = _unpack_scales_k4(packed)
        d = _f16_bits_to_f32(d_bits)[None, :] * sc_u.astype(F32)  # [8, S]
        dm = _f16_bits_to_f32(dmin_bits)[None, :] * m_u.astype(F32)
        dd = d.T.reshape(-1)[None, :]  # per sub-block, [1, S*8]
        dmm = dm.T.reshape(-1)[None, :]
        l = _nearest_int((X + dmm) / dd)
        np.clip(l, 0, nmax, out=l)
        L = l.astype(np.uint8)
        keep = np.nonzero(dd[0] == 0)[0]  # C skips these sub-blocks: L stays as the search left it
        if keep.size:
            L[:, keep] = levels(keep)
    Lb = np.ascontiguousarray(L.T).reshape(S, QK_K)
    return d_bits, dmin_bits, np.ascontiguousarray(packed.T), Lb


def _quantize_k(x, imatrix, type_name: str, name: str, nmax: int) -> np.ndarray:
    a = _as_rows(x, type_name, name)
    R, n = a.shape
    qw = _as_imatrix(imatrix, n, name)
    nb = n // QK_K
    xs_all = a.reshape(R * nb, QK_K)
    qw_row = None if qw is None else qw.reshape(nb, QK_K)
    bs = TYPE_SIZES[type_name]
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


# ----------------------------------------------------------------------------------------------------
# Q6_K
# ----------------------------------------------------------------------------------------------------


def _quantize_q6_chunk(xs: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    S = xs.shape[0]
    X = np.ascontiguousarray(xs.reshape(S * 16, 16).T)  # [16, S*16]
    with np.errstate(all="ignore"):
        W = X * X if qw is None else np.ascontiguousarray(qw.reshape(S * 16, 16).T)
        scales, levels = _make_qx_quants(X, W, 32)
        sc16 = scales.reshape(S, 16)
        scT = np.ascontiguousarray(sc16.T)
        max_abs, max_scale = _first_absmax(np.abs(scT), scT)
        zero_blk = max_abs < GROUP_MAX_EPS
        iscale = F32(-128) / max_scale
        d_bits = _f32_to_f16_bits(F32(1) / iscale)
        q_sc = (np.minimum(_nearest_int(iscale[:, None] * sc16), 127) & 0xFF).astype(np.uint8).view(np.int8)
        d = _f16_bits_to_f32(d_bits)[:, None] * q_sc.astype(F32)  # [S, 16]
        dd = d.reshape(-1)
        l = _nearest_int(X / dd)
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


# ----------------------------------------------------------------------------------------------------
# Dequantizers (dequantize_row_q4_K etc.; gguf-py's dequantize agrees)
# ----------------------------------------------------------------------------------------------------


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
    d = _f16_bits_to_f32(blocks[:, 0:2].copy().view(np.uint16)[:, 0])
    dmin = _f16_bits_to_f32(blocks[:, 2:4].copy().view(np.uint16)[:, 0])
    sc, m = _unpack_scales_k4(np.ascontiguousarray(blocks[:, 4:16].T))
    return d, dmin, sc.T.astype(F32), m.T.astype(F32)


def dequantize_q6_k(data, n_per_row: int | None = None) -> np.ndarray:
    """Q6_K bytes -> float32 ``[rows, n]``: ``(d*sc) * (q - 32)`` as dequantize_row_q6_K."""
    blocks, R = _blocks(data, "Q6_K", n_per_row)
    ql = blocks[:, 0:128].reshape(-1, 2, 64)
    qh = blocks[:, 128:192].reshape(-1, 2, 32)
    sc = blocks[:, 192:208].view(np.int8).astype(F32)  # [nb, 16]
    d = _f16_bits_to_f32(blocks[:, 208:210].copy().view(np.uint16)[:, 0])
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


def quantize(x, type_name: str, imatrix=None, *, name: str = "tensor") -> np.ndarray:
    """Quantize rows of ``x`` (last axis = ggml ne[0]) to ``type_name`` in {Q8_0, Q4_K, Q5_K, Q6_K}.

    Returns ``uint8 [rows, row_bytes]``, equal byte for byte to ggml_quantize_chunk with the same
    imatrix (``None`` = no importance weights).
    """
    return _QUANTIZERS[_canon(type_name)](x, imatrix, name=name)


def dequantize(data, type_name: str, n_per_row: int | None = None) -> np.ndarray:
    """Inverse of :func:`quantize` up to rounding: float32 ``[rows, n_per_row]``."""
    return _DEQUANTIZERS[_canon(type_name)](data, n_per_row)


# ----------------------------------------------------------------------------------------------------
# Benchmark against ggml's C (single thread, same tensor)
# ----------------------------------------------------------------------------------------------------


def benchmark_vs_ggml(
    shape: tuple[int, int] = (1024, 2048),
    cases: tuple[tuple[str, bool], ...] = (("Q4_K", True), ("Q4_K", False), ("Q6_K", True), ("Q6_K", False), ("Q8_0", False)),
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Time nexlab and ggml's C on the same tensor, single thread, best of ``repeats``.

    The C side is ``ggml_quantize_chunk`` called through ctypes on libggml-base (nexlab.ggml_ref's
    handle) with preallocated input/output buffers, so only the quantization is timed; numpy runs
    single-threaded for these elementwise ops. Returns ``{"Q4_K+imatrix": {"nexlab_s", "ggml_s",
    "time_ratio", "bytes_equal", "melem_per_s_nexlab", "melem_per_s_ggml"}, ...}`` where ``time_ratio``
    is nexlab time / C time (the workbook's benchmark convention, stated in the README: below 1 means
    nexlab is faster; the target is <= 2).
    """
    from nexlab import ggml_ref  # noqa: PLC0415

    lib = ggml_ref.lib()
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(rng.standard_normal(shape), dtype=F32)
    imat = np.ascontiguousarray((rng.random(shape[1]) * 2) ** 2, dtype=F32)
    results: dict = {}
    for t, use_im in cases:
        im = imat if use_im else None
        ref = np.zeros((shape[0], row_size(t, shape[1])), dtype=np.uint8)
        tn, tc = [], []
        ours = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = quantize(x, t, im)
            tn.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lib.ggml_quantize_chunk(
                GGML_TYPE_IDS[t], x.ctypes.data, ref.ctypes.data, 0, shape[0], shape[1],
                None if im is None else im.ctypes.data,
            )
            tc.append(time.perf_counter() - t0)
        key = t + ("+imatrix" if use_im else "")
        results[key] = {
            "nexlab_s": min(tn),
            "ggml_s": min(tc),
            "time_ratio": min(tn) / min(tc),
            "bytes_equal": bool(np.array_equal(ours, ref)),
            "melem_per_s_nexlab": x.size / min(tn) / 1e6,
            "melem_per_s_ggml": x.size / min(tc) / 1e6,
        }
    return results
