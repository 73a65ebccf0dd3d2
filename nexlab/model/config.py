"""Nex-N2-mini, tiny and slice configurations, structural validation, parameter budgets.

Every configuration here is the ``config.json`` dictionary a Hugging Face checkpoint of
Nex-N2-mini carries: the multimodal wrapper ``Qwen3_5MoeForConditionalGeneration``
(``model_type`` ``qwen3_5_moe``) with a ``text_config`` (``qwen3_5_moe_text``, the language
model every later chapter converts) and a ``vision_config`` (the mmproj tower, kept BF16 and
skipped by the text converter). The same dictionaries therefore drive transformers
(``Qwen3_5MoeConfig(**cfg)``), llama.cpp's ``convert_hf_to_gguf.py`` (which reads
``architectures`` and ``text_config``) and nexlab's own converter.

- :func:`real_config`: the published architecture (FACTS.md: hidden 2048, 40 layers of
  3 linear-attention + 1 full-attention, 256 experts top-8, vocab 248320), used for arithmetic.
- :func:`tiny_config`: trainable on 2 CPU cores in minutes, with every structural feature of
  the real model (see the function's docstring for the list).
- :func:`slice_config`: the real per-layer shapes for one period (4 layers), vocabulary a
  parameter.
- :func:`validate_config` refuses configurations that break a structural rule, naming the rule.
- :func:`parameter_counts` gives total / routed-expert / active-per-token parameters with a
  per-component breakdown (the arithmetic notebook 00 shows).
"""

from __future__ import annotations

import copy
from typing import Any

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.formats.minifloat import GGML_NVFP4_BLOCK

ARCHITECTURE = "Qwen3_5MoeForConditionalGeneration"


MODEL_TYPE = "qwen3_5_moe"


TEXT_MODEL_TYPE = "qwen3_5_moe_text"


LINEAR = "linear_attention"


FULL = "full_attention"


#: NVFP4 packs 16-value blocks and ggml's NVFP4 super-block holds 64 values: every matrix
#: input dimension must be a multiple of 64 to quantize to NVFP4 (GGUF type 40).
NVFP4_ROW_MULTIPLE = GGML_NVFP4_BLOCK


#: llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) use 256-value super-blocks (QK_K = 256).
KQUANT_ROW_MULTIPLE = 256


#: Default vocabulary of the slice. The real 248320 works, but with it the 4-layer slice's
#: embedding and lm_head (2 x 248320 x 2048 BF16 = 2.0 GB) dwarf one layer's attention and
#: the output matmul (0.51 G multiply-adds per token) costs ~4.5x the slice's active expert
#: work, so per-layer memory and speed figures would measure the vocabulary, not the layers.
#: 32768 keeps lm_head at 1/8 of that while staying a realistic BPE size.
SLICE_DEFAULT_VOCAB = 32768


#: Special tokens of the tiny tokenizer (ids 0..4 in this order); the real model's ids differ.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _layer_types(n_layers: int, interval: int) -> list[str]:
    """Layer i is full attention when (i + 1) % interval == 0 (FACTS.md), else linear."""
    return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n_layers)]


def _text_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    linear_num_key_heads: int,
    linear_num_value_heads: int,
    linear_key_head_dim: int,
    linear_value_head_dim: int,
    num_experts: int,
    num_experts_per_tok: int,
    moe_intermediate_size: int,
    shared_expert_intermediate_size: int,
    mrope_section: list[int],
    max_position_embeddings: int,
    eos_token_id: int,
    bos_token_id: int | None = None,
    interval: int = 4,
) -> dict[str, Any]:
    """A ``text_config`` with the key set the published Qwen3.5-35B-A3B config.json carries."""
    cfg = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "eos_token_id": eos_token_id,
        "full_attention_interval": interval,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "layer_types": _layer_types(num_hidden_layers, interval),
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": linear_key_head_dim,
        "linear_num_key_heads": linear_num_key_heads,
        "linear_num_value_heads": linear_num_value_heads,
        "linear_value_head_dim": linear_value_head_dim,
        "mamba_ssm_dtype": "float32",
        "max_position_embeddings": max_position_embeddings,
        "model_type": TEXT_MODEL_TYPE,
        "moe_intermediate_size": moe_intermediate_size,
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": num_attention_heads,
        "num_experts": num_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "output_router_logits": False,
        "pad_token_id": None,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": list(mrope_section),
            "partial_rotary_factor": 0.25,
            "rope_theta": 10000000,
            "rope_type": "default",
        },
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": shared_expert_intermediate_size,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if bos_token_id is not None:
        cfg["bos_token_id"] = bos_token_id
    return cfg


def _wrap(text: dict, vision: dict, token_ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": False,
        **token_ids,
    }


def _real_vision() -> dict[str, Any]:
    # Vision tower (mmproj) of Qwen3.5-35B-A3B: 27 blocks, hidden 1152, 16 heads, patch 16.
    return {
        "deepstack_visual_indexes": [],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4304,
        "model_type": "qwen3_5_moe",  # as published; transformers remaps it to qwen3_5_moe_vision
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


_REAL_TOKEN_IDS = {
    "image_token_id": 248056,
    "video_token_id": 248057,
    "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
}


def real_config() -> dict[str, Any]:
    """The Nex-N2-mini (Qwen3.5-35B-A3B architecture) config.json as published checkpoints carry it.

    Key set and values follow the published Qwen3.5/3.6-35B-A3B config.json (transformers
    ``Qwen3_5MoeConfig``); the numbers are those of FACTS.md. The published checkpoints
    carry no MTP weights although ``mtp_num_hidden_layers`` is 1 (convert with ``--no-mtp``).
    """
    text = _text_config(
        vocab_size=248320, hidden_size=2048, num_hidden_layers=40,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128,
        num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=512, shared_expert_intermediate_size=512,
        mrope_section=[11, 11, 10], max_position_embeddings=262144, eos_token_id=248044,
    )
    cfg = _wrap(text, _real_vision(), _REAL_TOKEN_IDS)
    cfg["transformers_version"] = "4.57.0.dev0"
    return cfg


def tiny_config(vocab_size: int = 2048) -> dict[str, Any]:
    """The tiny Nex-N2-mini: trains on 2 CPU cores in minutes, keeps every structural feature.

    - 8 layers = 2 periods of 3 linear-attention (Gated DeltaNet) layers + 1 full-attention layer;
    - linear attention: 2 key heads, 4 value heads (value heads = 2 x key heads, as the real
      16/32, so llama.cpp's grouped-to-tiled value-head reorder is exercised), head dim 64;
    - gated full attention (``attn_output_gate``: q_proj rows = 2 x heads x head_dim),
      4 query heads, 2 KV heads (GQA), head dim 64, partial rotary 0.25 (16 dims, interleaved
      mrope sections [3, 3, 2] summing to 16 / 2 as [11, 11, 10] sums to 64 / 2);
    - 16 routed experts, top-4, plus a sigmoid-gated shared expert;
    - every matrix input dimension (hidden 256, expert and shared intermediate 256, linear value
      dim 4 x 64, attention output 4 x 64) is a multiple of 256, so Q4_K/Q6_K apply without
      fallbacks, hence also of 64 for NVFP4;
    - a tiny untrained vision tower (1 block) so the checkpoint holds ``model.visual.*`` tensors
      as the real one does and converters must skip them.
    Special token ids are those of nexlab's tokenizer (:data:`SPECIAL_TOKENS`, ids 0..4).
    """
    text = _text_config(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=64, linear_value_head_dim=64,
        num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=256, shared_expert_intermediate_size=256,
        mrope_section=[3, 3, 2], max_position_embeddings=4096, eos_token_id=0, bos_token_id=0,
    )
    vision = {
        "deepstack_visual_indexes": [],
        "depth": 1,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 64,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "model_type": "qwen3_5_moe",
        "num_heads": 4,
        "num_position_embeddings": 64,
        "out_hidden_size": 256,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    # Vision placeholder ids: above the text specials, inside the vocabulary (never produced
    # by the tokenizer's merges because the tokenizer reserves no such tokens: text-only use).
    ids = {
        "image_token_id": vocab_size - 2,
        "video_token_id": vocab_size - 1,
        "vision_start_token_id": vocab_size - 4,
        "vision_end_token_id": vocab_size - 3,
    }
    cfg = _wrap(text, vision, ids)
    cfg["transformers_version"] = "5.23.0"
    return cfg


def slice_config(vocab_size: int = SLICE_DEFAULT_VOCAB, periods: int = 1) -> dict[str, Any]:
    """The real per-layer shapes for ``periods`` x 4 layers, vocabulary ``vocab_size``.

    hidden 2048, 256 experts of 512 (top-8), shared expert 512, full attention 16/2 heads of
    256, linear attention 16 key / 32 value heads of 128: identical to :func:`real_config`
    except the number of layers and the vocabulary (default :data:`SLICE_DEFAULT_VOCAB`,
    see there why; 248320 is accepted).
    """
    if not isinstance(vocab_size, int) or vocab_size < 16:
        raise NexlabError(f"slice vocab_size must be an int >= 16, got {vocab_size!r}")
    if not isinstance(periods, int) or periods < 1:
        raise NexlabError(f"slice periods must be a positive int, got {periods!r}")
    cfg = real_config()
    text = cfg["text_config"]
    text["vocab_size"] = vocab_size
    text["num_hidden_layers"] = 4 * periods
    text["layer_types"] = _layer_types(4 * periods, 4)
    text["eos_token_id"] = min(text["eos_token_id"], vocab_size - 1)
    for key in _REAL_TOKEN_IDS:
        cfg[key] = min(cfg[key], vocab_size - 1)
    return cfg


def text_config(cfg: dict) -> dict:
    """The language-model part of a config.json dict (``text_config`` or the dict itself)."""
    if not isinstance(cfg, dict):
        raise NexlabTypeError(f"config must be a dict, got {type(cfg).__name__}")
    inner = cfg.get("text_config")
    return inner if isinstance(inner, dict) else cfg


def _rule(ok: bool, rule: str, message: str) -> None:
    if not ok:
        raise NexlabError(f"config breaks rule '{rule}': {message}")


_INT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
    "linear_value_head_dim", "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size",
)


def validate_config(cfg: dict, *, kquant: bool = True) -> dict:
    """Refuse a configuration that breaks a structural rule of the qwen35moe architecture.

    Raises ``ValueError("config breaks rule '<rule>': ...")``; returns ``cfg`` when valid.
    Rules: ``architecture`` (architectures / model_type of a published checkpoint),
    ``positive-int`` (every size a positive int), ``layer-pattern`` (layer_types lists
    num_hidden_layers entries, layer i full attention iff (i+1) % full_attention_interval == 0,
    whole periods), ``gqa`` (query heads a multiple of KV heads), ``value-heads-multiple``
    (linear value heads a multiple of key heads), ``gated-attention`` (attn_output_gate),
    ``rope`` (partial rotary dims even and equal to 2 x sum(mrope_section)), ``moe``
    (1 <= top-k <= experts), ``shared-expert``, ``untied-embeddings``, ``nvfp4-multiple-64``
    (every matrix input dim % 64 == 0) and, when ``kquant``, ``kquant-multiple-256``
    (every matrix input dim % 256 == 0, so llama.cpp's K-quants need no fallback).
    """
    if not isinstance(cfg, dict):
        raise NexlabTypeError(f"config must be a dict, got {type(cfg).__name__}")
    _rule(cfg.get("architectures") == [ARCHITECTURE], "architecture",
          f"architectures must be [{ARCHITECTURE!r}] as in published checkpoints, got {cfg.get('architectures')!r}")
    _rule(cfg.get("model_type") == MODEL_TYPE, "architecture",
          f"model_type must be {MODEL_TYPE!r}, got {cfg.get('model_type')!r}")
    t = cfg.get("text_config")
    _rule(isinstance(t, dict), "architecture", "config.json must nest the language model under 'text_config'")
    _rule(t.get("model_type") == TEXT_MODEL_TYPE, "architecture",
          f"text_config.model_type must be {TEXT_MODEL_TYPE!r}, got {t.get('model_type')!r}")
    for key in _INT_KEYS:
        v = t.get(key)
        _rule(isinstance(v, int) and not isinstance(v, bool) and v > 0, "positive-int",
              f"text_config.{key} must be a positive int, got {v!r}")

    n, interval = t["num_hidden_layers"], t.get("full_attention_interval", 4)
    _rule(isinstance(interval, int) and interval >= 2, "layer-pattern",
          f"full_attention_interval must be an int >= 2, got {interval!r}")
    _rule(n % interval == 0, "layer-pattern",
          f"num_hidden_layers={n} is not a whole number of periods of {interval} layers")
    lt = t.get("layer_types")
    _rule(isinstance(lt, list) and len(lt) == n, "layer-pattern",
          f"layer_types must list num_hidden_layers={n} entries, got {None if lt is None else len(lt)}")
    expected = _layer_types(n, interval)
    bad = [i for i, (a, b) in enumerate(zip(lt, expected)) if a != b]
    _rule(not bad, "layer-pattern",
          f"layer {bad[0] if bad else 0} is {lt[bad[0]] if bad else ''!r}; layer i must be full_attention "
          f"exactly when (i+1) % {interval} == 0, else linear_attention")

    _rule(t["num_attention_heads"] % t["num_key_value_heads"] == 0, "gqa",
          f"num_attention_heads={t['num_attention_heads']} is not a multiple of "
          f"num_key_value_heads={t['num_key_value_heads']}")
    _rule(t["linear_num_value_heads"] % t["linear_num_key_heads"] == 0, "value-heads-multiple",
          f"linear_num_value_heads={t['linear_num_value_heads']} is not a multiple of "
          f"linear_num_key_heads={t['linear_num_key_heads']}")
    _rule(t.get("attn_output_gate") is True, "gated-attention",
          "attn_output_gate must be true (q_proj carries the output gate rows)")

    rope = t.get("rope_parameters") or {}
    prf = rope.get("partial_rotary_factor", t.get("partial_rotary_factor", 0.25))
    rot = t["head_dim"] * prf
    _rule(float(rot).is_integer() and int(rot) % 2 == 0 and rot > 0, "rope",
          f"head_dim * partial_rotary_factor = {rot} must be a positive even integer")
    sec = rope.get("mrope_section", [11, 11, 10])
    _rule(isinstance(sec, list) and sum(sec) * 2 == int(rot), "rope",
          f"mrope_section {sec} must sum to rotary dims / 2 = {int(rot) // 2}")

    _rule(1 <= t["num_experts_per_tok"] <= t["num_experts"], "moe",
          f"num_experts_per_tok={t['num_experts_per_tok']} must be in [1, num_experts={t['num_experts']}]")
    _rule(t["shared_expert_intermediate_size"] > 0, "shared-expert", "shared_expert_intermediate_size must be > 0")
    _rule(t.get("tie_word_embeddings", False) is False and cfg.get("tie_word_embeddings", False) is False,
          "untied-embeddings", "tie_word_embeddings must be false (lm_head is its own tensor)")

    for name, dim in _matrix_input_dims(t).items():
        _rule(dim % NVFP4_ROW_MULTIPLE == 0, "nvfp4-multiple-64",
              f"{name} input dimension {dim} is not a multiple of {NVFP4_ROW_MULTIPLE}")
        if kquant:
            _rule(dim % KQUANT_ROW_MULTIPLE == 0, "kquant-multiple-256",
                  f"{name} input dimension {dim} is not a multiple of {KQUANT_ROW_MULTIPLE}")
    return cfg


def _matrix_input_dims(t: dict) -> dict[str, int]:
    """Input (column) dimension of every matrix kind of a layer."""
    return {
        "hidden_size (embeddings, q/k/v, in_proj_*, router, experts gate/up, lm_head)": t["hidden_size"],
        "self_attn.o_proj (heads x head_dim)": t["num_attention_heads"] * t["head_dim"],
        "linear_attn.out_proj (value heads x value head dim)": t["linear_num_value_heads"] * t["linear_value_head_dim"],
        "mlp.experts.down_proj (moe_intermediate_size)": t["moe_intermediate_size"],
        "mlp.shared_expert.down_proj (shared_expert_intermediate_size)": t["shared_expert_intermediate_size"],
    }


def layer_parameter_shapes(cfg: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of every text parameter of one linear-attention layer, one full-attention layer
    and the non-layer tensors, named as transformers' ``Qwen3_5MoeForCausalLM`` names them
    (experts fused: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)."""
    t = text_config(cfg)
    h, e, i, si = t["hidden_size"], t["num_experts"], t["moe_intermediate_size"], t["shared_expert_intermediate_size"]
    kd = t["linear_num_key_heads"] * t["linear_key_head_dim"]
    vd = t["linear_num_value_heads"] * t["linear_value_head_dim"]
    nv = t["linear_num_value_heads"]
    qd = t["num_attention_heads"] * t["head_dim"]
    kvd = t["num_key_value_heads"] * t["head_dim"]
    mlp = {
        "mlp.gate.weight": (e, h),
        "mlp.experts.gate_up_proj": (e, 2 * i, h),
        "mlp.experts.down_proj": (e, h, i),
        "mlp.shared_expert.gate_proj.weight": (si, h),
        "mlp.shared_expert.up_proj.weight": (si, h),
        "mlp.shared_expert.down_proj.weight": (h, si),
        "mlp.shared_expert_gate.weight": (1, h),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    linear = {
        "linear_attn.in_proj_qkv.weight": (2 * kd + vd, h),
        "linear_attn.in_proj_z.weight": (vd, h),
        "linear_attn.in_proj_b.weight": (nv, h),
        "linear_attn.in_proj_a.weight": (nv, h),
        "linear_attn.conv1d.weight": (2 * kd + vd, 1, t["linear_conv_kernel_dim"]),
        "linear_attn.dt_bias": (nv,),
        "linear_attn.A_log": (nv,),
        "linear_attn.norm.weight": (t["linear_value_head_dim"],),
        "linear_attn.out_proj.weight": (h, vd),
    }
    gate = 2 if t.get("attn_output_gate", True) else 1
    full = {
        "self_attn.q_proj.weight": (gate * qd, h),
        "self_attn.k_proj.weight": (kvd, h),
        "self_attn.v_proj.weight": (kvd, h),
        "self_attn.o_proj.weight": (h, qd),
        "self_attn.q_norm.weight": (t["head_dim"],),
        "self_attn.k_norm.weight": (t["head_dim"],),
    }
    other = {
        "model.embed_tokens.weight": (t["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    if not t.get("tie_word_embeddings", False):
        other["lm_head.weight"] = (t["vocab_size"], h)
    return {"linear_attention": {**linear, **mlp}, "full_attention": {**full, **mlp}, "other": other}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def parameter_counts(cfg: dict) -> dict[str, Any]:
    """Text parameters of a configuration: total, routed experts, active per token, and the arithmetic.

    Returns ``{"total", "routed_experts", "active_per_token", "layers": {...}, "breakdown": {...},
    "formula": {...}}``. ``active_per_token`` counts what one token's forward multiplies by:
    everything except the routed experts not chosen and the token-embedding table (a row lookup,
    not a matmul, so it is conventionally left out of "active" counts; lm_head is counted). For
    Nex-N2-mini: 34.66 B total, 32.21 B routed, 2.95 B active (FACTS.md). MTP and vision
    weights are not text parameters of the published checkpoint and are not counted.
    Matches ``sum(p.numel())`` of transformers' ``Qwen3_5MoeForCausalLM`` built from the config
    (tested in tests/test_config.py).
    """
    t = text_config(cfg)
    shapes = layer_parameter_shapes(cfg)
    lt = t.get("layer_types") or _layer_types(t["num_hidden_layers"], t.get("full_attention_interval", 4))
    n_lin, n_full = lt.count(LINEAR), lt.count(FULL)
    e, k = t["num_experts"], t["num_experts_per_tok"]

    def group(kind: str, keys) -> int:
        return sum(_numel(s) for name, s in shapes[kind].items() if name.startswith(keys))

    per_layer = {kind: sum(_numel(s) for s in shapes[kind].values()) for kind in (LINEAR, FULL)}
    routed_per_layer = group(LINEAR, ("mlp.experts.",))
    breakdown = {
        "embed_tokens": _numel(shapes["other"]["model.embed_tokens.weight"]),
        "lm_head": _numel(shapes["other"].get("lm_head.weight", (0,))),
        "final_norm": _numel(shapes["other"]["model.norm.weight"]),
        "linear_attention_mixers": n_lin * group(LINEAR, ("linear_attn.",)),
        "full_attention_mixers": n_full * group(FULL, ("self_attn.",)),
        "routed_experts": (n_lin + n_full) * routed_per_layer,
        "shared_experts": (n_lin + n_full) * group(LINEAR, ("mlp.shared_expert.",)),
        "shared_expert_gates": (n_lin + n_full) * group(LINEAR, ("mlp.shared_expert_gate",)),
        "routers": (n_lin + n_full) * group(LINEAR, ("mlp.gate.",)),
        "layer_norms": (n_lin + n_full) * group(LINEAR, ("input_layernorm", "post_attention_layernorm")),
    }
    total = sum(breakdown.values())
    assert total == n_lin * per_layer[LINEAR] + n_full * per_layer[FULL] + sum(
        _numel(s) for s in shapes["other"].values())
    routed_active = breakdown["routed_experts"] * k // e
    active = total - breakdown["routed_experts"] + routed_active - breakdown["embed_tokens"]
    return {
        "total": total,
        "routed_experts": breakdown["routed_experts"],
        "active_per_token": active,
        "layers": {"linear_attention": n_lin, "full_attention": n_full,
                   "per_linear_attention_layer": per_layer[LINEAR],
                   "per_full_attention_layer": per_layer[FULL],
                   "routed_experts_per_layer": routed_per_layer,
                   "params_per_expert": routed_per_layer // e},
        "breakdown": breakdown,
        "formula": {
            "routed_experts": f"{n_lin + n_full} layers x {e} experts x 3 x {t['moe_intermediate_size']} x "
                              f"{t['hidden_size']} = {breakdown['routed_experts']:,}",
            "active_per_token": f"total {total:,} - routed {breakdown['routed_experts']:,} + {k}/{e} of routed "
                                f"{routed_active:,} - embed_tokens {breakdown['embed_tokens']:,} = {active:,}",
        },
    }


def to_transformers(cfg: dict, *, text_only: bool = True):
    """A transformers config object: ``Qwen3_5MoeTextConfig`` (for ``Qwen3_5MoeForCausalLM``)
    when ``text_only``, else the full ``Qwen3_5MoeConfig``."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)

    c = copy.deepcopy(cfg)
    if text_only:
        t = copy.deepcopy(text_config(c))
        t.pop("model_type", None)
        return Qwen3_5MoeTextConfig(**t)
    c.pop("architectures", None)
    c.pop("model_type", None)
    c.pop("transformers_version", None)
    c.pop("quantization_config", None)
    return Qwen3_5MoeConfig(**c)


def period_table(cfg: dict) -> list[dict[str, Any]]:
    """One row per matrix of one period (3 linear-attention layers share a row set, then the
    full-attention layer): layer kind, tensor, shape [out, in] (experts: [E, out, in]), parameters,
    and what it does. For the architecture table of notebook 00."""
    t = text_config(cfg)
    shapes = layer_parameter_shapes(cfg)
    e, i = t["num_experts"], t["moe_intermediate_size"]
    role = {
        "linear_attn.in_proj_qkv.weight": "Gated DeltaNet: q, k (key heads) and v (value heads) projections, fused",
        "linear_attn.in_proj_z.weight": "output gate z (value heads)",
        "linear_attn.in_proj_b.weight": "beta (write strength), one per value head",
        "linear_attn.in_proj_a.weight": "alpha (decay input), one per value head",
        "linear_attn.conv1d.weight": f"causal depthwise conv over q/k/v, kernel {t['linear_conv_kernel_dim']}",
        "linear_attn.dt_bias": "decay time-step bias",
        "linear_attn.A_log": "log decay rate",
        "linear_attn.norm.weight": "gated RMSNorm over each value head",
        "linear_attn.out_proj.weight": "output projection",
        "self_attn.q_proj.weight": "queries and their output gate (2 x heads x head_dim rows)",
        "self_attn.k_proj.weight": "keys (KV heads)",
        "self_attn.v_proj.weight": "values (KV heads)",
        "self_attn.o_proj.weight": "output projection",
        "self_attn.q_norm.weight": "RMSNorm on each query head",
        "self_attn.k_norm.weight": "RMSNorm on each key head",
        "mlp.gate.weight": f"router: softmax over {e} experts, top-{t['num_experts_per_tok']}, renormalised",
        "mlp.experts.gate_up_proj": f"{e} routed experts: gate and up ({i} each)",
        "mlp.experts.down_proj": f"{e} routed experts: down",
        "mlp.shared_expert.gate_proj.weight": "shared expert gate (every token)",
        "mlp.shared_expert.up_proj.weight": "shared expert up",
        "mlp.shared_expert.down_proj.weight": "shared expert down",
        "mlp.shared_expert_gate.weight": "sigmoid gate scaling the shared expert's output",
        "input_layernorm.weight": "RMSNorm before the mixer",
        "post_attention_layernorm.weight": "RMSNorm before the MoE",
    }
    rows = []
    for kind, label in (("linear_attention", "linear attention (x3)"), ("full_attention", "full attention (x1)")):
        for name, shape in shapes[kind].items():
            if kind == "full_attention" and not name.startswith("self_attn."):
                continue  # the MoE block is identical; listed once under linear attention
            n = 1
            for s in shape:
                n *= s
            rows.append({"layer": label if not name.startswith(("mlp.", "input_", "post_")) else "every layer",
                         "tensor": name, "shape": list(shape), "params": n, "role": role.get(name, "")})
    rows.sort(key=lambda r: {"linear attention (x3)": 0, "full attention (x1)": 1, "every layer": 2}[r["layer"]])
    return rows


#: Qwen3.5 / Qwen3-VL image processor settings as the published preprocessor_config.json carries them
#: (Qwen2VLImageProcessorFast): the mmproj stores image_mean / image_std (nexlab.convert.mmproj), synthetic
#: checkpoints carry the file (nexlab.artifacts.synth)
PREPROCESSOR_CONFIG = {
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "merge_size": 2,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
}
