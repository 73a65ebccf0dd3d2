"""qwen35moe, the one model of the architecture in nexlab: GGUF tensor names, the HF -> GGUF
transforms, the ``qwen35moe.*`` metadata and the tensor plan.

Everything that needs to know what a qwen35moe GGUF holds reads it from here: the converter
(:mod:`nexlab.convert.plan` attaches "how to make the bytes" to each planned tensor), size and memory
prediction (:mod:`nexlab.analysis.memory`), the imatrix collector (:mod:`nexlab.analysis.imatrix`, for
names and the value-head order) and the shape-only GGUFs the sizing tests load in llama.cpp. The
hyper-parameters (:class:`nexlab.model.hparams.HParams`) and llama-quantize's type rules
(:mod:`nexlab.model.mixes`) are beside it.

Reference: llama.cpp's converter (``Qwen3_5MoeTextModel`` in ``conversion/qwen.py`` of the tree that
llama-cpp-python 0.3.36 vendors, run with ``--outtype bf16 --no-mtp``) and its loader
(``src/models/qwen35moe.cpp``, ``llama-model.cpp``). The tests compare nexlab's files with the
converter's tensor for tensor, byte for byte, and the predicted sizes with the written files.

Shapes are numpy shapes (last axis = ggml ``ne[0]``, the row length) unless a name says ``ne``.

The tensor plan
---------------
:func:`tensor_plan` lists every tensor of the file in file order: the converter's order for the
``bf16`` variant (token_embd; per layer the norms, the mixer, the router and shared expert, the
stacked experts; output_norm, output), llama_model_quantize's order for ``q8_0`` / ``q4_k_m``. Types:

- NVFP4 modules (ModelOpt ``weight`` + ``weight_scale``) stay NVFP4 (ggml type 40), with the F32
  sidecars ``<name>.scale`` (``weight_scale_2``) and ``<name>.input_scale`` (``[1]`` dense,
  ``[n_expert]`` stacked), each omitted when all its values are within 1e-6 of 1;
- float tensors: F32 when 1-D, a ``*_norm.weight``, a router (``ffn_gate_inp``,
  ``ffn_gate_inp_shexp``), ``ssm_conv1d`` or not a ``.weight``; BF16 otherwise (the bf16 variant);
- ``q8_0`` / ``q4_k_m``: llama-quantize's type mix (:func:`nexlab.model.mixes.plan_types`, the one
  copy of its rules) over the bf16 plan, NVFP4 kept, shapes with ggml's trailing 1-dims dropped.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from nexlab.core.errors import NexlabError
from nexlab.formats.minifloat import NVFP4_GROUP
from nexlab.ggufio.layout import TensorSpec
from nexlab.model import hparams as Q
from nexlab.model.hparams import ARCH, HParams, LinearAttnDims
from nexlab.model.mixes import plan_types


def imatrix_for_tensor(weights: dict[str, np.ndarray] | None, name: str, ne0: int, n_expert: int = 1,
                       *, log=None) -> np.ndarray | None:
    """The importance weights llama_model_quantize would use for tensor ``name``, or None.

    As in llama-quant.cpp: no imatrix or no entry -> None (the tensor is quantized without importance
    weights; ``log`` is told "did not find weights for ..."); an entry whose size is not
    ``ne0 * n_expert`` -> ValueError, except for ``token_embd.weight`` where it is ignored. Returns
    float32 ``[n_expert, ne0]``: row j is expert j's column weights.
    """
    if weights is None:
        return None
    w = weights.get(name)
    if w is None:
        if log is not None:
            log(f"imatrix: did not find weights for {name}; quantizing it without importance weights")
        return None
    if w.size != ne0 * n_expert:
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            if log is not None:
                log(f"imatrix: size {w.size} differs from tensor size {ne0 * n_expert} for {name}; ignored")
            return None
        raise NexlabError(f"imatrix size {w.size} is different from tensor size {ne0 * n_expert} for {name}")
    return np.asarray(w, dtype=np.float32).reshape(n_expert, ne0)


def linear_attn_out_perm(config) -> np.ndarray | None:
    """Input-column permutation the converter applies to ``linear_attn.out_proj`` (value heads grouped ->
    tiled, :func:`ssm_out_column_permutation`), or None when key and value head counts
    are equal."""
    return ssm_out_column_permutation(Q.LinearAttnDims(
        int(config.linear_num_key_heads), int(config.linear_num_value_heads),
        int(config.linear_key_head_dim), int(config.linear_value_head_dim)))


VARIANTS = ("bf16", "q8_0", "q4_k_m")


NVFP4_SCOPES = ("mlp", "experts", "none")


SCALE_TRIVIAL_ATOL = 1e-6  # llama.cpp omits .scale / .input_scale when all values are this close to 1


# ============================================================================ names
def tensor_name(key: str, bid: int | None = None, suffix: str = ".weight") -> str:
    """GGUF tensor name from gguf-py's table (``MODEL_TENSOR`` member name, e.g. ``"ATTN_QKV"``)."""

    t = getattr(gguf.MODEL_TENSOR, key)
    if t not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN35MOE]:
        raise NexlabError(f"{key} is not a qwen35moe tensor")
    return gguf.TENSOR_NAMES[t].format(bid=bid) + suffix


#: HF suffix (inside ``model.layers.N.``) -> (``MODEL_TENSOR`` key, GGUF suffix), in converter order
LAYER_MAP: dict[str, tuple[str, str]] = {
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


GLOBAL_MAP = {
    "model.embed_tokens.weight": ("TOKEN_EMBD", ".weight"),
    "model.norm.weight": ("OUTPUT_NORM", ".weight"),
    "lm_head.weight": ("OUTPUT", ".weight"),
}


EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # llama.cpp's order


EXPERT_KEYS = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP", "down_proj": "FFN_DOWN_EXP"}


#: tensors a ModelOpt export may carry that have no GGUF counterpart (KV-cache quantizer amax)
IGNORED_SUFFIXES = (".k_scale", ".v_scale", ".rotary_emb.inv_freq")


#: the scale tensors beside a ModelOpt NVFP4 module's packed ``.weight`` in the checkpoint (block scales,
#: tensor scale, activation scale). In nexlab "sidecar" means only the GGUF's F32 ``.scale`` /
#: ``.input_scale`` tensors made from the last two.
MODELOPT_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")


def gguf_name(hf_name: str) -> str:
    """GGUF name of a non-expert HF tensor (``model.layers.3.linear_attn.A_log`` -> ``blk.3.ssm_a``)."""
    if hf_name in GLOBAL_MAP:
        return tensor_name(*GLOBAL_MAP[hf_name])
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        m = LAYER_MAP.get(parts[3])
        if m is not None:
            return tensor_name(m[0], int(parts[2]), m[1])
    raise NexlabError(f"tensor {hf_name!r} has no qwen35moe GGUF name")


def expert_gguf_name(layer: int, proj: str) -> str:
    """``blk.N.ffn_{gate,up,down}_exps.weight`` for HF ``gate_proj`` / ``up_proj`` / ``down_proj``."""
    return tensor_name(EXPERT_KEYS[proj], layer)


def v_head_permutation(n_k: int, per_k: int, head_dim: int) -> np.ndarray:
    """Index ``p`` with ``new = old[p]`` moving value heads from grouped to tiled order.

    HF stores the V heads grouped by key head ``[G0v0, G0v1, .., G1v0, ..]``; ggml's broadcast
    wants ``[G0v0, G1v0, .., G0v1, G1v1, ..]`` (llama.cpp PR 19468). Each head spans ``head_dim``
    consecutive channels.
    """
    return np.arange(n_k * per_k * head_dim).reshape(n_k, per_k, head_dim).transpose(1, 0, 2).reshape(-1)


def la_dims(cfg: dict) -> LinearAttnDims:
    """Linear-attention head counts and dims from a (text) config dict."""
    return LinearAttnDims(int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"]),
                          int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"]))


def ssm_out_column_permutation(d: LinearAttnDims) -> np.ndarray | None:
    """Input-column permutation of ``ssm_out`` (``linear_attn.out_proj``), None when heads are not grouped."""
    if d.n_k == d.n_v:
        return None
    return v_head_permutation(d.n_k, d.per_k, d.d_v)


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
    """Apply llama.cpp's qwen35moe transforms to one float tensor (torch, HF layout).

    RMSNorm weights +1 (not ``linear_attn.norm``), ``A_log`` -> ``ssm_a = -exp(A_log)``, ``conv1d``
    squeezed, and the linear-attention value heads reordered from grouped by key head to tiled
    order (:func:`v_head_permutation`) in the V rows of ``attn_qkv``, the rows of ``attn_gate`` /
    ``ssm_alpha`` / ``ssm_beta``, ``ssm_a``, ``ssm_dt``, the V channels of ``ssm_conv1d`` and the
    columns of ``ssm_out``.
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    suffix = hf_name.split(".", 3)[3] if hf_name.startswith("model.layers.") else hf_name
    d = la_dims(cfg)
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
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    if not hf_name.startswith("model.layers.") or ".linear_attn." not in hf_name:
        return weight, scale
    suffix = hf_name.split(".", 3)[3]
    d = la_dims(cfg)
    p = _row_perm_for(suffix, d, weight.shape[0])
    if p is not None:
        idx = torch.from_numpy(p)
        return weight.index_select(0, idx), scale.index_select(0, idx)
    if suffix == "linear_attn.out_proj.weight":
        if d.d_v % NVFP4_GROUP:
            raise NexlabError(f"{hf_name}: value head dim {d.d_v} is not a multiple of {NVFP4_GROUP}; "
                             "cannot reorder NVFP4 columns by head")
        hp = torch.from_numpy(v_head_permutation(d.n_k, d.per_k, 1))
        out = weight.shape[0]
        w = weight.reshape(out, d.n_v, -1).index_select(1, hp).reshape(out, -1)
        s = scale.reshape(out, d.n_v, -1).index_select(1, hp).reshape(out, -1)
        return w.contiguous(), s.contiguous()
    return weight, scale


def float_type(name: str, shape: tuple[int, ...]):
    """The converter's type for a float tensor: F32 when 1-D, a norm, a router, ``ssm_conv1d`` or not
    a ``.weight``; BF16 otherwise (``--outtype bf16``)."""
    base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    small = base.endswith((".ffn_gate_inp", ".ffn_gate_inp_shexp", ".ssm_conv1d"))
    if len(shape) <= 1 or name.endswith("_norm.weight") or small or not name.endswith(".weight"):
        return QT.F32
    return QT.BF16


def nvfp4_scope(scope: str) -> Callable[[str], bool]:
    """Which HF modules a ModelOpt checkpoint holds as NVFP4, by scope: ``mlp`` (routed and shared
    experts: Nex-N2-mini), ``experts`` (routed only) or ``none``."""
    if scope not in NVFP4_SCOPES:
        raise NexlabError(f"nvfp4 scope must be one of {', '.join(NVFP4_SCOPES)}, got {scope!r}")
    if scope == "none":
        return lambda module: False
    if scope == "experts":
        return lambda module: ".mlp.experts." in module
    return lambda module: ".mlp.experts." in module or ".mlp.shared_expert." in module


def ggml_n_dims_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Numpy ``shape`` without leading 1s (ggml's trailing 1-dims), at least one dimension kept
    (``ggml_n_dims``, as ``gguf_add_tensor`` stores a tensor llama_model_quantize writes)."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _hf_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """HF shapes of one layer's tensors (inside ``model.layers.N.``), experts per expert."""
    h, nv, dv = hp.n_embd, hp.ssm_dt_rank, hp.ssm_head_v_dim
    kd, vd = hp.ssm_n_group * hp.ssm_d_state, hp.ssm_d_inner
    qd, kvd = hp.n_head * hp.head_dim_k, hp.n_head_kv * hp.head_dim_k
    return {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": ((2 if hp.attn_output_gate else 1) * qd, h),
        "self_attn.k_proj.weight": (kvd, h), "self_attn.v_proj.weight": (kvd, h),
        "self_attn.o_proj.weight": (h, qd),
        "self_attn.q_norm.weight": (hp.head_dim_k,), "self_attn.k_norm.weight": (hp.head_dim_k,),
        "linear_attn.in_proj_qkv.weight": (2 * kd + vd, h), "linear_attn.in_proj_z.weight": (vd, h),
        "linear_attn.in_proj_b.weight": (nv, h), "linear_attn.in_proj_a.weight": (nv, h),
        "linear_attn.conv1d.weight": (2 * kd + vd, hp.ssm_d_conv),  # HF [C, 1, K], squeezed
        "linear_attn.A_log": (nv,), "linear_attn.dt_bias": (nv,), "linear_attn.norm.weight": (dv,),
        "linear_attn.out_proj.weight": (h, vd),
        "mlp.gate.weight": (hp.n_expert, h), "mlp.shared_expert_gate.weight": (1, h),
        "mlp.shared_expert.gate_proj.weight": (hp.n_ff_shexp, h),
        "mlp.shared_expert.up_proj.weight": (hp.n_ff_shexp, h),
        "mlp.shared_expert.down_proj.weight": (h, hp.n_ff_shexp),
        "experts.gate_proj": (hp.n_ff_exp, h), "experts.up_proj": (hp.n_ff_exp, h),
        "experts.down_proj": (h, hp.n_ff_exp),
    }


def tensor_plan(hp: HParams, variant: str = "bf16", *, nvfp4: str | Callable[[str], bool] = "mlp",
                sidecars: Callable[[str, str], bool] | None = None, lm_head: bool | None = None,
                shapes: Callable[[str], tuple[int, ...] | None] | None = None) -> list[TensorSpec]:
    """Every tensor of the qwen35moe GGUF of ``variant``, in file order (see the module docstring).

    ``nvfp4``: a scope name (:func:`nvfp4_scope`) or a predicate on an HF module name
    (``model.layers.N.mlp.experts.0.gate_proj`` stands for a layer's routed experts) saying which
    modules are NVFP4. ``sidecars(hf_module, suffix)`` says whether the ``.scale`` / ``.input_scale``
    sidecar of an NVFP4 tensor is written (the converter: unless all values are ~1; default: always).
    ``lm_head``: whether ``output.weight`` exists (default: untied embeddings). ``shapes(hf_name)``
    lets a checkpoint's own header shapes override the ones derived from ``hp`` (None: derive).
    """
    if variant not in VARIANTS:
        raise NexlabError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    is_nvfp4 = nvfp4_scope(nvfp4) if isinstance(nvfp4, str) else nvfp4
    keep = sidecars if sidecars is not None else (lambda module, suffix: True)
    lm_head = (not hp.tied_embeddings) if lm_head is None else lm_head
    layer_shapes = _hf_shapes(hp)
    plan: list[TensorSpec] = []

    def shape_of(hf: str, default: tuple[int, ...]) -> tuple[int, ...]:
        got = shapes(hf) if shapes is not None else None
        return tuple(got) if got is not None else default

    def add_sidecars(gname: str, module: str, layer: int | None, n: int, stacked: bool) -> None:
        for suffix, kind in ((".scale", "scale"), (".input_scale", "input_scale")):
            if keep(module, suffix):
                plan.append(TensorSpec(gname.replace(".weight", suffix), (n,), QT.F32, kind, module, layer, stacked))

    def module_tensor(hf: str, default_shape: tuple[int, ...], layer: int | None) -> None:
        g = gguf_name(hf)
        module = hf[: -len(".weight")] if hf.endswith(".weight") else None
        if module is not None and is_nvfp4(module):
            plan.append(TensorSpec(g, shape_of(hf, default_shape), QT.NVFP4, "nvfp4", module, layer))
            add_sidecars(g, module, layer, 1, False)
        else:
            shape = shape_of(hf, default_shape)
            plan.append(TensorSpec(g, shape, float_type(g, shape), "float", hf, layer))

    vocab_shape = (hp.n_vocab, hp.n_embd)
    module_tensor("model.embed_tokens.weight", vocab_shape, None)
    for i, recurrent in enumerate(hp.recurrent):
        p = f"model.layers.{i}."
        for suffix in LAYER_MAP:
            if suffix.startswith("self_attn.") and recurrent:
                continue
            if suffix.startswith("linear_attn.") and not recurrent:
                continue
            module_tensor(p + suffix, layer_shapes[suffix], i)
        for proj in EXPERT_PROJS:
            g = expert_gguf_name(i, proj)
            stack = f"{p}mlp.experts.{proj}"
            shape = (hp.n_expert,) + shape_of(stack, layer_shapes[f"experts.{proj}"])
            if is_nvfp4(f"{p}mlp.experts.0.{proj}"):
                plan.append(TensorSpec(g, shape, QT.NVFP4, "nvfp4", stack, i, True))
                add_sidecars(g, stack, i, hp.n_expert, True)
            else:
                plan.append(TensorSpec(g, shape, float_type(g, shape), "float", stack, i, True))
    module_tensor("model.norm.weight", (hp.n_embd,), None)
    if lm_head:
        module_tensor("lm_head.weight", vocab_shape, None)
    if variant != "bf16":
        plan = quantized_layout(plan, variant, hp)
    return plan


def quantized_layout(plan: list[TensorSpec], variant: str, hp: HParams) -> list[TensorSpec]:
    """The bf16 plan as llama_model_quantize writes the ``variant``: llama-quantize's types
    (:func:`nexlab.model.mixes.plan_types`, NVFP4 kept), llama_model_loader's tensor order, and shapes
    without ggml's trailing 1-dims (``blk.N.ffn_gate_inp_shexp.weight`` ne ``[n_embd, 1]`` ->
    ``[n_embd]``). Only where things sit and their types change, never a source."""

    by_name = {t.name: t for t in plan}
    if len(by_name) != len(plan):
        raise NexlabError("duplicate tensor names in the plan")
    plans = plan_types([(t.name, t.shape, QT(t.ggml_type).name) for t in plan], variant, hp.n_layer,
                       n_expert=hp.n_expert)
    return [replace(by_name[p.name], ggml_type=QT[p.ggml_type], shape=ggml_n_dims_shape(by_name[p.name].shape))
            for p in plans]


def file_type(variant: str, plan: list[TensorSpec]):
    """``general.file_type`` of the file: MOSTLY_NVFP4 for a bf16 file with NVFP4 tensors (the
    converter's choice), MOSTLY_BF16 without, MOSTLY_Q8_0 / MOSTLY_Q4_K_M for the variants."""

    F = gguf.LlamaFileType
    if variant == "bf16":
        return F.MOSTLY_NVFP4 if any(QT(t.ggml_type) == QT.NVFP4 for t in plan) else F.MOSTLY_BF16
    return {"q8_0": F.MOSTLY_Q8_0, "q4_k_m": F.MOSTLY_Q4_K_M}[variant]


# ============================================================================ metadata
def add_metadata(w, hp: HParams) -> None:
    """The ``qwen35moe.*`` hyper-parameter keys llama.cpp's loader reads, in the converter's order."""
    w.add_block_count(hp.n_layer)
    w.add_context_length(hp.n_ctx_train)
    w.add_embedding_length(hp.n_embd)
    if hp.n_ff is not None:
        w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_dimension_sections(list(hp.rope_sections))
    if hp.rope_theta is not None:
        w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_expert_count(hp.n_expert)
    w.add_expert_used_count(hp.n_expert_used)
    w.add_key_length(hp.head_dim_k)
    w.add_value_length(hp.head_dim_v)
    w.add_expert_feed_forward_length(hp.n_ff_exp)
    w.add_expert_shared_feed_forward_length(hp.n_ff_shexp)
    w.add_ssm_conv_kernel(hp.ssm_d_conv)
    w.add_ssm_state_size(hp.ssm_d_state)
    w.add_ssm_group_count(hp.ssm_n_group)
    w.add_ssm_time_step_rank(hp.ssm_dt_rank)
    w.add_ssm_inner_size(hp.ssm_d_inner)
    # gguf 0.19.0 has no add_recurrent_layers: write llama.cpp's LLM_KV_ATTENTION_RECURRENT_LAYERS key
    w.add_array(f"{ARCH}.attention.recurrent_layers", [bool(r) for r in hp.recurrent])
    w.add_full_attention_interval(hp.full_attention_interval)
    w.add_rope_dimension_count(int(hp.n_rot))
