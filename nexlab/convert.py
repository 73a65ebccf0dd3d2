"""ModelOpt NVFP4 (or BF16) Qwen3.5-MoE checkpoint -> qwen35moe GGUF that llama.cpp runs.

Pipeline (one tensor, or one layer's experts, in memory at a time):

1. :class:`nexlab.checkpoint.Checkpoint` indexes the safetensors headers; :func:`validate_checkpoint`
   rejects a malformed checkpoint before anything is written.
2. :func:`plan_tensors` decides every output tensor from headers alone: GGUF name, ggml type
   (hook :func:`tensor_type_for`), shape, and a ``produce`` callable that loads the source tensors,
   applies the qwen35moe transforms and encodes the bytes. The GGUF header (metadata + tensor infos)
   can therefore be written before the first tensor is read.
3. :func:`write_gguf` streams the tensors into a temporary file in the target folder and renames it
   at the end; any error removes the temporary file, so no partial GGUF is ever left.

What is written matches llama.cpp's own ``convert_hf_to_gguf.py`` (the ``Qwen3_5MoeTextModel``
class of the llama.cpp tree in llama-cpp-python 0.3.36, run with ``--outtype bf16 --no-mtp``)
tensor for tensor, byte for byte; tests compare the two with ``gguf.GGUFReader``:

- NVFP4 modules (``weight`` + ``weight_scale``) are repacked losslessly into ggml NVFP4 (type 40)
  by ``nexlab.nvfp4.repack_modelopt_to_ggml``; routed experts are stacked per layer into
  ``blk.N.ffn_{gate,up,down}_exps.weight`` (data ``[n_expert, out, in]``, ggml ne ``{in, out,
  n_expert}``); ``weight_scale_2`` becomes the F32 sidecar ``<name>.scale`` and ``input_scale``
  ``<name>.input_scale`` (``[1]`` dense, ``[n_expert]`` stacked), both omitted when every value is
  within 1e-6 of 1 (llama.cpp's rule).
- Float tensors go through float32 (as the reference does) and are stored F32 when 1-D, a norm,
  a router (``ffn_gate_inp``, ``ffn_gate_inp_shexp``), ``ssm_conv1d`` or not a ``.weight``;
  everything else BF16 (round to nearest even, quiet NaN: ggml_compute_fp32_to_bf16).
- qwen35moe transforms: RMSNorm weights +1 (not ``linear_attn.norm``), ``A_log`` -> ``ssm_a =
  -exp(A_log)``, ``conv1d`` squeezed, and the linear-attention value heads reordered from grouped
  by key head to tiled order (:func:`v_head_permutation`) in the V rows of ``attn_qkv``, the rows of
  ``attn_gate`` / ``ssm_alpha`` / ``ssm_beta``, ``ssm_a``, ``ssm_dt``, the V channels of
  ``ssm_conv1d`` and the columns of ``ssm_out``; on NVFP4 tensors the same permutation moves the
  packed code bytes and the block scales (a head is a whole number of 16-value groups).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nexlab.checkpoint import NVFP4_GROUP_SIZE, Checkpoint, e4m3_bytes_nan_mask, validate_checkpoint
from nexlab.fileio import atomic_output
from nexlab.formats import f32_to_bf16_bits

ARCH = "qwen35moe"
VARIANTS = ("bf16", "q8_0", "q4_k_m")
SCALE_TRIVIAL_ATOL = 1e-6  # llama.cpp omits .scale / .input_scale when all values are this close to 1
log = logging.getLogger(__name__)


def _gguf():
    import gguf  # noqa: PLC0415

    return gguf


# ----------------------------------------------------------------------------- names
def _tn(key: str, bid: int | None = None, suffix: str = ".weight") -> str:
    """GGUF tensor name from gguf-py's table (MODEL_TENSOR member name, e.g. ``"ATTN_QKV"``)."""
    g = _gguf()
    t = getattr(g.MODEL_TENSOR, key)
    if t not in g.MODEL_TENSORS[g.MODEL_ARCH.QWEN35MOE]:
        raise ValueError(f"{key} is not a qwen35moe tensor")
    return g.TENSOR_NAMES[t].format(bid=bid) + suffix


# HF suffix (inside model.layers.N.) -> (MODEL_TENSOR key, gguf suffix)
_LAYER_MAP: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("ATTN_NORM", ".weight"),
    "post_attention_layernorm.weight": ("ATTN_POST_NORM", ".weight"),
    "self_attn.q_proj.weight": ("ATTN_Q", ".weight"),
    "self_attn.k_proj.weight": ("ATTN_K", ".weight"),
    "self_attn.v_proj.weight": ("ATTN_V", ".weight"),
    "self_attn.o_proj.weight": ("ATTN_OUT", ".weight"),
    "self_attn.q_norm.weight": ("ATTN_Q_NORM", ".weight"),
    "self_attn.k_norm.weight": ("ATTN_K_NORM", ".weight"),
    "linear_attn.in_proj_qkv.weight": ("ATTN_QKV", ".weight"),
    "linear_attn.in_proj_z.weight": ("ATTN_GATE", ".weight"),
    "linear_attn.in_proj_b.weight": ("SSM_BETA", ".weight"),
    "linear_attn.in_proj_a.weight": ("SSM_ALPHA", ".weight"),
    "linear_attn.conv1d.weight": ("SSM_CONV1D", ".weight"),
    "linear_attn.A_log": ("SSM_A", ""),
    "linear_attn.dt_bias": ("SSM_DT", ".bias"),
    "linear_attn.norm.weight": ("SSM_NORM", ".weight"),
    "linear_attn.out_proj.weight": ("SSM_OUT", ".weight"),
    "mlp.gate.weight": ("FFN_GATE_INP", ".weight"),
    "mlp.shared_expert_gate.weight": ("FFN_GATE_INP_SHEXP", ".weight"),
    "mlp.shared_expert.gate_proj.weight": ("FFN_GATE_SHEXP", ".weight"),
    "mlp.shared_expert.up_proj.weight": ("FFN_UP_SHEXP", ".weight"),
    "mlp.shared_expert.down_proj.weight": ("FFN_DOWN_SHEXP", ".weight"),
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": ("TOKEN_EMBD", ".weight"),
    "model.norm.weight": ("OUTPUT_NORM", ".weight"),
    "lm_head.weight": ("OUTPUT", ".weight"),
}
_EXPERT_KEYS = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP", "down_proj": "FFN_DOWN_EXP"}
# tensors a ModelOpt export may carry that have no GGUF counterpart (KV-cache quantizer amax)
_IGNORED_SUFFIXES = (".k_scale", ".v_scale", ".rotary_emb.inv_freq")
_SIDECARS = (".weight_scale", ".weight_scale_2", ".input_scale")


def gguf_name(hf_name: str) -> str:
    """GGUF name of a non-expert HF tensor (``model.layers.3.linear_attn.A_log`` -> ``blk.3.ssm_a``)."""
    if hf_name in _GLOBAL_MAP:
        return _tn(*_GLOBAL_MAP[hf_name])
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        m = _LAYER_MAP.get(parts[3])
        if m is not None:
            return _tn(m[0], int(parts[2]), m[1])
    raise ValueError(f"tensor {hf_name!r} has no qwen35moe GGUF name")


# ----------------------------------------------------------------------------- types
_F32_KEYS = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "SSM_CONV1D")


def tensor_type_for(name: str, shape: tuple[int, ...], variant: str = "bf16", *, source: str = "float",
                    n_layer: int | None = None, n_expert: int = 0):
    """ggml type of one output tensor (the hook quantized variants extend).

    ``source`` is ``"nvfp4"`` for a repacked ModelOpt tensor (always kept NVFP4), ``"scale"`` for a
    ``.scale`` / ``.input_scale`` sidecar (F32), ``"float"`` otherwise. Float tensors follow
    llama.cpp's converter: F32 when 1-D, a ``*_norm.weight``, a router or ``ssm_conv1d``, or not a
    ``.weight``; else BF16 for ``variant="bf16"``. Other variants ask
    ``nexlab.quantize.choose_gguf_type(name, shape, variant, n_layer, n_expert=...)`` (llama-quantize's
    type mix, which depends on the layer count).
    """
    g = _gguf()
    T = g.GGMLQuantizationType
    if source == "nvfp4":
        return T.NVFP4
    if source == "scale":
        return T.F32
    base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    f32_names = {_tn(k, int(base.split(".")[1]), "") for k in _F32_KEYS} if base.startswith("blk.") else set()
    if len(shape) <= 1 or name.endswith("_norm.weight") or base in f32_names or not name.endswith(".weight"):
        return T.F32
    if variant == "bf16":
        return T.BF16
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    try:
        from nexlab.quantize import choose_gguf_type  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(f"variant {variant!r} needs nexlab.quantize ({exc})") from None
    if n_layer is None:
        raise ValueError(f"{name}: variant {variant!r} needs n_layer")
    return choose_gguf_type(name, tuple(shape), variant, n_layer, n_expert=n_expert)


def encode_tensor(data, ggml_type, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode one float tensor (torch or numpy, numpy-order shape) into ``ggml_type`` storage bytes.

    F32 / F16 / BF16 are done here (a BF16 source going to BF16 keeps its bits); other types go to
    ``nexlab.quantize.quantize_tensor(data_f32, type_name, imatrix [n_expert, ne0] | None)``
    (K-quants / Q8_0 bit-exact with ggml_quantize_chunk, from the kquants chapter).
    """
    import torch  # noqa: PLC0415

    T = _gguf().GGMLQuantizationType
    if isinstance(data, torch.Tensor):
        if ggml_type == T.BF16 and data.dtype == torch.bfloat16:
            return data.contiguous().view(torch.int16).numpy().view(np.uint16)
        data = data.float().numpy()
    data = np.asarray(data)
    if ggml_type == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    if ggml_type == T.BF16:
        return f32_to_bf16_bits(data)
    try:
        from nexlab.quantize import quantize_tensor  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(f"{name}: writing {ggml_type.name} needs nexlab.quantize ({exc})") from None
    return quantize_tensor(np.asarray(data, dtype=np.float32), ggml_type.name, imatrix, name=name)


def type_nbytes(ggml_type, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of logical ``shape`` (numpy order) in ``ggml_type``."""
    bs, ts = _gguf().GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % bs:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {ggml_type.name} block ({bs})")
    return math.prod(shape[:-1]) * (shape[-1] // bs) * ts


# ----------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class LinearAttnDims:
    n_k: int  # key heads
    n_v: int  # value heads
    d_k: int
    d_v: int

    @property
    def per_k(self) -> int:
        return self.n_v // self.n_k


def v_head_permutation(n_k: int, per_k: int, head_dim: int) -> np.ndarray:
    """Index ``p`` with ``new = old[p]`` moving value heads from grouped to tiled order.

    HF stores the V heads grouped by key head ``[G0v0, G0v1, .., G1v0, ..]``; ggml's broadcast
    wants ``[G0v0, G1v0, .., G0v1, G1v1, ..]`` (llama.cpp PR 19468). Each head spans ``head_dim``
    consecutive channels.
    """
    return np.arange(n_k * per_k * head_dim).reshape(n_k, per_k, head_dim).transpose(1, 0, 2).reshape(-1)


def _la_dims(cfg: dict) -> LinearAttnDims:
    return LinearAttnDims(int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"]),
                          int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"]))


def _row_perm_for(suffix: str, d: LinearAttnDims, n_rows: int) -> np.ndarray | None:
    """Row permutation for a linear-attention tensor (None when it has none)."""
    if suffix == "linear_attn.in_proj_qkv.weight" or suffix == "linear_attn.conv1d.weight":
        qk = 2 * d.n_k * d.d_k
        p = np.arange(n_rows)
        p[qk:] = qk + v_head_permutation(d.n_k, d.per_k, d.d_v)
        return p
    if suffix == "linear_attn.in_proj_z.weight":
        return v_head_permutation(d.n_k, d.per_k, d.d_v)
    if suffix in ("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight",
                  "linear_attn.A_log", "linear_attn.dt_bias"):
        return v_head_permutation(d.n_k, d.per_k, 1)
    return None


def transform_float(hf_name: str, t, cfg: dict):
    """Apply llama.cpp's qwen35moe transforms to one float tensor (torch, HF layout)."""
    import torch  # noqa: PLC0415

    suffix = hf_name.split(".", 3)[3] if hf_name.startswith("model.layers.") else hf_name
    d = _la_dims(cfg)
    reorder = d.n_k != d.n_v
    if suffix == "linear_attn.conv1d.weight":
        t = t.squeeze()
    if reorder:
        p = _row_perm_for(suffix, d, t.shape[0])
        if p is not None:
            t = t.index_select(0, torch.from_numpy(p))
        elif suffix == "linear_attn.out_proj.weight":
            t = t.index_select(1, torch.from_numpy(v_head_permutation(d.n_k, d.per_k, d.d_v)))
    if suffix == "linear_attn.A_log":
        t = -torch.exp(t.float())
    elif hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
        t = t.float() + 1
    return t


def transform_nvfp4(hf_name: str, weight, scale, cfg: dict):
    """The value-head reorder on ModelOpt NVFP4 codes ``[out, in/2]`` and scales ``[out, in/16]``.

    Rows move whole (codes and scales alike). For ``out_proj`` the columns move by whole heads of
    ``d_v`` values = ``d_v/2`` code bytes = ``d_v/16`` scales, so no nibble is split; llama.cpp's
    converter gets the same bytes by unpacking, permuting and repacking nibbles.
    """
    import torch  # noqa: PLC0415

    if not hf_name.startswith("model.layers.") or ".linear_attn." not in hf_name:
        return weight, scale
    suffix = hf_name.split(".", 3)[3]
    d = _la_dims(cfg)
    p = _row_perm_for(suffix, d, weight.shape[0])
    if p is not None:
        idx = torch.from_numpy(p)
        return weight.index_select(0, idx), scale.index_select(0, idx)
    if suffix == "linear_attn.out_proj.weight":
        if d.d_v % NVFP4_GROUP_SIZE:
            raise ValueError(f"{hf_name}: value head dim {d.d_v} is not a multiple of {NVFP4_GROUP_SIZE}; "
                             "cannot reorder NVFP4 columns by head")
        hp = torch.from_numpy(v_head_permutation(d.n_k, d.per_k, 1))
        out = weight.shape[0]
        w = weight.reshape(out, d.n_v, -1).index_select(1, hp).reshape(out, -1)
        s = scale.reshape(out, d.n_v, -1).index_select(1, hp).reshape(out, -1)
        return w.contiguous(), s.contiguous()
    return weight, scale


def _scale_bytes(scale) -> np.ndarray:
    import torch  # noqa: PLC0415

    if scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight_scale dtype {scale.dtype}, expected float8_e4m3fn")
    return scale.contiguous().view(torch.uint8).numpy()


def repack_nvfp4_module(ck: Checkpoint, module: str, cfg: dict, out: np.ndarray | None = None) -> np.ndarray:
    """Load one NVFP4 module, check its block scales, reorder if needed, repack to ggml bytes
    (into ``out`` when given: one expert's slot of a stacked tensor)."""
    from nexlab.nvfp4 import repack_modelopt_to_ggml  # noqa: PLC0415

    w = ck.load(f"{module}.weight")
    s = ck.load(f"{module}.weight_scale")
    nan = e4m3_bytes_nan_mask(_scale_bytes(s))
    if nan.any():
        r, c = np.argwhere(nan)[0]
        raise ValueError(f"{module}.weight_scale: NaN block scale at row {r}, block {c}")
    w, s = transform_nvfp4(f"{module}.weight", w, s, cfg)
    return repack_modelopt_to_ggml(w.numpy(), _scale_bytes(s), name=module, out=out)


# ----------------------------------------------------------------------------- planning
@dataclass
class PlannedTensor:
    """One output tensor: GGUF name, ggml type, logical shape (numpy order), and how to make it."""

    name: str
    ggml_type: Any
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray] = field(repr=False)
    sources: tuple[str, ...] = ()
    layer: int | None = None

    @property
    def nbytes(self) -> int:
        return type_nbytes(self.ggml_type, self.shape)


def _scalar(ck: Checkpoint, name: str, default: float = 1.0) -> float:
    return float(ck.load(name).float().reshape(-1)[0]) if name in ck else default


def _sidecars(ck: Checkpoint, gname: str, modules: list[str], layer: int | None, stacked: bool) -> list[PlannedTensor]:
    """``.scale`` (weight_scale_2) and ``.input_scale`` F32 sidecars, omitted when all are ~1."""
    T = _gguf().GGMLQuantizationType
    out = []
    for src, suf in ((".weight_scale_2", ".scale"), (".input_scale", ".input_scale")):
        vals = np.array([_scalar(ck, m + src) for m in modules], dtype=np.float32)
        trivial = np.allclose(vals, 1.0, atol=SCALE_TRIVIAL_ATOL) if stacked else abs(float(vals.sum()) - 1.0) < SCALE_TRIVIAL_ATOL
        if trivial:
            continue
        out.append(PlannedTensor(gname.replace(".weight", suf), T.F32, (len(modules),),
                                 lambda v=vals: v, tuple(m + src for m in modules), layer))
    return out


def plan_tensors(ck: Checkpoint, variant: str = "bf16", imatrix: dict[str, np.ndarray] | None = None) -> list[PlannedTensor]:
    """Every output tensor of the GGUF, in file order, from headers (and per-tensor scalars) only.

    ``imatrix``: ``{gguf_name: column weights}`` (``nexlab.imatrix.quantize_weights``) used when a
    float tensor is quantized to a K-quant; ignored for F32/BF16/NVFP4 tensors.
    """
    import torch  # noqa: PLC0415

    cfg = ck.config
    plan: list[PlannedTensor] = []
    used: set[str] = set()
    T = _gguf().GGMLQuantizationType
    plain = (T.F32, T.F16, T.BF16)

    def ttf(g, shape, source="float"):
        return tensor_type_for(g, shape, variant, source=source, n_layer=ck.n_layers, n_expert=ck.n_experts)

    def imat(g, shape, ttype):
        if imatrix is None or ttype in plain:
            return None
        from nexlab.imatrix import imatrix_for_tensor  # noqa: PLC0415

        # a missing entry falls back to no importance weights, as llama.cpp does, and says so (warning)
        return imatrix_for_tensor(imatrix, g, shape[-1], shape[0] if len(shape) == 3 else 1, log=log.warning)

    def float_tensor(hf: str, layer: int | None):
        e = ck.info(hf)
        g = gguf_name(hf)
        shape = tuple(e.shape)
        if hf.endswith("conv1d.weight"):
            shape = tuple(x for x in shape if x != 1) or (1,)
        ttype = ttf(g, shape)

        def produce(hf=hf, g=g, ttype=ttype, shape=shape):
            return encode_tensor(transform_float(hf, ck.load(hf), cfg), ttype, g, imat(g, shape, ttype))

        used.add(hf)
        plan.append(PlannedTensor(g, ttype, shape, produce, (hf,), layer))

    def nvfp4_tensor(module: str, layer: int | None):
        hf = f"{module}.weight"
        e = ck.info(hf)
        g = gguf_name(hf)
        shape = (e.shape[0], 2 * e.shape[1])
        used.update([hf] + [module + s for s in _SIDECARS])
        plan.append(PlannedTensor(g, ttf(g, shape, "nvfp4"), shape,
                                  lambda m=module: repack_nvfp4_module(ck, m, cfg), (hf,), layer))
        plan.extend(_sidecars(ck, g, [module], layer, stacked=False))

    def module_tensor(hf: str, layer: int | None):
        if hf.endswith(".weight") and ck.is_nvfp4(hf[: -len(".weight")]):
            nvfp4_tensor(hf[: -len(".weight")], layer)
        elif hf in ck:
            float_tensor(hf, layer)

    def experts(i: int):
        p = f"model.layers.{i}.mlp.experts."
        n_exp = ck.n_experts
        if ck.experts_fused(i):
            gu, dn = p + "gate_up_proj", p + "down_proj"
            used.update([gu, dn])
            E, two_i, h = ck.info(gu).shape
            n_ff = two_i // 2
            for proj, rows, shape in (("gate_proj", slice(0, n_ff), (E, n_ff, h)),
                                      ("up_proj", slice(n_ff, two_i), (E, n_ff, h))):
                g = _tn(_EXPERT_KEYS[proj], i)
                tt = ttf(g, shape)
                plan.append(PlannedTensor(g, tt, shape,
                                          lambda gu=gu, rows=rows, tt=tt, g=g, shape=shape:
                                          encode_tensor(ck.load(gu)[:, rows, :], tt, g, imat(g, shape, tt)),
                                          (gu,), i))
            g = _tn("FFN_DOWN_EXP", i)
            shape = tuple(ck.info(dn).shape)
            tt = ttf(g, shape)
            plan.append(PlannedTensor(g, tt, shape, lambda dn=dn, tt=tt, g=g, shape=shape:
                                      encode_tensor(ck.load(dn), tt, g, imat(g, shape, tt)), (dn,), i))
            return
        for proj in ("gate_proj", "up_proj", "down_proj"):  # llama.cpp order: gate, up, down (any order loads)
            mods = [f"{p}{x}.{proj}" for x in range(n_exp)]
            g = _tn(_EXPERT_KEYS[proj], i)
            e0 = ck.info(mods[0] + ".weight")
            if ck.is_nvfp4(mods[0]):
                shape = (n_exp, e0.shape[0], 2 * e0.shape[1])

                def produce(mods=mods, shape=shape):
                    stacked = np.empty(shape[:2] + (shape[2] // 64 * 36,), dtype=np.uint8)
                    for k, m in enumerate(mods):
                        repack_nvfp4_module(ck, m, cfg, out=stacked[k])
                    return stacked

                plan.append(PlannedTensor(g, ttf(g, shape, "nvfp4"), shape, produce,
                                          tuple(m + ".weight" for m in mods), i))
                plan.extend(_sidecars(ck, g, mods, i, stacked=True))
                for m in mods:
                    used.update(m + s for s in (".weight",) + _SIDECARS)
            else:
                shape = (n_exp,) + tuple(e0.shape)
                tt = ttf(g, shape)

                def produce(mods=mods, tt=tt, g=g, shape=shape):
                    return encode_tensor(torch.stack([ck.load(m + ".weight") for m in mods]), tt, g, imat(g, shape, tt))

                plan.append(PlannedTensor(g, tt, shape, produce, tuple(m + ".weight" for m in mods), i))
                used.update(m + ".weight" for m in mods)

    module_tensor("model.embed_tokens.weight", None)
    for i, lt in enumerate(ck.layer_types()):
        p = f"model.layers.{i}."
        for suffix in _LAYER_MAP:
            if suffix.startswith("self_attn.") and lt != "full_attention":
                continue
            if suffix.startswith("linear_attn.") and lt != "linear_attention":
                continue
            module_tensor(p + suffix, i)
        experts(i)
    module_tensor("model.norm.weight", None)
    if "lm_head.weight" in ck:
        module_tensor("lm_head.weight", None)

    left = sorted(n for n in ck.entries if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if left:
        raise ValueError(f"{len(left)} checkpoint tensors have no place in the qwen35moe GGUF, e.g. {left[:3]}")
    return plan


# ----------------------------------------------------------------------------- metadata
def _find_tokenizer_dir(ck: Checkpoint, tokenizer_dir: str | os.PathLike | None) -> Path:
    cands = [Path(tokenizer_dir)] if tokenizer_dir else [ck.path, ck.path / "tokenizer", ck.path.parent / "tokenizer"]
    for d in cands:
        if (d / "tokenizer.json").is_file():
            return d
    raise ValueError(f"no tokenizer.json in {', '.join(str(c) for c in cands)} (pass tokenizer_dir)")


def _tok_content(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def tokenizer_metadata(tok_dir: Path, vocab_size: int, config: dict) -> dict[str, Any]:
    """gpt2-style BPE vocabulary for llama.cpp from a Hugging Face ``tokenizer.json``.

    Tokens are the byte-level BPE strings by id, padded to ``vocab_size`` with ``[PAD{i}]``
    (type UNUSED) like llama.cpp's converter; added tokens are CONTROL when special, else
    USER_DEFINED; merges as ``"a b"`` strings. ``tokenizer.ggml.pre`` is ``"qwen2"``: the Qwen2
    pre-tokenizer regex llama.cpp applies to byte-level BPE vocabularies it does not recognise by
    hash (what the reference converter falls back to for self-made tokenizers).
    """
    T = _gguf().TokenType
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tok_dir}/tokenizer.json: model type {model.get('type')!r}, expected byte-level BPE")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(vocab.values())} but config vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = np.full(vocab_size, int(T.UNUSED), dtype=np.int32)
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    for tok, i in vocab.items():
        tokens[i] = tok
    types[ids] = int(T.NORMAL)
    for i, a in added.items():
        types[i] = int(T.CONTROL) if a.get("special") else int(T.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tc_path = tok_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    special: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        content = _tok_content(tc.get(f"{typ}_token"))
        if content is not None and content in vocab:
            special[typ] = vocab[content]
        elif isinstance(config.get(f"{typ}_token_id"), int):
            special[typ] = config[f"{typ}_token_id"]
    return {"tokens": tokens, "types": types.tolist(), "merges": merges, "special": special,
            "add_bos": tc.get("add_bos_token"), "add_eos": tc.get("add_eos_token")}


def _rope_params(cfg: dict) -> dict:
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    for k in ("rope_theta", "partial_rotary_factor"):
        if k not in rp and k in cfg:
            rp[k] = cfg[k]
    return rp


def add_model_metadata(w, ck: Checkpoint) -> None:
    """qwen35moe hyper-parameters from config.json (keys llama.cpp's loader reads)."""
    cfg = ck.config
    w.add_block_count(ck.n_layers)
    if "max_position_embeddings" in cfg:
        w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    if cfg.get("intermediate_size") is not None:
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg["num_key_value_heads"]))
    rp = _rope_params(cfg)
    sections = list(rp.get("mrope_section") or [11, 11, 10])
    w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(int(cfg["num_experts"]))
    w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    head_dim = cfg.get("head_dim")
    if head_dim is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))
    w.add_ssm_conv_kernel(int(cfg["linear_conv_kernel_dim"]))
    w.add_ssm_state_size(int(cfg["linear_key_head_dim"]))
    w.add_ssm_group_count(int(cfg["linear_num_key_heads"]))
    w.add_ssm_time_step_rank(int(cfg["linear_num_value_heads"]))
    w.add_ssm_inner_size(int(cfg["linear_value_head_dim"]) * int(cfg["linear_num_value_heads"]))
    if cfg.get("layer_types") is not None:
        # gguf 0.19.0 has no add_recurrent_layers: write llama.cpp's LLM_KV_ATTENTION_RECURRENT_LAYERS key
        w.add_array(f"{ARCH}.attention.recurrent_layers", [t == "linear_attention" for t in ck.layer_types()])
    w.add_full_attention_interval(int(cfg.get("full_attention_interval", 4)))
    rope_dim = head_dim if head_dim is not None else cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(int(rope_dim * rp.get("partial_rotary_factor", 0.25)))


def file_type_for(ck: Checkpoint, variant: str):
    F = _gguf().LlamaFileType
    if variant == "bf16":
        return F.MOSTLY_NVFP4 if any(n.endswith(".weight_scale") for n in ck.entries) else F.MOSTLY_BF16
    return {"q8_0": F.MOSTLY_Q8_0, "q4_k_m": F.MOSTLY_Q4_K_M}[variant]


# ----------------------------------------------------------------------------- llama-quantize layout
def llama_quantize_layout(plan: list[PlannedTensor], add_metadata: Callable[[Any], None]
                          ) -> tuple[list[PlannedTensor], Callable[[Any], None]]:
    """The file layout llama_model_quantize gives a converter GGUF (used for the q8_0 / q4_k_m variants).

    Only where things sit in the file changes, never a value or a data byte, so that nexlab's variant
    file is byte-identical to llama.cpp's quantization of nexlab's NVFP4-BF16 file (llama-quant.cpp,
    llama.cpp tree of llama-cpp-python 0.3.36):

    - tensors in llama_model_loader's ``weights_map`` order (layer, then name:
      ``nexlab.quantize.llama_tensor_order``), the order it quantizes and writes them;
    - each tensor with ``ggml_n_dims`` dimensions (trailing ggml ne 1s dropped, i.e. leading numpy 1s:
      ``blk.N.ffn_gate_inp_shexp.weight`` ne ``[n_embd, 1]`` -> ``[n_embd]``), as ``gguf_add_tensor``
      stores it;
    - ``general.quantization_version`` then ``general.file_type`` last among the key/values:
      ``gguf_set_val_u32`` on an existing key removes it and appends it again.

    Returns the reordered plan and an ``add_metadata`` that applies the key order.
    """
    from nexlab.quantize import llama_tensor_order  # noqa: PLC0415

    rank = {n: i for i, n in enumerate(llama_tensor_order({t.name for t in plan}))}

    def ggml_n_dims(shape: tuple[int, ...]) -> tuple[int, ...]:
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
        return shape

    out = [replace(t, shape=ggml_n_dims(t.shape)) for t in sorted(plan, key=lambda t: rank[t.name])]
    keys = _gguf().Keys.General

    def add_metadata_reappended(w):
        add_metadata(w)
        kv = w.kv_data[0]
        for k in (keys.QUANTIZATION_VERSION, keys.FILE_TYPE):
            kv[k] = kv.pop(k)  # llama.cpp's gguf_set_val_u32: remove, then append

    return out, add_metadata_reappended


# ----------------------------------------------------------------------------- writing
def write_gguf(out_path: str | os.PathLike, arch: str, add_metadata: Callable[[Any], None],
               tensors: list[PlannedTensor], *, show_progress: bool = True, desc: str = "write") -> Path:
    """Write a GGUF through gguf-py's writer, streaming one tensor at a time; atomic.

    ``add_metadata(writer)`` adds the key/values (it may read ``writer.get_total_parameter_count()``,
    which already knows every tensor). Tensor data comes from each ``PlannedTensor.produce()`` in
    order and must have exactly ``nbytes`` bytes. The file is written as ``.<name>.*.tmp`` in the
    target folder and renamed at the end; on any error the temporary file is removed.
    """
    from nexlab.progress import progress  # noqa: PLC0415

    g = _gguf()
    out = Path(out_path)
    w = g.GGUFWriter(path=None, arch=arch)
    with atomic_output(out) as tmp:
        try:
            seen = set()
            for t in tensors:
                if t.name in seen:
                    raise ValueError(f"duplicate output tensor {t.name}")
                seen.add(t.name)
                # logical shape, marked non-uint8 so gguf-py keeps it as is (byte size given explicitly)
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
            add_metadata(w)
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(t.nbytes for t in tensors)
            bar = (progress(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
                   if show_progress else _NoBar())
            try:
                for t in tensors:
                    data = np.ascontiguousarray(t.produce())
                    if data.nbytes != t.nbytes:
                        raise ValueError(f"{t.name}: produced {data.nbytes} bytes, expected {t.nbytes} "
                                         f"({t.ggml_type.name} {list(t.shape)})")
                    w.write_tensor_data(data.reshape(-1).view(np.uint8))
                    bar.update(t.nbytes)
                    del data
            finally:
                bar.close()
        finally:
            w.close()  # closes the temporary file; atomic_output renames it or removes it
    return out


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class ConvertResult:
    path: Path
    n_tensors: int
    nbytes: int
    seconds: float
    types: dict[str, int]


def convert_checkpoint(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, variant: str = "bf16",
                       chat_template: str = "fixed", *, tokenizer_dir: str | os.PathLike | None = None,
                       name: str | None = None, license: str = "apache-2.0", quantized_by: str = "nexlab",
                       source_url: str | None = None, imatrix: str | os.PathLike | None = None,
                       show_progress: bool = True) -> ConvertResult:
    """Convert a Qwen3.5-MoE checkpoint (ModelOpt NVFP4 or BF16) to a qwen35moe GGUF.

    ``variant``: ``bf16`` (NVFP4 tensors kept, the rest BF16/F32: the "NVFP4-BF16" file); ``q8_0``
    and ``q4_k_m`` use the hooks :func:`tensor_type_for` / :func:`encode_tensor` and are laid out as
    llama_model_quantize writes them (:func:`llama_quantize_layout`): byte-identical to llama.cpp's
    quantization of the bf16 file (NVFP4 kept, same imatrix). A tensor without an imatrix entry is
    quantized without importance weights, as llama.cpp does, with a warning (``nexlab.convert`` logger).
    ``chat_template``: ``fixed`` (nexlab's template, default), ``original`` (the checkpoint's own,
    unchanged) or a file path. ``imatrix``: a llama-imatrix GGUF whose column weights guide the
    K-quant search (q4_k_m). Raises ValueError naming the tensor on malformed input; never leaves a
    partial output file.
    """
    from nexlab.chat_template import resolve_chat_template  # noqa: PLC0415

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    g = _gguf()
    with Checkpoint(ckpt_dir) as ck:
        validate_checkpoint(ck)
        weights = None
        if imatrix is not None:
            from nexlab.imatrix import quantize_weights, read_imatrix  # noqa: PLC0415

            weights = quantize_weights(read_imatrix(imatrix))
        plan = plan_tensors(ck, variant, weights)
        tok = tokenizer_metadata(_find_tokenizer_dir(ck, tokenizer_dir), int(ck.config["vocab_size"]), ck.config)
        template = resolve_chat_template(chat_template, ck.path if chat_template == "original" else None)
        if chat_template == "original" and template is None:
            try:
                from nexlab.chat_template import original_template  # noqa: PLC0415

                template = original_template(_find_tokenizer_dir(ck, tokenizer_dir))
            except ValueError:
                template = None
        ftype = file_type_for(ck, variant)

        def add_metadata(w):
            w.add_type(g.GGUFType.MODEL)
            w.add_name(name or ck.raw_config.get("_name_or_path") or ck.path.name)
            total, shared, expert, n_exp = w.get_total_parameter_count()
            w.add_size_label(g.size_label(total, shared, expert, n_exp))
            w.add_license(license)
            w.add_quantized_by(quantized_by)
            if source_url:
                w.add_source_url(source_url)
            add_model_metadata(w, ck)
            w.add_file_type(int(ftype))
            w.add_quantization_version(g.GGML_QUANT_VERSION)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("qwen2")
            w.add_token_list(tok["tokens"])
            w.add_token_types(tok["types"])
            w.add_token_merges(tok["merges"])
            sp = tok["special"]
            for typ, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                            ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
                if typ in sp:
                    fn(int(sp[typ]))
            if tok["add_bos"] is not None:
                w.add_add_bos_token(bool(tok["add_bos"]))
            if tok["add_eos"] is not None:
                w.add_add_eos_token(bool(tok["add_eos"]))
            if template:
                w.add_chat_template(template)

        if variant != "bf16":  # the quantized variants are laid out as llama_model_quantize writes them
            plan, add_metadata = llama_quantize_layout(plan, add_metadata)
        path = write_gguf(out_path, ARCH, add_metadata, plan, show_progress=show_progress,
                          desc=f"convert {Path(out_path).name}")
    types: dict[str, int] = {}
    for t in plan:
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
    return ConvertResult(path, len(plan), sum(t.nbytes for t in plan), time.perf_counter() - t0, types)


# ----------------------------------------------------------------------------- CLI
def _cli(args: argparse.Namespace) -> int:
    if args.quiet:
        os.environ["NEXLAB_NO_PROGRESS"] = "1"
    r = convert_checkpoint(args.ckpt_dir, args.output, variant=args.variant, chat_template=args.chat_template,
                           tokenizer_dir=args.tokenizer_dir, name=args.name, source_url=args.source_url,
                           imatrix=args.imatrix)
    types = ", ".join(f"{k} {v}" for k, v in sorted(r.types.items()))
    print(f"wrote {r.path} ({r.nbytes / 2**20:.1f} MiB, {r.n_tensors} tensors: {types}) in {r.seconds:.1f} s")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="ModelOpt NVFP4 / BF16 Qwen3.5-MoE checkpoint -> qwen35moe GGUF",
                              description="Convert a checkpoint directory to a GGUF llama.cpp runs.")
    p.add_argument("ckpt_dir", help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--variant", default="bf16", choices=VARIANTS,
                   help="bf16: NVFP4 kept, rest BF16 (default); q8_0 / q4_k_m: quantize the rest")
    p.add_argument("--chat-template", default="fixed",
                   help="fixed (nexlab's, default) | original (the checkpoint's, unchanged) | FILE")
    p.add_argument("--tokenizer-dir", default=None, help="where tokenizer.json lives (default: the checkpoint)")
    p.add_argument("--name", default=None, help="general.name (default: config _name_or_path or folder name)")
    p.add_argument("--source-url", default=None, help="general.source.url")
    p.add_argument("--imatrix", default=None, help="importance matrix GGUF (llama-imatrix format) for q4_k_m")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)


# ----------------------------------------------------------------------------- size arithmetic
def estimate_gguf_bytes(config: dict, nvfp4_scope: str = "mlp") -> list[dict[str, Any]]:
    """Tensor bytes of the NVFP4-BF16 GGUF for a config, without weights (what notebook 02 plots).

    ``nvfp4_scope``: ``"mlp"`` (routed experts + shared expert NVFP4, as Nex-N2-mini) or ``"experts"``.
    Same type rules as the converter: NVFP4 36 bytes / 64 values; F32 for 1-D, norms, routers and
    ``conv1d``; BF16 otherwise. Returns rows ``{layer_type, group, tensor, type, bytes}`` (layer rows
    are multiplied by the number of layers of that type; ``.scale`` sidecars are ignored).
    """
    from nexlab.config import layer_parameter_shapes, text_config  # noqa: PLC0415

    t = text_config(config)
    shapes = layer_parameter_shapes(config)
    counts = {"linear_attention": 0, "full_attention": 0}
    for lt in t["layer_types"]:
        counts[lt] += 1
    rows = []
    for lt, tensors in shapes.items():
        n = counts.get(lt, 1)
        for name, shape in tensors.items():
            numel = math.prod(shape)
            experts = "mlp.experts." in name
            shared = "mlp.shared_expert." in name
            if experts or (shared and nvfp4_scope == "mlp"):
                typ, b = "NVFP4", numel * 36 // 64
            elif len([d for d in shape if d != 1]) <= 1 or "norm" in name or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "conv1d.weight")):
                typ, b = "F32", numel * 4
            else:
                typ, b = "BF16", numel * 2
            group = ("routed experts" if experts else "shared expert" if shared else
                     "embeddings + output" if lt == "other" and typ == "BF16" else
                     "norms, routers, small (F32)" if typ == "F32" else
                     "linear attention" if lt == "linear_attention" else "full attention")
            rows.append({"layer_type": lt, "group": group, "tensor": name, "type": typ, "bytes": b * n})
    return rows


# ----------------------------------------------------------------------------- notebook 02 helpers
def explain_block_repack(weight, weight_scale, row: int = 0, block: int = 0) -> dict[str, Any]:
    """The 64 values of one ggml block before (ModelOpt) and after (ggml) repacking.

    Returns the ModelOpt bytes (32 code bytes, adjacent pairs, even column low nibble; 4 E4M3 scale
    bytes), the ggml block (4 UE4M3 scale bytes then 32 code bytes; in 16-group ``s`` byte ``8s+j``
    holds value ``16s+j`` low and ``16s+j+8`` high), and the E2M1 codes of both read back in value
    order (they must be equal).
    """
    from nexlab.nvfp4 import repack_modelopt_to_ggml, unpack_nibbles_adjacent, unpack_nvfp4_ggml  # noqa: PLC0415

    w = np.asarray(weight)[row:row + 1]
    s = (weight_scale if isinstance(weight_scale, np.ndarray) else _scale_bytes(weight_scale))[row:row + 1]
    mo_codes = w[0, block * 32:(block + 1) * 32]
    mo_scales = s[0, block * 4:(block + 1) * 4]
    g = repack_modelopt_to_ggml(w, s)[0, block * 36:(block + 1) * 36]
    codes_mo = unpack_nibbles_adjacent(mo_codes)
    codes_g, scales_g = unpack_nvfp4_ggml(g[None])
    return {"modelopt_code_bytes": mo_codes, "modelopt_scale_bytes": mo_scales, "ggml_block": g,
            "codes_modelopt_order": codes_mo.reshape(-1), "codes_ggml_order": np.asarray(codes_g).reshape(-1),
            "ggml_scale_bytes": np.asarray(scales_g).reshape(-1)}


def check_repack_lossless(ck: Checkpoint) -> dict[str, int]:
    """Dequantize every NVFP4 module from ModelOpt bytes and from the repacked ggml bytes; count
    values that differ (both without ``weight_scale_2``, which the GGUF keeps as ``.scale``).

    Uses ``nexlab.nvfp4.dequantize_nvfp4_modelopt`` and ``dequantize_nvfp4_ggml`` (each bit-exact
    with ModelOpt and ggml respectively). Streams one module at a time.
    """
    from nexlab.nvfp4 import dequantize_nvfp4_ggml, dequantize_nvfp4_modelopt, repack_modelopt_to_ggml  # noqa: PLC0415

    n_mod = n_val = n_bad = 0
    for name in ck.entries:
        if not name.endswith(".weight_scale"):
            continue
        m = name[: -len("_scale")]
        w, s = ck.load(m), ck.load(name)
        a = dequantize_nvfp4_modelopt(w, s, np.float32(1.0))
        b = dequantize_nvfp4_ggml(repack_modelopt_to_ggml(w.numpy(), _scale_bytes(s))).reshape(a.shape)
        n_mod += 1
        n_val += a.size
        n_bad += int((a.view(np.uint32) != b.astype(np.float32).view(np.uint32)).sum())
    return {"modules": n_mod, "values": n_val, "mismatches": n_bad}
