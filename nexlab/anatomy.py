"""What the bytes are: a GGUF file region by region, a Q4_K super-block field by field, and what the
imatrix buys per tensor.

GGUF (v3, ``gguf-py/gguf/gguf_reader.py`` and ``ggml/src/gguf.cpp`` of the llama.cpp tree that
llama-cpp-python 0.3.36 vendors), all little-endian::

    offset 0   "GGUF"  magic, 4 bytes
           4   uint32  version (3)
           8   uint64  number of tensors
          16   uint64  number of key/value pairs
          24   key/values: string key (uint64 length + UTF-8 bytes), uint32 value type, value
               (arrays: uint32 element type, uint64 count, the elements)
           ..  tensor infos: string name, uint32 n_dims, uint64 ne[n_dims] (ne0 = row length first),
               uint32 ggml type, uint64 offset of the data, relative to the data section
           ..  zero padding up to a multiple of general.alignment (32 unless the file sets it)
               data section: each tensor's bytes, each padded to the alignment

:func:`gguf_regions` walks a file with :mod:`struct` only (no gguf-py), so the layout above is the
whole explanation; the tests check every offset it finds against gguf-py's ``GGUFReader``.
:func:`hexdump` prints bytes with the region each line starts, :func:`tensor_location` says where a
tensor's data lies.

Q4_K (``block_q4_K`` in ``ggml-common.h``): 256 weights in 144 bytes = 4.5 bits per weight::

    bytes   0..1    fp16 d      super-block scale of the sub-block scales
    bytes   2..3    fp16 dmin   super-block scale of the sub-block mins
    bytes   4..15   twelve bytes holding eight 6-bit scales and eight 6-bit mins (get_scale_min_k4)
    bytes  16..143  128 bytes of 4-bit codes: 32-byte group g holds sub-block 2g in the low nibbles
                    and sub-block 2g+1 in the high nibbles
    value = d * scale_j * q - dmin * min_j          (j = sub-block of 32 weights, q in 0..15)

:func:`decode_q4_k_block` reads those fields one by one (checked against libggml's and gguf-py's
dequantizers). :func:`imatrix_gain` quantizes every K-quant tensor of a variant through libggml's
``ggml_quantize_chunk`` (what llama-quantize calls) with and without the imatrix and reports the
importance-weighted error each way.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT

# gguf value types (GGUFValueType): struct format of the fixed-size ones
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
VALUE_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
                    7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


@dataclass
class Region:
    """Bytes ``[start, end)`` of a GGUF file: ``kind`` is header, kv, tensor_info, padding or data."""

    start: int
    end: int
    kind: str
    label: str
    detail: Any = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class _Cursor:
    def __init__(self, buf: memoryview, where: str):
        self.buf, self.pos, self.where = buf, 0, where

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.where}: file ends at byte {len(self.buf)} inside a field at {self.pos}")
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALAR:  # fixed size: skip over the elements, keep the first few
                size = struct.calcsize(_SCALAR[etype])
                head = [struct.unpack_from(_SCALAR[etype], self.buf, self.pos + i * size)[0] for i in range(min(count, 4))]
                self.pos += size * count
                return {"type": VALUE_TYPE_NAMES[etype], "count": count, "head": head}
            head = [self.value(etype) for _ in range(count)][:4]
            return {"type": VALUE_TYPE_NAMES.get(etype, str(etype)), "count": count, "head": head}
        raise ValueError(f"{self.where}: unknown value type {vtype} at byte {self.pos - 4}")


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def gguf_regions(path: str | os.PathLike) -> dict[str, Any]:
    """Walk a GGUF file and return its layout: ``version``, ``n_tensors``, ``n_kv``, ``alignment``,
    ``data_offset`` (absolute start of the data section), ``file_bytes`` and ``regions`` (a list of
    :class:`Region` in file order covering every byte: the 24-byte header split into its four fields,
    one region per key/value, one per tensor info, the padding before the data, then per tensor its
    data and the padding after it).

    Matches gguf-py's ``GGUFReader``: a key/value region starts at ``reader.fields[key].offset``, a
    tensor info at ``tensor.field.offset``, a tensor's data at ``tensor.data_offset`` (tested).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    buf = memoryview(raw)
    c = _Cursor(buf, str(path))
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (first bytes {bytes(buf[:4])!r}, expected b'GGUF')")
    regions = [Region(0, 4, "header", "magic 'GGUF'", "GGUF")]
    c.pos = 4
    version = c.unpack("<I")
    regions.append(Region(4, 8, "header", f"version = {version}", version))
    n_tensors = c.unpack("<Q")
    regions.append(Region(8, 16, "header", f"tensor count = {n_tensors}", n_tensors))
    n_kv = c.unpack("<Q")
    regions.append(Region(16, 24, "header", f"key/value count = {n_kv}", n_kv))
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        start = c.pos
        key = c.string()
        vtype = c.unpack("<I")
        value = c.value(vtype)
        if key == "general.alignment":
            alignment = int(value)
        regions.append(Region(start, c.pos, "kv", f"{key} ({VALUE_TYPE_NAMES.get(vtype, vtype)})",
                              {"key": key, "type": VALUE_TYPE_NAMES.get(vtype, vtype), "value": value}))
    infos = []
    for _ in range(n_tensors):
        start = c.pos
        name = c.string()
        n_dims = c.unpack("<I")
        ne = [c.unpack("<Q") for _ in range(n_dims)]
        ggml_type = c.unpack("<I")
        rel = c.unpack("<Q")
        infos.append((name, ne, ggml_type, rel))
        regions.append(Region(start, c.pos, "tensor_info", f"tensor info {name}",
                              {"name": name, "ne": ne, "ggml_type": ggml_type, "relative_offset": rel}))
    data_offset = _pad(c.pos, alignment)
    if data_offset > c.pos:
        regions.append(Region(c.pos, data_offset, "padding", f"zero padding to a multiple of {alignment}"))
    order = sorted(range(len(infos)), key=lambda i: infos[i][3])
    for k, i in enumerate(order):
        name, ne, ggml_type, rel = infos[i]
        start = data_offset + rel
        nbytes = _tensor_nbytes(ne, ggml_type)
        end_pad = data_offset + infos[order[k + 1]][3] if k + 1 < len(order) else len(raw)
        regions.append(Region(start, start + nbytes, "data", f"data of {name}",
                              {"name": name, "ne": ne, "ggml_type": ggml_type, "relative_offset": rel}))
        if end_pad > start + nbytes:
            regions.append(Region(start + nbytes, end_pad, "padding", f"zero padding after {name}"))
    return {"path": str(path), "version": version, "n_tensors": n_tensors, "n_kv": n_kv, "alignment": alignment,
            "data_offset": data_offset, "file_bytes": len(raw), "regions": regions}


def _tensor_nbytes(ne: list[int], ggml_type: int) -> int:
    """Bytes of a tensor: rows x row size, from gguf-py's table of block sizes (GGML_QUANT_SIZES)."""
    import gguf  # noqa: PLC0415

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return math.prod(ne[1:]) * (ne[0] // block) * size


def tensor_location(layout: dict[str, Any], name: str) -> dict[str, Any]:
    """Where tensor ``name`` lies in a file walked by :func:`gguf_regions`: the byte range of its
    info entry, its data (absolute ``start`` = ``data_offset`` + the info's relative offset), bytes,
    and the zero padding that follows it."""
    info = next((r for r in layout["regions"] if r.kind == "tensor_info" and r.detail["name"] == name), None)
    if info is None:
        raise KeyError(f"{layout['path']}: no tensor named {name}")
    data = next(r for r in layout["regions"] if r.kind == "data" and r.detail["name"] == name)
    i = layout["regions"].index(data)
    nxt = layout["regions"][i + 1] if i + 1 < len(layout["regions"]) else None
    pad = nxt.nbytes if nxt is not None and nxt.kind == "padding" else 0
    return {"name": name, "info_start": info.start, "info_end": info.end, "relative_offset": data.detail["relative_offset"],
            "start": data.start, "end": data.end, "nbytes": data.nbytes, "padding_after": pad,
            "ne": data.detail["ne"], "ggml_type": data.detail["ggml_type"]}


def hexdump(path: str | os.PathLike, start: int, length: int, regions: list[Region] | None = None,
            width: int = 16) -> str:
    """``xxd``-style lines (offset, hex bytes, ASCII) for ``[start, start + length)``; with
    ``regions``, each line ends with the labels of the regions that begin on it."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(length)
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        a = start + off
        hx = " ".join(f"{b:02x}" for b in chunk).ljust(3 * width - 1)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk).ljust(width)
        notes = [r.label for r in (regions or []) if a <= r.start < min(a + width, start + length)]
        lines.append(f"{a:08x}  {hx}  |{asc}|" + ("  <- " + "; ".join(notes) if notes else ""))
    return "\n".join(lines)


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
        raise ValueError(f"a Q4_K block has {Q4_K_BLOCK_BYTES} bytes, got {b.size}")
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
        raise ValueError(f"tensor {t.name}: stored as {name}; the gain is measured from F32/F16/BF16 tensors")
    n_mat = math.prod(ne[2:]) if len(ne) > 2 else 1
    return np.ascontiguousarray(a.reshape(n_mat, -1, ne[0]))


def imatrix_gain(gguf_path: str | os.PathLike, imatrix, variant: str = "q4_k_m", *, eval_imatrix=None,
                 n_layer: int | None = None, n_expert: int | None = None) -> list[dict[str, Any]]:
    """Per tensor that ``variant`` quantizes to Q4_K or Q6_K (llama-quantize's choice,
    :func:`nexlab.quantize.plan_types`) and that the imatrix covers: the importance-weighted error
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
    import gguf  # noqa: PLC0415

    from nexlab import ggml_ref  # noqa: PLC0415
    from nexlab import imatrix as IM  # noqa: PLC0415
    from nexlab import quantize as QZ  # noqa: PLC0415

    r = gguf.GGUFReader(str(gguf_path))
    arch = r.fields["general.architecture"].contents()
    n_layer = n_layer or int(r.fields[f"{arch}.block_count"].contents())
    n_expert = n_expert or int(r.fields[f"{arch}.expert_count"].contents())
    tensors = {t.name: t for t in r.tensors}
    triples = [(t.name, tuple(int(s) for s in reversed(t.shape)), t.tensor_type.name) for t in r.tensors]
    weights = IM.quantize_weights(imatrix)
    measure = weights if eval_imatrix is None else IM.quantize_weights(eval_imatrix)
    rows = []
    for p in QZ.plan_types(triples, variant, n_layer, n_expert=n_expert):
        if p.target_type not in ("Q4_K", "Q6_K") or p.name not in weights:
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
            yp = ggml_ref.ggml_dequantize(p.target_type, ggml_ref.ggml_quantize_chunk(p.target_type, xe, nrows, ne0), xe.size)
            yi = ggml_ref.ggml_dequantize(p.target_type, ggml_ref.ggml_quantize_chunk(p.target_type, xe, nrows, ne0, w[e]),
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
        rows.append({"name": p.name, "type": p.target_type, "elements": int(x.size), "err_plain": ep,
                     "err_imatrix": ei, "reduction": 1.0 - ei / ep if ep > 0 else 0.0,
                     "rel_err_plain": sq_p / sq, "rel_err_imatrix": sq_i / sq})
    return rows


# ----------------------------------------------------------------------------------------------------
# config.json -> qwen35moe.* keys
# ----------------------------------------------------------------------------------------------------
#: (config.json field of text_config, GGUF key after "qwen35moe.", HParams attribute, what llama.cpp does with it).
#: The loader: llama_model_loader::load_hparams in src/llama-model.cpp (generic keys) and
#: llama_model_qwen35moe::load_arch_hparams in src/models/qwen35moe.cpp (llama-cpp-python 0.3.36's tree).
CONFIG_TO_KEYS = (
    ("num_hidden_layers", "block_count", "n_layer", "number of blocks; 40 selects the 35B-A3B model type"),
    ("max_position_embeddings", "context_length", "n_ctx_train", "n_ctx_train: the context used when -c 0"),
    ("hidden_size", "embedding_length", "n_embd", "width of the residual stream and of every norm"),
    ("num_attention_heads", "attention.head_count", "n_head", "query heads of the full-attention layers"),
    ("num_key_value_heads", "attention.head_count_kv", "n_head_kv", "KV heads: with key_length, the KV-cache row"),
    ("head_dim", "attention.key_length", "head_dim_k", "K head size (KV cache, attention scale)"),
    ("head_dim", "attention.value_length", "head_dim_v", "V head size (KV cache)"),
    ("head_dim x partial_rotary_factor", "rope.dimension_count", "n_rot", "dims rotated by RoPE (the rest pass through)"),
    ("rope_parameters.mrope_section", "rope.dimension_sections", "rope_sections", "interleaved M-RoPE sections (text, height, width)"),
    ("rope_parameters.rope_theta", "rope.freq_base", "rope_theta", "RoPE base frequency"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", "rms_eps", "epsilon of every RMSNorm"),
    ("num_experts", "expert_count", "n_expert", "routed experts per layer (router width)"),
    ("num_experts_per_tok", "expert_used_count", "n_expert_used", "top-k experts run per token"),
    ("moe_intermediate_size", "expert_feed_forward_length", "n_ff_exp", "routed expert FFN width"),
    ("shared_expert_intermediate_size", "expert_shared_feed_forward_length", "n_ff_shexp", "shared expert FFN width"),
    ("linear_conv_kernel_dim", "ssm.conv_kernel", "ssm_d_conv", "causal conv length; conv state keeps kernel-1 columns"),
    ("linear_key_head_dim", "ssm.state_size", "ssm_d_state", "Gated DeltaNet key head dim (state rows)"),
    ("linear_num_key_heads", "ssm.group_count", "ssm_n_group", "linear-attention key heads"),
    ("linear_num_value_heads", "ssm.time_step_rank", "ssm_dt_rank", "linear-attention value heads"),
    ("linear_num_value_heads x linear_value_head_dim", "ssm.inner_size", "ssm_d_inner", "recurrent state width"),
    ("layer_types", "attention.recurrent_layers", "recurrent", "which blocks are linear attention (is_recr)"),
    ("full_attention_interval", "full_attention_interval", "full_attention_interval", "fallback when recurrent_layers is absent"),
)


def config_key_rows(hp, metadata: dict, arch: str = "qwen35moe") -> list[dict[str, Any]]:
    """One row per :data:`CONFIG_TO_KEYS` entry: the config field, the GGUF key, the value derived
    from config.json (``hp``: :class:`nexlab.qwen35moe.HParams`), the value in the file
    (``metadata``: :func:`nexlab.gguf_inspect.inspect_gguf`'s), whether they agree, and the use."""
    rows = []
    for field_, key, attr, use in CONFIG_TO_KEYS:
        want = getattr(hp, attr)
        want = [bool(v) for v in want] if attr == "recurrent" else list(want) if isinstance(want, tuple) else want
        got = metadata.get(f"{arch}.{key}")
        same = (np.float32(got) == np.float32(want)) if isinstance(want, float) and got is not None else got == want
        short = (lambda v: f"[{len(v)} values]" if isinstance(v, list) and len(v) > 4 else v)
        rows.append({"config.json": field_, "GGUF key": f"{arch}.{key}", "from config": short(want),
                     "in file": short(got), "equal": bool(same), "llama.cpp uses it for": use})
    return rows
