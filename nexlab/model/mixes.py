"""Per-tensor type mixes as llama-quantize chooses them for qwen35moe, with the NVFP4 experts kept.

Reference: src/llama-quant.cpp of llama.cpp as vendored by llama-cpp-python 0.3.36
(``tensor_allows_quantization``, ``tensor_get_category``, ``llama_tensor_get_type`` /
``llama_tensor_get_type_impl``, ``tensor_type_fallback``, ``init_quantize_state_counters`` and the
main loop of ``llama_model_quantize_impl``). Only the branches reachable for the three variants
nexlab builds are reproduced:

========  =================  ===========================================================================
variant   llama ftype        rules
========  =================  ===========================================================================
q4_k_m    MOSTLY_Q4_K_M      default Q4_K; ``output.weight`` Q6_K (Q8_0 if ne0 % 256); attn_v-like
                             tensors (``attn_v``, ``attn_qkv``, ``attn_kv_b``) Q6_K when
                             ``use_more_bits(i_attention_wv, n_attention_wv)``; ``ffn_down*`` Q6_K when
                             ``use_more_bits(layer, n_layer)``; with exactly 8 experts attn_v/attn_k Q8_0
                             and attn_output Q5_K
q8_0      MOSTLY_Q8_0        every quantizable tensor Q8_0 (F16 if ne0 % 32)
bf16      MOSTLY_BF16        every quantizable tensor BF16 (BF16 is not a quantized type: no rules, no
                             fallbacks)
========  =================  ===========================================================================

``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division, C ``%``).
``i_attention_wv`` is a counter over attn_v-like tensors in llama.cpp's processing order (tensors
sorted by layer number, then name; non-layer tensors first), ``n_attention_wv`` their number; in
qwen35moe every layer has exactly one (``attn_v`` in full-attention layers, ``attn_qkv`` in
linear-attention layers), so the counter equals the layer index.

Not quantized (copied as they are): tensors with fewer than 2 ggml dimensions (trailing 1s do not
count), names not ending in ``weight``, ``*_norm.weight``, ``ffn_gate_inp.weight`` (routers),
``ssm_conv1d``, and (nexlab's policy, done in llama.cpp with a tensor-type override) every tensor that
is already NVFP4: routed ``*_exps`` and shared ``*_shexp`` experts; their ``.scale`` /
``.input_scale`` sidecars are 1-D and copied anyway. K-quants need ``ne0 % 256 == 0``; otherwise
llama.cpp falls back Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when even 32 does not divide.

Shapes are numpy shapes (last axis = ggml ne[0], the row length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from nexlab.core.errors import NexlabError

#: variant -> (llama ftype name, default tensor type)
VARIANTS = {"q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"), "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "bf16": ("MOSTLY_BF16", "BF16")}


#: ggml block sizes of the types that can come out of the rules
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
              "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "NVFP4": 64}  # fmt: skip


_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


_QUANTIZED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "NVFP4"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's ``use_more_bits`` (C integer division and remainder)."""
    a = n_layers // 8
    d = i_layer - a
    rem = d - int(d / 3) * 3  # C's % truncates towards zero
    return i_layer < a or i_layer >= 7 * n_layers // 8 or rem == 2


def ggml_n_dims(shape: Sequence[int]) -> int:
    """``ggml_n_dims``: number of ggml dimensions up to the last one > 1 (numpy shape given)."""
    ne = list(reversed([int(s) for s in shape]))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def tensor_allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """``tensor_allows_quantization`` for the names a qwen35moe GGUF can hold (quantize_output_tensor on)."""
    if ggml_n_dims(shape) < 2:
        return False
    if not name.endswith("weight"):
        return False
    for bad in ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight",
                ".position_embd", ".patch_embd", ".patch_merger", ".rel_pos"):  # fmt: skip
        if bad in name:
            return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return True


def tensor_category(name: str) -> str:
    """``tensor_get_category``: first matching substring rule, in llama.cpp's order."""
    if name == "output.weight":
        return "OUTPUT"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "TOKEN_EMBD"
    for key, cat in (("attn_qkv.weight", "ATTENTION_QKV"), ("attn_kv_b.weight", "ATTENTION_KV_B"),
                     ("attn_v.weight", "ATTENTION_V"), ("attn_k.weight", "ATTENTION_K"),
                     ("attn_q.weight", "ATTENTION_Q"), ("attn_output.weight", "ATTENTION_OUTPUT"),
                     ("ffn_up", "FFN_UP"), ("ffn_gate", "FFN_GATE"), ("ffn_down", "FFN_DOWN")):  # fmt: skip
        if key in name:
            return cat
    return "OTHER"


def _is_attn_v_like(cat: str) -> bool:
    return cat in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B")


_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def _layer_of(name: str) -> int:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else -1


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """Names in llama_model_loader's ``weights_map`` order (weight_name_comparer): layer number first
    (non-``blk.N.`` names count as -1), then the name. llama_model_quantize processes and writes
    tensors in this order."""
    return sorted(names, key=lambda n: (_layer_of(n), n))


def _fallback(name: str, new_type: str, ne0: int, log=None) -> str:
    qk = BLOCK_SIZE[new_type]
    if ne0 % qk == 0:
        return new_type
    if new_type in _FALLBACK:
        ret = _FALLBACK[new_type]
    elif qk <= 32:
        ret = new_type
    else:
        raise NexlabError(f"{name}: no tensor type fallback is defined for type {new_type}")
    if ne0 % BLOCK_SIZE[ret] != 0:
        ret = "F16"
    if log is not None:
        log(f"{name}: ncols {ne0} not divisible by {qk} (required for {new_type}) -> falling back to {ret}")
    return ret


def choose_type(
    name: str,
    shape: Sequence[int],
    variant: str,
    n_layer: int | None = None,
    *,
    source_ggml_type: str = "BF16",
    n_expert: int = 0,
    i_attention_wv: int | None = None,
    n_attention_wv: int | None = None,
    has_output: bool = True,
    keep_nvfp4: bool = True,
    log=None,
) -> str:
    """The ggml type llama-quantize gives tensor ``name`` (numpy ``shape``) in ``variant``.

    ``source_ggml_type`` is the tensor's type in the input GGUF (returned unchanged when the tensor is not
    quantized). For attn_v-like tensors in q4_k_m, ``i_attention_wv`` / ``n_attention_wv`` give the
    counter (default: the layer index and ``n_layer``, right for qwen35moe; :func:`plan_types` computes
    them). ``has_output=False`` means tied embeddings (token_embd then follows output.weight's rule).
    NVFP4 tensors stay NVFP4 when ``keep_nvfp4`` (llama.cpp needs ``--tensor-type ...=nvfp4`` for that).
    ``n_layer`` (the model's block count) is required for q4_k_m's layer rules. Returns a type name such
    as ``"Q4_K"`` (``gguf.GGMLQuantizationType[name]`` gives the enum).
    """
    v = variant.lower().replace("-", "_")
    if v not in VARIANTS:
        raise NexlabError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    source_ggml_type = source_ggml_type.upper()
    if not tensor_allows_quantization(name, shape):
        return source_ggml_type
    ne0 = int(shape[-1])
    if source_ggml_type == "NVFP4" and keep_nvfp4:
        return _fallback(name, "NVFP4", ne0, log)  # manual override: no mix rules, fallback check only
    default = VARIANTS[v][1]
    if default not in _QUANTIZED:  # BF16: llama_tensor_get_type skips rules and fallbacks
        return default
    new = default
    cat = tensor_category(name)
    if cat == "OUTPUT" or (not has_output and cat == "TOKEN_EMBD"):
        if ne0 % BLOCK_SIZE[new] != 0:
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif cat == "TOKEN_EMBD":
        pass  # no change for Q4_K_M / Q8_0
    elif _is_attn_v_like(cat):
        if v == "q4_k_m":
            if n_layer is None and (i_attention_wv is None or n_attention_wv is None):
                raise NexlabError(f"{name}: n_layer is needed for the q4_k_m attn_v rule")
            i = _layer_of(name) if i_attention_wv is None else i_attention_wv
            n = n_layer if n_attention_wv is None else n_attention_wv
            if use_more_bits(i, n):
                new = "Q6_K"
        if n_expert == 8:
            new = "Q8_0"
    elif cat == "ATTENTION_K":
        if n_expert == 8:
            new = "Q8_0"
    elif cat == "FFN_DOWN" and v == "q4_k_m":
        i_layer = _layer_of(name)
        if n_layer is None:
            raise NexlabError(f"{name}: n_layer is needed for the q4_k_m ffn_down rule")
        if i_layer < 0 or i_layer >= n_layer:
            raise NexlabError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
        if use_more_bits(i_layer, n_layer):
            new = "Q6_K"
    elif cat == "ATTENTION_OUTPUT":
        if n_expert == 8 and v == "q4_k_m":
            new = "Q5_K"
    return _fallback(name, new, ne0, log)


@dataclass
class TensorPlan:
    name: str
    shape: tuple
    source_ggml_type: str
    ggml_type: str

    @property
    def copy(self) -> bool:
        """True when llama-quantize writes the tensor's bytes unchanged (target == source)."""
        return self.ggml_type == self.source_ggml_type


def plan_types(
    tensors: Iterable[tuple[str, Sequence[int], str]],
    variant: str,
    n_layer: int,
    *,
    n_expert: int = 0,
    keep_nvfp4: bool = True,
    log=None,
) -> list[TensorPlan]:
    """Type choice for a whole model: ``tensors`` = (name, numpy shape, source type) triples.

    Returns plans in llama_model_quantize's processing/writing order (:func:`llama_tensor_order`), with
    the attn_v counter run as llama.cpp runs it (n_attention_wv counted over all tensors first).
    """
    v = variant.lower().replace("-", "_")
    if v not in VARIANTS:
        raise NexlabError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    items = {n: (tuple(int(s) for s in shp), str(getattr(t, "name", t)).upper()) for n, shp, t in tensors}
    order = llama_tensor_order(items)
    n_wv = sum(1 for n in order if _is_attn_v_like(tensor_category(n)))
    has_output = "output.weight" in items
    i_wv = 0
    plans = []
    for n in order:
        shp, src = items[n]
        kwargs = {}
        counted = (
            tensor_allows_quantization(n, shp)
            and _is_attn_v_like(tensor_category(n))
            and not (src == "NVFP4" and keep_nvfp4)
            and VARIANTS[v][1] in _QUANTIZED
        )
        if counted:
            kwargs = {"i_attention_wv": i_wv, "n_attention_wv": n_wv}
        t = choose_type(n, shp, variant, n_layer, source_ggml_type=src, n_expert=n_expert, has_output=has_output,
                        keep_nvfp4=keep_nvfp4, log=log, **kwargs)
        if counted:
            i_wv += 1
        plans.append(TensorPlan(n, shp, src, t))
    return plans


def nvfp4_override_patterns(plans: Iterable[TensorPlan]) -> list[str]:
    """Regexes (one per NVFP4 tensor kept) for llama_model_quantize's ``tt_overrides`` -> nvfp4."""
    return ["^" + re.escape(p.name) + "$" for p in plans if p.source_ggml_type == "NVFP4" and p.ggml_type == "NVFP4"]
