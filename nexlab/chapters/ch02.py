"""Chapter 02 helpers (notebooks/02_checkpoint_repacking.ipynb): one block repacked, losslessness proven.

- :func:`explain_block_repack`: the 64 values of one block as ModelOpt stores them (adjacent nibble
  pairs, E4M3 scale bytes) and as ggml's ``block_nvfp4`` does after
  :func:`nexlab.formats.nvfp4.repack_modelopt_to_ggml`, with the codes of both read back in value order;
- :func:`check_repack_lossless`: every NVFP4 module of a checkpoint dequantized from the ModelOpt bytes
  and from the repacked ggml bytes, counting values that differ (bitwise; it must be 0).

The codecs are :mod:`nexlab.formats.nvfp4`; the converter that repacks is :mod:`nexlab.convert.plan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nexlab.convert.plan import scale_bytes
from nexlab.formats.minifloat import GGML_NVFP4_BYTES
from nexlab.formats.nvfp4 import (
    dequantize_nvfp4_ggml,
    dequantize_nvfp4_modelopt,
    repack_modelopt_to_ggml,
    unpack_nibbles_adjacent,
    unpack_nvfp4_ggml,
)
from nexlab.model.checkpoint import Checkpoint


# ----------------------------------------------------------------------------- notebook 02 helpers
def explain_block_repack(weight, weight_scale, row: int = 0, block: int = 0) -> dict[str, Any]:
    """The 64 values of one ggml block before (ModelOpt) and after (ggml) repacking.

    Returns the ModelOpt bytes (32 code bytes, adjacent pairs, even column low nibble; 4 E4M3 scale
    bytes), the ggml block (4 UE4M3 scale bytes then 32 code bytes; in 16-group ``s`` byte ``8s+j``
    holds value ``16s+j`` low and ``16s+j+8`` high), and the E2M1 codes of both read back in value
    order (they must be equal).
    """
    w = np.asarray(weight)[row:row + 1]
    s = (weight_scale if isinstance(weight_scale, np.ndarray) else scale_bytes(weight_scale))[row:row + 1]
    mo_codes = w[0, block * 32:(block + 1) * 32]
    mo_scales = s[0, block * 4:(block + 1) * 4]
    g = repack_modelopt_to_ggml(w, s)[0, block * GGML_NVFP4_BYTES:(block + 1) * GGML_NVFP4_BYTES]
    codes_mo = unpack_nibbles_adjacent(mo_codes)
    codes_g, scales_g = unpack_nvfp4_ggml(g[None])
    return {"modelopt_code_bytes": mo_codes, "modelopt_scale_bytes": mo_scales, "ggml_block": g,
            "codes_modelopt_order": codes_mo.reshape(-1), "codes_ggml_order": np.asarray(codes_g).reshape(-1),
            "ggml_scale_bytes": np.asarray(scales_g).reshape(-1)}


def check_repack_lossless(ck: Checkpoint) -> dict[str, int]:
    """Dequantize every NVFP4 module from ModelOpt bytes and from the repacked ggml bytes; count
    values that differ (both without ``weight_scale_2``, which the GGUF keeps as ``.scale``).

    Uses ``nexlab.formats.nvfp4.dequantize_nvfp4_modelopt`` and ``dequantize_nvfp4_ggml`` (each bit-exact
    with ModelOpt and ggml respectively). Streams one module at a time.
    """
    n_mod = n_val = n_bad = 0
    for name in ck.entries:
        if not name.endswith(".weight_scale"):
            continue
        m = name[: -len("_scale")]
        w, s = ck.load(m), ck.load(name)
        a = dequantize_nvfp4_modelopt(w, s, np.float32(1.0))
        b = dequantize_nvfp4_ggml(repack_modelopt_to_ggml(w.numpy(), scale_bytes(s))).reshape(a.shape)
        n_mod += 1
        n_val += a.size
        n_bad += int((a.view(np.uint32) != b.astype(np.float32).view(np.uint32)).sum())
    return {"modules": n_mod, "values": n_val, "mismatches": n_bad}
