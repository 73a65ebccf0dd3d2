"""The tiny vision-language checkpoint and a test image: the inputs of the mmproj proofs.

:func:`ensure_tiny_vl` derives ``ARTIFACTS_DIR/tiny-vl/bf16`` from the tiny text model
(:func:`nexlab.artifacts.tiny.ensure_tiny`): its text tensors unchanged plus a seeded vision tower of
:data:`TINY_VL_VISION` (every structural feature of the real tower: several blocks, 2-D rotary, the
2x2 merger, a learned position grid llama.cpp resizes), written by :func:`write_vl_checkpoint` as a
published-style ``Qwen3_5MoeForConditionalGeneration`` checkpoint with ``preprocessor_config.json``.
It is rebuilt only when its key (text checkpoint, vision config, seed, :data:`TINY_VL_FORMAT`) changes.

:func:`make_test_image` is a deterministic RGB image that neither llama.cpp nor the HF processor
resizes (:func:`save_png` writes it), so both embed the same pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nexlab.artifacts.checkpoints import ShardedWriter
from nexlab.artifacts.synth import meta_state_dict_shapes
from nexlab.artifacts.tiny import ensure_tiny, tiny_paths
from nexlab.core.fileio import atomic_directory, atomic_output, atomic_write_text, locked
from nexlab.model.checkpoint import Checkpoint
from nexlab.model.config import PREPROCESSOR_CONFIG, tiny_config, validate_config
from nexlab.model.vision import VISUAL_PREFIXES, vision_kind

# ----------------------------------------------------------------------------- the tiny vision-language model
# A small Qwen3_5MoeVisionConfig with every structural feature of the real tower: the tiny model's own
# vision config made deeper and wider: several blocks, multi-head attention with 2-D rotary (head dim
# 32), the 2x2 merger to the text hidden size (256, the tiny text model's), a learned 8x8 position grid
# (image_size 128) that llama.cpp resizes.
TINY_VL_VISION = {**tiny_config()["vision_config"], "depth": 2, "hidden_size": 128, "intermediate_size": 256}


TINY_VL_FORMAT = 1  # bump when the tiny VL checkpoint's recipe changes (part of its cache key)


def tiny_vl_paths(artifacts_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Where :func:`ensure_tiny_vl` puts the tiny vision-language checkpoint (nothing is created)."""

    a = tiny_paths(artifacts_dir)["artifacts"]
    return {"artifacts": a, "ckpt": a / "tiny-vl" / "bf16", "build_json": a / "tiny-vl" / "build.json"}


def random_vision_tensors(cfg: dict, seed: int) -> dict[str, Any]:
    """Seeded BF16 values for every ``model.visual.*`` tensor of ``cfg`` (names and shapes from
    transformers' ``Qwen3_5MoeForConditionalGeneration`` on the meta device).

    Weights N(0, 1/fan_in) so activations keep their scale through the blocks; biases N(0, 0.05),
    LayerNorm weights 1 + N(0, 0.1) and biases N(0, 0.05), position embeddings N(0, 0.5): every
    tensor differs from its default, so a tensor mapped to the wrong place changes the output.
    One ``torch.Generator`` seeded with ``seed``, keys in sorted order: deterministic.
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)


    shapes = {k: v for k, v in meta_state_dict_shapes(cfg).items() if k.startswith("model.visual.")}
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        z = torch.randn(shape, generator=g, dtype=torch.float32)
        kind = vision_kind(key)
        if kind == "bias":
            v = 0.05 * z
        elif kind == "norm":
            v = 1.0 + 0.1 * z
        elif kind == "pos":
            v = 0.5 * z
        else:
            fan_in = int(np.prod(shape[1:]))
            v = z / np.sqrt(fan_in)
        out[key] = v.to(torch.bfloat16)
    return out


def _tiny_vl_key(text_ckpt: Path, seed: int) -> str:
    """Cache key: the text checkpoint it derives from (its index and config bytes), the vision
    config, the seed and :data:`TINY_VL_FORMAT`."""
    h = hashlib.sha256()
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json"):
        h.update((text_ckpt / name).read_bytes())
    for shard in sorted(text_ckpt.glob("*.safetensors")):
        h.update(f"{shard.name}:{shard.stat().st_size}".encode())
    h.update(json.dumps([TINY_VL_VISION, PREPROCESSOR_CONFIG, seed, TINY_VL_FORMAT], sort_keys=True).encode())
    return h.hexdigest()


def write_vl_checkpoint(text_ckpt: str | os.PathLike, out_dir: str | os.PathLike, vision: dict, *, seed: int = 0,
                        min_shards: int = 2) -> Path:
    """A published-style ``Qwen3_5MoeForConditionalGeneration`` checkpoint: the text tensors of
    ``text_ckpt`` (copied unchanged, ``model.language_model.*`` and ``lm_head``), a vision tower of
    config ``vision`` with :func:`random_vision_tensors` (``model.visual.*``), at least
    ``min_shards`` shards, config.json (``vision_config`` replaced), ``preprocessor_config.json``
    (:data:`PREPROCESSOR_CONFIG`) and the tokenizer files. Written atomically."""

    src = Path(text_ckpt)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"] = dict(vision)
    validate_config(cfg)
    visual = random_vision_tensors(cfg, seed)
    with Checkpoint(src) as ck, atomic_directory(out_dir) as tmp:
        text_keys = [k for k in ck.stored if not k.startswith(VISUAL_PREFIXES)]
        total = sum(ck.stored[k].nbytes for k in text_keys) + sum(t.numel() * 2 for t in visual.values())
        w = ShardedWriter(tmp, total // min_shards + 1)
        try:
            for k in text_keys:
                w.add({k: ck.load_stored(k)})
            w.add(visual)
            w.finish()
        finally:
            w.close()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
        for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return Path(out_dir)


def ensure_tiny_vl(artifacts_dir: str | os.PathLike | None = None, smoke: bool = False,
                   seed: int = 0) -> dict[str, Path]:
    """The tiny vision-language checkpoint, derived from the tiny text model; built once.

    :func:`nexlab.artifacts.tiny.ensure_tiny` (``smoke``, ``seed``) first, unchanged; then its BF16 text
    weights plus a :data:`TINY_VL_VISION` tower seeded from ``seed`` are written to
    ``ARTIFACTS_DIR/tiny-vl/bf16`` (:func:`write_vl_checkpoint`). The build is reused while its key
    (the text checkpoint it came from, vision config, seed, :data:`TINY_VL_FORMAT`) is unchanged: a
    rebuilt tiny text model makes a new one. Returns :func:`tiny_vl_paths` plus ``"text"`` (the
    :func:`ensure_tiny` paths' ``bf16``) and ``"tokenizer"``. Safe from several processes (file lock).
    """

    tiny = ensure_tiny(artifacts_dir, smoke=smoke, seed=seed)
    p = tiny_vl_paths(artifacts_dir)
    out = {**p, "text": tiny["bf16"], "tokenizer": tiny["tokenizer"]}

    def current(key: str) -> bool:
        try:
            return json.loads(p["build_json"].read_text()).get("key") == key and (p["ckpt"] / "config.json").is_file()
        except (OSError, ValueError):
            return False

    key = _tiny_vl_key(tiny["bf16"], seed)
    if current(key):
        return out
    with locked(p["artifacts"] / "tiny-vl.lock"):
        key = _tiny_vl_key(tiny["bf16"], seed)
        if current(key):
            return out
        t0 = time.perf_counter()
        p["build_json"].unlink(missing_ok=True)
        write_vl_checkpoint(tiny["bf16"], p["ckpt"], TINY_VL_VISION, seed=seed)
        atomic_write_text(p["build_json"], json.dumps({"key": key, "seed": seed, "vision_config": TINY_VL_VISION,
                                                       "text_checkpoint": str(tiny["bf16"]),
                                                       "seconds": round(time.perf_counter() - t0, 2)}, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- images and embeddings
def make_test_image(width: int = 128, height: int = 96, seed: int = 0) -> np.ndarray:
    """A deterministic RGB image (uint8 [height, width, 3]): colour gradients, a disc and seeded
    noise, so every patch differs. 128x96 is a multiple of 32 px (patch 16 x merge 2) and gives
    12 >= 8 image tokens (llama.cpp's minimum for qwen3vl), so neither llama.cpp nor the HF
    processor resizes it: both sides embed the very same pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - 0.6 * width) ** 2 + (y - 0.4 * height) ** 2 < (0.25 * height) ** 2).astype(np.float32)
    img = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 200 * disc + 30], axis=-1)
    img = img + rng.normal(0, 20, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB uint8 image as PNG (Pillow), atomically."""


    with atomic_output(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(tmp, format="PNG")
    return Path(path)
