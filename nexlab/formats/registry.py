"""Encoding a float tensor into the storage bytes of a ggml type: the one entry point per tensor.

- :func:`encode_tensor` is what the converters call for every float tensor (``ggml_type`` a
  ``gguf.GGMLQuantizationType``): F32 / F16 / BF16 are written here (a BF16 source going to BF16
  keeps its bits; otherwise round to nearest even, as ggml_compute_fp32_to_bf16), any other type
  goes to :func:`quantize_tensor`.
- :func:`quantize_tensor` quantizes as ``llama_model_quantize`` does (``llama_tensor_quantize_impl``
  of src/llama-quant.cpp): Q8_0 / Q4_K / Q5_K / Q6_K through :mod:`nexlab.formats.kquants`
  (bit-exact with ``ggml_quantize_chunk``), expert j of a stacked tensor with imatrix row j, in row
  pieces so memory stays at the output plus one piece.

A new quantization type is added here, after its codec in this layer.
"""

from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.formats import kquants
from nexlab.formats.minifloat import f32_to_bf16_bits

#: Elements per piece when a tensor is quantized row block by row block (16 MiB of float32).
QUANT_CHUNK_ELEMENTS = 1 << 22


def quantize_tensor(data, ggml_type: str, imatrix: np.ndarray | None = None, *, name: str = "tensor",
                    chunk_elements: int = QUANT_CHUNK_ELEMENTS) -> np.ndarray:
    """Quantize a float tensor (numpy shape ``[..., ne1, ne0]``) as llama_model_quantize does.

    ``data``: a numpy float array, a numpy ``ml_dtypes.bfloat16`` array or a torch tensor (BF16 is
    widened exactly, piece by piece). ``imatrix``: None, or float32 ``[n_mat, ne0]`` with one row per
    expert (n_mat = product of the leading dims, or 1); expert j's rows are quantized with row j, as
    llama_tensor_quantize_impl does. Q8_0/Q4_K/Q5_K/Q6_K go through :mod:`nexlab.formats.kquants`; F16 and BF16
    are rounded to nearest even. Rows are quantized in pieces of about ``chunk_elements`` values (every
    ggml type quantizes rows independently, so the bytes do not depend on the piece size): memory is
    the output plus one piece, not a float32 copy of the tensor (2 GB for Nex-N2-mini's token_embd).
    Returns the tensor's bytes (uint8, flat).
    """

    t = ggml_type.name if hasattr(ggml_type, "name") and not isinstance(ggml_type, str) else str(ggml_type)
    t = t.upper()
    if hasattr(data, "detach") and hasattr(data, "dtype"):  # torch: zero-copy numpy view (BF16 as ml_dtypes)
        import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

        data = data.detach().contiguous()
        x = data.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if data.dtype == torch.bfloat16 else data.numpy()
    else:
        x = np.asarray(data)
    if x.dtype.kind != "f" and x.dtype != ml_dtypes.bfloat16:
        raise NexlabTypeError(f"{name}: expected floating-point data, got {x.dtype}")
    x = np.ascontiguousarray(x)
    if t in ("F32", "F16", "BF16"):
        x = np.asarray(x, dtype=np.float32)
        if t == "F32":
            return x.reshape(-1).view(np.uint8).copy()
        if t == "F16":
            return x.astype(np.float16).reshape(-1).view(np.uint8).copy()
        return f32_to_bf16_bits(x).reshape(-1).view(np.uint8).copy()
    if t not in kquants.QUANT_TYPES:
        raise NexlabError(f"{name}: nexlab cannot quantize to {ggml_type}")
    ne0 = x.shape[-1]
    mats = x.reshape(-1, x.shape[-2] if x.ndim >= 2 else 1, ne0)
    if imatrix is None:
        im = None
    else:
        im = np.asarray(imatrix, dtype=np.float32).reshape(-1, ne0)
        if im.shape[0] != mats.shape[0]:
            raise NexlabError(f"{name}: imatrix has {im.shape[0]} expert rows, the tensor has {mats.shape[0]} matrices")
    n_rows = mats.shape[1]
    step = max(1, int(chunk_elements) // max(ne0, 1))
    out = None
    row_bytes = 0
    for j in range(mats.shape[0]):
        w = None if im is None else im[j]
        label = name if im is None or mats.shape[0] == 1 else f"{name}[expert {j}]"
        for r in range(0, n_rows, step):
            piece = np.asarray(mats[j, r:r + step], dtype=np.float32)
            q = kquants.quantize(piece, t, w, name=label)
            if out is None:
                row_bytes = q.shape[-1]
                out = np.empty((mats.shape[0], n_rows, row_bytes), dtype=np.uint8)
            out[j, r:r + step] = q.reshape(-1, row_bytes)
    return out.reshape(-1)


# ----------------------------------------------------------------------------- encoding
def encode_tensor(data, ggml_type, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode one float tensor (torch or numpy, numpy-order shape) into ``ggml_type`` storage bytes.

    F32 / F16 / BF16 are done here (a BF16 source going to BF16 keeps its bits); other types go to
    ``quantize_tensor(data, ggml_type, imatrix [n_expert, ne0] | None)``
    (K-quants / Q8_0 bit-exact with ggml_quantize_chunk, from the kquants chapter).
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    T = gguf.GGMLQuantizationType
    if ggml_type not in (T.F32, T.F16, T.BF16):
        # quantized types: row pieces are widened to float32 one at a time (no float32 copy of a 1 GB tensor)
        return quantize_tensor(data, ggml_type.name, imatrix, name=name)
    if isinstance(data, torch.Tensor):
        if ggml_type == T.BF16 and data.dtype == torch.bfloat16:
            return data.contiguous().view(torch.int16).numpy().view(np.uint16)
        data = data.float().numpy()
    data = np.asarray(data)
    if ggml_type == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return f32_to_bf16_bits(data)
