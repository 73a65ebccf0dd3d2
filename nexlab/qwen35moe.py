"""qwen35moe, the one model of the architecture in nexlab: hyper-parameters, GGUF tensor names,
the HF -> GGUF transforms, the ``qwen35moe.*`` metadata and the tensor plan.

Everything that needs to know what a qwen35moe GGUF holds reads it from here: the converter
(:mod:`nexlab.convert` attaches "how to make the bytes" to each planned tensor), size and memory
prediction (:mod:`nexlab.memory`), the imatrix collector (:mod:`nexlab.imatrix`, for names and the
value-head order) and the shape-only GGUFs the sizing tests load in llama.cpp.

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
- ``q8_0`` / ``q4_k_m``: llama-quantize's type mix (:func:`nexlab.quantize.plan_types`, the one copy
  of its rules) over the bf16 plan, NVFP4 kept, shapes with ggml's trailing 1-dims dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

from nexlab.checkpoint import NVFP4_GROUP_SIZE

ARCH = "qwen35moe"
VARIANTS = ("bf16", "q8_0", "q4_k_m")
NVFP4_SCOPES = ("mlp", "experts", "none")
SCALE_TRIVIAL_ATOL = 1e-6  # llama.cpp omits .scale / .input_scale when all values are this close to 1

_SUPPORTED_HF = {"Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"}
_SUPPORTED_MODEL_TYPES = {"qwen3_5_moe", "qwen3_5_moe_text"}


# ============================================================================ hyper-parameters
@dataclass(frozen=True)
class HParams:
    """The hyper-parameters of a qwen35moe model, in llama.cpp's names.

    ``recurrent[i]`` is llama.cpp's ``hparams.is_recr(i)``: True for a linear-attention (Gated
    DeltaNet) layer, False for a full-attention layer. ``n_ff`` (a dense FFN width, absent from
    Qwen3.5-MoE configs) and ``rope_theta`` are written only when known, as the converter does.
    """

    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    ssm_d_conv: int
    ssm_d_state: int     # linear key head dim
    ssm_n_group: int     # linear key heads
    ssm_dt_rank: int     # linear value heads
    ssm_d_inner: int     # linear value heads * value head dim
    recurrent: tuple[bool, ...]
    n_ctx_train: int
    tied_embeddings: bool = False
    arch: str = ARCH
    name: str = "model"
    vision: dict | None = field(default=None, compare=False)
    rms_eps: float = 1e-6
    rope_theta: float | None = 1e7
    rope_sections: tuple[int, ...] = (11, 11, 10, 0)
    n_rot: int | None = None             # rotary dims (head_dim * partial_rotary_factor)
    full_attention_interval: int = 4
    attn_output_gate: bool = True
    n_ff: int | None = None

    def __post_init__(self):
        for f in ("n_layer", "n_embd", "n_vocab", "n_head", "n_head_kv", "head_dim_k", "head_dim_v",
                  "n_expert", "n_expert_used", "n_ff_exp", "n_ff_shexp", "ssm_d_conv", "ssm_d_state",
                  "ssm_n_group", "ssm_dt_rank", "ssm_d_inner", "n_ctx_train"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model hyperparameter {f} must be a positive int, got {v!r}")
        if len(self.recurrent) != self.n_layer:
            raise ValueError(f"recurrent has {len(self.recurrent)} entries, expected n_layer={self.n_layer}")
        if self.arch != ARCH:
            raise ValueError(f"unsupported architecture {self.arch!r}: only {ARCH} is modelled")
        if self.ssm_dt_rank % self.ssm_n_group:
            raise ValueError(f"linear value heads ({self.ssm_dt_rank}) must be a multiple of the key heads "
                             f"({self.ssm_n_group})")
        if self.n_rot is None:
            object.__setattr__(self, "n_rot", self.head_dim_k // 4)

    @property
    def n_attn_layers(self) -> int:
        return sum(not r for r in self.recurrent)

    @property
    def n_recr_layers(self) -> int:
        return sum(self.recurrent)

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv

    @property
    def n_embd_r(self) -> int:
        """llama_hparams::n_embd_r(): conv state floats per sequence (d_conv - 1 columns)."""
        return (self.ssm_d_conv - 1) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    @property
    def n_embd_s(self) -> int:
        """llama_hparams::n_embd_s(): delta-rule state floats per sequence."""
        return self.ssm_d_state * self.ssm_d_inner

    @property
    def ssm_head_v_dim(self) -> int:
        return self.ssm_d_inner // self.ssm_dt_rank

    @property
    def la_dims(self) -> "LinearAttnDims":
        return LinearAttnDims(self.ssm_n_group, self.ssm_dt_rank, self.ssm_d_state, self.ssm_head_v_dim)

    def layer_types(self) -> list[str]:
        return ["linear_attention" if r else "full_attention" for r in self.recurrent]

    def with_full_attention(self) -> "HParams":
        """The same model with full attention in every layer (for the hybrid-vs-dense comparison)."""
        return replace(self, recurrent=(False,) * self.n_layer, name=self.name + " (all full attention)")


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"{where} lacks {key!r}")
    return d[key]


def rope_parameters(text: dict) -> dict:
    """``rope_parameters`` (transformers 5) or ``rope_scaling``, with top-level fallbacks."""
    rp = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    for k in ("rope_theta", "partial_rotary_factor"):
        if k not in rp and k in text:
            rp[k] = text[k]
    return rp


def hparams_from_hf_config(config: dict, name: str = "model") -> HParams:
    """Read a Hugging Face ``config.json`` dict (top level or nested ``text_config``)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    archs = set(config.get("architectures") or [])
    text = {**config, **(config.get("text_config") or {})}
    mtypes = {config.get("model_type"), text.get("model_type")}
    if not (archs & _SUPPORTED_HF or mtypes & _SUPPORTED_MODEL_TYPES):
        raise ValueError(f"unsupported architecture {sorted(archs) or sorted(t for t in mtypes if t)}: "
                         f"only Qwen3.5-MoE ({', '.join(sorted(_SUPPORTED_HF))}) is modelled")
    w = "config"
    n_layer = int(_need(text, "num_hidden_layers", w))
    n_head = int(_need(text, "num_attention_heads", w))
    n_embd = int(_need(text, "hidden_size", w))
    head_dim = int(text.get("head_dim") or n_embd // n_head)
    interval = int(text.get("full_attention_interval", 4))
    if text.get("layer_types") is not None:
        lt = list(text["layer_types"])
        if len(lt) != n_layer:
            raise ValueError(f"config layer_types has {len(lt)} entries, num_hidden_layers is {n_layer}")
        recurrent = tuple(t == "linear_attention" for t in lt)
    else:
        recurrent = tuple((i + 1) % interval != 0 for i in range(n_layer))
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    rp = rope_parameters(text)
    sections = list(rp.get("mrope_section") or [11, 11, 10])
    n_val = int(_need(text, "linear_num_value_heads", w))
    return HParams(
        n_layer=n_layer, n_embd=n_embd, n_vocab=int(_need(text, "vocab_size", w)), n_head=n_head,
        n_head_kv=int(_need(text, "num_key_value_heads", w)), head_dim_k=head_dim, head_dim_v=head_dim,
        n_expert=int(_need(text, "num_experts", w)), n_expert_used=int(_need(text, "num_experts_per_tok", w)),
        n_ff_exp=int(_need(text, "moe_intermediate_size", w)),
        n_ff_shexp=int(_need(text, "shared_expert_intermediate_size", w)),
        ssm_d_conv=int(_need(text, "linear_conv_kernel_dim", w)),
        ssm_d_state=int(_need(text, "linear_key_head_dim", w)),
        ssm_n_group=int(_need(text, "linear_num_key_heads", w)),
        ssm_dt_rank=n_val, ssm_d_inner=n_val * int(_need(text, "linear_value_head_dim", w)),
        recurrent=recurrent, n_ctx_train=int(text.get("max_position_embeddings", 262144)),
        tied_embeddings=bool(tied), name=name, vision=config.get("vision_config"),
        rms_eps=float(_need(text, "rms_norm_eps", w)),
        rope_theta=float(rp["rope_theta"]) if rp.get("rope_theta") is not None else None,
        rope_sections=tuple((sections + [0, 0, 0, 0])[:4]),
        n_rot=int(head_dim * rp.get("partial_rotary_factor", 0.25)),
        full_attention_interval=interval, attn_output_gate=bool(text.get("attn_output_gate", True)),
        n_ff=int(text["intermediate_size"]) if text.get("intermediate_size") is not None else None,
    )


def nex_n2_mini() -> HParams:
    """Nex-N2-mini's hyper-parameters (from :func:`nexlab.config.real_config`), with its vision tower."""
    from nexlab.config import real_config  # noqa: PLC0415  (config imports nothing of nexlab)

    return hparams_from_hf_config(real_config(), name="Nex-N2-mini")


def _gguf_value(reader, key: str, default: Any = None, required: bool = True):
    """A metadata value through gguf-py's ``ReaderField.contents()``."""
    f = reader.get_field(key)
    if f is None:
        if required and default is None:
            raise ValueError(f"GGUF lacks metadata key {key!r}")
        return default
    return f.contents()


def hparams_from_gguf(reader_or_path, name: str | None = None) -> HParams:
    """Read a qwen35moe GGUF's metadata the way llama.cpp's loader does (qwen35moe.cpp).

    Takes a path or an open ``gguf.GGUFReader``.
    """
    import gguf  # noqa: PLC0415

    if isinstance(reader_or_path, gguf.GGUFReader):
        reader = reader_or_path
        where = name or str(getattr(reader.data, "filename", "GGUF"))
    else:
        reader = gguf.GGUFReader(str(reader_or_path))
        where = name or str(reader_or_path).rsplit("/", 1)[-1]
    arch = _gguf_value(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"unsupported architecture {arch!r} in {where}: only {ARCH} is modelled")

    def k(s):
        return f"{arch}.{s}"

    n_layer = int(_gguf_value(reader, k("block_count")))
    n_embd = int(_gguf_value(reader, k("embedding_length")))
    n_head = int(_gguf_value(reader, k("attention.head_count")))
    n_head_kv = _gguf_value(reader, k("attention.head_count_kv"), n_head)
    if isinstance(n_head_kv, list):  # per-layer array: the full-attention layers' value counts
        vals = {int(v) for v in n_head_kv if int(v) > 0}
        if len(vals) != 1:
            raise ValueError(f"{where}: per-layer head_count_kv {n_head_kv} is not uniform")
        n_head_kv = vals.pop()
    head_k = int(_gguf_value(reader, k("attention.key_length"), n_embd // n_head))
    head_v = int(_gguf_value(reader, k("attention.value_length"), n_embd // n_head))
    interval = int(_gguf_value(reader, k("full_attention_interval"), 4))
    recr = _gguf_value(reader, k("attention.recurrent_layers"), required=False)
    if recr is not None:
        recurrent = tuple(bool(x) for x in recr)[:n_layer]
    else:
        recurrent = tuple((i + 1) % interval != 0 for i in range(n_layer))
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{where}: tensor token_embd.weight missing")
    n_vocab = int(names["token_embd.weight"].shape[1])
    ff_exp = _gguf_value(reader, k("expert_feed_forward_length"))
    if isinstance(ff_exp, list):
        ff_exp = max(int(v) for v in ff_exp)
    sections = _gguf_value(reader, k("rope.dimension_sections"), [11, 11, 10, 0], required=False)
    theta = _gguf_value(reader, k("rope.freq_base"), required=False)
    n_ff = _gguf_value(reader, k("feed_forward_length"), required=False)
    return HParams(
        n_layer=n_layer, n_embd=n_embd, n_vocab=n_vocab, n_head=n_head, n_head_kv=int(n_head_kv),
        head_dim_k=head_k, head_dim_v=head_v, n_expert=int(_gguf_value(reader, k("expert_count"))),
        n_expert_used=int(_gguf_value(reader, k("expert_used_count"))), n_ff_exp=int(ff_exp),
        n_ff_shexp=int(_gguf_value(reader, k("expert_shared_feed_forward_length"), int(ff_exp))),
        ssm_d_conv=int(_gguf_value(reader, k("ssm.conv_kernel"))),
        ssm_d_state=int(_gguf_value(reader, k("ssm.state_size"))),
        ssm_n_group=int(_gguf_value(reader, k("ssm.group_count"))),
        ssm_dt_rank=int(_gguf_value(reader, k("ssm.time_step_rank"))),
        ssm_d_inner=int(_gguf_value(reader, k("ssm.inner_size"))), recurrent=recurrent,
        n_ctx_train=int(_gguf_value(reader, k("context_length"))), tied_embeddings="output.weight" not in names,
        name=name or where, rms_eps=float(_gguf_value(reader, k("attention.layer_norm_rms_epsilon"), 1e-6)),
        rope_theta=None if theta is None else float(theta),
        rope_sections=tuple(int(s) for s in sections),
        n_rot=int(_gguf_value(reader, k("rope.dimension_count"), head_k // 4)),
        full_attention_interval=interval, n_ff=None if n_ff is None else int(n_ff),
    )


# ============================================================================ names
def tensor_name(key: str, bid: int | None = None, suffix: str = ".weight") -> str:
    """GGUF tensor name from gguf-py's table (``MODEL_TENSOR`` member name, e.g. ``"ATTN_QKV"``)."""
    import gguf  # noqa: PLC0415

    t = getattr(gguf.MODEL_TENSOR, key)
    if t not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN35MOE]:
        raise ValueError(f"{key} is not a qwen35moe tensor")
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
NVFP4_SIDECARS = (".weight_scale", ".weight_scale_2", ".input_scale")
#: NVFP4 checkpoint scalar -> GGUF sidecar suffix
SIDECAR_SUFFIXES = {".weight_scale_2": ".scale", ".input_scale": ".input_scale"}


def gguf_name(hf_name: str) -> str:
    """GGUF name of a non-expert HF tensor (``model.layers.3.linear_attn.A_log`` -> ``blk.3.ssm_a``)."""
    if hf_name in GLOBAL_MAP:
        return tensor_name(*GLOBAL_MAP[hf_name])
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        m = LAYER_MAP.get(parts[3])
        if m is not None:
            return tensor_name(m[0], int(parts[2]), m[1])
    raise ValueError(f"tensor {hf_name!r} has no qwen35moe GGUF name")


def expert_gguf_name(layer: int, proj: str) -> str:
    """``blk.N.ffn_{gate,up,down}_exps.weight`` for HF ``gate_proj`` / ``up_proj`` / ``down_proj``."""
    return tensor_name(EXPERT_KEYS[proj], layer)


# ============================================================================ transforms
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
    import torch  # noqa: PLC0415

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
    import torch  # noqa: PLC0415

    if not hf_name.startswith("model.layers.") or ".linear_attn." not in hf_name:
        return weight, scale
    suffix = hf_name.split(".", 3)[3]
    d = la_dims(cfg)
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


# ============================================================================ the tensor plan
def tensor_nbytes_shape(shape: tuple[int, ...], ggml_type) -> int:
    """``ggml_nbytes`` of a contiguous tensor of numpy ``shape`` (rows of ``shape[-1]`` values)."""
    import gguf  # noqa: PLC0415

    qt = QT(ggml_type)
    if qt not in gguf.GGML_QUANT_SIZES:
        raise ValueError(f"unknown ggml type {qt!r}")
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"bad tensor shape {list(shape)}")
    if shape[-1] % bs:
        raise ValueError(f"row of {shape[-1]} values is not a multiple of {qt.name}'s block of {bs}")
    return math.prod(shape[:-1]) * (shape[-1] // bs) * ts


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor of the plan.

    ``shape`` is numpy order (``ne`` reversed); ``kind`` says how the converter makes it:
    ``"float"`` (a float HF tensor, transformed and encoded), ``"nvfp4"`` (a repacked ModelOpt
    module), ``"scale"`` / ``"input_scale"`` (F32 sidecars of NVFP4 tensors). ``hf`` names the
    source: the HF tensor for a float tensor, the HF module for NVFP4 and sidecars, and for
    stacked experts ``model.layers.N.mlp.experts.{proj}`` (``stacked`` True).
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: Any
    kind: str = "float"
    hf: str = ""
    layer: int | None = None
    stacked: bool = False

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def qtype(self):
        return QT(self.ggml_type)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes_shape(self.shape, self.ggml_type)


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
        raise ValueError(f"nvfp4 scope must be one of {', '.join(NVFP4_SCOPES)}, got {scope!r}")
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
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
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
    (:func:`nexlab.quantize.plan_types`, NVFP4 kept), llama_model_loader's tensor order, and shapes
    without ggml's trailing 1-dims (``blk.N.ffn_gate_inp_shexp.weight`` ne ``[n_embd, 1]`` ->
    ``[n_embd]``). Only where things sit and their types change, never a source."""
    from nexlab.quantize import plan_types  # noqa: PLC0415  (quantize imports nothing of this module)

    by_name = {t.name: t for t in plan}
    if len(by_name) != len(plan):
        raise ValueError("duplicate tensor names in the plan")
    plans = plan_types([(t.name, t.shape, QT(t.ggml_type).name) for t in plan], variant, hp.n_layer,
                       n_expert=hp.n_expert)
    return [replace(by_name[p.name], ggml_type=QT[p.target_type], shape=ggml_n_dims_shape(by_name[p.name].shape))
            for p in plans]


def file_type(variant: str, plan: list[TensorSpec]):
    """``general.file_type`` of the file: MOSTLY_NVFP4 for a bf16 file with NVFP4 tensors (the
    converter's choice), MOSTLY_BF16 without, MOSTLY_Q8_0 / MOSTLY_Q4_K_M for the variants."""
    import gguf  # noqa: PLC0415

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
