"""Chapter 03 helpers (notebooks/03_gguf_writing.ipynb): config.json -> GGUF keys, the mmproj's bytes.

- :data:`CONFIG_TO_KEYS` / :func:`config_key_rows`: each ``text_config`` field, the ``qwen35moe.*`` key
  it becomes, the value derived and the value in the file, and what llama.cpp's loader
  (``load_hparams`` of src/llama-model.cpp and src/models/qwen35moe.cpp) does with it;
- :func:`byte_breakdown`: where an mmproj plan's bytes go (patch and position embeddings, ViT blocks,
  merger, header);
- :func:`explain_seed_size`: Nex-N2-mini's mmproj sizes from the exact plan
  (:func:`nexlab.convert.mmproj.plan_mmproj_from_config`) against the seed's 903 MB: 899.28 MB as F16,
  902.82 MB with the F32 patch embedding llama.cpp's converter writes for every non-F16 type.

The file's region map and hex dump are :mod:`nexlab.ggufio.regions`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nexlab.convert.mmproj import MmprojPlan, plan_mmproj_from_config
from nexlab.model.config import real_config
from nexlab.model.vision import SEED_MMPROJ_MB

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
    ("head_dim x partial_rotary_factor", "rope.dimension_count", "n_rot",
     "dims rotated by RoPE (the rest pass through)"),
    ("rope_parameters.mrope_section", "rope.dimension_sections", "rope_sections",
     "interleaved M-RoPE sections (text, height, width)"),
    ("rope_parameters.rope_theta", "rope.freq_base", "rope_theta", "RoPE base frequency"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", "rms_eps", "epsilon of every RMSNorm"),
    ("num_experts", "expert_count", "n_expert", "routed experts per layer (router width)"),
    ("num_experts_per_tok", "expert_used_count", "n_expert_used", "top-k experts run per token"),
    ("moe_intermediate_size", "expert_feed_forward_length", "n_ff_exp", "routed expert FFN width"),
    ("shared_expert_intermediate_size", "expert_shared_feed_forward_length", "n_ff_shexp", "shared expert FFN width"),
    ("linear_conv_kernel_dim", "ssm.conv_kernel", "ssm_d_conv",
     "causal conv length; conv state keeps kernel-1 columns"),
    ("linear_key_head_dim", "ssm.state_size", "ssm_d_state", "Gated DeltaNet key head dim (state rows)"),
    ("linear_num_key_heads", "ssm.group_count", "ssm_n_group", "linear-attention key heads"),
    ("linear_num_value_heads", "ssm.time_step_rank", "ssm_dt_rank", "linear-attention value heads"),
    ("linear_num_value_heads x linear_value_head_dim", "ssm.inner_size", "ssm_d_inner", "recurrent state width"),
    ("layer_types", "attention.recurrent_layers", "recurrent", "which blocks are linear attention (is_recr)"),
    ("full_attention_interval", "full_attention_interval", "full_attention_interval",
     "fallback when recurrent_layers is absent"),
)


def config_key_rows(hp, metadata: dict, arch: str = "qwen35moe") -> list[dict[str, Any]]:
    """One row per :data:`CONFIG_TO_KEYS` entry: the config field, the GGUF key, the value derived
    from config.json (``hp``: :class:`nexlab.model.hparams.HParams`), the value in the file
    (``metadata``: :func:`nexlab.ggufio.inspector.inspect_gguf`'s), whether they agree, and the use."""
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


def byte_breakdown(plan: MmprojPlan) -> dict[str, int]:
    """Where an mmproj's tensor bytes go: patch embedding, position embedding, the ViT blocks'
    attention (qkv + out) and MLP (up + down) weights, their biases and LayerNorms, the merger
    (``v.post_ln`` + ``mm.*``) and deepstack mergers; plus ``header`` (key/values, tensor infos,
    alignment padding: file size minus tensor bytes)."""
    groups: dict[str, int] = {}
    for t in plan.tensors:
        n = t.name
        if n.startswith("v.patch_embd."):
            g = "patch embedding"
        elif n.startswith("v.position_embd."):
            g = "position embedding"
        elif n.startswith("v.blk.") and n.endswith(".weight") and ("attn_" in n or "ffn_" in n):
            g = "blocks: attention weights" if "attn_" in n else "blocks: MLP weights"
        elif n.startswith("v.blk."):
            g = "blocks: biases and LayerNorms"
        elif n.startswith("v.deepstack."):
            g = "deepstack mergers"
        else:
            g = "merger"
        groups[g] = groups.get(g, 0) + t.nbytes
    groups["header"] = plan.file_nbytes - plan.tensor_nbytes
    return groups


def explain_seed_size(config: dict | None = None) -> dict[str, Any]:
    """Nex-N2-mini's mmproj sizes from the exact plan, against the seed's 903 MB and the earlier
    899.3 MB estimate (decimal MB, as the model card).

    * ``f16_file``: what ``convert_hf_to_gguf.py --mmproj --outtype f16`` (and nexlab's ``--mmproj
      f16``) writes: 899.28 MB. The earlier estimate, 899.26 MB, was this plan's tensor bytes
      (``f16_tensors``) without the 19.6 KB header: no tensor was missing or mis-typed for an F16 file.
    * ``bf16_file``: ``--outtype bf16`` (also what ``--outtype auto`` picks for the BF16 checkpoint):
      902.82 MB, which rounds to the seed's 903 MB. The only layout difference is the Conv3d patch
      embedding: the converter keeps its two 2x1152x3x16x16 halves F16 only in an F16 file and F32
      in any other (``MmprojModel.tensor_force_quant``): +3,538,944 bytes. Every other weight is 2
      bytes either way, biases, LayerNorms and the position embedding F32 either way.
    * So the seed's "F16" file (903 MB) is not this converter's F16 layout; its size is that of the
      layout with F32 patch-embedding kernels and 2-byte weights. The workbook's memory tables use
      that plan (:data:`nexlab.model.vision.SEED_MMPROJ_DTYPE`), the writer can make both.
    """

    cfg = config or real_config()
    f16 = plan_mmproj_from_config(cfg, "f16", name="Nex-N2-mini")
    bf16 = plan_mmproj_from_config(cfg, "bf16", name="Nex-N2-mini")
    patch = {t.name: t for t in f16.tensors if t.name.startswith("v.patch_embd.weight")}
    patch_extra = sum(t.nbytes for t in patch.values())  # F16 -> F32 doubles them
    return {
        "seed_mb": SEED_MMPROJ_MB,
        "f16_file": f16.file_nbytes, "f16_tensors": f16.tensor_nbytes,
        "f16_header": f16.file_nbytes - f16.tensor_nbytes,
        "bf16_file": bf16.file_nbytes, "bf16_tensors": bf16.tensor_nbytes,
        "patch_embedding_f32_extra": patch_extra,
        "bf16_minus_f16": bf16.file_nbytes - f16.file_nbytes,
        "f16_rounds_to_mb": round(f16.file_nbytes / 1e6), "bf16_rounds_to_mb": round(bf16.file_nbytes / 1e6),
        "n_tensors": len(f16.tensors),
        "breakdown_f16": byte_breakdown(f16), "breakdown_bf16": byte_breakdown(bf16),
    }
