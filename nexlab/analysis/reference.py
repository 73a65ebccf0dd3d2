"""Proof that a converted GGUF computes the checkpoint's model: transformers vs llama.cpp logits.

The reference is transformers' ``Qwen3_5MoeForCausalLM`` (float32, CPU, eager attention; the
linear attention uses its pure-torch path) loaded with the checkpoint's weights, NVFP4 modules
dequantized exactly (``e2m1(code) * e4m3(weight_scale) * weight_scale_2`` via
``nexlab.formats.nvfp4.dequantize_nvfp4_modelopt``; per-expert tensors fused into transformers 5's
``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``). The candidate is llama.cpp through
llama-cpp-python (``logits_all=True``) on the GGUF. Both see the same token ids, so the tokenizer
is not under test here.

Figures: per-position KL(p_hf || p_llama) in nats (mean, max), top-1 agreement, and greedy
continuations from a few prompts (transformers recomputes the whole prefix per token; llama.cpp
decodes incrementally with its recurrent state and KV cache, as it does when serving).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from nexlab.analysis.quality import log_softmax
from nexlab.core.errors import NexlabError
from nexlab.formats.nvfp4 import dequantize_nvfp4_modelopt
from nexlab.llamacpp.runtime import open_model
from nexlab.model.checkpoint import Checkpoint
from nexlab.model.tokenizer import encode_text


def dequantized_state_dict(ckpt_dir: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """(config dict, state dict in ``Qwen3_5MoeForCausalLM`` layout, float32, NVFP4 dequantized)."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)


    sd: dict[str, Any] = {}
    with Checkpoint(ckpt_dir) as ck:
        experts: dict[tuple[int, str], dict[int, Any]] = {}
        for name in ck.entries:
            if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
                continue
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module is not None and ck.is_nvfp4(module):
                s2 = ck.load(module + ".weight_scale_2") if module + ".weight_scale_2" in ck else torch.tensor(1.0)
                w = dequantize_nvfp4_modelopt(ck.load(name), ck.load(module + ".weight_scale"), s2)
                t = torch.as_tensor(np.asarray(w, dtype=np.float32))
            else:
                t = ck.load(name).float()
            parts = name.split(".")
            if ".mlp.experts." in name and len(parts) == 8 and parts[5].isdecimal():
                experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = t
            else:
                sd[name] = t
        for (layer, proj), d in experts.items():
            experts[(layer, proj)] = torch.stack([d[i] for i in range(len(d))])
        for layer in sorted({k[0] for k in experts}):
            p = f"model.layers.{layer}.mlp.experts."
            sd[p + "gate_up_proj"] = torch.cat([experts[(layer, "gate_proj")], experts[(layer, "up_proj")]], dim=1)
            sd[p + "down_proj"] = experts[(layer, "down_proj")]
        cfg = dict(ck.raw_config)
    return cfg, sd


def build_hf_model(ckpt_dir: str | os.PathLike):
    """transformers' Qwen3_5MoeForCausalLM in float32 with the checkpoint's (dequantized) weights."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)
    from transformers import AutoConfig, Qwen3_5MoeForCausalLM  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)

    _, sd = dequantized_state_dict(ckpt_dir)
    config = AutoConfig.from_pretrained(str(ckpt_dir))
    config = getattr(config, "text_config", config)
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del config.quantization_config
    config._attn_implementation = "eager"
    torch.manual_seed(0)  # the random init is overwritten; buffers (rotary inv_freq) are computed
    model = Qwen3_5MoeForCausalLM(config).float()
    if "lm_head.weight" not in sd and getattr(config, "tie_word_embeddings", False):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise NexlabError(f"state dict does not fit Qwen3_5MoeForCausalLM: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.eval()


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """float64 logits [n, vocab] of the transformers model for one sequence (no cache)."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    return out.logits[0].double().numpy()


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """float64 logits [n, vocab] from llama.cpp for one sequence (fresh context state)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def kl_per_position(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) in nats per row, P = softmax(p_logits), Q = softmax(q_logits), float64 log-sum-exp
    (:func:`nexlab.analysis.quality.log_softmax`, which also refuses NaN/Inf logits)."""

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def greedy_hf(model, prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(int(np.argmax(hf_logits(model, toks)[-1])))
    return toks[len(prompt):]


def greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation with llama.cpp's normal decode path (prompt batch, then one token at a time)."""
    llm.reset()
    llm.eval(list(prompt))
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def compare_logits(ckpt_dir: str | os.PathLike, gguf_path: str | os.PathLike, tokens: list[int], *,
                   window: int = 128, greedy_prompts: int = 2, greedy_len: int = 12, prompt_len: int = 16,
                   n_ctx: int = 256, n_threads: int = 2, model=None) -> dict[str, Any]:
    """KL and greedy agreement between transformers (reference) and llama.cpp on held-out tokens.

    ``tokens`` is split into windows of ``window`` tokens (at least one, positions counted over all
    windows); each window is evaluated from an empty context on both sides.
    """
    if len(tokens) < window:
        raise NexlabError(f"need at least {window} tokens, got {len(tokens)}")
    if window > n_ctx:
        raise NexlabError(f"window {window} exceeds n_ctx {n_ctx}")
    model = model if model is not None else build_hf_model(ckpt_dir)
    llm = open_model(gguf_path, n_ctx, n_threads=n_threads)
    kls, top1 = [], []
    for start in range(0, len(tokens) - window + 1, window):
        seq = tokens[start:start + window]
        a, b = hf_logits(model, seq), llama_logits(llm, seq)
        kls.append(kl_per_position(a, b))
        top1.append(a.argmax(-1) == b.argmax(-1))
    kl = np.concatenate(kls)
    agree = []
    for i in range(greedy_prompts):
        prompt = tokens[i * prompt_len:(i + 1) * prompt_len]
        g_hf, g_ll = greedy_hf(model, prompt, greedy_len), greedy_llama(llm, prompt, greedy_len)
        agree.append({"prompt": prompt, "hf": g_hf, "llama": g_ll, "equal": g_hf == g_ll})
    with contextlib.suppress(Exception):
        llm.close()
    return {"positions": int(kl.size), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(np.concatenate(top1).mean()), "greedy": agree,
            "greedy_all_equal": all(g["equal"] for g in agree)}


def heldout_tokens(artifacts_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                   n: int = 256) -> list[int]:
    """First ``n`` token ids of ``text/heldout.txt`` with the tiny tokenizer."""

    a = Path(artifacts_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else a / "tiny" / "tokenizer"
    ids = encode_text(a / "text" / "heldout.txt", tok_dir).tolist()
    if len(ids) < n:
        raise NexlabError(f"heldout text has {len(ids)} tokens, need {n}")
    return ids[:n]
