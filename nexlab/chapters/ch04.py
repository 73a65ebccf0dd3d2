"""Chapter 04 helpers (notebooks/04_imatrix_quantization.ipynb): a Q4_K super-block, what the imatrix buys.

Q4_K (``block_q4_K`` in ggml-common.h): 256 weights in 144 bytes, fp16 ``d`` and ``dmin``, twelve
bytes of eight 6-bit scales and mins (``get_scale_min_k4``), 128 bytes of 4-bit codes;
``value = d * scale_j * q - dmin * min_j``. :data:`Q4_K_FIELDS` / :func:`q4_k_byte_fields` map the
bytes for the byte-map figure, :func:`decode_q4_k_block` reads every field as
``dequantize_row_q4_K`` does (checked against libggml and gguf-py).

:func:`imatrix_gain` quantizes every tensor a variant makes Q4_K or Q6_K (llama-quantize's choice,
:func:`nexlab.model.mixes.plan_types`) through libggml's ``ggml_quantize_chunk`` with and without the
imatrix, expert by expert, and reports the importance-weighted error (:func:`weighted_error`) each way.
"""

from __future__ import annotations

import math
import os
from typing import Any

import gguf
import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.ggufio import imatrix_file
from nexlab.llamacpp import libggml as ggml_ref
from nexlab.model import mixes as QZ
from nexlab.model import qwen35moe as IM

# ----------------------------------------------------------------------------------------------------
# Q4_K
# ----------------------------------------------------------------------------------------------------
Q4_K_BLOCK_BYTES = 144


Q4_K_FIELDS = (  # (first byte, end byte, field, what it holds)
    (0, 2, "d", "fp16 super-block scale of the 6-bit scales"),
    (2, 4, "dmin", "fp16 super-block scale of the 6-bit mins"),
    (4, 16, "scales", "8 six-bit scales + 8 six-bit mins, packed in 12 bytes"),
    (16, 144, "qs", "256 four-bit codes: byte 32g+l = sub-block 2g (low nibble) | 2g+1 (high nibble), value l"),
)


def q4_k_byte_fields() -> np.ndarray:
    """For each of the 144 bytes of a Q4_K block, the index of its field in :data:`Q4_K_FIELDS`;
    the 128 code bytes are numbered 3 + g (g = 0..3, the 32-byte group holding sub-blocks 2g, 2g+1)."""
    ids = np.empty(Q4_K_BLOCK_BYTES, dtype=np.int64)
    for i, (a, b, _, _) in enumerate(Q4_K_FIELDS[:3]):
        ids[a:b] = i
    ids[16:] = 3 + (np.arange(128) // 32)
    return ids


def decode_q4_k_block(block: bytes | np.ndarray) -> dict[str, Any]:
    """Every field of one 144-byte Q4_K block, read as ``dequantize_row_q4_K`` and
    ``get_scale_min_k4`` in ggml-quants.c do: ``d``, ``dmin`` (float), ``scales`` and ``mins``
    (eight 6-bit ints: for j < 4 the low 6 bits of bytes 4+j / 8+j; for j >= 4 the low / high
    nibble of byte 12+(j-4) plus the top 2 bits of bytes j / j+4 as bits 4-5), ``q`` (256 codes,
    0..15, in value order) and ``values`` (float32: d*scale_j*q - dmin*min_j)."""
    b = np.frombuffer(bytes(block), dtype=np.uint8) if not isinstance(block, np.ndarray) else block.astype(np.uint8)
    if b.size != Q4_K_BLOCK_BYTES:
        raise NexlabError(f"a Q4_K block has {Q4_K_BLOCK_BYTES} bytes, got {b.size}")
    d = float(b[0:2].view(np.float16)[0])
    dmin = float(b[2:4].view(np.float16)[0])
    s = b[4:16].astype(np.int64)
    scales = [int(s[j] & 63) if j < 4 else int((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) for j in range(8)]
    mins = [int(s[j + 4] & 63) if j < 4 else int((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) for j in range(8)]
    qs = b[16:].reshape(4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=1).reshape(256).astype(np.int64)  # group g: sub-blocks 2g, 2g+1
    sc = np.repeat(np.float32(d) * np.array(scales, np.float32), 32)
    mn = np.repeat(np.float32(dmin) * np.array(mins, np.float32), 32)
    values = (sc * q.astype(np.float32) - mn).astype(np.float32)
    return {"d": d, "dmin": dmin, "scales": scales, "mins": mins, "q": q, "values": values}


def weighted_error(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    """``sum w (x - y)^2 / sum w x^2`` over all elements (``w`` broadcast along rows; None: 1).

    With ``w`` = the imatrix column weights (mean x_j^2 of input channel j) the numerator is the
    expected squared error of the matmul output if input channels are uncorrelated: the quantity
    the importance-weighted Q4_K / Q6_K searches try to make small."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones(x.shape[-1]) if w is None else np.asarray(w, np.float64)
    den = float((w * x * x).sum())
    return float((w * (x - y) ** 2).sum() / den) if den > 0 else 0.0


def tensor_f32(t) -> np.ndarray:
    """A GGUFReader tensor as float32 ``[n_mat, rows, ne0]`` (F32, F16, BF16 stored tensors)."""
    name = t.tensor_type.name
    raw = np.asarray(t.data)
    ne = [int(v) for v in t.shape]
    if name == "F32":
        a = raw.astype(np.float32)
    elif name == "F16":
        a = raw.view(np.float16).astype(np.float32)
    elif name == "BF16":
        a = (raw.reshape(-1).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raise NexlabError(f"tensor {t.name}: stored as {name}; the gain is measured from F32/F16/BF16 tensors")
    n_mat = math.prod(ne[2:]) if len(ne) > 2 else 1
    return np.ascontiguousarray(a.reshape(n_mat, -1, ne[0]))


def imatrix_gain(gguf_path: str | os.PathLike, imatrix, variant: str = "q4_k_m", *, eval_imatrix=None,
                 n_layer: int | None = None, n_expert: int | None = None) -> list[dict[str, Any]]:
    """Per tensor that ``variant`` quantizes to Q4_K or Q6_K (llama-quantize's choice,
    :func:`nexlab.model.mixes.plan_types`) and that the imatrix covers: the importance-weighted error
    (:func:`weighted_error`, weights = the imatrix column weights llama-quantize uses) of libggml's
    ``ggml_quantize_chunk`` without and with the imatrix, and ``reduction`` = 1 - with / without.

    The tensors are read from ``gguf_path`` (an F32/F16/BF16-stored file, e.g. the NVFP4-BF16
    GGUF: its NVFP4 experts are kept by every variant and so not listed); expert tensors are
    quantized expert by expert with that expert's weights, as llama-quantize does. Rows are in file
    order: ``name``, ``type``, ``elements``, ``err_plain``, ``err_imatrix``, ``reduction``,
    ``rel_err_plain`` / ``rel_err_imatrix`` (unweighted).

    ``eval_imatrix``: measure the errors with this imatrix's weights instead (for example one
    collected on held-out text), while ``imatrix`` still drives the quantizer: the gain out of sample.
    """


    r = gguf.GGUFReader(str(gguf_path))
    arch = r.fields["general.architecture"].contents()
    n_layer = n_layer or int(r.fields[f"{arch}.block_count"].contents())
    n_expert = n_expert or int(r.fields[f"{arch}.expert_count"].contents())
    tensors = {t.name: t for t in r.tensors}
    triples = [(t.name, tuple(int(s) for s in reversed(t.shape)), t.tensor_type.name) for t in r.tensors]
    weights = imatrix_file.quantize_weights(imatrix)
    measure = weights if eval_imatrix is None else imatrix_file.quantize_weights(eval_imatrix)
    rows = []
    for p in QZ.plan_types(triples, variant, n_layer, n_expert=n_expert):
        if p.ggml_type not in ("Q4_K", "Q6_K") or p.name not in weights:
            continue
        t = tensors[p.name]
        x = tensor_f32(t)
        n_mat, nrows, ne0 = x.shape
        w = IM.imatrix_for_tensor(weights, p.name, ne0, n_mat)
        wm = IM.imatrix_for_tensor(measure, p.name, ne0, n_mat)
        if w is None or wm is None:
            continue
        num_p = num_i = den = sq_p = sq_i = sq = 0.0
        for e in range(n_mat):
            xe = x[e]
            yp = ggml_ref.ggml_dequantize(p.ggml_type, ggml_ref.ggml_quantize_chunk(p.ggml_type, xe, nrows, ne0),
                                          xe.size)
            yi = ggml_ref.ggml_dequantize(p.ggml_type, ggml_ref.ggml_quantize_chunk(p.ggml_type, xe, nrows, ne0, w[e]),
                                          xe.size)
            we = wm[e].astype(np.float64)
            x64 = xe.astype(np.float64)
            dp = (x64 - yp.reshape(nrows, ne0)) ** 2
            di = (x64 - yi.reshape(nrows, ne0)) ** 2
            num_p += float((we * dp).sum())
            num_i += float((we * di).sum())
            den += float((we * x64 * x64).sum())
            sq_p += float(dp.sum())
            sq_i += float(di.sum())
            sq += float((x64 * x64).sum())
        ep, ei = num_p / den, num_i / den
        rows.append({"name": p.name, "type": p.ggml_type, "elements": int(x.size), "err_plain": ep,
                     "err_imatrix": ei, "reduction": 1.0 - ei / ep if ep > 0 else 0.0,
                     "rel_err_plain": sq_p / sq, "rel_err_imatrix": sq_i / sq})
    return rows
