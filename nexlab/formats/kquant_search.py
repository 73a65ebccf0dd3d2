"""ggml's K-quant scale searches, vectorised across blocks and bit-exact with the C code.

The building blocks of :mod:`nexlab.formats.kquants`, each reproducing one function of
``ggml/src/ggml-quants.c`` (llama.cpp as vendored by llama-cpp-python 0.3.36) in float32 with the C
expression order:

- :func:`make_qx_quants`: symmetric scale search (Q6_K; ``rmse_type = 1``, optional weights);
- :func:`make_qkx`: ``make_qkx2_quants`` / ``make_qkx3_quants``, scale and min search (Q4_K, Q5_K);
- :func:`make_qp_quants`: the 6-bit quantization of sub-block scales and mins with an imatrix;
- :func:`nearest_int` (ggml's rounding trick), :func:`seqsum` (sums in C loop order),
  :func:`first_absmax` and the fp16 conversions they need.

Arrays are element-major (``[n, n_blocks]``): each candidate of a search is one vector step over
every block, and the searches keep C's stateful updates.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


_MAGIC = F32(12582912.0)  # 1.5 * 2^23, nearest_int's rounding constant


GROUP_MAX_EPS = F32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: ``bits(v + 12582912.f) & 0x7fffff) - 0x400000`` as int32.

    Equals round-half-to-even for |v| <= 4194303 (the C code only asserts this in debug builds); beyond
    that it reproduces the same wrapped value the release C build returns.
    """
    f = np.asarray(v, dtype=F32) + _MAGIC
    i = f.view(np.int32)
    i &= 0x007FFFFF
    i -= 0x00400000
    return i


def seqsum(a: np.ndarray) -> np.ndarray:
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


def f32_to_f16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as uint16 bits."""
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def f16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return np.asarray(b, dtype=np.uint16).view(np.float16).astype(F32)


def round_clip(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """In place: ``v = clamp(nearest_int(v), lo, hi)`` as float32, for |v| <= 4194303.

    In that range ``nearest_int`` is round-half-even, i.e. ``np.rint``; callers guarantee the range
    (or use :func:`nearest_int`).
    """
    np.rint(v, out=v)
    np.clip(v, F32(lo), F32(hi), out=v)
    return v


NEAREST_INT_SAFE = F32(4194303.0)


def qkx_levels(X: np.ndarray, mn: np.ndarray, isc: np.ndarray, nmax: int, xmin: np.ndarray,
                xmax: np.ndarray, skip: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = clamp(nearest_int(isc*(X - mn)), 0, nmax)`` as float32 (the L of make_qkx*_quants).

    Uses ``np.rint`` when a per-block bound shows every argument is within nearest_int's exact range
    (the usual case), the bit-level emulation otherwise. Blocks flagged in ``skip`` (degenerate ones,
    whose result the caller discards) are left out of the bound.
    """
    np.subtract(X, mn, out=out)
    out *= isc
    bound = np.abs(isc) * np.maximum(np.abs(xmax - mn), np.abs(xmin - mn))
    if bool(((bound <= NEAREST_INT_SAFE) | skip).all()):
        return round_clip(out, 0, nmax)
    l = nearest_int(out)
    np.clip(l, 0, nmax, out=l)
    out[...] = l
    return out


def make_qkx(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
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

    Kept in one function so that it reads line by line beside ggml-quants.c's make_qkx2/3_quants.
    """
    n, M = X.shape
    nmax_f = F32(nmax)
    with np.errstate(all="ignore"):
        xmin = X.min(axis=0)
        xmax = X.max(axis=0)
        sum_w = seqsum(W)
        sum_x = seqsum(W * X)
        mn = np.where(xmin > 0, F32(0), xmin).astype(F32)
        degenerate = xmax <= mn

        iscale = nmax_f / (xmax - mn)
        scale = F32(1) / iscale
        lf = np.empty_like(X)
        t = np.empty_like(X)
        wl = np.empty_like(X)
        qkx_levels(X, mn, iscale, nmax, xmin, xmax, degenerate, lf)
        np.multiply(lf, scale, out=t)
        t += mn
        t -= X
        t *= t
        t *= W
        best = seqsum(t)
        best_iscale = iscale.copy()
        best_ref = mn.copy()  # the min that the best L was computed from

        for step in range(nstep + 1):
            num = F32(rmin) + F32(rdelta) * F32(step) + nmax_f
            isc = num / (xmax - mn)
            qkx_levels(X, mn, isc, nmax, xmin, xmax, degenerate, lf)
            np.multiply(W, lf, out=wl)
            sum_l = seqsum(wl)
            np.multiply(wl, lf, out=t)
            sum_l2 = seqsum(t)
            np.multiply(wl, X, out=t)
            sum_xl = seqsum(t)
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
            mad = seqsum(t)
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
            l = nearest_int(best_iscale[cols] * (Xc - best_ref[cols]))
        np.clip(l, 0, nmax, out=l)
        L = l.astype(np.uint8)
        L[:, degenerate[cols]] = 0
        return L

    return scale, (-mn).astype(F32), levels


def make_qp_quants(X: np.ndarray, QW: np.ndarray, nmax: int):
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
        Lu = (nearest_int(iscale * X) & 0xFF).astype(F32)
        scale = F32(1) / iscale
        diff = X - scale * Lu
        best = seqsum((QW * diff) * diff)
        for is_ in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (F32(0.1) * F32(is_) + F32(nmax)) / mx
            sc = F32(1) / isc
            l = np.minimum(nearest_int(isc * X), nmax).astype(F32)
            diff = X - sc * l
            mse = seqsum((QW * diff) * diff)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, isc, iscale)
        l = np.minimum(nearest_int(iscale * X), nmax)
        lf = l.astype(F32)
        L = (l & 0xFF).astype(np.int32)
        sumlx = seqsum((QW * X) * lf)
        suml2 = seqsum((QW * lf) * lf)
        for _ in range(5):
            for i in range(n):
                w = QW[i]
                xi = X[i]
                Li = L[i].astype(F32)
                slx = sumlx - (w * xi) * Li
                sl2 = suml2 - (w * Li) * Li
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nearest_int((xi * sl2) / slx), nmax)
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


def first_absmax(ax: np.ndarray, X: np.ndarray):
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


def make_qx_quants(X: np.ndarray, W: np.ndarray, nmax: int):
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
        amax, mxv = first_absmax(ax, X)
        zero = amax < GROUP_MAX_EPS
        iscale = F32(-nmax) / mxv
        lf = np.multiply(X, iscale)
        round_clip(lf, -nmax, nmax - 1)
        wx = W * X
        t = wx * lf
        sumlx = seqsum(t)
        np.multiply(W, lf, out=t)
        t *= lf
        suml2 = seqsum(t)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        best_isc = iscale
        for is_ in range(-9, 10):
            if is_ == 0:
                continue
            isc = -(F32(nmax) + F32(0.1) * F32(is_)) / mxv
            np.multiply(X, isc, out=lf)
            round_clip(lf, -nmax, nmax - 1)
            np.multiply(wx, lf, out=t)
            sumlx = seqsum(t)
            np.multiply(W, lf, out=t)
            t *= lf
            suml2 = seqsum(t)
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
        round_clip(v, -nmax, nmax - 1)
        L = (v + F32(nmax)).astype(np.uint8)
        L[:, zero[c]] = 0
        return L

    return scale, levels
