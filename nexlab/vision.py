"""The vision tower (mmproj) of a Qwen3.5-MoE checkpoint as llama.cpp's converter writes it.

``mmproj_tensor_plan`` lists the tensors of the F16 (or BF16/F32/Q8_0) mmproj GGUF that
``convert_hf_to_gguf.py --mmproj`` writes for a Qwen3-VL-style vision tower (``conversion/qwen3vl.py``
of the llama.cpp tree in llama-cpp-python 0.3.36); :func:`mmproj_size` sums their bytes for the
memory tables of chapter 05.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as QT

from nexlab.qwen35moe import TensorSpec

MMPROJ_TYPES = {"f16": QT.F16, "bf16": QT.BF16, "f32": QT.F32, "q8_0": QT.Q8_0}


def mmproj_tensor_plan(vision: dict, dtype: str = "f16") -> list[TensorSpec]:
    """Tensors of the mmproj (numpy shapes).

    Conv3d patch embedding split into two 2-D kernels (``v.patch_embd.weight`` and ``.weight.1``,
    F16 in an F16 file, F32 otherwise), position embedding F32, per block LayerNorms F32,
    qkv/out/fc1/fc2 weights in ``dtype`` with F32 biases, the patch merger (LayerNorm, fc1, fc2) and
    one deepstack merger per ``deepstack_visual_indexes`` entry.
    """
    wt = MMPROJ_TYPES.get(dtype)
    if wt is None:
        raise ValueError(f"mmproj dtype must be one of {', '.join(MMPROJ_TYPES)}, got {dtype!r}")
    v = vision
    h, inter, depth = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["depth"])
    p, tp = int(v["patch_size"]), int(v.get("temporal_patch_size", 2))
    merge, out = int(v.get("spatial_merge_size", 2)), int(v["out_hidden_size"])
    cin = int(v.get("in_channels", 3))
    npos = int(v.get("num_position_embeddings", 2304))
    if tp != 2:
        raise ValueError("llama.cpp's converter supports temporal_patch_size 2 only")
    F32 = QT.F32
    patch_t = wt if wt == QT.F16 else F32  # MmprojModel.tensor_force_quant: F16 only for an F16 file

    def t(name, ne, typ):
        return TensorSpec(name, tuple(reversed(ne)), typ)

    s = [t("v.patch_embd.weight", (p, p, cin, h), patch_t), t("v.patch_embd.weight.1", (p, p, cin, h), patch_t),
         t("v.patch_embd.bias", (h,), F32), t("v.position_embd.weight", (h, npos), F32)]
    for i in range(depth):
        b = f"v.blk.{i}."
        s += [t(b + "ln1.weight", (h,), F32), t(b + "ln1.bias", (h,), F32),
              t(b + "ln2.weight", (h,), F32), t(b + "ln2.bias", (h,), F32),
              t(b + "attn_qkv.weight", (h, 3 * h), wt), t(b + "attn_qkv.bias", (3 * h,), F32),
              t(b + "attn_out.weight", (h, h), wt), t(b + "attn_out.bias", (h,), F32),
              t(b + "ffn_up.weight", (h, inter), wt), t(b + "ffn_up.bias", (inter,), F32),
              t(b + "ffn_down.weight", (inter, h), wt), t(b + "ffn_down.bias", (h,), F32)]
    hm = h * merge * merge
    s += [t("v.post_ln.weight", (h,), F32), t("v.post_ln.bias", (h,), F32),
          t("mm.0.weight", (hm, hm), wt), t("mm.0.bias", (hm,), F32),
          t("mm.2.weight", (hm, out), wt), t("mm.2.bias", (out,), F32)]
    for j in v.get("deepstack_visual_indexes", []) or []:
        b = f"v.deepstack.{j}."
        s += [t(b + "norm.weight", (hm,), F32), t(b + "norm.bias", (hm,), F32),
              t(b + "fc1.weight", (hm, hm), wt), t(b + "fc1.bias", (hm,), F32),
              t(b + "fc2.weight", (hm, out), wt), t(b + "fc2.bias", (out,), F32)]
    return s


def mmproj_size(vision: dict, dtype: str = "f16") -> int:
    """Weight bytes of the mmproj (tensor data; the file adds a few KB of header and padding)."""
    return sum(t.nbytes for t in mmproj_tensor_plan(vision, dtype))
