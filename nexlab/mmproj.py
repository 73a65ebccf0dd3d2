"""The vision tower as llama.cpp's multimodal library (mtmd) loads it: the mmproj GGUF.

Nex-N2-mini is a vision-language model (``Qwen3_5MoeForConditionalGeneration``): beside the text
model sits a ViT (``model.visual.*``) whose output tokens are spliced into the text sequence.
llama.cpp keeps the two apart: the text GGUF (``qwen35moe``, :mod:`nexlab.convert`) and an
"mmproj" GGUF (architecture ``clip``, projector type ``qwen3vl_merger``) that ``llama-mtmd-cli``,
``llama-server --mmproj`` and libmtmd load. How an image becomes tokens (Qwen3-VL style, which
Qwen3.5 keeps):

1. the image is resized to multiples of ``patch_size * spatial_merge_size`` (32 px) and
   normalised with the processor's ``image_mean`` / ``image_std``;
2. each 16x16 patch (the frame repeated twice: ``temporal_patch_size`` 2) is embedded by a Conv3d,
   stored as two Conv2d kernels ``v.patch_embd.weight`` / ``.weight.1`` whose outputs are summed;
3. a learned position embedding of ``num_position_embeddings`` (a 48x48 grid for Nex-N2-mini) is
   bilinearly resized to the image's patch grid and added; 2-D rotary embeddings inside attention;
4. ``depth`` pre-LayerNorm ViT blocks (fused qkv with biases, GELU-tanh MLP);
5. the merger: LayerNorm, then each 2x2 block of patches is concatenated (4 x hidden) and mapped by
   fc1 -> GELU -> fc2 to the text model's hidden size: one text token per 32x32 pixels.

What the file holds is decided by :func:`mmproj_specs` (names, shapes, ggml types, the checkpoint
tensor each comes from) and :func:`add_mmproj_metadata` (``clip.*`` keys); :func:`plan_mmproj`
attaches "how to make the bytes" (the patch-embedding split, float32 -> F16/BF16/F32) and
:func:`convert_mmproj` writes it with :func:`nexlab.convert.write_gguf` (validated first,
streamed, atomic, progress bar). The reference is llama.cpp's own ``convert_hf_to_gguf.py
--mmproj`` (``Qwen3VLVisionModel`` in ``conversion/qwen3vl.py`` and ``MmprojModel`` in
``conversion/base.py`` of the llama.cpp tree in llama-cpp-python 0.3.36): the tests compare both
files tensor for tensor and key for key (byte-equal), run ``llama-mtmd-cli`` on the result and
compare llama.cpp's image embeddings with transformers' vision tower.

Sizes come from the same plan: :func:`mmproj_file_nbytes` packs the planned header with gguf-py
(:mod:`nexlab.gguf_layout`), so a predicted size is the size of the file this module writes.
For Nex-N2-mini (:func:`explain_seed_size`): ``--outtype f16`` gives 899,282,976 bytes (899.3 MB);
the workbook's earlier 899.3 MB estimate was exactly this plan's tensor bytes, without the 19.6 KB
header: nothing was missing or mis-typed for an F16 file. The seed's ``mmproj-...-F16.gguf`` is
903 MB, 3.54 MB more: exactly the two Conv3d patch-embedding halves (2 x 1152x3x16x16) at F32
instead of F16. llama.cpp's converter keeps them F16 only in an F16 file and writes them F32 for
every other type; its ``bf16`` plan (also what ``--outtype auto`` picks for a BF16 checkpoint) is
902,821,920 bytes, which rounds to 903 MB. So the seed's file has the layout of that plan (F32
patch embedding, 2-byte weights), not of this converter's F16; the memory tables use that plan
(:data:`SEED_MMPROJ_DTYPE`), and ``--mmproj f16`` / ``bf16`` write either file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nexlab.config import PREPROCESSOR_CONFIG, tiny_config  # image processor settings; the tiny model
from nexlab.gguf_layout import PlannedFile

# ----------------------------------------------------------------------------- constants
MMPROJ_ARCH = "clip"                  # gguf.MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]
PROJECTOR_TYPE = "qwen3vl_merger"     # gguf.VisionProjectorType.QWEN3VL
VISUAL_PREFIXES = ("model.visual.", "visual.")  # published Qwen3.5 checkpoints: model.visual.*
DTYPES = ("f16", "bf16", "f32")       # --outtype of the reference converter (q8_0 is not offered)
SEED_MMPROJ_MB = 903                  # mmproj-Nex-N2-mini-F16.gguf on the seed's model card (decimal MB)



def _gguf():
    import gguf  # noqa: PLC0415

    return gguf


# ----------------------------------------------------------------------------- the tiny vision-language model
# A small Qwen3_5MoeVisionConfig with every structural feature of the real tower: the tiny model's own
# vision config made deeper and wider: several blocks, multi-head attention with 2-D rotary (head dim
# 32), the 2x2 merger to the text hidden size (256, the tiny text model's), a learned 8x8 position grid
# (image_size 128) that llama.cpp resizes.
TINY_VL_VISION = {**tiny_config()["vision_config"], "depth": 2, "hidden_size": 128, "intermediate_size": 256}
TINY_VL_FORMAT = 1  # bump when the tiny VL checkpoint's recipe changes (part of its cache key)


def tiny_vl_paths(artifacts_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Where :func:`ensure_tiny_vl` puts the tiny vision-language checkpoint (nothing is created)."""
    from nexlab.models import tiny_paths  # noqa: PLC0415

    a = tiny_paths(artifacts_dir)["artifacts"]
    return {"artifacts": a, "ckpt": a / "tiny-vl" / "bf16", "build_json": a / "tiny-vl" / "build.json"}


def _vision_kind(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return "bias"
    if ("norm" in key.rsplit(".", 2)[-2]) and leaf == "weight":
        return "norm"
    if key.endswith("pos_embed.weight"):
        return "pos"
    return "weight"


def random_vision_tensors(cfg: dict, seed: int) -> dict[str, Any]:
    """Seeded BF16 values for every ``model.visual.*`` tensor of ``cfg`` (names and shapes from
    transformers' ``Qwen3_5MoeForConditionalGeneration`` on the meta device).

    Weights N(0, 1/fan_in) so activations keep their scale through the blocks; biases N(0, 0.05),
    LayerNorm weights 1 + N(0, 0.1) and biases N(0, 0.05), position embeddings N(0, 0.5): every
    tensor differs from its default, so a tensor mapped to the wrong place changes the output.
    One ``torch.Generator`` seeded with ``seed``, keys in sorted order: deterministic.
    """
    import torch  # noqa: PLC0415

    from nexlab.synth import _meta_state_dict_shapes  # noqa: PLC0415

    shapes = {k: v for k, v in _meta_state_dict_shapes(cfg).items() if k.startswith("model.visual.")}
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        z = torch.randn(shape, generator=g, dtype=torch.float32)
        kind = _vision_kind(key)
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
    from nexlab.checkpoint import Checkpoint  # noqa: PLC0415
    from nexlab.config import validate_config  # noqa: PLC0415
    from nexlab.fileio import atomic_directory  # noqa: PLC0415
    from nexlab.models import ShardedWriter  # noqa: PLC0415

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


def ensure_tiny_vl(artifacts_dir: str | os.PathLike | None = None, smoke: bool = False, seed: int = 0) -> dict[str, Path]:
    """The tiny vision-language checkpoint, derived from the tiny text model; built once.

    :func:`nexlab.models.ensure_tiny` (``smoke``, ``seed``) first, unchanged; then its BF16 text
    weights plus a :data:`TINY_VL_VISION` tower seeded from ``seed`` are written to
    ``ARTIFACTS_DIR/tiny-vl/bf16`` (:func:`write_vl_checkpoint`). The build is reused while its key
    (the text checkpoint it came from, vision config, seed, :data:`TINY_VL_FORMAT`) is unchanged: a
    rebuilt tiny text model makes a new one. Returns :func:`tiny_vl_paths` plus ``"text"`` (the
    :func:`ensure_tiny` paths' ``bf16``) and ``"tokenizer"``. Safe from several processes (file lock).
    """
    from nexlab.fileio import atomic_write_text, locked  # noqa: PLC0415
    from nexlab.models import ensure_tiny  # noqa: PLC0415

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


# ----------------------------------------------------------------------------- the tensor plan
def vision_config(config: dict, *, where: str = "config.json") -> dict:
    """The ``vision_config`` of a Qwen3.5 / Qwen3-VL config.json, checked for what the mmproj needs.

    Raises ValueError naming the missing or unsupported key (the converter supports
    ``temporal_patch_size`` 2 only, as llama.cpp's).
    """
    v = config.get("vision_config")
    if not isinstance(v, dict):
        raise ValueError(f"{where}: no vision_config: this checkpoint has no vision tower to write as an mmproj")
    need = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "out_hidden_size")
    missing = [k for k in need if not isinstance(v.get(k), int) or v[k] <= 0]
    if missing:
        raise ValueError(f"{where}: vision_config.{missing[0]} must be a positive integer, got {v.get(missing[0])!r}")
    if int(v.get("temporal_patch_size", 2)) != 2:
        raise ValueError(f"{where}: vision_config.temporal_patch_size is {v['temporal_patch_size']}; llama.cpp's "
                         "mmproj splits the Conv3d patch embedding into exactly two Conv2d kernels (2)")
    bad = [i for i in v.get("deepstack_visual_indexes") or [] if not 0 <= int(i) < int(v["depth"])]
    if bad:
        raise ValueError(f"{where}: vision_config.deepstack_visual_indexes {bad} outside 0..{v['depth'] - 1}")
    return v


def expected_vision_tensors(vision: dict) -> dict[str, tuple[int, ...]]:
    """``model.visual.*`` key -> shape of a Qwen3.5 / Qwen3-VL vision tower of config ``vision``
    (what ``Qwen3_5MoeVisionModel`` holds; a test compares with transformers on the meta device)."""
    h, inter, depth = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["depth"])
    p, tp, cin = int(vision["patch_size"]), int(vision.get("temporal_patch_size", 2)), int(vision.get("in_channels", 3))
    m, out = int(vision.get("spatial_merge_size", 2)), int(vision["out_hidden_size"])
    npos, hm = int(vision.get("num_position_embeddings", 2304)), h * m * m
    v = "model.visual."
    s = {v + "patch_embed.proj.weight": (h, cin, tp, p, p), v + "patch_embed.proj.bias": (h,),
         v + "pos_embed.weight": (npos, h)}
    for i in range(depth):
        b = f"{v}blocks.{i}."
        s |= {b + "norm1.weight": (h,), b + "norm1.bias": (h,), b + "norm2.weight": (h,), b + "norm2.bias": (h,),
              b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,),
              b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
              b + "mlp.linear_fc1.weight": (inter, h), b + "mlp.linear_fc1.bias": (inter,),
              b + "mlp.linear_fc2.weight": (h, inter), b + "mlp.linear_fc2.bias": (h,)}
    s |= {v + "merger.norm.weight": (h,), v + "merger.norm.bias": (h,),
          v + "merger.linear_fc1.weight": (hm, hm), v + "merger.linear_fc1.bias": (hm,),
          v + "merger.linear_fc2.weight": (out, hm), v + "merger.linear_fc2.bias": (out,)}
    for j, _ in enumerate(vision.get("deepstack_visual_indexes") or []):
        b = f"{v}deepstack_merger_list.{j}."
        s |= {b + "norm.weight": (hm,), b + "norm.bias": (hm,),
              b + "linear_fc1.weight": (hm, hm), b + "linear_fc1.bias": (hm,),
              b + "linear_fc2.weight": (out, hm), b + "linear_fc2.bias": (out,)}
    return s


_BLOCK_MAP = {"norm1": "ln1", "norm2": "ln2", "attn.qkv": "attn_qkv", "attn.proj": "attn_out",
              "mlp.linear_fc1": "ffn_up", "mlp.linear_fc2": "ffn_down"}
_MERGER_MAP = {"norm": "v.post_ln", "linear_fc1": "mm.0", "linear_fc2": "mm.2"}
_DEEPSTACK_MAP = {"norm": "norm", "linear_fc1": "fc1", "linear_fc2": "fc2"}


def gguf_names(key: str, vision: dict) -> list[tuple[str, int | None]]:
    """Output tensor(s) of one ``model.visual.*`` (or ``visual.*``) key: ``[(gguf name, temporal
    slice or None)]``, as ``Qwen3VLVisionModel.modify_tensors`` maps them (the Conv3d patch
    embedding gives two tensors, frames 0 and 1). Raises ValueError for a key with no place."""
    k = key
    for pre in VISUAL_PREFIXES:
        if k.startswith(pre):
            k = k[len(pre):]
            break
    else:
        raise ValueError(f"tensor {key!r} is not part of the vision tower (model.visual.*)")
    base, _, leaf = k.rpartition(".")
    if k == "patch_embed.proj.weight":
        return [("v.patch_embd.weight", 0), ("v.patch_embd.weight.1", 1)]
    if k == "patch_embed.proj.bias":
        return [("v.patch_embd.bias", None)]
    if k == "pos_embed.weight":
        return [("v.position_embd.weight", None)]
    parts = base.split(".")
    if parts[0] == "blocks" and len(parts) >= 3 and parts[1].isdecimal() and ".".join(parts[2:]) in _BLOCK_MAP:
        if int(parts[1]) < int(vision["depth"]):
            return [(f"v.blk.{int(parts[1])}.{_BLOCK_MAP['.'.join(parts[2:])]}.{leaf}", None)]
    if parts[0] == "merger" and len(parts) == 2 and parts[1] in _MERGER_MAP:
        return [(f"{_MERGER_MAP[parts[1]]}.{leaf}", None)]
    if parts[0] == "deepstack_merger_list" and len(parts) == 3 and parts[1].isdecimal() and parts[2] in _DEEPSTACK_MAP:
        idx = list(vision.get("deepstack_visual_indexes") or [])
        j = int(parts[1])
        if j < len(idx):
            return [(f"v.deepstack.{int(idx[j])}.{_DEEPSTACK_MAP[parts[2]]}.{leaf}", None)]
    raise ValueError(f"tensor {key!r} has no place in the mmproj of this vision config")


def mmproj_tensor_type(name: str, ndim: int, dtype: str):
    """ggml type of one mmproj tensor, by llama.cpp's converter's rules (``MmprojModel.
    tensor_force_quant`` and ``ModelBase.prepare_tensors``): the patch embedding is F16 in an F16
    file and F32 in any other; 1-D tensors (biases, LayerNorms) and the position embedding F32;
    every other ``.weight`` the file's type."""
    QT = _gguf().GGMLQuantizationType
    wt = {"f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32}.get(dtype)
    if wt is None:
        raise ValueError(f"mmproj type must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if ".patch_embd.weight" in name:
        return QT.F16 if dtype == "f16" else QT.F32
    if ndim <= 1 or name.endswith("_norm.weight") or name.startswith("v.position_embd.") or not name.endswith(".weight"):
        return QT.F32
    return wt


@dataclass(frozen=True)
class MmprojTensor:
    """One mmproj tensor: its spec (numpy-order shape, ggml type), the checkpoint key it comes
    from, and the temporal frame taken from the Conv3d patch embedding (None: the whole tensor)."""

    spec: Any
    key: str
    frame: int | None = None


def mmproj_specs(vision: dict, dtype: str = "f16", keys: list[tuple[str, tuple[int, ...]]] | None = None) -> list[MmprojTensor]:
    """Every tensor of the mmproj in file order.

    ``keys``: the checkpoint's vision tensors ``(key, shape)`` in the order the reference reads
    them (shards in sorted order, keys sorted within a shard); default :func:`expected_vision_tensors`
    sorted (one shard). Shapes are checked against the config: a wrong one is a ValueError naming
    the tensor, as is a missing tensor or one with no place in the file.
    """
    from nexlab.qwen35moe import TensorSpec  # noqa: PLC0415

    want = expected_vision_tensors(vision)
    if keys is None:
        keys = sorted(want.items())
    seen = set()
    out: list[MmprojTensor] = []
    for key, shape in keys:
        canon = "model.visual." + key.split("visual.", 1)[1] if key.startswith(VISUAL_PREFIXES) else key
        names = gguf_names(key, vision)
        if canon not in want:
            raise ValueError(f"tensor {key!r} has no place in the mmproj of this vision config")
        if tuple(shape) != want[canon]:
            raise ValueError(f"tensor {key!r} has shape {list(shape)}, the vision config needs {list(want[canon])}")
        seen.add(canon)
        for name, frame in names:
            shp = tuple(shape) if frame is None else tuple(shape[:2]) + tuple(shape[3:])
            out.append(MmprojTensor(TensorSpec(name, shp, mmproj_tensor_type(name, len(shp), dtype), hf=key), key, frame))
    missing = [k for k in want if k not in seen]
    if missing:
        raise ValueError(f"vision tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    return out


def preprocessor_config(ckpt_dir: str | os.PathLike) -> dict:
    """``preprocessor_config.json`` merged with ``processor_config.json``'s ``image_processor`` (the
    reference reads both, in that order); image_mean and image_std must be 3 numbers each."""
    d = Path(ckpt_dir)
    cfg: dict = {}
    for name, nested in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        f = d / name
        if f.is_file():
            c = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(c.get(nested), dict):
                c = {**c, **c[nested]}
            cfg = {**cfg, **c}
    for k in ("image_mean", "image_std"):
        v = cfg.get(k)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ValueError(f"{d}: preprocessor_config.json must give {k} as 3 numbers (the mmproj stores the "
                             f"image normalisation), got {v!r}")
    return cfg


def source_is_nvfp4(ck) -> bool:
    """Whether llama.cpp's converter treats the checkpoint as NVFP4 (``ModelBase``'s ``_is_nvfp4`` in
    conversion/base.py: quant_algo ``NVFP4`` / ``W4A16_NVFP4`` in config.json's quantization_config or
    hf_quant_config.json). It then stamps every file it writes from it, the mmproj included, with
    ``general.file_type`` MOSTLY_NVFP4 (39), although the vision tower itself is F16/BF16/F32."""
    return ((ck.quant or {}).get("quant_algo") or "") in ("NVFP4", "W4A16_NVFP4")


def add_mmproj_metadata(w, config: dict, preproc: dict, dtype: str, *, name: str,
                        license: str = "apache-2.0", quantized_by: str = "nexlab",
                        nvfp4_source: bool = False) -> None:
    """The mmproj's key/values in the reference's order (``MmprojModel.set_gguf_parameters`` then
    ``Qwen3VLVisionModel``'s): file type, ``clip.has_vision_encoder``, projection dim (the text
    hidden size), image size (``sqrt(num_position_embeddings) * patch_size`` unless given), patch
    size, width, MLP width, blocks, heads, image mean/std, projector ``qwen3vl_merger``, GELU, merge
    size, the LayerNorm epsilon (the text config's rms_norm_eps, as the reference), deepstack flags."""
    from nexlab.convert import _general_metadata  # noqa: PLC0415

    g = _gguf()
    K = g.Keys
    v = vision_config(config)
    text = {**config, **(config.get("text_config") or {})}
    _general_metadata(w, name=name, license=license, quantized_by=quantized_by, source_url=None,
                      gguf_type=g.GGUFType.MMPROJ)
    ftype = {"f16": g.LlamaFileType.MOSTLY_F16, "bf16": g.LlamaFileType.MOSTLY_BF16, "f32": g.LlamaFileType.ALL_F32}[dtype]
    if nvfp4_source:  # the reference's prepare_metadata: a ModelOpt NVFP4 source makes every file MOSTLY_NVFP4
        ftype = g.LlamaFileType.MOSTLY_NVFP4
    w.add_file_type(int(ftype))
    w.add_bool(K.Clip.HAS_VISION_ENCODER, True)
    w.add_uint32(K.ClipVision.PROJECTION_DIM, int(text["hidden_size"]))
    image_size = v.get("image_size") or int(int(v.get("num_position_embeddings", 2304)) ** 0.5 * int(v["patch_size"]))
    w.add_uint32(K.ClipVision.IMAGE_SIZE, int(image_size))
    w.add_uint32(K.ClipVision.PATCH_SIZE, int(v["patch_size"]))
    w.add_uint32(K.ClipVision.EMBEDDING_LENGTH, int(v["hidden_size"]))
    w.add_uint32(K.ClipVision.FEED_FORWARD_LENGTH, int(v["intermediate_size"]))
    w.add_uint32(K.ClipVision.BLOCK_COUNT, int(v["depth"]))
    w.add_uint32(K.ClipVision.Attention.HEAD_COUNT, int(v["num_heads"]))
    w.add_array(K.ClipVision.IMAGE_MEAN, [float(x) for x in preproc["image_mean"]])
    w.add_array(K.ClipVision.IMAGE_STD, [float(x) for x in preproc["image_std"]])
    w.add_string(K.Clip.PROJECTOR_TYPE, PROJECTOR_TYPE)
    w.add_bool(K.ClipVision.USE_GELU, True)
    if v.get("spatial_merge_size") is not None:
        w.add_uint32(K.ClipVision.SPATIAL_MERGE_SIZE, int(v["spatial_merge_size"]))
    eps = (config.get("text_config") or {}).get("rms_norm_eps", 1e-6)
    w.add_float32(K.ClipVision.Attention.LAYERNORM_EPS, float(eps))
    deep = set(int(i) for i in v.get("deepstack_visual_indexes") or [])
    if int(v["depth"]) > 0:
        w.add_array(K.ClipVision.IS_DEEPSTACK_LAYERS, [i in deep for i in range(int(v["depth"]))])
    w.add_quantization_version(g.GGML_QUANT_VERSION)


@dataclass
class MmprojPlan(PlannedFile):
    """Everything :func:`convert_mmproj` will write: tensors (with producers) and metadata;
    ``file_nbytes`` is the exact file size (:mod:`nexlab.gguf_layout`, the writer's own set-up)."""

    dtype: str
    tensors: list  # nexlab.convert.PlannedTensor
    add_metadata: Callable[[Any], None]
    arch = MMPROJ_ARCH


def _encode(data, spec) -> np.ndarray:
    """float tensor -> storage bytes of ``spec.ggml_type`` (nexlab.convert.encode_tensor: through
    float32 as the reference, F16 by numpy's round-to-nearest-even cast, BF16 bits kept)."""
    from nexlab.convert import encode_tensor  # noqa: PLC0415

    return encode_tensor(data, spec.ggml_type, spec.name)


def plan_mmproj(ck, dtype: str = "f16", *, name: str | None = None, license: str = "apache-2.0",
                quantized_by: str = "nexlab") -> MmprojPlan:
    """Plan the mmproj of an open :class:`nexlab.checkpoint.Checkpoint` from headers only.

    Checks the vision config, the preprocessor config, every vision tensor's presence, shape and
    dtype (BF16 / F16 / F32), and that nothing under ``model.visual.`` is left without a place;
    each error names the tensor. Tensor order is the reference's (shards sorted, keys sorted).
    """
    from nexlab.convert import PlannedTensor  # noqa: PLC0415

    config = ck.raw_config
    vision = vision_config(config, where=str(ck.path / "config.json"))
    preproc = preprocessor_config(ck.path)
    stored = [e for e in ck.stored.values() if e.key.startswith(VISUAL_PREFIXES)]
    stored.sort(key=lambda e: (e.shard.name, e.key))
    for e in stored:
        if e.dtype not in ("BF16", "F16", "F32"):
            raise ValueError(f"vision tensor {e.key!r} has dtype {e.dtype}; the mmproj converter takes BF16, F16 or F32")
    specs = mmproj_specs(vision, dtype, [(e.key, e.shape) for e in stored])

    def produce(t: MmprojTensor):
        def make():
            x = ck.load_stored(t.key)
            if t.frame is not None:
                x = x[:, :, t.frame, ...]
            return _encode(x, t.spec)
        return make

    tensors = [PlannedTensor(t.spec, produce(t), (t.key,)) for t in specs]
    label = name or config.get("_name_or_path") or ck.path.name
    nvfp4 = source_is_nvfp4(ck)
    return MmprojPlan(dtype, tensors, lambda w: add_mmproj_metadata(w, config, preproc, dtype, name=label,
                                                                    license=license, quantized_by=quantized_by,
                                                                    nvfp4_source=nvfp4))


def plan_mmproj_from_config(config: dict, dtype: str = "f16", preproc: dict | None = None, *,
                            name: str = "mmproj") -> MmprojPlan:
    """The same plan for a config alone (no checkpoint): tensors in sorted key order, producers that
    refuse to run. Its ``file_nbytes`` is the size :func:`convert_mmproj` writes for a checkpoint of
    that config (order does not change the size; ``name`` is the only free-text field)."""
    from nexlab.convert import PlannedTensor  # noqa: PLC0415

    vision = vision_config(config)
    pre = preproc or PREPROCESSOR_CONFIG

    def nothing():
        raise RuntimeError("a plan made from a config alone has no tensor data")

    tensors = [PlannedTensor(t.spec, nothing, (t.key,)) for t in mmproj_specs(vision, dtype)]
    return MmprojPlan(dtype, tensors, lambda w: add_mmproj_metadata(w, config, pre, dtype, name=name))


def mmproj_file_nbytes(config: dict, dtype: str = "f16", *, name: str = "mmproj") -> int:
    """Exact size in bytes of the mmproj GGUF of a config (:func:`plan_mmproj_from_config`)."""
    return plan_mmproj_from_config(config, dtype, name=name).file_nbytes


# ----------------------------------------------------------------------------- writing
@dataclass
class MmprojResult:
    path: Path
    n_tensors: int
    nbytes: int
    seconds: float
    types: dict[str, int]


def convert_mmproj(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16", *,
                   name: str | None = None, show_progress: bool = True) -> MmprojResult:
    """Write the vision tower of ``ckpt_dir`` as an mmproj GGUF (``dtype``: f16, bf16 or f32).

    Byte-equal in tensors and ``clip.*`` metadata to llama.cpp's ``convert_hf_to_gguf.py --mmproj
    --outtype DTYPE`` (llama-cpp-python 0.3.36's tree). Planned and validated before anything is
    written (:func:`plan_mmproj`), then streamed through :func:`nexlab.convert.write_gguf`: atomic
    (no partial file on any error), progress bar, one tensor in memory at a time.
    """
    from nexlab.checkpoint import Checkpoint  # noqa: PLC0415
    from nexlab.convert import write_gguf  # noqa: PLC0415

    if dtype not in DTYPES:
        raise ValueError(f"mmproj type must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    with Checkpoint(ckpt_dir) as ck:
        plan = plan_mmproj(ck, dtype, name=name)
        path = write_gguf(out_path, MMPROJ_ARCH, plan.add_metadata, plan.tensors, show_progress=show_progress,
                          desc=f"mmproj {Path(out_path).name}")
    types: dict[str, int] = {}
    for t in plan.tensors:
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
    return MmprojResult(path, len(plan.tensors), plan.tensor_nbytes, time.perf_counter() - t0, types)


def cli_convert_mmproj(args) -> int:
    """``nexlab convert CKPT_DIR --mmproj [f16|bf16|f32] -o mmproj-F16.gguf``."""
    if getattr(args, "quiet", False):
        os.environ["NEXLAB_NO_PROGRESS"] = "1"
    r = convert_mmproj(args.ckpt_dir, args.output, args.mmproj, name=getattr(args, "name", None))
    types = ", ".join(f"{k} {v}" for k, v in sorted(r.types.items()))
    print(f"wrote {r.path} (mmproj, {r.nbytes / 1e6:.1f} MB, {r.n_tensors} tensors: {types}) in {r.seconds:.1f} s")
    return 0


def register_cli(subparsers) -> None:
    """``nexlab convert ... --mmproj [f16|bf16|f32]``: an option of the ``convert`` command (registered
    by :mod:`nexlab.convert`, which this module builds on) that writes the vision tower instead."""
    p = subparsers.choices.get("convert")
    if p is None:
        return
    p.add_argument("--mmproj", nargs="?", const="f16", default=None, choices=DTYPES,
                   help="write the vision tower as llama.cpp's mmproj GGUF instead (default type f16), as "
                        "convert_hf_to_gguf.py --mmproj does; for llama-mtmd-cli / llama-server --mmproj")
    text = p.get_default("func")
    p.set_defaults(func=lambda args: cli_convert_mmproj(args) if args.mmproj else text(args))


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
    from PIL import Image  # noqa: PLC0415

    from nexlab.fileio import atomic_output  # noqa: PLC0415

    with atomic_output(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(tmp, format="PNG")
    return Path(path)


def load_vision_tower(ckpt_dir: str | os.PathLike, dtype=None):
    """transformers' ``Qwen3_5MoeVisionModel`` of a checkpoint (float32 by default), its weights
    read through :class:`nexlab.checkpoint.Checkpoint` (no pickle, no text model built)."""
    import torch  # noqa: PLC0415
    from transformers import Qwen3_5MoeConfig  # noqa: PLC0415
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel  # noqa: PLC0415

    from nexlab.checkpoint import Checkpoint  # noqa: PLC0415

    d = Path(ckpt_dir)
    cfg = Qwen3_5MoeConfig(**json.loads((d / "config.json").read_text()))
    model = Qwen3_5MoeVisionModel._from_config(cfg.vision_config, dtype=dtype or torch.float32)
    with Checkpoint(d) as ck:
        sd = {}
        for key in ck.stored:
            for pre in VISUAL_PREFIXES:
                if key.startswith(pre):
                    sd[key[len(pre):]] = ck.load_stored(key).to(dtype or torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: vision tower tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model.eval()


def hf_pixel_values(image: np.ndarray, preproc: dict, vision: dict):
    """``pixel_values`` and ``image_grid_thw`` of transformers' Qwen2-VL image processor (the PIL
    backend) for ``image``, without resizing (see :func:`make_test_image`)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: PLC0415

    proc = Qwen2VLImageProcessorPil(image_mean=preproc["image_mean"], image_std=preproc["image_std"],
                                    patch_size=int(vision["patch_size"]),
                                    temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                                    merge_size=int(vision.get("spatial_merge_size", 2)))
    out = proc(images=[image], do_resize=False, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def transformers_image_embeddings(ckpt_dir: str | os.PathLike, image: np.ndarray) -> np.ndarray:
    """The image tokens transformers' vision tower gives the text model: ``pooler_output`` of
    ``Qwen3_5MoeVisionModel`` (after the merger), float32 [n_tokens, out_hidden_size], in raster
    order of the merged 2x2 blocks."""
    import torch  # noqa: PLC0415

    d = Path(ckpt_dir)
    config = json.loads((d / "config.json").read_text())
    model = load_vision_tower(d)
    pv, thw = hf_pixel_values(image, preprocessor_config(d), vision_config(config))
    with torch.no_grad():
        out = model(pv.float(), grid_thw=thw)
    return out.pooler_output.float().numpy()


_MTMD_QUIET = []


def _mtmd_quiet_callback():
    """A log callback for libmtmd that drops every line (kept alive for the process: libmtmd holds
    the pointer)."""
    import llama_cpp  # noqa: PLC0415

    if not _MTMD_QUIET:
        _MTMD_QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
    return _MTMD_QUIET[0]


def llamacpp_image_embeddings(mmproj_path: str | os.PathLike, text_gguf: str | os.PathLike, image: np.ndarray,
                              *, n_threads: int = 2) -> np.ndarray:
    """The image tokens llama.cpp computes (libmtmd through llama-cpp-python's ``mtmd_cpp``
    bindings: ``mtmd_tokenize`` the media marker with the image, ``mtmd_encode_chunk``,
    ``mtmd_get_output_embd``), float32 [n_tokens, n_embd of the text model]. CPU, no warm-up."""
    import ctypes  # noqa: PLC0415

    import llama_cpp  # noqa: PLC0415
    from llama_cpp import mtmd_cpp as M  # noqa: PLC0415

    from nexlab.llamacpp import open_model  # noqa: PLC0415

    llm = open_model(text_gguf, n_ctx=256, n_threads=n_threads)
    model_ptr = llm._model.model
    M.mtmd_log_set(_mtmd_quiet_callback(), None)  # clip's loader logs every tensor to stderr otherwise
    params = M.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = int(n_threads)
    params.warmup = False
    params.print_timings = False
    ctx = M.mtmd_init_from_file(str(Path(mmproj_path)).encode(), model_ptr, params)
    if not ctx:
        raise ValueError(f"llama.cpp's mtmd could not load {mmproj_path} with {text_gguf}")
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    bitmap = chunks = None
    try:
        bitmap = M.mtmd_bitmap_init(w, h, img.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = M.mtmd_input_chunks_init()
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(marker, len(marker), False, True)
        arr = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), arr, 1)
        if rc != 0:
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                break
        else:
            raise RuntimeError("mtmd_tokenize gave no image chunk")
        n_tok = M.mtmd_input_chunk_get_n_tokens(chunk)
        if M.mtmd_encode_chunk(ctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        n_embd = llama_cpp.llama_model_n_embd(model_ptr)
        ptr = M.mtmd_get_output_embd(ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_tok * n_embd,)).copy().reshape(n_tok, n_embd)
    finally:
        if chunks:
            M.mtmd_input_chunks_free(chunks)
        if bitmap:
            M.mtmd_bitmap_free(bitmap)
        M.mtmd_free(ctx)
        llm.close()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` (Frobenius, float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- sizes
SEED_MMPROJ_DTYPE = "bf16"  # the converter type whose plan gives the seed's 903 MB file (see explain_seed_size)


def config_for_vision(vision: dict, text_hidden: int | None = None) -> dict:
    """A minimal config.json around a ``vision_config`` (the text hidden size is the projection
    dim, ``out_hidden_size`` unless given): enough for :func:`plan_mmproj_from_config`."""
    return {"vision_config": dict(vision),
            "text_config": {"hidden_size": int(text_hidden or vision["out_hidden_size"]), "rms_norm_eps": 1e-6}}


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
      that plan (:data:`SEED_MMPROJ_DTYPE`), the writer can make both.
    """
    from nexlab.config import real_config  # noqa: PLC0415

    cfg = config or real_config()
    f16 = plan_mmproj_from_config(cfg, "f16", name="Nex-N2-mini")
    bf16 = plan_mmproj_from_config(cfg, "bf16", name="Nex-N2-mini")
    patch = {t.name: t for t in f16.tensors if t.name.startswith("v.patch_embd.weight")}
    patch_extra = sum(t.nbytes for t in patch.values())  # F16 -> F32 doubles them
    return {
        "seed_mb": SEED_MMPROJ_MB,
        "f16_file": f16.file_nbytes, "f16_tensors": f16.tensor_nbytes, "f16_header": f16.file_nbytes - f16.tensor_nbytes,
        "bf16_file": bf16.file_nbytes, "bf16_tensors": bf16.tensor_nbytes,
        "patch_embedding_f32_extra": patch_extra,
        "bf16_minus_f16": bf16.file_nbytes - f16.file_nbytes,
        "f16_rounds_to_mb": round(f16.file_nbytes / 1e6), "bf16_rounds_to_mb": round(bf16.file_nbytes / 1e6),
        "n_tensors": len(f16.tensors),
        "breakdown_f16": byte_breakdown(f16), "breakdown_bf16": byte_breakdown(bf16),
    }


# ----------------------------------------------------------------------------- llama.cpp's multimodal tool
@dataclass
class MtmdRun:
    returncode: int
    output: str   # the generated text (stdout)
    log: str      # llama.cpp's log (stderr)
    seconds: float
    command: list


def run_mtmd_cli(text_gguf: str | os.PathLike, mmproj: str | os.PathLike, image: str | os.PathLike, *,
                 prompt: str = "Describe the image.", n_predict: int = 8, n_ctx: int = 512, threads: int = 2,
                 timeout: float = 300) -> MtmdRun:
    """Run ``llama-mtmd-cli -m TEXT --mmproj MMPROJ --image IMAGE -p PROMPT`` (greedy, seed 0, no
    warm-up, CPU) and return what it printed; raise with the end of its log when it fails."""
    import subprocess  # noqa: PLC0415

    from nexlab.llamacpp import tool_path  # noqa: PLC0415

    cmd = [str(tool_path("llama-mtmd-cli")), "-m", str(text_gguf), "--mmproj", str(mmproj), "--image", str(image),
           "-p", prompt, "-n", str(int(n_predict)), "-c", str(int(n_ctx)), "-t", str(int(threads)),
           "--temp", "0", "--seed", "0", "--no-warmup"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    run = MtmdRun(r.returncode, r.stdout, r.stderr, time.perf_counter() - t0, cmd)
    if r.returncode != 0:
        raise RuntimeError(f"llama-mtmd-cli failed ({r.returncode}) on {image} with {mmproj}:\n{r.stderr[-3000:]}")
    return run
