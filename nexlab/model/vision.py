"""The vision tower (mmproj) of a Qwen3.5-MoE checkpoint as llama.cpp's converter writes it.

The one plan of the mmproj GGUF that ``convert_hf_to_gguf.py --mmproj`` writes for a Qwen3-VL-style
vision tower (``conversion/qwen3vl.py`` of the llama.cpp tree in llama-cpp-python 0.3.36):
:func:`mmproj_specs` maps every ``model.visual.*`` checkpoint tensor to its GGUF names
(:func:`gguf_names`), shapes and ggml types (:func:`mmproj_tensor_type`: F16 / BF16 / F32, the Conv3d
patch embedding split in two); :func:`mmproj_tensor_plan` is the same as
:class:`nexlab.ggufio.layout.TensorSpec` rows. :func:`vision_config`, :func:`expected_vision_tensors`
and :func:`preprocessor_config` read and check a checkpoint's vision tower; :func:`config_for_vision`
wraps a bare ``vision_config`` for sizing.

The writer and the exact file size are :mod:`nexlab.convert.mmproj`
(:func:`nexlab.convert.mmproj.mmproj_size`); Nex-N2-mini is 899.28 MB as F16 and 902.82 MB (the
seed's 903 MB, :data:`SEED_MMPROJ_DTYPE`) with the F32 patch embedding of every non-F16 type: see
:func:`nexlab.chapters.ch03.explain_seed_size`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType as QT

from nexlab.core.errors import NexlabError
from nexlab.ggufio.layout import TensorSpec

MMPROJ_TYPES = {"f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32}


def mmproj_tensor_plan(vision: dict, dtype: str = "f16") -> list[TensorSpec]:
    """Tensors of the mmproj (numpy shapes), in file order: :func:`mmproj_specs`.

    Conv3d patch embedding split into two 2-D kernels (``v.patch_embd.weight`` and ``.weight.1``,
    F16 in an F16 file, F32 otherwise), position embedding F32, per block LayerNorms F32,
    qkv/out/fc1/fc2 weights in ``dtype`` with F32 biases, the patch merger (LayerNorm, fc1, fc2) and
    one deepstack merger per ``deepstack_visual_indexes`` entry.
    """

    if dtype not in MMPROJ_TYPES:
        raise NexlabError(f"mmproj dtype must be one of {', '.join(MMPROJ_TYPES)}, got {dtype!r}")
    if int(vision.get("temporal_patch_size", 2)) != 2:
        raise NexlabError("llama.cpp's converter supports temporal_patch_size 2 only")
    return [t.spec for t in mmproj_specs(vision, dtype)]


# ----------------------------------------------------------------------------- constants
MMPROJ_ARCH = "clip"                  # gguf.MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]


PROJECTOR_TYPE = "qwen3vl_merger"     # gguf.VisionProjectorType.QWEN3VL


VISUAL_PREFIXES = ("model.visual.", "visual.")  # published Qwen3.5 checkpoints: model.visual.*


DTYPES = ("f16", "bf16", "f32")       # --outtype of the reference converter (q8_0 is not offered)


SEED_MMPROJ_MB = 903                  # mmproj-Nex-N2-mini-F16.gguf on the seed's model card (decimal MB)


def vision_kind(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return "bias"
    if ("norm" in key.rsplit(".", 2)[-2]) and leaf == "weight":
        return "norm"
    if key.endswith("pos_embed.weight"):
        return "pos"
    return "weight"


# ----------------------------------------------------------------------------- the tensor plan
def vision_config(config: dict, *, where: str = "config.json") -> dict:
    """The ``vision_config`` of a Qwen3.5 / Qwen3-VL config.json, checked for what the mmproj needs.

    Raises ValueError naming the missing or unsupported key (the converter supports
    ``temporal_patch_size`` 2 only, as llama.cpp's).
    """
    v = config.get("vision_config")
    if not isinstance(v, dict):
        raise NexlabError(f"{where}: no vision_config: this checkpoint has no vision tower to write as an mmproj")
    need = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "out_hidden_size")
    missing = [k for k in need if not isinstance(v.get(k), int) or v[k] <= 0]
    if missing:
        raise NexlabError(f"{where}: vision_config.{missing[0]} must be a positive integer, got {v.get(missing[0])!r}")
    if int(v.get("temporal_patch_size", 2)) != 2:
        raise NexlabError(f"{where}: vision_config.temporal_patch_size is {v['temporal_patch_size']}; llama.cpp's "
                         "mmproj splits the Conv3d patch embedding into exactly two Conv2d kernels (2)")
    bad = [i for i in v.get("deepstack_visual_indexes") or [] if not 0 <= int(i) < int(v["depth"])]
    if bad:
        raise NexlabError(f"{where}: vision_config.deepstack_visual_indexes {bad} outside 0..{v['depth'] - 1}")
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
        raise NexlabError(f"tensor {key!r} is not part of the vision tower (model.visual.*)")
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
    raise NexlabError(f"tensor {key!r} has no place in the mmproj of this vision config")


def mmproj_tensor_type(name: str, ndim: int, dtype: str):
    """ggml type of one mmproj tensor, by llama.cpp's converter's rules (``MmprojModel.
    tensor_force_quant`` and ``ModelBase.prepare_tensors``): the patch embedding is F16 in an F16
    file and F32 in any other; 1-D tensors (biases, LayerNorms) and the position embedding F32;
    every other ``.weight`` the file's type."""
    QT = gguf.GGMLQuantizationType
    wt = {"f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32}.get(dtype)
    if wt is None:
        raise NexlabError(f"mmproj type must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if ".patch_embd.weight" in name:
        return QT.F16 if dtype == "f16" else QT.F32
    if (ndim <= 1 or name.endswith("_norm.weight") or name.startswith("v.position_embd.")
            or not name.endswith(".weight")):
        return QT.F32
    return wt


@dataclass(frozen=True)
class MmprojTensor:
    """One mmproj tensor: its spec (numpy-order shape, ggml type), the checkpoint key it comes
    from, and the temporal frame taken from the Conv3d patch embedding (None: the whole tensor)."""

    spec: Any
    key: str
    frame: int | None = None


def mmproj_specs(vision: dict, dtype: str = "f16",
                 keys: list[tuple[str, tuple[int, ...]]] | None = None) -> list[MmprojTensor]:
    """Every tensor of the mmproj in file order.

    ``keys``: the checkpoint's vision tensors ``(key, shape)`` in the order the reference reads
    them (shards in sorted order, keys sorted within a shard); default :func:`expected_vision_tensors`
    sorted (one shard). Shapes are checked against the config: a wrong one is a ValueError naming
    the tensor, as is a missing tensor or one with no place in the file.
    """

    want = expected_vision_tensors(vision)
    if keys is None:
        keys = sorted(want.items())
    seen = set()
    out: list[MmprojTensor] = []
    for key, shape in keys:
        canon = "model.visual." + key.split("visual.", 1)[1] if key.startswith(VISUAL_PREFIXES) else key
        names = gguf_names(key, vision)
        if canon not in want:
            raise NexlabError(f"tensor {key!r} has no place in the mmproj of this vision config")
        if tuple(shape) != want[canon]:
            raise NexlabError(f"tensor {key!r} has shape {list(shape)}, the vision config needs {list(want[canon])}")
        seen.add(canon)
        for name, frame in names:
            shp = tuple(shape) if frame is None else tuple(shape[:2]) + tuple(shape[3:])
            out.append(MmprojTensor(TensorSpec(name, shp, mmproj_tensor_type(name, len(shp), dtype), hf=key),
                                    key, frame))
    missing = [k for k in want if k not in seen]
    if missing:
        raise NexlabError(f"vision tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
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
            raise NexlabError(f"{d}: preprocessor_config.json must give {k} as 3 numbers (the mmproj stores the "
                             f"image normalisation), got {v!r}")
    return cfg


# ----------------------------------------------------------------------------- sizes
SEED_MMPROJ_DTYPE = "bf16"  # the converter type whose plan gives the seed's 903 MB file (see explain_seed_size)


def config_for_vision(vision: dict, text_hidden: int | None = None) -> dict:
    """A minimal config.json around a ``vision_config`` (the text hidden size is the projection
    dim, ``out_hidden_size`` unless given): enough for :func:`nexlab.convert.mmproj.plan_mmproj_from_config`."""
    return {"vision_config": dict(vision),
            "text_config": {"hidden_size": int(text_hidden or vision["out_hidden_size"]), "rms_norm_eps": 1e-6}}
