"""The slice: Nex-N2-mini's real per-layer shapes for one period (4 layers), as a ModelOpt NVFP4 checkpoint.

The slice (:func:`nexlab.model.config.slice_config`) is too big for ModelOpt on CPU, so
:func:`write_slice` writes it with ModelOpt's semantics
(:func:`nexlab.artifacts.modelopt.quantize_mlp_group_modelopt`), streaming layer by layer from seeded
random BF16 weights: one shard per layer, peak memory about one quantized layer plus one expert,
ModelOpt's ``quantization_config`` and ``hf_quant_config.json`` for the MLP-only scope, ``input_scale``
1.0. :func:`ensure_slice` keeps ``ARTIFACTS_DIR/slice/nvfp4`` while its vocabulary is the one asked
for and copies in the tiny tokenizer. Chapter 00 builds it; the throughput chapter (06) measures it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from nexlab.artifacts.checkpoints import (
    ShardedWriter,
    atomic_write_json,
    copy_tokenizer,
    default_artifacts_dir,
    fix_malloc_mmap_threshold,
    random_expert_tensors,
    random_layer_tensors,
)
from nexlab.artifacts.modelopt import mlp_scope_excludes, modelopt_version, quantize_mlp_group_modelopt
from nexlab.artifacts.tiny import refresh_tokenizer, tiny_paths
from nexlab.core.fileio import atomic_directory, locked
from nexlab.core.progress import progress
from nexlab.model.config import SLICE_DEFAULT_VOCAB, slice_config, validate_config


def write_slice(out_dir: str | os.PathLike | None = None, *, vocab_size: int | None = None, periods: int = 1,
                seed: int = 0, tokenizer_dir=None, show_progress: bool = True, cfg: dict | None = None) -> Path:
    """Write the slice (real per-layer shapes, random weights) as a ModelOpt-layout NVFP4 checkpoint.

    Streams layer by layer: each layer's BF16 tensors are drawn (seeded; routed experts one at a
    time), quantized with :func:`nexlab.artifacts.modelopt.quantize_mlp_group_modelopt` (Nex-N2-mini
    scope, the semantics :func:`nexlab.artifacts.modelopt.quantize_layer_modelopt` checks against
    ModelOpt) and flushed as its own shard, so peak memory is about one quantized layer plus one
    expert. Embeddings and lm_head (BF16) get their own shards. Writes
    config.json (:func:`nexlab.model.config.slice_config` + ModelOpt's ``quantization_config``),
    hf_quant_config.json with the exclude list ModelOpt writes for this scope, and tokenizer
    files when ``tokenizer_dir`` is given. ``input_scale`` is 1.0 (no activations for random weights).
    Default folder: ``ARTIFACTS_DIR/slice/nvfp4``. ``cfg`` replaces the slice configuration
    (tests write a tiny-shaped one the same way).
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)


    if cfg is None:
        cfg = slice_config(vocab_size=vocab_size or SLICE_DEFAULT_VOCAB, periods=periods)
    validate_config(cfg)
    t = cfg["text_config"]
    out = Path(out_dir) if out_dir is not None else default_artifacts_dir() / "slice" / "nvfp4"
    fix_malloc_mmap_threshold()
    gen = torch.Generator().manual_seed(seed)
    h, v = t["hidden_size"], t["vocab_size"]
    lm = "model.language_model."
    hf_quant = {"producer": {"name": "modelopt", "version": modelopt_version()},
                "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                                 "exclude_modules": mlp_scope_excludes(t)}}
    with atomic_directory(out) as tmp:
        w = ShardedWriter(tmp, shard_bytes=1)  # every add() is its own shard
        w.add({lm + "embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16)})
        layers = range(t["num_hidden_layers"])
        for layer in (progress(layers, total=len(layers), desc="slice layers") if show_progress else layers):
            # Dense tensors and the shared expert first, then one routed expert at a time: only
            # one expert's BF16 weights exist at once, the layer is held quantized (~0.5 GB real).
            prefix = f"{lm}layers.{layer}."
            dense = random_layer_tensors(cfg, layer, gen, experts=False)
            shared = {k: dense.pop(f"mlp.shared_expert.{k}_proj.weight") for k in ("gate", "up", "down")}
            layer_out = {prefix + k: v for k, v in dense.items()}
            layer_out.update(quantize_mlp_group_modelopt(prefix + "mlp.shared_expert", shared["gate"], shared["up"],
                                                         shared["down"]))
            for ex in range(t["num_experts"]):
                e = random_expert_tensors(cfg, gen)
                layer_out.update(quantize_mlp_group_modelopt(f"{prefix}mlp.experts.{ex}", e["gate_proj.weight"],
                                                             e["up_proj.weight"], e["down_proj.weight"]))
            w.add(dict(sorted(layer_out.items())))
            del dense, shared, layer_out
        w.add({lm + "norm.weight": torch.zeros(h, dtype=torch.bfloat16),
               "lm_head.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16)})
        w.finish()
        full_cfg = copy.deepcopy(cfg)
        full_cfg["quantization_config"] = {
            "config_groups": {"group_0": {
                "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                "targets": ["Linear"]}},
            "ignore": hf_quant["quantization"]["exclude_modules"], "quant_algo": "NVFP4",
            "producer": hf_quant["producer"], "quant_method": "modelopt"}
        atomic_write_json(tmp / "config.json", full_cfg)
        atomic_write_json(tmp / "hf_quant_config.json", hf_quant)
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
    return out


def ensure_slice(artifacts_dir: str | os.PathLike | None = None, *, vocab_size: int | None = None, seed: int = 0,
                 show_progress: bool = True) -> Path:
    """``ARTIFACTS_DIR/slice/nvfp4``, written by :func:`write_slice` when missing or when its
    vocabulary differs from ``vocab_size`` (default :data:`nexlab.model.config.SLICE_DEFAULT_VOCAB`).
    The tiny tokenizer is copied in when it exists (its ids are a subset of any slice vocabulary
    >= 2048); a kept slice whose copy differs from the tiny tokenizer (made again since, e.g. by an
    earlier nexlab) gets the current files (the random weights do not depend on it)."""

    a = Path(artifacts_dir) if artifacts_dir is not None else default_artifacts_dir()
    out = a / "slice" / "nvfp4"
    vocab = vocab_size or SLICE_DEFAULT_VOCAB
    tok = tiny_paths(a)["tokenizer"]
    with locked(a / "slice.lock"):
        try:
            cfg = json.loads((out / "config.json").read_text())
            keep = cfg["text_config"]["vocab_size"] == vocab and (out / "model.safetensors.index.json").is_file()
        except (OSError, ValueError, KeyError):
            keep = False
        if keep:
            refresh_tokenizer(tok, out)
            return out
        return write_slice(out, vocab_size=vocab, seed=seed, show_progress=show_progress,
                           tokenizer_dir=tok if tok.is_dir() else None)
