"""The vision tower (mmproj) of a Qwen3.5-MoE checkpoint as llama.cpp's converter writes it.

A thin view of :mod:`nexlab.mmproj`, the one plan the mmproj writer uses: ``mmproj_tensor_plan``
lists the tensors of the F16 / BF16 / F32 mmproj GGUF that ``convert_hf_to_gguf.py --mmproj``
writes for a Qwen3-VL-style vision tower (``conversion/qwen3vl.py`` of the llama.cpp tree in
llama-cpp-python 0.3.36); :func:`mmproj_size` is the exact size of that file (header included)
for the memory tables of chapter 05. Nex-N2-mini: 899.28 MB as F16, 902.82 MB (the seed's 903
MB) with the F32 patch embedding of every non-F16 type: see :func:`nexlab.mmproj.explain_seed_size`.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as QT

from nexlab.qwen35moe import TensorSpec

MMPROJ_TYPES = {"f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32}


def mmproj_tensor_plan(vision: dict, dtype: str = "f16") -> list[TensorSpec]:
    """Tensors of the mmproj (numpy shapes), in file order: :func:`nexlab.mmproj.mmproj_specs`.

    Conv3d patch embedding split into two 2-D kernels (``v.patch_embd.weight`` and ``.weight.1``,
    F16 in an F16 file, F32 otherwise), position embedding F32, per block LayerNorms F32,
    qkv/out/fc1/fc2 weights in ``dtype`` with F32 biases, the patch merger (LayerNorm, fc1, fc2) and
    one deepstack merger per ``deepstack_visual_indexes`` entry.
    """
    from nexlab.mmproj import mmproj_specs  # noqa: PLC0415

    if dtype not in MMPROJ_TYPES:
        raise ValueError(f"mmproj dtype must be one of {', '.join(MMPROJ_TYPES)}, got {dtype!r}")
    if int(vision.get("temporal_patch_size", 2)) != 2:
        raise ValueError("llama.cpp's converter supports temporal_patch_size 2 only")
    return [t.spec for t in mmproj_specs(vision, dtype)]


def mmproj_size(vision: dict, dtype: str = "f16") -> int:
    """Exact size in bytes of the mmproj GGUF (header and alignment padding included) from the
    plan :func:`nexlab.mmproj.convert_mmproj` writes (:func:`nexlab.mmproj.mmproj_file_nbytes`)."""
    from nexlab.mmproj import config_for_vision, mmproj_file_nbytes  # noqa: PLC0415

    if dtype not in MMPROJ_TYPES:
        raise ValueError(f"mmproj dtype must be one of {', '.join(MMPROJ_TYPES)}, got {dtype!r}")
    return mmproj_file_nbytes(config_for_vision(vision), dtype)
