"""Memory sizing for a hybrid (Gated DeltaNet + full attention) MoE model in llama.cpp.

Everything here is byte arithmetic that mirrors what llama.cpp 0.3.36 (the tree vendored by
llama-cpp-python 0.3.36) allocates; the tests compare every number with llama.cpp itself:

* **GGUF file size** (:func:`gguf_file_size`): gguf-py's ``GGUFWriter`` and llama.cpp's
  ``llama-quantize`` both write a 24-byte header, the key/value metadata, the tensor infos,
  zero padding to ``general.alignment`` (default 32), then each tensor's data padded to the
  alignment (the last one too). Tensor data is ``ne0 / block_size * type_size`` bytes per row
  (``gguf.GGML_QUANT_SIZES``: NVFP4 36 B per 64, Q4_K 144/256, Q5_K 176/256, Q6_K 210/256,
  Q8_0 34/32, BF16/F16 2, F32 4).
* **Weights in memory** (:func:`weights_bytes`): the sum of the tensors' ``ggml_nbytes``; this
  is what ``llama_model_size()`` reports.
* **KV cache** (:func:`kv_cache_size`): llama-context.cpp pads ``n_ctx`` to a multiple of 256;
  with ``kv_unified=False`` (llama.cpp's default) each of the ``n_seq`` sequences gets its own
  stream of ``n_ctx_seq = pad(n_ctx / n_seq, 256)`` cells and ``n_ctx`` becomes
  ``n_ctx_seq * n_seq``; with ``kv_unified=True`` one stream holds ``n_ctx`` cells. Each
  full-attention layer holds a K tensor ``[n_embd_k_gqa, n_ctx_seq, n_stream]`` of type_k and a
  V tensor of type_v (llama-kv-cache.cpp). Linear-attention layers have no KV cache.
* **Recurrent state** (:func:`recurrent_size`): llama-memory-recurrent.cpp allocates, per
  linear-attention layer, ``r`` = F32 ``[n_embd_r, mem_size * (1 + n_rs_seq)]`` and ``s`` = F32
  ``[n_embd_s, mem_size * (1 + n_rs_seq)]`` with ``mem_size = max(1, n_seq)``,
  ``n_embd_r = (d_conv - 1) * (d_inner + 2 * n_group * d_state)`` and
  ``n_embd_s = d_state * d_inner``; it does not depend on the context length.
* **mmproj** (:func:`mmproj_size`): the Qwen3-VL vision tower as llama.cpp's converter writes it.

The "reported" sizes are what llama.cpp prints in its ``llama_kv_cache: size = ...`` and
``llama_memory_recurrent: size = ...`` lines (sum of ``ggml_nbytes``); the backend buffer adds
at most one alignment per tensor (CPU 32 B, so nothing for these shapes).
"""

from __future__ import annotations

import argparse
import json
import math
import re as _re
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

__all__ = [
    "GGUF_ALIGNMENT", "KV_CACHE_TYPES", "VARIANTS", "GPUS", "HybridModel", "TensorSpec",
    "ContextOverflowWarning", "KVCacheSize", "RecurrentSize", "MemoryEstimate",
    "nex_n2_mini", "model_from_hf_config", "model_from_gguf", "load_model",
    "tensor_nbytes", "gguf_tensor_specs", "retype_tensor_specs", "choose_type", "weights_bytes",
    "gguf_value_nbytes", "gguf_header_nbytes", "gguf_file_size", "gguf_file_size_from_gguf",
    "kv_cache_size", "recurrent_size", "mmproj_size", "estimate", "register_cli",
]

GGUF_ALIGNMENT = 32  # gguf.GGUF_DEFAULT_ALIGNMENT, used unless general.alignment says otherwise
_CTX_PAD = 256       # llama-context.cpp: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)
LLAMA_MAX_SEQ = 256  # llama-cparams.h

# --cache-type-k/-v values llama.cpp accepts (common/arg.cpp kv_cache_types)
KV_CACHE_TYPES: dict[str, QT] = {
    "f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0,
    "q4_1": QT.Q4_1, "iq4_nl": QT.IQ4_NL, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1,
}

# variant -> (llama file type name, default type for quantizable 2-D weights)
VARIANTS: dict[str, QT] = {"bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_k_m": QT.Q4_K}

# Device memory in bytes as the driver reports it (nvidia-smi "Total", MiB), or the nominal
# size for the DGX Spark, whose 128 GB LPDDR5x is shared with the CPU and the OS.
GPUS: dict[str, int] = {
    "RTX 4090 (24 GB)": 24564 * 2**20,
    "RTX 5090 (32 GB)": 32607 * 2**20,
    "H100 SXM (80 GB)": 81559 * 2**20,
    "DGX Spark (128 GB unified)": 128 * 2**30,
    "H200 (141 GB)": 143771 * 2**20,
}

_SUPPORTED_HF = {"Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"}
_SUPPORTED_MODEL_TYPES = {"qwen3_5_moe", "qwen3_5_moe_text"}
_SUPPORTED_GGUF_ARCH = "qwen35moe"


class ContextOverflowWarning(UserWarning):
    """n_ctx_seq exceeds the trained context (llama.cpp logs the same warning and proceeds)."""


# ---------------------------------------------------------------------------------------------
# model description
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HybridModel:
    """The hyperparameters that size a qwen35moe model's weights and caches (llama.cpp names).

    ``recurrent[i]`` is llama.cpp's ``hparams.is_recr(i)``: True for a linear-attention
    (Gated DeltaNet) layer, False for a full-attention layer.
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
    arch: str = _SUPPORTED_GGUF_ARCH
    name: str = "model"
    vision: dict | None = None

    def __post_init__(self):
        for f in ("n_layer", "n_embd", "n_vocab", "n_head", "n_head_kv", "head_dim_k", "head_dim_v",
                  "n_expert", "n_expert_used", "n_ff_exp", "n_ff_shexp", "ssm_d_conv", "ssm_d_state",
                  "ssm_n_group", "ssm_dt_rank", "ssm_d_inner", "n_ctx_train"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model hyperparameter {f} must be a positive int, got {v!r}")
        if len(self.recurrent) != self.n_layer:
            raise ValueError(f"recurrent has {len(self.recurrent)} entries, expected n_layer={self.n_layer}")
        if self.arch != _SUPPORTED_GGUF_ARCH:
            raise ValueError(f"unsupported architecture {self.arch!r}: only {_SUPPORTED_GGUF_ARCH} is sized")

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
        """llama_hparams::n_embd_r(): conv state floats per sequence (Mamba-style, d_conv - 1 columns)."""
        return (self.ssm_d_conv - 1) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    @property
    def n_embd_s(self) -> int:
        """llama_hparams::n_embd_s(): delta-rule state floats per sequence."""
        return self.ssm_d_state * self.ssm_d_inner

    def with_full_attention(self) -> "HybridModel":
        """The same model with full attention in every layer (for the hybrid-vs-dense comparison)."""
        return replace(self, recurrent=(False,) * self.n_layer, name=self.name + " (all full attention)")


# Nex-N2-mini = Qwen3.5-35B-A3B text architecture (FACTS.md); used when nexlab.config is absent.
_NEX_N2_MINI_HF = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "model_type": "qwen3_5_moe",
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 40,
        "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
        "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "vocab_size": 248320,
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    },
    "vision_config": {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
        "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 2048,
        "in_channels": 3, "num_position_embeddings": 2304, "deepstack_visual_indexes": [],
    },
}


def nex_n2_mini() -> HybridModel:
    """Nex-N2-mini's shape: from ``nexlab.config.real_config()`` when available, else FACTS.md."""
    try:
        from nexlab.config import real_config  # noqa: PLC0415
        cfg = real_config()
    except ImportError:
        cfg = _NEX_N2_MINI_HF
    m = model_from_hf_config(cfg, name="Nex-N2-mini")
    if m.vision is None:
        m = replace(m, vision=dict(_NEX_N2_MINI_HF["vision_config"]))
    return m


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"{where} lacks {key!r}")
    return d[key]


def model_from_hf_config(config: dict, name: str = "model") -> HybridModel:
    """Read a Hugging Face ``config.json`` dict (top level or nested ``text_config``)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    archs = set(config.get("architectures") or [])
    text = {**config, **(config.get("text_config") or {})}
    mtypes = {config.get("model_type"), text.get("model_type")}
    if not (archs & _SUPPORTED_HF or mtypes & _SUPPORTED_MODEL_TYPES):
        raise ValueError(f"unsupported architecture {sorted(archs) or sorted(t for t in mtypes if t)}: "
                         f"only Qwen3.5-MoE ({', '.join(sorted(_SUPPORTED_HF))}) is sized")
    w = "config"
    n_layer = int(_need(text, "num_hidden_layers", w))
    n_head = int(_need(text, "num_attention_heads", w))
    n_embd = int(_need(text, "hidden_size", w))
    head_dim = int(text.get("head_dim") or n_embd // n_head)
    if text.get("layer_types") is not None:
        lt = list(text["layer_types"])
        if len(lt) != n_layer:
            raise ValueError(f"layer_types has {len(lt)} entries, expected num_hidden_layers={n_layer}")
        recurrent = tuple(t == "linear_attention" for t in lt)
    else:
        interval = int(text.get("full_attention_interval", 4))
        recurrent = tuple((i + 1) % interval != 0 for i in range(n_layer))
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return HybridModel(
        n_layer=n_layer, n_embd=n_embd, n_vocab=int(_need(text, "vocab_size", w)), n_head=n_head,
        n_head_kv=int(_need(text, "num_key_value_heads", w)), head_dim_k=head_dim, head_dim_v=head_dim,
        n_expert=int(_need(text, "num_experts", w)), n_expert_used=int(_need(text, "num_experts_per_tok", w)),
        n_ff_exp=int(_need(text, "moe_intermediate_size", w)),
        n_ff_shexp=int(_need(text, "shared_expert_intermediate_size", w)),
        ssm_d_conv=int(_need(text, "linear_conv_kernel_dim", w)),
        ssm_d_state=int(_need(text, "linear_key_head_dim", w)),
        ssm_n_group=int(_need(text, "linear_num_key_heads", w)),
        ssm_dt_rank=int(_need(text, "linear_num_value_heads", w)),
        ssm_d_inner=int(text["linear_num_value_heads"]) * int(_need(text, "linear_value_head_dim", w)),
        recurrent=recurrent, n_ctx_train=int(text.get("max_position_embeddings", 262144)),
        tied_embeddings=bool(tied), name=name, vision=config.get("vision_config"),
    )


def _field(reader: "gguf.GGUFReader", key: str, default: Any = None, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ValueError(f"GGUF lacks metadata key {key!r}")
        return default
    return f.contents()


def model_from_gguf(path: str | Path, name: str | None = None) -> HybridModel:
    """Read a qwen35moe GGUF's metadata the way llama.cpp's loader does (qwen35moe.cpp)."""
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != _SUPPORTED_GGUF_ARCH:
        raise ValueError(f"unsupported architecture {arch!r} in {path}: only {_SUPPORTED_GGUF_ARCH} is sized")
    k = lambda s: f"{arch}.{s}"  # noqa: E731
    n_layer = int(_field(reader, k("block_count")))
    n_embd = int(_field(reader, k("embedding_length")))
    n_head = int(_field(reader, k("attention.head_count")))
    n_head_kv = _field(reader, k("attention.head_count_kv"), n_head)
    if isinstance(n_head_kv, list):  # per-layer array: the full-attention layers' value counts
        vals = {int(v) for v in n_head_kv if int(v) > 0}
        if len(vals) != 1:
            raise ValueError(f"{path}: per-layer head_count_kv {n_head_kv} is not uniform")
        n_head_kv = vals.pop()
    head_k = int(_field(reader, k("attention.key_length"), n_embd // n_head))
    head_v = int(_field(reader, k("attention.value_length"), n_embd // n_head))
    recr = _field(reader, k("attention.recurrent_layers"), required=False)
    if recr is not None:
        recurrent = tuple(bool(x) for x in recr)[:n_layer]
    else:
        interval = int(_field(reader, k("full_attention_interval"), 4))
        recurrent = tuple((i + 1) % interval != 0 for i in range(n_layer))
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: tensor token_embd.weight missing")
    n_vocab = int(names["token_embd.weight"].shape[1])
    ff_exp = _field(reader, k("expert_feed_forward_length"))
    if isinstance(ff_exp, list):
        ff_exp = max(int(v) for v in ff_exp)
    return HybridModel(
        n_layer=n_layer, n_embd=n_embd, n_vocab=n_vocab, n_head=n_head, n_head_kv=int(n_head_kv),
        head_dim_k=head_k, head_dim_v=head_v, n_expert=int(_field(reader, k("expert_count"))),
        n_expert_used=int(_field(reader, k("expert_used_count"))), n_ff_exp=int(ff_exp),
        n_ff_shexp=int(_field(reader, k("expert_shared_feed_forward_length"), int(ff_exp))),
        ssm_d_conv=int(_field(reader, k("ssm.conv_kernel"))), ssm_d_state=int(_field(reader, k("ssm.state_size"))),
        ssm_n_group=int(_field(reader, k("ssm.group_count"))), ssm_dt_rank=int(_field(reader, k("ssm.time_step_rank"))),
        ssm_d_inner=int(_field(reader, k("ssm.inner_size"))), recurrent=recurrent,
        n_ctx_train=int(_field(reader, k("context_length"))), tied_embeddings="output.weight" not in names,
        name=name or Path(path).name,
    )


def load_model(spec: str | Path) -> HybridModel:
    """``nex-n2-mini``, a ``config.json`` (or a checkpoint folder holding one), or a ``.gguf`` file."""
    s = str(spec)
    if s.lower() in ("nex-n2-mini", "nex_n2_mini"):
        return nex_n2_mini()
    p = Path(s)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"model {s!r} is neither 'nex-n2-mini' nor an existing config.json / .gguf")
    if p.suffix == ".gguf":
        return model_from_gguf(p)
    return model_from_hf_config(json.loads(p.read_text()), name=p.parent.name or p.name)


# ---------------------------------------------------------------------------------------------
# tensors and GGUF size
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: name, ggml shape ``ne`` (fastest dimension first) and ggml type."""

    name: str
    ne: tuple[int, ...]
    qtype: QT

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.ne, self.qtype)


def tensor_nbytes(ne: Sequence[int], qtype: QT | int) -> int:
    """``ggml_nbytes`` of a contiguous tensor: ``prod(ne[1:]) * ne[0] / block_size * type_size``."""
    qtype = QT(qtype)
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise ValueError(f"unknown ggml type {qtype!r}")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    ne = [int(n) for n in ne]
    if not ne or any(n < 0 for n in ne):
        raise ValueError(f"bad tensor shape {ne}")
    if ne[0] % block:
        raise ValueError(f"row of {ne[0]} values is not a multiple of {qtype.name}'s block of {block}")
    return math.prod(ne[1:]) * (ne[0] // block) * size


def gguf_tensor_specs(model: HybridModel, nvfp4_scope: str = "mlp") -> list[TensorSpec]:
    """The tensors a BF16 conversion of ``model`` holds, in converter types (the "bf16" variant).

    Matches llama.cpp's converter (conversion/qwen.py + base.py): norms and 1-D tensors F32,
    routers (ffn_gate_inp, ffn_gate_inp_shexp) and ssm_conv1d F32, every other 2-D/3-D weight
    BF16. ``nvfp4_scope="mlp"`` keeps the routed and shared experts NVFP4 as the Nex-N2-mini
    checkpoint has them, with the per-tensor ``.scale`` and ``.input_scale`` F32 tensors
    (``[1]`` dense, ``[n_expert]`` stacked); ``"none"`` makes them BF16 too.
    """
    if nvfp4_scope not in ("mlp", "none"):
        raise ValueError(f"nvfp4_scope must be 'mlp' or 'none', got {nvfp4_scope!r}")
    m = model
    F32, BF16, NV = QT.F32, QT.BF16, QT.NVFP4
    mlp_t = NV if nvfp4_scope == "mlp" else BF16
    out = [TensorSpec("token_embd.weight", (m.n_embd, m.n_vocab), BF16),
           TensorSpec("output_norm.weight", (m.n_embd,), F32)]
    if not m.tied_embeddings:
        out.append(TensorSpec("output.weight", (m.n_embd, m.n_vocab), BF16))
    key_dim = m.ssm_d_state * m.ssm_n_group
    value_dim = m.ssm_d_inner
    conv_dim = 2 * key_dim + value_dim
    head_v_dim = m.ssm_d_inner // m.ssm_dt_rank
    for il in range(m.n_layer):
        b = f"blk.{il}."
        t = [TensorSpec(b + "attn_norm.weight", (m.n_embd,), F32),
             TensorSpec(b + "post_attention_norm.weight", (m.n_embd,), F32)]
        if not m.recurrent[il]:
            t += [TensorSpec(b + "attn_q.weight", (m.n_embd, m.head_dim_k * m.n_head * 2), BF16),
                  TensorSpec(b + "attn_k.weight", (m.n_embd, m.n_embd_k_gqa), BF16),
                  TensorSpec(b + "attn_v.weight", (m.n_embd, m.n_embd_v_gqa), BF16),
                  TensorSpec(b + "attn_output.weight", (m.head_dim_k * m.n_head, m.n_embd), BF16),
                  TensorSpec(b + "attn_q_norm.weight", (m.head_dim_k,), F32),
                  TensorSpec(b + "attn_k_norm.weight", (m.head_dim_k,), F32)]
        else:
            t += [TensorSpec(b + "attn_qkv.weight", (m.n_embd, conv_dim), BF16),
                  TensorSpec(b + "attn_gate.weight", (m.n_embd, value_dim), BF16),
                  TensorSpec(b + "ssm_conv1d.weight", (m.ssm_d_conv, conv_dim), F32),
                  TensorSpec(b + "ssm_dt.bias", (m.ssm_dt_rank,), F32),
                  TensorSpec(b + "ssm_a", (m.ssm_dt_rank,), F32),
                  TensorSpec(b + "ssm_beta.weight", (m.n_embd, m.ssm_dt_rank), BF16),
                  TensorSpec(b + "ssm_alpha.weight", (m.n_embd, m.ssm_dt_rank), BF16),
                  TensorSpec(b + "ssm_norm.weight", (head_v_dim,), F32),
                  TensorSpec(b + "ssm_out.weight", (value_dim, m.n_embd), BF16)]
        t.append(TensorSpec(b + "ffn_gate_inp.weight", (m.n_embd, m.n_expert), F32))
        for proj, ne in (("gate", (m.n_embd, m.n_ff_exp, m.n_expert)), ("up", (m.n_embd, m.n_ff_exp, m.n_expert)),
                         ("down", (m.n_ff_exp, m.n_embd, m.n_expert))):
            t.append(TensorSpec(b + f"ffn_{proj}_exps.weight", ne, mlp_t))
            if mlp_t == NV:
                t += [TensorSpec(b + f"ffn_{proj}_exps.scale", (m.n_expert,), F32),
                      TensorSpec(b + f"ffn_{proj}_exps.input_scale", (m.n_expert,), F32)]
        t.append(TensorSpec(b + "ffn_gate_inp_shexp.weight", (m.n_embd,), F32))
        for proj, ne in (("gate", (m.n_embd, m.n_ff_shexp)), ("up", (m.n_embd, m.n_ff_shexp)),
                         ("down", (m.n_ff_shexp, m.n_embd))):
            t.append(TensorSpec(b + f"ffn_{proj}_shexp.weight", ne, mlp_t))
            if mlp_t == NV:
                t += [TensorSpec(b + f"ffn_{proj}_shexp.scale", (1,), F32),
                      TensorSpec(b + f"ffn_{proj}_shexp.input_scale", (1,), F32)]
        out += t
    return out


def _allows_quantization(name: str, ne: Sequence[int]) -> bool:
    """llama-quant.cpp tensor_allows_quantization(), restricted to the names a qwen35moe GGUF has."""
    if len([n for n in ne]) < 2 or (len(ne) >= 2 and all(n == 1 for n in ne[1:])):
        return False  # ggml_n_dims < 2
    return (name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name
            and "ssm_conv1d" not in name)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(qtype: QT, ne0: int) -> QT:
    """llama-quant.cpp tensor_type_fallback() for the types a Q4_K_M / Q8_0 mix uses."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if ne0 % block == 0:
        return qtype
    alt = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}.get(qtype, qtype)
    if ne0 % gguf.GGML_QUANT_SIZES[alt][0]:
        alt = QT.F16
    return alt


def choose_type(spec: TensorSpec, variant: str, n_layer: int, attn_v_index: int, n_attn_v: int,
                n_expert: int = 0) -> QT:
    """Target type of one tensor in a ``variant`` conversion with NVFP4 tensors kept NVFP4.

    Local re-statement of llama-quant.cpp's llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M
    and MOSTLY_Q8_0 (llama-quantize run with a tensor-type override that keeps NVFP4): output
    Q6_K (Q8_0 in Q8_0), attn_v/attn_qkv Q6_K where use_more_bits(attn_v counter), ffn_down*
    Q6_K where use_more_bits(layer), with exactly 8 experts attn_v/attn_qkv/attn_k Q8_0 and
    attn_output Q5_K; every other quantizable tensor the default type; K-quants fall back when
    ne0 is not a multiple of 256. ``bf16`` is the converter's output as is. (Fallback for when
    ``nexlab.quantize`` is absent; the tests compare both with llama_model_quantize.)
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if spec.qtype == QT.NVFP4 or variant == "bf16":
        return spec.qtype
    if not _allows_quantization(spec.name, spec.ne):
        return spec.qtype
    default = VARIANTS[variant]
    name = spec.name
    new = default
    if name == "output.weight":
        new = QT.Q8_0 if (spec.ne[0] % 256 or default == QT.Q8_0) else QT.Q6_K
        return new  # the output branch skips the generic fallback only for block sizes it already chose
    if "attn_qkv.weight" in name or "attn_v.weight" in name:
        if variant == "q4_k_m" and _use_more_bits(attn_v_index, n_attn_v):
            new = QT.Q6_K
        if n_expert == 8:  # llama-quant.cpp: "for the 8-expert model, bumping this to Q8_0"
            new = QT.Q8_0
    elif "attn_k.weight" in name:
        if n_expert == 8:
            new = QT.Q8_0
    elif "attn_output.weight" in name:
        if n_expert == 8 and variant == "q4_k_m":
            new = QT.Q5_K
    elif variant == "q4_k_m":
        if "ffn_down" in name:
            layer = int(name.split(".")[1])
            if _use_more_bits(layer, n_layer):
                new = QT.Q6_K
    return _fallback(new, spec.ne[0])


def retype_tensor_specs(specs: Iterable[TensorSpec], variant: str, n_layer: int, n_expert: int = 0,
                        use_external: bool = True) -> list[TensorSpec]:
    """Apply the variant's type mix to every tensor (result in the input order).

    Uses ``nexlab.quantize.plan_types`` (the kquants helper's restatement of llama-quantize, the
    rule nexlab's writer uses) when it exists and ``use_external``; otherwise the local
    :func:`choose_type` with the attn_v counter in file order (equal for qwen35moe, where every
    layer holds exactly one attn_v-like tensor). NVFP4 tensors stay NVFP4 either way.
    """
    specs = list(specs)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if use_external:
        try:
            from nexlab.quantize import plan_types  # noqa: PLC0415
        except ImportError:
            plan_types = None
        if plan_types is not None:
            plans = plan_types([(s.name, tuple(reversed(s.ne)), s.qtype.name) for s in specs], variant, n_layer,
                               n_expert=n_expert)
            by_name = {p.name: QT[p.target_type] for p in plans}
            return [TensorSpec(s.name, s.ne, by_name[s.name]) for s in specs]
    n_attn_v = sum(1 for s in specs if "attn_v.weight" in s.name or "attn_qkv.weight" in s.name)
    out, i_v = [], 0
    for s in specs:
        t = choose_type(s, variant, n_layer, i_v, n_attn_v, n_expert)
        if "attn_v.weight" in s.name or "attn_qkv.weight" in s.name:
            i_v += 1
        out.append(TensorSpec(s.name, s.ne, t))
    return out


def weights_bytes(specs: Iterable[TensorSpec]) -> int:
    """Sum of the tensors' ``ggml_nbytes``; equals llama.cpp's ``llama_model_size()``."""
    return sum(s.nbytes for s in specs)


_SIMPLE = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4, VT.FLOAT32: 4,
           VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}


def gguf_value_nbytes(value: Any, vtype: VT, sub_type: VT | None = None) -> int:
    """Bytes of one GGUF metadata value *without* its leading type tag (GGUF v3 encoding).

    Strings are a u64 length then UTF-8 bytes; arrays are a u32 element type, a u64 count and
    the elements (strings each with their own u64 length).
    """
    vtype = VT(vtype)
    if vtype in _SIMPLE:
        return _SIMPLE[vtype]
    if vtype == VT.STRING:
        return 8 + len(value.encode("utf-8") if isinstance(value, str) else bytes(value))
    if vtype == VT.ARRAY:
        if sub_type is None:
            raise ValueError("array metadata value needs its element type")
        sub_type = VT(sub_type)
        if sub_type == VT.STRING:
            return 12 + sum(gguf_value_nbytes(v, VT.STRING) for v in value)
        if sub_type == VT.ARRAY:
            raise ValueError("nested metadata arrays are not sized")
        return 12 + len(value) * _SIMPLE[sub_type]
    raise ValueError(f"unknown GGUF value type {vtype!r}")


def gguf_header_nbytes(metadata: Iterable[tuple[str, Any, VT, VT | None]], tensor_names_ndims: Iterable[tuple[str, int]],
                       alignment: int = GGUF_ALIGNMENT) -> int:
    """Bytes before the first tensor's data: header, KV pairs, tensor infos, padding to ``alignment``.

    Per KV pair: key string (u64 + bytes), u32 value type, value. Per tensor info: name string,
    u32 n_dims, u64 per dimension, u32 type, u64 offset (gguf_writer.py write_ti_data_to_file).
    """
    n = 4 + 4 + 8 + 8  # magic, version, n_tensors, n_kv
    for key, value, vtype, sub in metadata:
        n += gguf_value_nbytes(key, VT.STRING) + 4 + gguf_value_nbytes(value, vtype, sub)
    for name, ndims in tensor_names_ndims:
        n += gguf_value_nbytes(name, VT.STRING) + 4 + 8 * ndims + 4 + 8
    return -(-n // alignment) * alignment


def gguf_file_size(specs: Iterable[TensorSpec], header_nbytes: int, alignment: int = GGUF_ALIGNMENT) -> int:
    """Header (already padded) plus every tensor's data padded to ``alignment``."""
    return header_nbytes + sum(-(-s.nbytes // alignment) * alignment for s in specs)


def _specs_of_gguf(reader: "gguf.GGUFReader") -> list[TensorSpec]:
    return [TensorSpec(t.name, tuple(int(x) for x in t.shape), QT(int(t.tensor_type))) for t in reader.tensors]


def gguf_file_size_from_gguf(path: str | Path, variant: str | None = None,
                             extra_metadata: Iterable[tuple[str, Any, VT, VT | None]] = ()) -> dict:
    """Predict the size of ``path`` re-typed to ``variant`` (None: as is), from its own header.

    The header keeps its size when only types change (``general.file_type`` is a u32), except
    that a quantized variant (q8_0, q4_k_m) is written as llama_model_quantize writes it: tensor
    shapes lose trailing 1-dims (``ggml_n_dims``), 8 bytes of tensor info each (the converter
    writes ``ffn_gate_inp_shexp`` as [n, 1]). Keys a quantizer adds (e.g.
    ``quantize.imatrix.*``) go in ``extra_metadata``.
    """
    reader = gguf.GGUFReader(str(path))
    align = int(reader.alignment)
    specs = _specs_of_gguf(reader)
    n_layer = 1 + max((int(s.name.split(".")[1]) for s in specs if s.name.startswith("blk.")), default=-1)
    dropped_dims = 0
    if variant is not None:
        n_expert = int(_field(reader, f"{_field(reader, 'general.architecture')}.expert_count", 0, required=False) or 0)
        specs = retype_tensor_specs(specs, variant, n_layer, n_expert)
        if variant != "bf16":
            trimmed = [replace(s, ne=_ggml_n_dims_shape(s.ne)) for s in specs]
            dropped_dims = sum(len(a.ne) - len(b.ne) for a, b in zip(specs, trimmed))
            specs = trimmed
    extra = sum(gguf_value_nbytes(k, VT.STRING) + 4 + gguf_value_nbytes(v, t, st)
                for k, v, t, st in extra_metadata) - 8 * dropped_dims
    header = -(-(_unpadded_header_end(reader) + extra) // align) * align
    return {"file_bytes": gguf_file_size(specs, header, align), "header_bytes": header,
            "weights_bytes": weights_bytes(specs), "specs": specs, "alignment": align}


def _ggml_n_dims_shape(ne: tuple[int, ...]) -> tuple[int, ...]:
    """``ne`` without trailing 1-dims, at least one dimension kept (ggml_n_dims)."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return tuple(ne[:n])


def _unpadded_header_end(reader: "gguf.GGUFReader") -> int:
    """End of the last KV pair or tensor info (what gguf-py parsed), before alignment padding."""
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    return max(int(f.offset) + sum(int(p.nbytes) for p in f.parts) for f in fields)


def _converter_metadata(model: HybridModel, variant: str) -> list[tuple[str, Any, VT, VT | None]]:
    """Approximate metadata of a converted Nex-N2-mini GGUF (the tokenizer part is estimated)."""
    a = model.arch
    md: list[tuple[str, Any, VT, VT | None]] = [
        ("general.architecture", a, VT.STRING, None), ("general.type", "model", VT.STRING, None),
        ("general.name", model.name, VT.STRING, None), ("general.file_type", 0, VT.UINT32, None),
        ("general.quantization_version", 2, VT.UINT32, None),
    ]
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                "attention.key_length", "attention.value_length", "expert_count", "expert_used_count",
                "expert_feed_forward_length", "expert_shared_feed_forward_length", "ssm.conv_kernel",
                "ssm.state_size", "ssm.group_count", "ssm.time_step_rank", "ssm.inner_size",
                "full_attention_interval", "vocab_size"):
        md.append((f"{a}.{key}", 0, VT.UINT32, None))
    md += [(f"{a}.rope.freq_base", 0.0, VT.FLOAT32, None),
           (f"{a}.attention.layer_norm_rms_epsilon", 0.0, VT.FLOAT32, None),
           (f"{a}.rope.dimension_sections", [0, 0, 0, 0], VT.ARRAY, VT.INT32),
           (f"{a}.attention.recurrent_layers", list(model.recurrent), VT.ARRAY, VT.BOOL)]
    # tokenizer: tokens (avg ~6.6 UTF-8 bytes for Qwen's 248k BPE vocabulary), token types, merges
    # (~n_vocab merges of ~12 bytes). Estimate; exact only from a real GGUF header.
    n = model.n_vocab
    md.append(("tokenizer.ggml.model", "gpt2", VT.STRING, None))
    md.append(("tokenizer.ggml.pre", "qwen35", VT.STRING, None))
    return md


def _tokenizer_estimate_bytes(n_vocab: int) -> int:
    tokens = 12 + n_vocab * (8 + 7)          # string array
    types = 12 + n_vocab * 4                 # int32 array
    merges = 12 + (n_vocab - 1000) * (8 + 12)
    return tokens + types + merges + 4096    # special-token ids, chat template


# ---------------------------------------------------------------------------------------------
# KV cache and recurrent state
# ---------------------------------------------------------------------------------------------

def _cache_type(t: str | QT) -> QT:
    if isinstance(t, QT):
        if t not in KV_CACHE_TYPES.values():
            raise ValueError(f"unsupported cache type {t.name}: choose one of {', '.join(KV_CACHE_TYPES)}")
        return t
    key = str(t).lower()
    if key not in KV_CACHE_TYPES:
        raise ValueError(f"unknown cache type {t!r}: choose one of {', '.join(KV_CACHE_TYPES)}")
    return KV_CACHE_TYPES[key]


@dataclass(frozen=True)
class KVCacheSize:
    n_ctx_requested: int
    n_ctx: int          # after llama.cpp's padding / rounding
    n_ctx_seq: int      # cells per stream (llama_kv_cache kv_size)
    n_stream: int
    n_seq: int
    n_layers: int
    type_k: str
    type_v: str
    k_bytes: int
    v_bytes: int
    warnings: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes


def llama_ctx_layout(n_ctx: int, n_seq: int = 1, kv_unified: bool = False) -> tuple[int, int, int]:
    """``(n_ctx, n_ctx_seq, n_stream)`` exactly as llama_context's constructor derives them."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be an int >= 1, got {n_ctx!r}")
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= LLAMA_MAX_SEQ:
        raise ValueError(f"n_seq (parallel sequences) must be an int in [1, {LLAMA_MAX_SEQ}], got {n_seq!r}")
    ctx = -(-n_ctx // _CTX_PAD) * _CTX_PAD
    if kv_unified:
        return ctx, ctx, 1
    ctx_seq = -(-(ctx // n_seq) // _CTX_PAD) * _CTX_PAD
    if ctx_seq == 0:
        raise ValueError("n_ctx_seq == 0")  # llama.cpp throws the same
    return ctx_seq * n_seq, ctx_seq, n_seq


def kv_cache_size(model: HybridModel, n_ctx: int, type_k: str | QT = "f16", type_v: str | QT = "f16",
                  n_seq: int = 1, kv_unified: bool = False, flash_attn: bool = True) -> KVCacheSize:
    """KV cache of the full-attention layers as llama_kv_cache allocates it (exact bytes).

    Per layer: K ``[n_embd_k_gqa, n_ctx_seq, n_stream]`` of type_k and V likewise of type_v
    (without flash attention V is stored transposed with the same element count). A context
    above the trained one gets llama.cpp's warning (as a :class:`ContextOverflowWarning`) and
    the size it would allocate. Quantized V needs flash attention, as in llama.cpp.
    """
    tk, tv = _cache_type(type_k), _cache_type(type_v)
    if not flash_attn and tv not in (QT.F32, QT.F16, QT.BF16):
        raise ValueError(f"quantized V cache ({tv.name.lower()}) requires flash_attn, as in llama.cpp")
    for t, hd in ((tk, model.head_dim_k), (tv, model.head_dim_v)):
        blk = gguf.GGML_QUANT_SIZES[t][0]
        if hd % blk:
            raise ValueError(f"cache type {t.name.lower()} (block {blk}) does not divide head dim {hd}")
    ctx, ctx_seq, n_stream = llama_ctx_layout(n_ctx, n_seq, kv_unified)
    warns = []
    if ctx_seq > model.n_ctx_train:
        msg = (f"n_ctx_seq ({ctx_seq}) > n_ctx_train ({model.n_ctx_train}) -- possible training context overflow")
        warns.append(msg)
        warnings.warn(msg, ContextOverflowWarning, stacklevel=2)
    L = model.n_attn_layers
    kb = L * tensor_nbytes((model.n_embd_k_gqa, ctx_seq, n_stream), tk)
    vb = L * tensor_nbytes((model.n_embd_v_gqa, ctx_seq, n_stream), tv)
    return KVCacheSize(n_ctx, ctx, ctx_seq, n_stream, n_seq, L, tk.name.lower(), tv.name.lower(), kb, vb, tuple(warns))


@dataclass(frozen=True)
class RecurrentSize:
    cells: int
    n_seq: int
    n_rs_seq: int
    n_layers: int
    r_bytes: int
    s_bytes: int

    @property
    def bytes(self) -> int:
        return self.r_bytes + self.s_bytes


def recurrent_size(model: HybridModel, n_seq: int = 1, n_rs_seq: int = 0) -> RecurrentSize:
    """Conv (r) and delta-rule (s) states of the linear-attention layers, F32, per sequence.

    llama_memory_recurrent: ``mem_size = max(1, n_seq_max)`` cells, ``(1 + n_rs_seq)`` rows per
    cell (rollback snapshots; llama.cpp's default is 0), per recurrent layer.
    """
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= LLAMA_MAX_SEQ:
        raise ValueError(f"n_seq must be an int in [1, {LLAMA_MAX_SEQ}], got {n_seq!r}")
    if isinstance(n_rs_seq, bool) or not isinstance(n_rs_seq, int) or n_rs_seq < 0:
        raise ValueError(f"n_rs_seq must be an int >= 0, got {n_rs_seq!r}")
    cells = max(1, n_seq)
    rows = cells * (1 + n_rs_seq)
    L = model.n_recr_layers
    return RecurrentSize(cells, n_seq, n_rs_seq, L, L * tensor_nbytes((model.n_embd_r, rows), QT.F32),
                         L * tensor_nbytes((model.n_embd_s, rows), QT.F32))


# ---------------------------------------------------------------------------------------------
# mmproj
# ---------------------------------------------------------------------------------------------

def mmproj_tensor_specs(vision: dict, dtype: str = "f16") -> list[TensorSpec]:
    """Tensors of a Qwen3-VL-style mmproj as llama.cpp's converter writes it (conversion/qwen3vl.py).

    Conv3d patch embedding split into two 2-D kernels (``v.patch_embd.weight`` and ``.weight.1``,
    in ``dtype``), position embedding F32, per block LayerNorms F32, qkv/out/fc1/fc2 weights in
    ``dtype`` with F32 biases, the patch merger (LayerNorm, fc1, fc2) and one deepstack merger per
    ``deepstack_visual_indexes`` entry.
    """
    wt = {"f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32, "q8_0": QT.Q8_0}.get(dtype)
    if wt is None:
        raise ValueError(f"mmproj dtype must be f16, bf16, f32 or q8_0, got {dtype!r}")
    v = vision
    h, inter, depth = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["depth"])
    p, tp = int(v["patch_size"]), int(v.get("temporal_patch_size", 2))
    merge, out = int(v.get("spatial_merge_size", 2)), int(v["out_hidden_size"])
    cin = int(v.get("in_channels", 3))
    npos = int(v.get("num_position_embeddings", 2304))
    if tp != 2:
        raise ValueError("llama.cpp's converter supports temporal_patch_size 2 only")
    F32 = QT.F32
    patch_t = wt if wt in (QT.F16,) else F32  # MmprojModel.tensor_force_quant: F16 only for an F16 file
    s = [TensorSpec("v.patch_embd.weight", (p, p, cin, h), patch_t),
         TensorSpec("v.patch_embd.weight.1", (p, p, cin, h), patch_t),
         TensorSpec("v.patch_embd.bias", (h,), F32),
         TensorSpec("v.position_embd.weight", (h, npos), F32)]
    for i in range(depth):
        b = f"v.blk.{i}."
        s += [TensorSpec(b + "ln1.weight", (h,), F32), TensorSpec(b + "ln1.bias", (h,), F32),
              TensorSpec(b + "ln2.weight", (h,), F32), TensorSpec(b + "ln2.bias", (h,), F32),
              TensorSpec(b + "attn_qkv.weight", (h, 3 * h), wt), TensorSpec(b + "attn_qkv.bias", (3 * h,), F32),
              TensorSpec(b + "attn_out.weight", (h, h), wt), TensorSpec(b + "attn_out.bias", (h,), F32),
              TensorSpec(b + "ffn_up.weight", (h, inter), wt), TensorSpec(b + "ffn_up.bias", (inter,), F32),
              TensorSpec(b + "ffn_down.weight", (inter, h), wt), TensorSpec(b + "ffn_down.bias", (h,), F32)]
    hm = h * merge * merge
    s += [TensorSpec("v.post_ln.weight", (h,), F32), TensorSpec("v.post_ln.bias", (h,), F32),
          TensorSpec("mm.0.weight", (hm, hm), wt), TensorSpec("mm.0.bias", (hm,), F32),
          TensorSpec("mm.2.weight", (hm, out), wt), TensorSpec("mm.2.bias", (out,), F32)]
    for j in v.get("deepstack_visual_indexes", []) or []:
        b = f"v.deepstack.{j}."
        s += [TensorSpec(b + "norm.weight", (hm,), F32), TensorSpec(b + "norm.bias", (hm,), F32),
              TensorSpec(b + "fc1.weight", (hm, hm), wt), TensorSpec(b + "fc1.bias", (hm,), F32),
              TensorSpec(b + "fc2.weight", (hm, out), wt), TensorSpec(b + "fc2.bias", (out,), F32)]
    return s


def mmproj_size(vision: dict, dtype: str = "f16") -> int:
    """Weight bytes of the mmproj (tensor data; the file adds a few KB of header and padding)."""
    return weights_bytes(mmproj_tensor_specs(vision, dtype))


# ---------------------------------------------------------------------------------------------
# everything together
# ---------------------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    model: str
    variant: str | None
    n_ctx: int
    n_seq: int
    type_k: str
    type_v: str
    weights_bytes: int
    gguf_file_bytes: int
    gguf_file_exact: bool
    kv_bytes: int
    recurrent_bytes: int
    mmproj_bytes: int
    kv: dict = field(default_factory=dict)
    recurrent: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.mmproj_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def estimate(model: HybridModel | str | Path, variant: str | None = "q4_k_m", n_ctx: int = 262144,
             type_k: str = "f16", type_v: str = "f16", n_seq: int = 1, mmproj_bytes: int | None = 0,
             kv_unified: bool = False, n_rs_seq: int = 0, nvfp4_scope: str = "mlp") -> MemoryEstimate:
    """Weights + KV cache + recurrent state + mmproj for one configuration.

    ``model`` may be a :class:`HybridModel`, ``"nex-n2-mini"``, a config.json path or a GGUF path.
    For a GGUF the weights come from its own tensor list (re-typed when ``variant`` is given) and
    the file size from its own header (exact); from a config the header's tokenizer part is an
    estimate (``gguf_file_exact=False``). ``mmproj_bytes=None`` computes it from the vision config.
    Compute buffers (activations) are not included.
    """
    gguf_path = None
    if not isinstance(model, HybridModel):
        if str(model).endswith(".gguf"):
            gguf_path = Path(model)
        model = load_model(model)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kv = kv_cache_size(model, n_ctx, type_k, type_v, n_seq, kv_unified)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    rs = recurrent_size(model, n_seq, n_rs_seq)
    if gguf_path is not None:
        g = gguf_file_size_from_gguf(gguf_path, variant)
        wbytes, fbytes, exact = g["weights_bytes"], g["file_bytes"], True
    else:
        specs = gguf_tensor_specs(model, nvfp4_scope)
        specs = retype_tensor_specs(specs, variant or "bf16", model.n_layer, model.n_expert)
        header = gguf_header_nbytes(_converter_metadata(model, variant or "bf16"),
                                    [(s.name, len(s.ne)) for s in specs])
        header = -(-(header + _tokenizer_estimate_bytes(model.n_vocab)) // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
        wbytes, fbytes, exact = weights_bytes(specs), gguf_file_size(specs, header), False
    if mmproj_bytes is None:
        if not model.vision:
            raise ValueError(f"{model.name} has no vision config: pass mmproj_bytes explicitly")
        mmproj_bytes = mmproj_size(model.vision)
    if isinstance(mmproj_bytes, bool) or not isinstance(mmproj_bytes, int) or mmproj_bytes < 0:
        raise ValueError(f"mmproj_bytes must be an int >= 0, got {mmproj_bytes!r}")
    return MemoryEstimate(
        model=model.name, variant=variant, n_ctx=kv.n_ctx, n_seq=n_seq, type_k=kv.type_k, type_v=kv.type_v,
        weights_bytes=wbytes, gguf_file_bytes=fbytes, gguf_file_exact=exact, kv_bytes=kv.bytes,
        recurrent_bytes=rs.bytes, mmproj_bytes=mmproj_bytes,
        kv={k: v for k, v in asdict(kv).items()} | {"bytes": kv.bytes},
        recurrent=asdict(rs) | {"bytes": rs.bytes}, warnings=list(kv.warnings))


def write_shape_gguf(path: str | Path, model: HybridModel, variant: str = "bf16", nvfp4_scope: str = "mlp",
                     n_ctx_train: int | None = None) -> list[TensorSpec]:
    """Write a GGUF llama.cpp loads, with ``model``'s shapes, the ``variant``'s types and zero weights.

    Only for sizing experiments: llama.cpp allocates its caches from the metadata alone, so the
    weights need no content (all bytes zero, which is a valid block of every ggml type). The
    tokenizer is ``none`` with ``{arch}.vocab_size`` dummy tokens. Written to a temporary name
    in the target folder and renamed. Returns the tensor list written.
    """
    import numpy as np  # noqa: PLC0415

    from nexlab.fileio import atomic_output  # noqa: PLC0415

    path = Path(path)
    specs = retype_tensor_specs(gguf_tensor_specs(model, nvfp4_scope), variant, model.n_layer, model.n_expert)
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, model.arch)
        a = model.arch
        w.add_type("model")
        w.add_name(model.name)
        w.add_file_type({"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[variant])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_block_count(model.n_layer)
        w.add_context_length(n_ctx_train or model.n_ctx_train)
        w.add_embedding_length(model.n_embd)
        w.add_feed_forward_length(model.n_ff_exp)
        w.add_head_count(model.n_head)
        w.add_head_count_kv(model.n_head_kv)
        w.add_key_length(model.head_dim_k)
        w.add_value_length(model.head_dim_v)
        rope_dims = model.head_dim_k // 4
        w.add_rope_dimension_count(rope_dims)
        q = rope_dims // 2
        w.add_rope_dimension_sections([q - 2 * (q // 3), q // 3, q // 3, 0])
        w.add_rope_freq_base(1e7)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_expert_count(model.n_expert)
        w.add_expert_used_count(model.n_expert_used)
        w.add_expert_feed_forward_length(model.n_ff_exp)
        w.add_expert_shared_feed_forward_length(model.n_ff_shexp)
        w.add_ssm_conv_kernel(model.ssm_d_conv)
        w.add_ssm_state_size(model.ssm_d_state)
        w.add_ssm_group_count(model.ssm_n_group)
        w.add_ssm_time_step_rank(model.ssm_dt_rank)
        w.add_ssm_inner_size(model.ssm_d_inner)
        w.add_array(f"{a}.attention.recurrent_layers", [bool(r) for r in model.recurrent])
        w.add_full_attention_interval(4)
        w.add_uint32(f"{a}.vocab_size", model.n_vocab)
        w.add_tokenizer_model("none")
        for s in specs:
            block, size = gguf.GGML_QUANT_SIZES[s.qtype]
            byte_shape = tuple(reversed(s.ne[1:])) + (s.ne[0] // block * size,)
            data = np.zeros(byte_shape, dtype=np.uint8)
            if s.name.endswith(".scale"):
                data = np.ones(tuple(reversed(s.ne)), dtype=np.float32).view(np.uint8).reshape(byte_shape)
            w.add_tensor(s.name, data, raw_dtype=s.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return specs


def fits(total_bytes: int, gpu_bytes: int, reserve_bytes: int = 0) -> tuple[bool, int]:
    """(fits, headroom) of ``total_bytes`` plus a ``reserve`` (compute buffers, CUDA context) on a GPU."""
    head = gpu_bytes - total_bytes - reserve_bytes
    return head >= 0, head


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _fmt(n: int) -> str:
    return f"{n:>15,d} B  {n / 2**20:>11.2f} MiB  {n / 1e9:>8.3f} GB"


def _cli(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():  # printed below as llama.cpp prints it, once
        warnings.simplefilter("ignore", ContextOverflowWarning)
        est = estimate(args.model, variant=args.variant, n_ctx=args.ctx, type_k=args.cache_type_k,
                       type_v=args.cache_type_v, n_seq=args.parallel,
                       mmproj_bytes=args.mmproj, kv_unified=args.kv_unified)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    kv, rs = est.kv, est.recurrent
    print(f"model {est.model}  variant {est.variant}  n_ctx {est.n_ctx} (asked {kv['n_ctx_requested']}, "
          f"{kv['n_stream']} stream(s) x {kv['n_ctx_seq']} cells)  sequences {est.n_seq}")
    print(f"  weights          {_fmt(est.weights_bytes)}")
    print(f"  gguf file        {_fmt(est.gguf_file_bytes)}  ({'exact' if est.gguf_file_exact else 'tokenizer metadata estimated'})")
    print(f"  KV cache         {_fmt(est.kv_bytes)}  ({kv['n_layers']} layers, K {kv['type_k']} {kv['k_bytes']:,} B, V {kv['type_v']} {kv['v_bytes']:,} B)")
    print(f"  recurrent state  {_fmt(est.recurrent_bytes)}  ({rs['n_layers']} layers, {rs['cells']} cells, r {rs['r_bytes']:,} B, s {rs['s_bytes']:,} B)")
    print(f"  mmproj           {_fmt(est.mmproj_bytes)}")
    print(f"  total            {_fmt(est.total_bytes)}  (compute buffers not included)")
    for w in est.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _mmproj_arg(s: str) -> int | None:
    if s.lower() == "auto":
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mmproj must be a byte count or 'auto', got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("--mmproj must be >= 0")
    return v


def register_cli(subparsers) -> None:
    """Add ``nexlab memory``."""
    p = subparsers.add_parser("memory", help="weights + KV cache + recurrent state + mmproj bytes",
                              description="Memory llama.cpp needs for a qwen35moe model at a given context.")
    p.add_argument("--model", default="nex-n2-mini", help="nex-n2-mini, CONFIG.json (or its folder) or FILE.gguf")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="type mix (default: q4_k_m for a config, the file as is for a GGUF)")
    p.add_argument("--ctx", type=int, default=262144, help="context length (n_ctx)")
    p.add_argument("--cache-type-k", default="f16", help="K cache type: " + ", ".join(KV_CACHE_TYPES))
    p.add_argument("--cache-type-v", default="f16", help="V cache type (quantized V needs flash attention)")
    p.add_argument("--parallel", type=int, default=1, help="parallel sequences (n_seq_max)")
    p.add_argument("--kv-unified", action="store_true", help="one KV stream shared by all sequences")
    p.add_argument("--mmproj", type=_mmproj_arg, default=0, help="mmproj bytes, or 'auto' (from the vision config)")
    p.add_argument("--json", action="store_true", help="print a JSON object")

    def handler(args):
        if args.variant is None and not str(args.model).endswith(".gguf"):
            args.variant = "q4_k_m"
        return _cli(args)

    p.set_defaults(func=handler)
