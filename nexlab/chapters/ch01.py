"""Chapter 01 helpers (notebooks/01_nvfp4_numerics.ipynb): an example weight, one block explained,
4-bit formats compared.

The formats themselves live in :mod:`nexlab.formats` (:mod:`~nexlab.formats.minifloat`,
:mod:`~nexlab.formats.nvfp4`, :mod:`~nexlab.formats.mxfp4`, :mod:`~nexlab.formats.kquants`); this
module only puts them side by side for the NVFP4 numerics chapter, with libggml
(:mod:`nexlab.llamacpp.libggml`) as the reference, and reads where llama.cpp's source uses
``input_scale`` (:func:`input_scale_in_llamacpp`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from nexlab.core.errors import NexlabError
from nexlab.formats import kquants, metrics, mxfp4, nvfp4
from nexlab.formats import minifloat as formats
from nexlab.ggufio.layout import pad
from nexlab.llamacpp import libggml as ggml_ref
from nexlab.model.checkpoint import Checkpoint


def load_example_weight(artifacts_dir: str | Path, seed: int = 0, max_rows: int = 1024) -> tuple[np.ndarray, str]:
    """A real routed-expert weight of the tiny model when notebook 00 has built it, else a generated one.

    Looks for ``artifacts_dir/tiny/bf16/*.safetensors`` and takes the first routed-expert
    projection it finds: a fused ``mlp.experts.gate_up_proj [E, 2I, H]`` (transformers 5)
    gives expert 0's gate rows, a per-expert ``mlp.experts.0.gate_proj.weight`` is used as
    is. Without it, a Student-t (3 degrees of freedom) matrix scaled like an initialised
    weight stands in, which is heavy-tailed as trained weights are. Returns
    ``(float32 [rows, in], name)``.
    """
    ckpt = Path(artifacts_dir) / "tiny" / "bf16"
    if (ckpt / "config.json").is_file():
        with Checkpoint(ckpt) as ck:
            for key in sorted(ck.entries):
                if key.endswith("mlp.experts.gate_up_proj"):
                    t = ck.load(key)[0]  # expert 0: [2I, H], gate rows first
                    w = t[: t.shape[0] // 2].float().numpy()
                    return np.ascontiguousarray(w[:max_rows]), f"{key}[0, :I] (gate of expert 0)"
                if ".mlp.experts.0.gate_proj.weight" in key:
                    return np.ascontiguousarray(ck.load(key).float().numpy()[:max_rows]), key
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(512, 1024)) * 0.02).astype(np.float32)
    return w, "generated Student-t(3) weight [512, 1024] (run notebook 00 for a real one)"


def example_distributions(n_values: int, cols: int = 4096, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic float32 matrices ``[n_values // cols, cols]`` for the format comparison.

    ``gaussian`` (standard normal), ``laplace`` (heavier tails) and ``outliers``: standard
    normal with 0.1 % of the values (at least one) multiplied by 30, the pattern that
    hurts formats whose scale is shared by many values.
    """
    if cols <= 0 or n_values < cols:
        raise NexlabError(f"n_values ({n_values}) must be at least cols ({cols}) and cols positive")
    rng = np.random.default_rng(seed)
    n = (n_values // cols) * cols
    out = {
        "gaussian": rng.standard_normal(n).astype(np.float32),
        "laplace": rng.laplace(size=n).astype(np.float32),
    }
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.choice(n, size=max(1, n // 1000), replace=False)] *= 30
    out["outliers"] = x
    return {k: v.reshape(-1, cols) for k, v in out.items()}


def explain_block(values: Any, tensor_amax: float) -> dict:
    """Quantize one block of 16 as ModelOpt would inside a tensor whose amax is ``tensor_amax``.

    ``weight_scale_2 = tensor_amax / 2688``; returns the scale byte (hex value, bit
    string, decoded), the 16 E2M1 codes, the reconstruction and its relative MSE — the
    numbers chapter 01's explorer shows.
    """
    x = formats.as_f32(values, name="block", finite=True).reshape(1, -1)
    if x.shape[1] != formats.NVFP4_GROUP:
        raise NexlabError(f"block: expected 16 values, got {x.shape[1]}")
    if not (np.isfinite(tensor_amax) and tensor_amax > 0):
        raise NexlabError(f"tensor_amax must be positive and finite, got {tensor_amax}")
    ws2 = nvfp4.nvfp4_tensor_scale(tensor_amax)
    q, s, ws2 = nvfp4.quantize_nvfp4_modelopt(x, weight_scale_2=ws2, name="block")
    recon = nvfp4.dequantize_nvfp4_modelopt(q, s, ws2)[0]
    byte = int(s[0, 0])
    err = float(np.sum((recon - x[0]) ** 2) / max(float(np.sum(x[0] ** 2)), 1e-30))
    return {
        "values": x[0],
        "weight_scale_2": float(ws2),
        "scale_byte": byte,
        "scale_bits": f"{byte >> 7} {(byte >> 3) & 0xF:04b} {byte & 7:03b}",
        "block_scale": float(formats.e4m3_bytes_to_f32(np.uint8(byte))),
        "codes": nvfp4.unpack_nibbles_adjacent(q)[0],
        "reconstruction": recon,
        "rel_mse": err,
    }


def _q4_k_roundtrip(x: np.ndarray) -> tuple[np.ndarray, str]:
    """Q4_K round trip through nexlab's quantizer (ggml's C when nexlab.formats.kquants is absent) and gguf-py."""

    try:

        data = np.asarray(kquants.quantize(x, "Q4_K"), dtype=np.uint8).reshape(x.shape[0], -1)
        label = "Q4_K"
    except ImportError:

        raw = ggml_ref.ggml_quantize_chunk("Q4_K", x, x.shape[0], x.shape[1])
        data = np.frombuffer(raw, dtype=np.uint8).reshape(x.shape[0], -1)
        label = "Q4_K (ggml C)"
    return dequantize(data, GGMLQuantizationType.Q4_K).reshape(x.shape).astype(np.float32), label


def compare_formats(tensors: dict[str, np.ndarray]) -> dict[str, dict[str, dict[str, float]]]:
    """Relative MSE and SQNR of NVFP4, MXFP4, INT4-g16 and Q4_K on each named 2-D tensor.

    NVFP4 is ModelOpt's two-level recipe; MXFP4 is ggml's quantizer (E8M0 per 32);
    INT4-g16 is symmetric with an FP16 scale per 16; Q4_K is ggml's K-quant without an
    importance matrix (needs rows of a multiple of 256, skipped otherwise).
    Bits per weight count the scales.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, x in tensors.items():
        x = formats.as_f32(x, name=name, finite=True)
        if x.ndim != 2:
            raise NexlabError(f"{name}: expected a 2-D tensor, got shape {x.shape}")
        recon = {
            "NVFP4": (nvfp4.dequantize_nvfp4_modelopt(*nvfp4.quantize_nvfp4_modelopt(x, name=name)), 4.5),
            "MXFP4": (mxfp4.dequantize_mxfp4_ggml(mxfp4.quantize_mxfp4_ggml(x, name=name)), 4.25),
            "INT4-g16": (mxfp4.dequantize_int4_g16(*mxfp4.quantize_int4_g16(x, name=name)), 5.0),
        }
        if x.shape[1] % 256 == 0:
            q4k, _ = _q4_k_roundtrip(x)
            recon["Q4_K"] = (q4k, 4.5)
        out[name] = {
            fmt: {"rel_mse": metrics.relative_mse(x, r), "sqnr_db": metrics.sqnr_db(x, r), "bits_per_weight": bpw}
            for fmt, (r, bpw) in recon.items()
        }
    return out


def e2m1_staircase(x: Any, scale_byte: int = 0x38, weight_scale_2: float = 1.0) -> np.ndarray:
    """``Q(x)``: every value of ``x`` quantized by ModelOpt's step 3 under one fixed block scale.

    The scale is ``e4m3(scale_byte) * weight_scale_2`` for every block (0x38 is 1.0, so the
    steps are the E2M1 grid itself); codes come from :func:`nexlab.formats.nvfp4.encode_nvfp4_modelopt`
    (round half to even, saturating at 6) and values from ``dequantize_nvfp4_modelopt``, so the
    staircase chapter 01 draws is the quantizer nexlab proves against ModelOpt, not a copy.
    ``x`` is 1-D; it is padded with zeros to a multiple of 16 and the padding dropped again.
    """
    v = formats.as_f32(x, name="x", finite=True).reshape(-1)
    n = pad(v.size, formats.NVFP4_GROUP)
    row = np.zeros((1, n), dtype=np.float32)
    row[0, : v.size] = v
    sb = np.full((1, n // formats.NVFP4_GROUP), scale_byte, dtype=np.uint8)
    q = nvfp4.encode_nvfp4_modelopt(row, sb, np.float32(weight_scale_2), name="x")
    return nvfp4.dequantize_nvfp4_modelopt(q, sb, np.float32(weight_scale_2))[0, : v.size]


def e8m0_vs_e4m3(weight: Any, *, name: str | None = None) -> dict[str, Any]:
    """The scales MXFP4 and NVFP4 pick for every block of one tensor ``weight [rows, in]`` (in % 32 == 0).

    MXFP4 is ggml's quantizer (:func:`nexlab.formats.mxfp4.quantize_mxfp4_ggml`): one E8M0 byte per 32
    values, a power of two ``2**(floor(log2 amax) - 2)`` on the E2M1 grid (ggml stores half of it
    against its doubled table; the product is the same). NVFP4 is ModelOpt's recipe
    (:func:`nexlab.formats.nvfp4.quantize_nvfp4_modelopt`): one E4M3 byte per 16 values times the tensor's
    ``weight_scale_2``. Returns bytes, effective scales (what one E2M1 step of 1 is worth),
    ``*_top = block amax / scale`` (where the block's largest value lands on the 0..6 grid: above 6
    it is clipped), both reconstructions and the relative MSE of each 32-value block under each
    format (``mx_err``, ``nv_err``, ``[rows, in/32]``).
    """
    x = formats.as_f32(weight, name=name, finite=True)
    if x.ndim != 2 or x.shape[1] % formats.MXFP4_BLOCK:
        raise NexlabError(f"{name or 'weight'}: expected [rows, in] with in % 32 == 0, got shape {x.shape}")
    mx = mxfp4.quantize_mxfp4_ggml(x, name=name).reshape(x.shape[0], -1, formats.GGML_MXFP4_BYTES)
    mx_recon = mxfp4.dequantize_mxfp4_ggml(mx.reshape(x.shape[0], -1), name=name)
    q, sb, ws2 = nvfp4.quantize_nvfp4_modelopt(x, name=name)
    nv_recon = nvfp4.dequantize_nvfp4_modelopt(q, sb, ws2, name=name)
    mx_scale = formats.e8m0_byte_to_f32(mx[..., 0])
    nv_scale = formats.e4m3_bytes_to_f32(sb) * ws2
    with np.errstate(divide="ignore", invalid="ignore"):
        mx_top = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=-1) / mx_scale
        nv_top = np.abs(x).reshape(x.shape[0], -1, 16).max(axis=-1) / nv_scale

    def block_err(r: np.ndarray) -> np.ndarray:
        xb, rb = x.reshape(x.shape[0], -1, 32).astype(np.float64), r.reshape(x.shape[0], -1, 32)
        return np.sum((rb - xb) ** 2, axis=-1) / np.maximum(np.sum(xb**2, axis=-1), 1e-30)

    return {"mx_byte": mx[..., 0], "mx_scale": mx_scale, "mx_top": mx_top, "mx_recon": mx_recon,
            "mx_err": block_err(mx_recon), "nv_byte": sb, "weight_scale_2": float(ws2), "nv_scale": nv_scale,
            "nv_top": nv_top, "nv_recon": nv_recon, "nv_err": block_err(nv_recon)}


def input_scale_in_llamacpp(src: str | Path) -> dict[str, Any]:
    """Where llama.cpp's source tree ``src`` touches ModelOpt's ``input_scale`` (the activation scale).

    Scans the library (``src/``) for lines naming an ``*_in_s`` member (the loaded
    ``<name>.input_scale`` tensors; ``ssm_in_s`` is the *weight* scale of ``ssm_in`` and is left
    out) or the string ``"input_scale"``, and every backend (``ggml/``) for ``input_scale``.
    ``graph`` maps the graph builders (``src/llama-graph.*``, ``src/models/*``) to their matching
    lines: a model that multiplied activations by the scale would show up here. ``other`` maps the
    remaining files (loader, member declarations, saver) to theirs. ``ggml`` lists the files under
    ``ggml/`` that mention ``input_scale``. ``nvfp4_vec_dot_type`` is the ``vec_dot_type`` of
    ``[GGML_TYPE_NVFP4]`` in the CPU backend's type traits (``ggml/src/ggml-cpu/ggml-cpu.c``):
    the type activations are quantized to before the NVFP4 dot product.
    """

    root = Path(src)
    pat = re.compile(r"\b(?!ssm_in_s\b)\w+_in_s\b|\"input_scale\"")
    graph: dict[str, list[str]] = {}
    other: dict[str, list[str]] = {}
    for f in sorted((root / "src").rglob("*")):
        if f.suffix not in (".c", ".cpp", ".h", ".hpp") or not f.is_file():
            continue
        rel = f.relative_to(root)
        hits = [ln.strip() for ln in f.read_text(encoding="utf-8", errors="replace").splitlines() if pat.search(ln)]
        if hits:
            is_graph = rel.parts[1] == "models" or rel.name.startswith("llama-graph.")
            (graph if is_graph else other)[rel.as_posix()] = hits
    exts = (".c", ".cpp", ".h", ".cu", ".cuh", ".m", ".metal", ".comp", ".cl", ".glsl", ".wgsl")
    ggml = sorted(f.relative_to(root).as_posix() for f in (root / "ggml").rglob("*")
                  if f.is_file() and f.suffix in exts
                  and "input_scale" in f.read_text(encoding="utf-8", errors="replace"))
    cpu = (root / "ggml" / "src" / "ggml-cpu" / "ggml-cpu.c").read_text(encoding="utf-8", errors="replace")
    m = re.search(r"\[GGML_TYPE_NVFP4\]\s*=\s*\{[^}]*?\.vec_dot_type\s*=\s*(GGML_TYPE_\w+)", cpu)
    return {"graph": graph, "other": other, "ggml": ggml, "nvfp4_vec_dot_type": m.group(1) if m else None}


def expert_amaxes(artifacts_dir: str | Path) -> dict[str, float]:
    """``amax(|W|)`` of every routed-expert projection of the tiny BF16 checkpoint
    (``artifacts_dir/tiny/bf16``), one entry per expert and projection; empty when notebook 00
    has not built it. Fused ``gate_up_proj [E, 2I, H]`` tensors are split into gate and up rows,
    as ModelOpt quantizes them (each projection gets its own amax; gate and up then share
    ``weight_scale_2``)."""
    ckpt = Path(artifacts_dir) / "tiny" / "bf16"
    out: dict[str, float] = {}
    if not (ckpt / "config.json").is_file():
        return out
    with Checkpoint(ckpt) as ck:
        for key in sorted(ck.entries):
            if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                a = ck.load(key).float().abs()  # [E, out, in]
                parts = ({"gate": a[:, : a.shape[1] // 2], "up": a[:, a.shape[1] // 2:]} if "gate_up" in key
                         else {"down": a})
                for p, t in parts.items():
                    out.update({f"{key}[{e}].{p}": float(v) for e, v in enumerate(t.amax(dim=(1, 2)).tolist())})
            elif ".mlp.experts." in key and key.endswith("_proj.weight"):
                out[key] = float(ck.load(key).float().abs().max())
    return out
