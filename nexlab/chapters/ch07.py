"""Chapter 07 helpers (notebooks/07_better_nvfp4_scales.ipynb): one block's scale candidates explained.

:func:`explain_scale_candidates` lists every E4M3 block-scale code the ``search`` rule considers for one
16-value block under a tensor scale ``g`` (ModelOpt's map-to-6 code, its :data:`SEARCH_OFFSETS`
neighbours and the map-to-4 code), each with the values ModelOpt's encoding decodes to and the exact
(importance-weighted) squared error, and the code each method of :data:`METHODS` (``max``,
``4over6``, ``search``) picks. The scale rules themselves are :mod:`nexlab.formats.scales`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nexlab.formats.minifloat import E4M3_VALUES, NVFP4_GROUP, as_f32
from nexlab.formats.nvfp4 import dequantize_nvfp4_modelopt, encode_nvfp4_modelopt
from nexlab.formats.scales import (
    E4M3_MAX_CODE,
    E4M3_MIN_CODE,
    METHODS,
    SEARCH_OFFSETS,
    block_errors,
    choose_block_scales,
    map_to_code,
)


# ----------------------------------------------------------------------------- teaching (notebook 07)
def explain_scale_candidates(values: Any, g: Any, importance: Any | None = None) -> dict[str, Any]:
    """Every candidate of one 16-value block under tensor scale ``g``: ``{"b6", "b4", "rows": [{"code",
    "offset", "scale", "decoded", "error"}...], "best": {method: code}}`` with ``offset`` relative to
    ModelOpt's map-to-6 code ``b6``, ``decoded`` the 16 values ModelOpt's encoding gives under that
    block scale and ``error`` the exact (weighted) squared error (:func:`block_errors`). ``best`` holds
    the code each method picks (``max``, ``4over6``, ``search``) at this ``g``."""
    x = as_f32(values, name="block", finite=True).reshape(1, NVFP4_GROUP)
    g = np.float32(g)
    c = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(1, NVFP4_GROUP)
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    best = {m: int(choose_block_scales(x, g, m, None if c is None else c[0])[0].reshape(-1)[0]) for m in METHODS}
    b6 = best["max"]
    b4 = int(map_to_code(torch.tensor(np.abs(x).max()), torch.tensor(g), 4.0))
    codes = sorted({int(np.clip(b6 + o, E4M3_MIN_CODE, E4M3_MAX_CODE)) for o in SEARCH_OFFSETS} | {b4})
    rows = []
    for code in codes:
        q = encode_nvfp4_modelopt(x, np.array([[code]], np.uint8), g)
        dec = dequantize_nvfp4_modelopt(q, np.array([[code]], np.uint8), g)[0]
        rows.append({"code": code, "offset": code - b6, "scale": float(E4M3_VALUES[code] * g),
                     "decoded": dec, "error": float(block_errors(x, np.array([code]), g, c)[0])})
    return {"values": x[0], "g": float(g), "b6": b6, "b4": b4, "rows": rows, "best": best}
