"""The hyper-parameters of a qwen35moe model, in llama.cpp's names, from config.json or from a GGUF.

:class:`HParams` holds what llama.cpp's qwen35moe loader reads (``llama_hparams``: layers, widths,
heads, experts, the Gated DeltaNet ``ssm_*`` sizes, ``recurrent[i]`` = ``is_recr(i)``, RoPE) and
derives the sizes the memory and roofline models need (``n_embd_k_gqa``, ``n_embd_r``,
``n_embd_s``, ...). Two readers fill it:

- :func:`hparams_from_hf_config`: a Hugging Face ``config.json`` (top level or ``text_config``) of
  ``Qwen3_5MoeForConditionalGeneration`` / ``Qwen3_5MoeForCausalLM``, as llama.cpp's converter maps it;
- :func:`hparams_from_gguf`: a qwen35moe GGUF's ``qwen35moe.*`` keys, as ``src/models/qwen35moe.cpp``
  loads them.

:func:`nex_n2_mini` is the published model's; :class:`LinearAttnDims` the linear-attention head
layout the transforms of :mod:`nexlab.model.qwen35moe` use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import gguf

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.model.config import real_config

ARCH = "qwen35moe"


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
                raise NexlabError(f"model hyperparameter {f} must be a positive int, got {v!r}")
        if len(self.recurrent) != self.n_layer:
            raise NexlabError(f"recurrent has {len(self.recurrent)} entries, expected n_layer={self.n_layer}")
        if self.arch != ARCH:
            raise NexlabError(f"unsupported architecture {self.arch!r}: only {ARCH} is modelled")
        if self.ssm_dt_rank % self.ssm_n_group:
            raise NexlabError(f"linear value heads ({self.ssm_dt_rank}) must be a multiple of the key heads "
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
        raise NexlabError(f"{where} lacks {key!r}")
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
        raise NexlabTypeError(f"config must be a dict, got {type(config).__name__}")
    archs = set(config.get("architectures") or [])
    text = {**config, **(config.get("text_config") or {})}
    mtypes = {config.get("model_type"), text.get("model_type")}
    if not (archs & _SUPPORTED_HF or mtypes & _SUPPORTED_MODEL_TYPES):
        raise NexlabError(f"unsupported architecture {sorted(archs) or sorted(t for t in mtypes if t)}: "
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
            raise NexlabError(f"config layer_types has {len(lt)} entries, num_hidden_layers is {n_layer}")
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
    """Nex-N2-mini's hyper-parameters (from :func:`nexlab.model.config.real_config`), with its vision tower."""

    return hparams_from_hf_config(real_config(), name="Nex-N2-mini")


def _gguf_value(reader, key: str, default: Any = None, required: bool = True):
    """A metadata value through gguf-py's ``ReaderField.contents()``."""
    f = reader.get_field(key)
    if f is None:
        if required and default is None:
            raise NexlabError(f"GGUF lacks metadata key {key!r}")
        return default
    return f.contents()


def hparams_from_gguf(reader_or_path, name: str | None = None) -> HParams:
    """Read a qwen35moe GGUF's metadata the way llama.cpp's loader does (qwen35moe.cpp).

    Takes a path or an open ``gguf.GGUFReader``.
    """

    if isinstance(reader_or_path, gguf.GGUFReader):
        reader = reader_or_path
        where = name or str(getattr(reader.data, "filename", "GGUF"))
    else:
        reader = gguf.GGUFReader(str(reader_or_path))
        where = name or str(reader_or_path).rsplit("/", 1)[-1]
    arch = _gguf_value(reader, "general.architecture")
    if arch != ARCH:
        raise NexlabError(f"unsupported architecture {arch!r} in {where}: only {ARCH} is modelled")

    def k(s):
        return f"{arch}.{s}"

    n_layer = int(_gguf_value(reader, k("block_count")))
    n_embd = int(_gguf_value(reader, k("embedding_length")))
    n_head = int(_gguf_value(reader, k("attention.head_count")))
    n_head_kv = _gguf_value(reader, k("attention.head_count_kv"), n_head)
    if isinstance(n_head_kv, list):  # per-layer array: the full-attention layers' value counts
        vals = {int(v) for v in n_head_kv if int(v) > 0}
        if len(vals) != 1:
            raise NexlabError(f"{where}: per-layer head_count_kv {n_head_kv} is not uniform")
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
        raise NexlabError(f"{where}: tensor token_embd.weight missing")
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
