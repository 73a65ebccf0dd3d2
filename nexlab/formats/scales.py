"""Better NVFP4 scales: choosing the E4M3 block scales and the FP32 tensor scale (notebook 07).

NVFP4 stores ``value = e2m1(code) * e4m3(block_scale) * tensor_scale``. The codes follow from the
scales (round to nearest on the E2M1 grid), so all the freedom a quantizer has is in the scales, and
every choice below writes the same bytes per block: a file made with any of them has exactly the
size of ModelOpt's and is standard ggml NVFP4 (type 40) that stock llama.cpp runs.

Methods (:data:`METHODS`):

``max``
    ModelOpt's max scaling (nvidia-modelopt 0.47.0, ``NVFP4QTensor``): tensor scale
    ``g = amax / (6 * 448)``, block scale ``e4m3(block_amax / (6 g))``: the block's largest value
    lands on the grid's 6. Byte-identical to ModelOpt's export (:func:`nexlab.formats.nvfp4.quantize_nvfp4_modelopt`,
    proven against ModelOpt itself in tests/test_scales.py). Its waste: the E4M3 rounding of the block
    scale moves the block's max off 6 (up to 6 % either way) and the largest values of most blocks sit
    in the coarse top of the grid (4 -> 6 is a step of 2 block units).
``4over6``
    "Four Over Six" (arXiv 2512.02010): each block is quantized twice, with its max mapped to 6 and
    to 4 (``e4m3(block_amax / (4 g))``: a finer grid for the block's bulk, the max exactly on 4),
    and keeps the one with the lower squared error. The tensor scale is ``amax / (6 * 256)`` so the
    larger block scale (up to 256 * 6 / 4 = 384) still fits E4M3's 448.
``search``
    nexlab's: per block, the E4M3 scale code that minimises the (importance-weighted) squared error
    among ModelOpt's code, its neighbours :data:`SEARCH_OFFSETS` and the map-to-4 code (so it is
    never worse than ``max`` or 4/6's block choice at the same tensor scale, in its own objective);
    the tensor scale is searched too, over ``amax / (6 M)`` for M in :data:`TENSOR_SCALE_DIVISORS`,
    judged on a sample of rows. The same search with 9 + 1 candidates is ScaleSweep's MSE-optimal
    per-block scale (arXiv 2606.07618) restricted to the codes that can win; with an imatrix it is
    the weighted objective of llama.cpp's imatrix-weighted NVFP4 proposal (pull request 25153).

Importance weights. Quantization error in a weight ``W[r, j]`` reaches the layer's output as
``dW[r, j] * x_j``, so over calibration activations the expected squared output error is
``sum_j dW[r, j]^2 E[x_j^2]``: the imatrix's per-column mean square (llama-imatrix's ``in_sum2 /
count``, per expert for the ``*_exps`` tensors) is the right per-element weight, and ``search`` uses
it as is. An expert that was never routed during calibration has count 0 and no information: its
weights fall back to 1 (the unweighted squared error, as without an imatrix), which is what
llama-quantize's column weights already do (:func:`nexlab.ggufio.imatrix_file.column_weights`); without that
fallback the PR 25153 discussion saw such experts' error explode. Columns that are exactly zero in an
otherwise informed expert keep a floor of :data:`WEIGHT_FLOOR` times the mean so ties still prefer
small error.

Speed. The candidate errors of a chunk of blocks are one fused elementwise kernel: ``torch.compile``
(inductor's C++ backend) when it works, else the same torch code eagerly (several times slower; a
warning says so). The E2M1 rounding inside it is the arithmetic form of ModelOpt's round-half-to-even
(``rint(a / step) * step`` with step 0.5 / 1 / 2 below 2 / 4 / above, clipped at 6); the chosen
scales are then encoded by :func:`nexlab.formats.nvfp4.encode_nvfp4_modelopt`, ModelOpt's own step, so the
bytes never depend on the kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.formats.minifloat import E4M3_VALUES, NVFP4_GROUP, as_f32, tensor_label
from nexlab.formats.nvfp4 import (
    dequantize_nvfp4_modelopt,
    encode_nvfp4_modelopt,
    nvfp4_tensor_scale,
    quantize_nvfp4_modelopt,
)

log = logging.getLogger(__name__)


#: the scale-choice rules of ``nexlab convert --nvfp4-scales``
METHODS = ("max", "4over6", "search")


#: E4M3 code offsets around ModelOpt's block-scale code that ``search`` tries (8 codes = one octave;
#: on Gaussian and trained weights the winners fall in -2..6, the map-to-4 code sits near +4.7)
SEARCH_OFFSETS = tuple(range(-2, 7))


#: ``search``'s tensor-scale candidates ``amax / (6 M)``: ModelOpt's M = 448 down to 4/6's 256
TENSOR_SCALE_DIVISORS = (448, 416, 384, 352, 320, 288, 256)


#: Four Over Six's tensor-scale divisor (block scales up to 256 * 6 / 4 = 384 < 448)
FOUR_OVER_SIX_DIVISOR = 256


#: rows of a tensor (group) the tensor-scale search looks at: every k-th row so about this many
TENSOR_SEARCH_ROWS = 64


#: floor of an informed expert's column weights, relative to their mean
WEIGHT_FLOOR = 1e-4


#: blocks per chunk of the candidate kernel (bounds its temporaries to ~40 MB)
CHUNK_BLOCKS = 1 << 16


E4M3_MAX_CODE = 0x7E  # 448; 0x7F is NaN


E4M3_MIN_CODE = 0x01  # 2**-9, the smallest positive (subnormal) value


@dataclass
class NVFP4Scaled:
    """One tensor in ModelOpt's layout: ``weight`` uint8 ``[..., in/2]`` (even column in the low
    nibble), ``weight_scale`` uint8 E4M3 bytes ``[..., in/16]``, ``weight_scale_2`` float32."""

    weight: np.ndarray
    weight_scale: np.ndarray
    weight_scale_2: np.float32

    def dequantize(self) -> np.ndarray:
        """float32 values (a stack ``[experts, rows, in]`` when ``weight_scale_2`` has one per expert)."""
        g = np.asarray(self.weight_scale_2, dtype=np.float32)
        if g.ndim == 0:
            return dequantize_nvfp4_modelopt(self.weight, self.weight_scale, g)
        return np.stack([dequantize_nvfp4_modelopt(w, s, x) for w, s, x in zip(self.weight, self.weight_scale, g)])


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise NexlabError(f"unknown NVFP4 scale method {method!r}; choose one of {', '.join(METHODS)}")
    return method


# ----------------------------------------------------------------------------- importance
def element_weights(importance: Any | None, n_in: int, *, name: str | None = None) -> np.ndarray | None:
    """Per-column weights ``[n_in]`` for the search from imatrix column weights, or None (unweighted).

    All-zero, or all-equal (llama-quantize's fallback of 1 for an expert the calibration never routed)
    -> None: the unweighted objective. Otherwise negative or non-finite values are refused, and zeros
    get a floor of :data:`WEIGHT_FLOOR` times the mean.
    """
    if importance is None:
        return None
    c = np.asarray(importance, dtype=np.float32).reshape(-1)
    if c.size != n_in:
        raise NexlabError(f"{tensor_label(name, 'importance')}: {c.size} column weights for {n_in} columns")
    if not np.isfinite(c).all() or (c < 0).any():
        raise NexlabError(f"{tensor_label(name, 'importance')}: column weights must be finite and >= 0")
    mean = float(c.mean(dtype=np.float64))
    if mean == 0 or np.all(c == c[0]):
        return None
    return np.maximum(c, np.float32(WEIGHT_FLOOR * mean)).astype(np.float32)


# ----------------------------------------------------------------------------- the candidate kernel
def map_to_code(bmax, g, top: float):
    """E4M3 code (int32 torch) of the block scale that maps a block max ``bmax`` onto the E2M1 value
    ``top`` (6: ModelOpt's max scaling, 4: Four Over Six's other choice) under tensor scale ``g``, as
    ModelOpt computes it: the product ``top * g`` first, zero blocks -> 1.0, clamp to [2**-9, 448],
    torch's RNE cast to float8_e4m3fn (the cast ModelOpt uses)."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    s = torch.where(bmax == 0, 1.0, bmax / (g * top)).clamp(2.0**-9, 448.0)
    return s.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)


def _best_codes_eager(x, c, g, e4, offs):
    """For blocks ``x [R, B, 16]`` (float32 torch) under tensor scale ``g`` (0-d): the E4M3 code each
    block keeps and its (weighted) squared error, both ``[R, B]``.

    Candidates: ModelOpt's map-to-6 code ``b6`` plus ``offs`` (``offs[0] == 0``), and the map-to-4 code
    ``b4``, each clamped to the positive E4M3 codes (:func:`map_to_code`). ``c [B, 16]``: per-element
    weights. The E2M1
    rounding is round-half-to-even written as ``rint(y / step) * step``, step 0.5 / 1 / 2 below 2 / 4
    / above, clipped at 6. argmin keeps the first of equal errors: ``b6``.
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    a = x.abs()
    bmax = a.amax(-1)
    b6, b4 = map_to_code(bmax, g, 6.0), map_to_code(bmax, g, 4.0)
    codes = torch.cat([b6[..., None] + offs, b4[..., None]], -1).clamp(E4M3_MIN_CODE, E4M3_MAX_CODE)
    s = e4[codes] * g
    y = a[..., None, :] / s[..., None]
    step = torch.where(y < 2, 0.5, torch.where(y < 4, 1.0, 2.0))
    r = torch.clamp_max(torch.round(y / step) * step, 6.0) * s[..., None]
    err = ((a[..., None, :] - r) ** 2 * c[:, None, :]).sum(-1)
    k = torch.argmin(err, -1, keepdim=True)
    return torch.gather(codes, -1, k)[..., 0].to(torch.uint8), torch.gather(err, -1, k)[..., 0]


_kernel: dict[str, Any] = {}


def _best_codes(x, c, g, method: str):
    """:func:`_best_codes_eager` with the method's offsets, compiled by torch.compile once per process
    when that works (else eagerly, with a warning)."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    if "e4" not in _kernel:
        _kernel["e4"] = torch.from_numpy(np.nan_to_num(E4M3_VALUES.astype(np.float32)))
        _kernel["offs"] = {"4over6": torch.zeros(1, dtype=torch.int32),
                           "search": torch.tensor([0] + [o for o in SEARCH_OFFSETS if o], dtype=torch.int32)}
    args = (x, c, g, _kernel["e4"], _kernel["offs"][method])
    fn = _kernel.get("fn")
    if fn is None:
        try:
            compiled = torch.compile(_best_codes_eager, dynamic=True)
            out = compiled(*args)
            _kernel["fn"] = compiled
            return out
        except Exception as exc:  # noqa: BLE001  (no C++ compiler, unsupported platform, ...)
            log.warning("torch.compile is not available here (%s); the NVFP4 scale search runs eagerly, "
                        "several times slower", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _kernel["fn"] = fn = _best_codes_eager
    return fn(*args)


def _as_stack(x: Any, name: str | None) -> np.ndarray:
    xf = as_f32(x, name=name, finite=True)
    if xf.ndim not in (2, 3) or xf.shape[-1] % NVFP4_GROUP or xf.size == 0:
        raise NexlabError(f"{tensor_label(name, 'weight')}: expected [rows, in] or [experts, rows, in] with in a "
                         f"multiple of 16, got {list(xf.shape)}")
    return xf if xf.ndim == 3 else xf[None]


def _tensor_scales(g: Any, n: int, name: str | None) -> np.ndarray:
    g = np.asarray(g, dtype=np.float32).reshape(-1)
    if g.size == 1:
        g = np.repeat(g, n)
    if g.size != n or not (np.isfinite(g) & (g > 0)).all():
        raise NexlabError(f"{tensor_label(name, 'weight')}: tensor scales must be {n} positive finite values")
    return g


def choose_block_scales(x: Any, g: Any, method: str = "search", importance: Any | None = None, *,
                        name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 block-scale bytes for ``x`` (``[rows, in]``, or a stack ``[experts, rows, in]`` with one
    tensor scale per expert in ``g``) and the (weighted) squared error per expert (float64 ``[experts]``).

    ``max``: ModelOpt's map-to-6 code; ``4over6``: map-to-6 or map-to-4, whichever has the lower
    unweighted squared error (ties: 6); ``search``: the best of the candidates (module docstring)
    under the column weights ``importance`` (``[in]``, or ``[experts, in]``; None: unweighted). One
    kernel call per expert and chunk of at most :data:`CHUNK_BLOCKS` blocks.
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    method = _check_method(method)
    xs = _as_stack(x, name)
    n_e, rows, n_in = xs.shape
    ge = _tensor_scales(g, n_e, name)
    nb = n_in // NVFP4_GROUP
    cw = None
    if importance is not None and method == "search":
        cw = np.asarray(importance, dtype=np.float32)
        cw = cw.reshape(1, -1) if cw.ndim == 1 and n_e == 1 else cw
        if cw.shape != (n_e, n_in):
            raise NexlabError(f"{tensor_label(name, 'importance')}: column weights of shape {list(cw.shape)}, "
                             f"expected [{n_e}, {n_in}]")
    codes = np.empty((n_e, rows, nb), dtype=np.uint8)
    err = np.zeros(n_e, dtype=np.float64)
    step = max(1, CHUNK_BLOCKS // nb)
    for e in range(n_e):
        g_t = torch.tensor(ge[e], dtype=torch.float32)
        # unweighted = weights of 1: the kernel compiled with weights is several times faster than without
        c_t = (torch.ones(nb, NVFP4_GROUP) if cw is None
               else torch.from_numpy(np.ascontiguousarray(cw[e].reshape(nb, NVFP4_GROUP))))
        for r in range(0, rows, step):
            xb = torch.from_numpy(np.ascontiguousarray(xs[e, r: r + step].reshape(-1, nb, NVFP4_GROUP)))
            if method == "max":
                codes[e, r: r + step] = map_to_code(xb.abs().amax(-1), g_t, 6.0).numpy()
                continue
            k, be = _best_codes(xb, c_t, g_t, method)
            codes[e, r: r + step] = k.numpy()
            err[e] += float(be.sum(dtype=torch.float64))
    if method == "max":
        err = np.array([block_errors(xs[e], codes[e], ge[e]).sum() for e in range(n_e)])
    return codes.reshape(np.shape(x)[:-1] + (nb,)), err


def block_errors(xb: np.ndarray, codes: np.ndarray, g: Any, cb: np.ndarray | None = None) -> np.ndarray:
    """Weighted squared error per block of ``xb [N, 16]`` under E4M3 codes ``[N]`` and one tensor scale
    ``g`` (float64, with the exact ModelOpt encoding :func:`nexlab.formats.nvfp4.encode_nvfp4_modelopt`)."""
    xb = np.asarray(xb, dtype=np.float32).reshape(-1, NVFP4_GROUP)
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1, 1)
    q = encode_nvfp4_modelopt(xb, codes, g)
    d = (dequantize_nvfp4_modelopt(q, codes, g).astype(np.float64) - xb) ** 2
    return (d if cb is None else d * np.asarray(cb, np.float64).reshape(d.shape)).sum(-1)


def weighted_error(x: Any, q: NVFP4Scaled, importance: Any | None = None) -> float:
    """``sum_j c_j (x - dequant(q))^2`` over a tensor ``[rows, in]`` (c: column weights ``[in]``; None: 1),
    in float64."""
    d = (q.dequantize().astype(np.float64) - np.asarray(x, dtype=np.float32)) ** 2
    return float((d if importance is None else d * np.asarray(importance, dtype=np.float64)).sum())


# ----------------------------------------------------------------------------- tensor scale
def tensor_scale(weights: Sequence[Any], method: str = "max", importances: Sequence[Any | None] | None = None,
                 *, name: str | None = None) -> np.ndarray:
    """The float32 tensor scale a method gives a group of tensors that share it (ModelOpt shares one
    between the gate and up projections of an expert, which inference fuses): one per expert when the
    tensors are stacks ``[experts, rows, in]`` (a scalar array for ``[rows, in]``).

    ``max``: ``amax / 2688`` exactly as ModelOpt computes it; ``4over6``: ``amax / (6 * 256)``;
    ``search``: per expert, the ``amax / (6 M)``, M in :data:`TENSOR_SCALE_DIVISORS`, whose block
    search gives the lowest total weighted error on every k-th row of each tensor (about
    :data:`TENSOR_SEARCH_ROWS` rows per expert and tensor). An all-zero expert is refused.
    """
    method = _check_method(method)
    xs = [_as_stack(w, name) for w in weights]
    scalar = np.ndim(weights[0]) == 2
    amax = np.max([np.maximum(x.max(axis=(1, 2)), -x.min(axis=(1, 2))) for x in xs], axis=0).astype(np.float32)
    if (amax == 0).any():
        raise NexlabError(f"{tensor_label(name, 'weight')}: all-zero tensor (expert {int(np.argmin(amax))}); "
                         "no tensor scale maps it onto NVFP4")
    if method == "max":
        g = nvfp4_tensor_scale(amax)
    elif method == "4over6":
        g = (amax / np.float32(6.0 * FOUR_OVER_SIX_DIVISOR)).astype(np.float32)
    else:
        imps = list(importances) if importances is not None else [None] * len(xs)
        samples = [(x[:, :: max(1, x.shape[1] // TENSOR_SEARCH_ROWS)], c) for x, c in zip(xs, imps)]
        best = np.full(amax.shape, np.inf)
        g = np.zeros_like(amax)
        for m in TENSOR_SCALE_DIVISORS:
            gm = (amax / np.float32(6.0 * m)).astype(np.float32)
            err = sum(choose_block_scales(r, gm, "search", c)[1] for r, c in samples)
            better = err < best
            best[better], g[better] = err[better], gm[better]
    return g[0] if scalar else g


# ----------------------------------------------------------------------------- one tensor / a group
def quantize_nvfp4(w: Any, method: str = "max", *, weight_scale_2: Any | None = None,
                   importance: Any | None = None, name: str | None = None) -> NVFP4Scaled:
    """Quantize ``w`` (``[rows, in]``, or a stack ``[experts, rows, in]`` with one tensor scale per
    expert) to NVFP4 in ModelOpt's layout with the scale rule ``method``.

    ``max`` is ModelOpt's export byte for byte (:func:`nexlab.formats.nvfp4.quantize_nvfp4_modelopt`).
    ``weight_scale_2``: tensor scale(s) to use instead of the method's own (a group's shared one from
    :func:`tensor_scale`). ``importance``: imatrix column weights ``[in]`` (``[experts, in]`` for a
    stack) for ``search``, cleaned by :func:`element_weights` per expert; ``max`` and ``4over6`` are
    defined without them and ignore them.
    """
    return quantize_nvfp4_group([w], method, [importance],
                                names=[name], weight_scale_2=weight_scale_2)[0]


def quantize_nvfp4_group(weights: Sequence[Any], method: str = "max", importances: Sequence[Any | None] | None = None,
                         *, names: Sequence[str | None] | None = None, weight_scale_2: Any | None = None
                         ) -> list[NVFP4Scaled]:
    """Quantize tensors that share one tensor scale (an expert's gate and up projections; stacks
    ``[experts, rows, in]`` share it per expert) with ``method``.

    The shared scale is :func:`tensor_scale` of the group unless ``weight_scale_2`` is given (for
    ``max``: amax over the group / 2688, as ModelOpt's export); codes are ModelOpt's encoding under
    the chosen block scales (:func:`nexlab.formats.nvfp4.encode_nvfp4_modelopt`).
    """
    method = _check_method(method)
    names = list(names) if names is not None else [None] * len(weights)
    imps = list(importances) if importances is not None else [None] * len(weights)
    xs = [_as_stack(w, n) for w, n in zip(weights, names)]
    squeeze = [np.ndim(w) == 2 for w in weights]
    cs = []
    for x, c, n in zip(xs, imps, names):
        if c is None or method != "search":
            cs.append(None)
            continue
        c = np.asarray(c, dtype=np.float32).reshape(x.shape[0], x.shape[-1])
        rows = [element_weights(c[e], x.shape[-1], name=n) for e in range(x.shape[0])]
        cs.append(None if all(r is None for r in rows) else
                  np.stack([np.ones(x.shape[-1], np.float32) if r is None else r for r in rows]))
    if weight_scale_2 is None:
        g = np.atleast_1d(tensor_scale(xs, method, cs, name=names[0]))
    else:
        g = _tensor_scales(weight_scale_2, xs[0].shape[0], names[0])
    out = []
    for x, c, n, sq in zip(xs, cs, names, squeeze):
        if method == "max":
            parts = [quantize_nvfp4_modelopt(x[e], g[e], name=n) for e in range(x.shape[0])]
            q, sb = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
        else:
            sb, _ = choose_block_scales(x, g, method, c, name=n)
            q = np.stack([encode_nvfp4_modelopt(x[e], sb[e], g[e], name=n) for e in range(x.shape[0])])
        out.append(NVFP4Scaled(q[0], sb[0], np.float32(g[0])) if sq else NVFP4Scaled(q, sb, g.astype(np.float32)))
    return out
