"""Error metrics for comparing a quantized tensor with its reference.

:func:`relative_mse` is ``sum((approx - ref)**2) / sum(ref**2)``, accumulated in float64 (0 for an
exact match), and :func:`sqnr_db` is the same error as a signal-to-quantization-noise ratio in dB
(``-10 log10``, inf when exact). Both take numpy arrays or torch tensors of the same shape and raise
ValueError naming the tensor (``name=``) for a shape mismatch, NaN/Inf or an all-zero reference.
Chapter 01 uses them to compare NVFP4, MXFP4, INT4-g16 and Q4_K.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.formats.minifloat import tensor_label, to_numpy


def relative_mse(ref: Any, approx: Any, *, name: str | None = None) -> float:
    """``sum((approx - ref)**2) / sum(ref**2)`` accumulated in float64 (0 for an exact match)."""
    r = to_numpy(ref).astype(np.float64)
    q = to_numpy(approx).astype(np.float64)
    if r.shape != q.shape:
        raise NexlabError(f"{tensor_label(name, 'approx')}: shape {q.shape} differs from reference {r.shape}")
    if not (np.isfinite(r).all() and np.isfinite(q).all()):
        raise NexlabError(f"{tensor_label(name, 'tensor')}: NaN or Inf in the reference or the approximation")
    den = float(np.sum(r * r))
    if den == 0:
        raise NexlabError(f"{tensor_label(name, 'ref')}: reference is all zeros; relative error undefined")
    return float(np.sum((q - r) ** 2)) / den


def sqnr_db(ref: Any, approx: Any, *, name: str | None = None) -> float:
    """Signal-to-quantization-noise ratio ``-10 log10(relative_mse)`` in dB (inf if exact)."""
    e = relative_mse(ref, approx, name=name)
    return float("inf") if e == 0 else float(-10.0 * np.log10(e))
