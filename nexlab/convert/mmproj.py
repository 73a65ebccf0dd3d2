"""The vision tower as llama.cpp's multimodal library (mtmd) loads it: the mmproj GGUF.

Nex-N2-mini is a vision-language model (``Qwen3_5MoeForConditionalGeneration``): beside the text
model sits a ViT (``model.visual.*``) whose output tokens are spliced into the text sequence.
llama.cpp keeps the two apart: the text GGUF (``qwen35moe``, :mod:`nexlab.convert.text`) and an
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

What the file holds is decided by :func:`nexlab.model.vision.mmproj_specs` (names, shapes, ggml
types, the checkpoint tensor each comes from) and :func:`add_mmproj_metadata` (``clip.*`` keys);
:func:`plan_mmproj` attaches "how to make the bytes" (the patch-embedding split, float32 ->
F16/BF16/F32) and :func:`convert_mmproj` writes it with :func:`nexlab.ggufio.writer.write_gguf`
(validated first, streamed, atomic, progress bar); ``nexlab convert --mmproj`` runs it. The reference
is llama.cpp's own ``convert_hf_to_gguf.py --mmproj`` (``Qwen3VLVisionModel`` in
``conversion/qwen3vl.py`` and ``MmprojModel`` in ``conversion/base.py`` of the llama.cpp tree in
llama-cpp-python 0.3.36): the tests compare both files tensor for tensor and key for key
(byte-equal); :mod:`nexlab.analysis.mtmd` runs ``llama-mtmd-cli`` on the result and compares
llama.cpp's image embeddings with transformers' vision tower.

Sizes come from the same plan: :func:`mmproj_file_nbytes` / :func:`mmproj_size` pack the planned
header with gguf-py (:mod:`nexlab.ggufio.layout`), so a predicted size is the size of the file this
module writes. Why Nex-N2-mini's is 899.28 MB as F16 and the seed's file 903 MB (the F32 patch
embedding llama.cpp's converter writes for every non-F16 type, :data:`nexlab.model.vision.SEED_MMPROJ_DTYPE`)
is :func:`nexlab.chapters.ch03.explain_seed_size`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.formats.registry import encode_tensor
from nexlab.ggufio.layout import PlannedFile
from nexlab.ggufio.metadata import add_general_metadata
from nexlab.ggufio.writer import PlannedTensor, WriteResult, write_plan
from nexlab.model.checkpoint import Checkpoint
from nexlab.model.config import PREPROCESSOR_CONFIG
from nexlab.model.vision import (
    DTYPES,
    MMPROJ_ARCH,
    MMPROJ_TYPES,
    PROJECTOR_TYPE,
    VISUAL_PREFIXES,
    MmprojTensor,
    config_for_vision,
    mmproj_specs,
    preprocessor_config,
    vision_config,
)


def mmproj_size(vision: dict, dtype: str = "f16") -> int:
    """Exact size in bytes of the mmproj GGUF (header and alignment padding included) from the
    plan :func:`convert_mmproj` writes (:func:`mmproj_file_nbytes`)."""

    if dtype not in MMPROJ_TYPES:
        raise NexlabError(f"mmproj dtype must be one of {', '.join(MMPROJ_TYPES)}, got {dtype!r}")
    return mmproj_file_nbytes(config_for_vision(vision), dtype)




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

    g = gguf
    K = g.Keys
    v = vision_config(config)
    text = {**config, **(config.get("text_config") or {})}
    add_general_metadata(w, name=name, license=license, quantized_by=quantized_by, source_url=None,
                      gguf_type=g.GGUFType.MMPROJ)
    ftype = {"f16": g.LlamaFileType.MOSTLY_F16, "bf16": g.LlamaFileType.MOSTLY_BF16,
             "f32": g.LlamaFileType.ALL_F32}[dtype]
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
    ``file_nbytes`` is the exact file size (:mod:`nexlab.ggufio.layout`, the writer's own set-up)."""

    dtype: str
    tensors: list  # nexlab.ggufio.writer.PlannedTensor
    add_metadata: Callable[[Any], None]
    arch = MMPROJ_ARCH


def _encode(data, spec) -> np.ndarray:
    """float tensor -> storage bytes of ``spec.ggml_type`` (nexlab.formats.registry.encode_tensor: through
    float32 as the reference, F16 by numpy's round-to-nearest-even cast, BF16 bits kept)."""

    return encode_tensor(data, spec.ggml_type, spec.name)


def plan_mmproj(ck, dtype: str = "f16", *, name: str | None = None, license: str = "apache-2.0",
                quantized_by: str = "nexlab") -> MmprojPlan:
    """Plan the mmproj of an open :class:`nexlab.model.checkpoint.Checkpoint` from headers only.

    Checks the vision config, the preprocessor config, every vision tensor's presence, shape and
    dtype (BF16 / F16 / F32), and that nothing under ``model.visual.`` is left without a place;
    each error names the tensor. Tensor order is the reference's (shards sorted, keys sorted).
    """

    config = ck.raw_config
    vision = vision_config(config, where=str(ck.path / "config.json"))
    preproc = preprocessor_config(ck.path)
    stored = [e for e in ck.stored.values() if e.key.startswith(VISUAL_PREFIXES)]
    stored.sort(key=lambda e: (e.shard.name, e.key))
    for e in stored:
        if e.dtype not in ("BF16", "F16", "F32"):
            raise NexlabError(f"vision tensor {e.key!r} has dtype {e.dtype}; "
                              "the mmproj converter takes BF16, F16 or F32")
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
def convert_mmproj(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16", *,
                   name: str | None = None, show_progress: bool = True) -> WriteResult:
    """Write the vision tower of ``ckpt_dir`` as an mmproj GGUF (``dtype``: f16, bf16 or f32).

    Byte-equal in tensors and ``clip.*`` metadata to llama.cpp's ``convert_hf_to_gguf.py --mmproj
    --outtype DTYPE`` (llama-cpp-python 0.3.36's tree). Planned and validated before anything is
    written (:func:`plan_mmproj`), then streamed through :func:`nexlab.ggufio.writer.write_gguf`: atomic
    (no partial file on any error), progress bar, one tensor in memory at a time.
    """

    if dtype not in DTYPES:
        raise NexlabError(f"mmproj type must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    with Checkpoint(ckpt_dir) as ck:
        plan = plan_mmproj(ck, dtype, name=name)
        return write_plan(out_path, plan, show_progress=show_progress, desc=f"mmproj {Path(out_path).name}",
                          started=t0)


def cli_convert_mmproj(args) -> int:
    """``nexlab convert CKPT_DIR --mmproj [f16|bf16|f32] -o mmproj-F16.gguf``."""
    r = convert_mmproj(args.ckpt_dir, args.output, args.mmproj, name=args.name, show_progress=not args.quiet)
    types = ", ".join(f"{k} {v}" for k, v in sorted(r.types.items()))
    print(f"wrote {r.path} (mmproj, {r.nbytes / 1e6:.1f} MB, {r.n_tensors} tensors: {types}) in {r.seconds:.1f} s")
    return 0
