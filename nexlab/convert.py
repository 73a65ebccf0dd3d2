"""ModelOpt NVFP4 (or BF16) Qwen3.5-MoE checkpoint -> qwen35moe GGUF that llama.cpp runs.

What the file holds (names, types, shapes, order, metadata, transforms) is decided by
:mod:`nexlab.qwen35moe`, the one model of the architecture; this module attaches "how to make the
bytes" to each planned tensor and writes the file. Pipeline (one tensor, or one layer's experts, in
memory at a time):

1. :class:`nexlab.checkpoint.Checkpoint` indexes the safetensors headers; :func:`validate_checkpoint`
   rejects a malformed checkpoint before anything is written.
2. :func:`plan_conversion` takes :func:`nexlab.qwen35moe.tensor_plan` for the checkpoint (which
   modules are NVFP4, which sidecars are non-trivial, whether ``lm_head`` exists), checks every
   source tensor's header shape against it, and gives each tensor a ``produce`` callable that loads
   the sources, applies the qwen35moe transforms and encodes the bytes; the GGUF header (metadata
   and tensor infos) is therefore known before the first tensor is read, and so is the exact file
   size (:func:`predict_file_size`, through :mod:`nexlab.gguf_layout`).
3. :func:`write_gguf` streams the tensors into a temporary file in the target folder and renames it
   at the end; any error removes the temporary file, so no partial GGUF is ever left.

What is written matches llama.cpp's own ``convert_hf_to_gguf.py`` (the ``Qwen3_5MoeTextModel``
class of the llama.cpp tree in llama-cpp-python 0.3.36, run with ``--outtype bf16 --no-mtp``)
tensor for tensor, byte for byte, and for ``q8_0`` / ``q4_k_m`` llama_model_quantize's output on
that file; tests compare them with ``gguf.GGUFReader``. NVFP4 modules are repacked losslessly
into ggml NVFP4 (type 40) by :func:`nexlab.nvfp4.repack_modelopt_to_ggml`; float tensors go
through float32 (as the reference does) and BF16 rounds to nearest even (ggml_compute_fp32_to_bf16).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nexlab import qwen35moe as Q
from nexlab.chat_template import original_template, resolve_chat_template
from nexlab.checkpoint import Checkpoint, e4m3_bytes_nan_mask, validate_checkpoint
from nexlab.fileio import atomic_output, disk_full_error, ensure_free_space
from nexlab.formats import f32_to_bf16_bits
from nexlab.gguf_layout import PlannedFile, file_nbytes, make_writer
from nexlab.imatrix import imatrix_for_tensor, quantize_weights, read_imatrix
from nexlab.nvfp4 import (dequantize_nvfp4_ggml, dequantize_nvfp4_modelopt, repack_modelopt_to_ggml,
                          unpack_nibbles_adjacent, unpack_nvfp4_ggml)
from nexlab.progress import progress
from nexlab.quantize import quantize_tensor
from nexlab.tokenizer import pretokenizer_name

ARCH = Q.ARCH
VARIANTS = Q.VARIANTS
log = logging.getLogger(__name__)


def _gguf():
    import gguf  # noqa: PLC0415

    return gguf


# ----------------------------------------------------------------------------- encoding
def encode_tensor(data, ggml_type, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode one float tensor (torch or numpy, numpy-order shape) into ``ggml_type`` storage bytes.

    F32 / F16 / BF16 are done here (a BF16 source going to BF16 keeps its bits); other types go to
    ``nexlab.quantize.quantize_tensor(data, type_name, imatrix [n_expert, ne0] | None)``
    (K-quants / Q8_0 bit-exact with ggml_quantize_chunk, from the kquants chapter).
    """
    import torch  # noqa: PLC0415

    T = _gguf().GGMLQuantizationType
    if ggml_type not in (T.F32, T.F16, T.BF16):
        # quantized types: row pieces are widened to float32 one at a time (no float32 copy of a 1 GB tensor)
        return quantize_tensor(data, ggml_type.name, imatrix, name=name)
    if isinstance(data, torch.Tensor):
        if ggml_type == T.BF16 and data.dtype == torch.bfloat16:
            return data.contiguous().view(torch.int16).numpy().view(np.uint16)
        data = data.float().numpy()
    data = np.asarray(data)
    if ggml_type == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return f32_to_bf16_bits(data)



def _scale_bytes(scale) -> np.ndarray:
    import torch  # noqa: PLC0415

    if scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight_scale dtype {scale.dtype}, expected float8_e4m3fn")
    return scale.contiguous().view(torch.uint8).numpy()


def repack_nvfp4_module(ck: Checkpoint, module: str, cfg: dict, out: np.ndarray | None = None) -> np.ndarray:
    """Load one NVFP4 module, check its block scales, reorder if needed, repack to ggml bytes
    (into ``out`` when given: one expert's slot of a stacked tensor)."""
    w = ck.load(f"{module}.weight")
    s = ck.load(f"{module}.weight_scale")
    nan = e4m3_bytes_nan_mask(_scale_bytes(s))
    if nan.any():
        r, c = np.argwhere(nan)[0]
        raise ValueError(f"{module}.weight_scale: NaN block scale at row {r}, block {c}")
    w, s = Q.transform_nvfp4(f"{module}.weight", w, s, cfg)
    return repack_modelopt_to_ggml(w.numpy(), _scale_bytes(s), name=module, out=out)


# ----------------------------------------------------------------------------- planning
@dataclass
class PlannedTensor:
    """One output tensor: its :class:`nexlab.qwen35moe.TensorSpec` and how to make its bytes."""

    spec: Q.TensorSpec
    produce: Callable[[], np.ndarray] = field(repr=False)
    sources: tuple[str, ...] = ()

    name = property(lambda self: self.spec.name)
    ggml_type = property(lambda self: self.spec.ggml_type)
    shape = property(lambda self: self.spec.shape)
    layer = property(lambda self: self.spec.layer)
    nbytes = property(lambda self: self.spec.nbytes)


def checkpoint_hparams(ck: Checkpoint) -> Q.HParams:
    """The checkpoint's hyper-parameters (:func:`nexlab.qwen35moe.hparams_from_hf_config`); tied
    embeddings when it has no ``lm_head.weight``."""
    hp = Q.hparams_from_hf_config(ck.raw_config, name=ck.path.name)
    tied = "lm_head.weight" not in ck
    return hp if hp.tied_embeddings == tied else replace(hp, tied_embeddings=tied)


def _scalars(ck: Checkpoint, names: list[str]) -> np.ndarray:
    return np.array([float(ck.load(n).float().reshape(-1)[0]) if n in ck else 1.0 for n in names], dtype=np.float32)


def _expert_modules(stack: str, n_expert: int) -> list[str]:
    """``model.layers.N.mlp.experts.{proj}`` -> the per-expert modules ``...experts.{e}.{proj}``."""
    base, proj = stack.rsplit(".", 1)
    return [f"{base}.{e}.{proj}" for e in range(n_expert)]


#: what ``--experts`` can ask for: the routed and shared experts of a BF16 checkpoint quantized to NVFP4
EXPERT_FORMATS = ("nvfp4",)


def _check_experts(ck: Checkpoint, experts: str | None, nvfp4_scales: str | None) -> str | None:
    """The scale method when ``experts == "nvfp4"`` (default ``max``), None otherwise; refuses a scale
    method without ``--experts nvfp4`` and a checkpoint whose experts are NVFP4 already."""
    from nexlab.scales import METHODS  # noqa: PLC0415

    if experts is None:
        if nvfp4_scales is not None:
            raise ValueError(f"--nvfp4-scales {nvfp4_scales} needs --experts nvfp4 (a BF16 checkpoint's experts "
                             "quantized by nexlab); a ModelOpt checkpoint's NVFP4 experts are repacked as they are")
        return None
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"unknown --experts {experts!r}; choose one of {', '.join(EXPERT_FORMATS)}")
    method = nvfp4_scales or "max"
    if method not in METHODS:
        raise ValueError(f"unknown --nvfp4-scales {method!r}; choose one of {', '.join(METHODS)}")
    quantized = [m for m in ck.entries if m.endswith(".weight_scale") and Q.nvfp4_scope("mlp")(m)]
    if quantized:
        raise ValueError(f"{ck.path}: the experts are NVFP4 already ({quantized[0]}, ...): convert without "
                         "--experts to repack them losslessly, or point --experts nvfp4 at a BF16 checkpoint")
    return method


def plan_tensors(ck: Checkpoint, variant: str = "bf16", imatrix: dict[str, np.ndarray] | None = None, *,
                 experts: str | None = None, nvfp4_scales: str | None = None) -> list[PlannedTensor]:
    """Every output tensor of the GGUF, in file order, from headers (and per-tensor scalars) only.

    The list is :func:`nexlab.qwen35moe.tensor_plan` for this checkpoint. ``imatrix``: ``{gguf_name:
    column weights}`` (:func:`nexlab.imatrix.quantize_weights`) used when a float tensor is quantized
    to a K-quant; a missing entry falls back to no importance weights, as llama.cpp does, with a
    warning. ``experts="nvfp4"``: the routed and shared experts of a BF16 checkpoint become NVFP4 with
    the scale rule ``nvfp4_scales`` (:mod:`nexlab.scales`; gate and up of an expert share a tensor
    scale, as ModelOpt's export; ``.scale`` sidecars, no ``.input_scale``: that needs activation
    calibration), the imatrix weighting ``search``. Raises ValueError naming the tensor when a source
    is missing, has the wrong shape, or a checkpoint tensor has no place in the file.
    """
    import torch  # noqa: PLC0415

    cfg = ck.config
    hp = checkpoint_hparams(ck)
    method = _check_experts(ck, experts, nvfp4_scales)
    made_nvfp4 = Q.nvfp4_scope("mlp") if method is not None else (lambda module: False)
    T = _gguf().GGMLQuantizationType
    plain = (T.F32, T.F16, T.BF16)
    scalar_cache: dict[tuple[str, str], np.ndarray] = {}

    def sidecar_values(module: str, suffix: str) -> np.ndarray:
        src = ".weight_scale_2" if suffix == ".scale" else ".input_scale"
        key = (module, src)
        if key not in scalar_cache:
            stacked = module.split(".")[-2] == "experts"  # model.layers.N.mlp.experts.{proj}
            mods = _expert_modules(module, hp.n_expert) if stacked else [module]
            scalar_cache[key] = _scalars(ck, [m + src for m in mods])
        return scalar_cache[key]

    def keep_sidecar(module: str, suffix: str) -> bool:
        if made_nvfp4(module):
            return suffix == ".scale"
        vals = sidecar_values(module, suffix)
        if vals.size > 1:
            return not np.allclose(vals, 1.0, atol=Q.SCALE_TRIVIAL_ATOL)
        return abs(float(vals.sum()) - 1.0) >= Q.SCALE_TRIVIAL_ATOL

    specs = Q.tensor_plan(hp, variant, nvfp4=lambda m: ck.is_nvfp4(m) or made_nvfp4(m), sidecars=keep_sidecar,
                          lm_head="lm_head.weight" in ck)

    def imat(spec: Q.TensorSpec):
        if imatrix is None or spec.ggml_type in plain:
            return None
        shape = spec.shape
        return imatrix_for_tensor(imatrix, spec.name, shape[-1], shape[0] if len(shape) == 3 else 1, log=log.warning)

    def expect(hf: str, shape: tuple[int, ...]) -> None:
        """The source's header shape must be the planned one (conv1d squeezed; q8_0 / q4_k_m plans drop
        leading 1s, as ggml_n_dims does)."""
        got = tuple(ck.info(hf).shape)
        if hf.endswith("conv1d.weight"):
            got = tuple(x for x in got if x != 1) or (1,)
        if Q.ggml_n_dims_shape(got) != Q.ggml_n_dims_shape(shape):
            raise ValueError(f"tensor {hf!r} has shape {list(got)}, the configuration needs {list(shape)}")

    def expect_nvfp4(module: str, shape: tuple[int, ...]) -> None:
        w, s = ck.info(module + ".weight"), ck.info(module + ".weight_scale")
        out, n_in = shape[-2], shape[-1]
        if tuple(w.shape) != (out, n_in // 2) or tuple(s.shape) != (out, n_in // Q.NVFP4_GROUP_SIZE):
            raise ValueError(f"NVFP4 module {module!r}: weight {list(w.shape)} / weight_scale {list(s.shape)}, "
                             f"the configuration needs [{out}, {n_in // 2}] / [{out}, {n_in // Q.NVFP4_GROUP_SIZE}]")

    def expert_loader(layer: int, proj: str) -> tuple[Callable[[], Any], tuple[str, ...]]:
        """A loader of a layer's routed experts ``proj`` as one float tensor [n_expert, out, in] (fused
        ``gate_up_proj`` / ``down_proj`` or per-expert modules; shapes checked) and its sources."""
        per_expert = (hp.n_ff_exp, hp.n_embd) if proj != "down_proj" else (hp.n_embd, hp.n_ff_exp)
        if ck.experts_fused(layer):
            p = f"model.layers.{layer}.mlp.experts."
            gu, dn = p + "gate_up_proj", p + "down_proj"
            used.update([gu, dn])
            n_ff = hp.n_ff_exp
            if proj == "down_proj":
                expect(dn, (hp.n_expert,) + per_expert)
                return (lambda: ck.load(dn)), (dn,)
            expect(gu, (hp.n_expert, 2 * n_ff, hp.n_embd))
            rows = slice(0, n_ff) if proj == "gate_proj" else slice(n_ff, 2 * n_ff)
            return (lambda: ck.load(gu)[:, rows, :]), (gu,)
        mods = _expert_modules(f"model.layers.{layer}.mlp.experts.{proj}", hp.n_expert)
        for m in mods:
            expect(m + ".weight", per_expert)
        srcs = tuple(m + ".weight" for m in mods)
        used.update(srcs)
        return (lambda: torch.stack([ck.load(n) for n in srcs])), srcs

    made: dict[str, list] = {}  # module -> [ggml bytes, scale values, uses left]

    def made_tensor(module: str, what: int) -> np.ndarray:
        """Quantize the group holding ``module`` (an expert's gate and up share a tensor scale) with the
        chosen scale rule on first use; ``what`` 0: its ggml bytes, 1: its ``.scale`` values. Each part
        is handed out once, then dropped."""
        if module not in made:
            made.update(_quantize_expert_group(module, hp, loaders, method, imatrix))
        item = made[module]
        out, item[what] = item[what], None
        item[2] -= 1
        if item[2] == 0:
            del made[module]
        return out

    loaders: dict[str, tuple[Callable[[], Any], str]] = {}  # module -> (loader of [E?, out, in], gguf name)
    used: set[str] = set()
    plan: list[PlannedTensor] = []
    for spec in specs:
        hf = spec.hf
        if spec.kind in ("scale", "input_scale") and made_nvfp4(hf):
            plan.append(PlannedTensor(spec, lambda m=hf: made_tensor(m, 1), (hf,)))
        elif spec.kind == "nvfp4" and made_nvfp4(hf):
            if spec.stacked:
                load, srcs = expert_loader(spec.layer, hf.rsplit(".", 1)[1])
            else:
                expect(hf + ".weight", spec.shape)
                used.add(hf + ".weight")
                load, srcs = (lambda m=hf: ck.load(m + ".weight")), (hf + ".weight",)
            loaders[hf] = (load, spec.name)
            plan.append(PlannedTensor(spec, lambda m=hf: made_tensor(m, 0), srcs))
        elif spec.kind in ("scale", "input_scale"):
            vals = sidecar_values(hf, spec.name[spec.name.rindex("."):])
            plan.append(PlannedTensor(spec, lambda v=vals: v, (hf,)))
        elif spec.kind == "nvfp4" and not spec.stacked:
            expect_nvfp4(hf, spec.shape)
            used.update(hf + s for s in (".weight",) + Q.NVFP4_SIDECARS)
            plan.append(PlannedTensor(spec, lambda m=hf: repack_nvfp4_module(ck, m, cfg), (hf + ".weight",)))
        elif spec.kind == "nvfp4":
            mods = _expert_modules(hf, hp.n_expert)
            for m in mods:
                expect_nvfp4(m, spec.shape)
                used.update(m + s for s in (".weight",) + Q.NVFP4_SIDECARS)

            def produce(mods=mods, spec=spec):
                stacked = np.empty(spec.nbytes, dtype=np.uint8).reshape(spec.shape[0], spec.shape[1], -1)
                for k, m in enumerate(mods):
                    repack_nvfp4_module(ck, m, cfg, out=stacked[k])
                return stacked

            plan.append(PlannedTensor(spec, produce, tuple(m + ".weight" for m in mods)))
        elif spec.stacked:
            load, srcs = expert_loader(spec.layer, hf.rsplit(".", 1)[1])
            plan.append(PlannedTensor(spec, lambda load=load, spec=spec:
                                      encode_tensor(load(), spec.ggml_type, spec.name, imat(spec)), srcs))
        else:
            expect(hf, spec.shape)
            used.add(hf)
            plan.append(PlannedTensor(spec, lambda hf=hf, spec=spec: encode_tensor(
                Q.transform_float(hf, ck.load(hf), cfg), spec.ggml_type, spec.name, imat(spec)), (hf,)))

    left = sorted(n for n in ck.entries if n not in used and not n.endswith(Q.IGNORED_SUFFIXES))
    if left:
        raise ValueError(f"{len(left)} checkpoint tensors have no place in the qwen35moe GGUF, e.g. {left[:3]}")
    return plan


def _quantize_expert_group(module: str, hp: Q.HParams, loaders: dict, method: str,
                           imatrix: dict[str, np.ndarray] | None) -> dict[str, list]:
    """NVFP4 of the projections that share a tensor scale with ``module`` (gate and up of each expert;
    down alone) by :func:`nexlab.scales.quantize_nvfp4_group`, expert by expert, repacked to ggml:
    ``{module: [ggml bytes, .scale values, 2]}``. Column weights from the imatrix entry of each GGUF
    tensor (per expert for ``*_exps``); an expert without routed tokens gets llama-quantize's uniform
    weights, which the search treats as unweighted."""
    from nexlab.scales import quantize_nvfp4_group  # noqa: PLC0415

    base, proj = module.rsplit(".", 1)
    group = [f"{base}.{p}" for p in (("gate_proj", "up_proj") if proj != "down_proj" else ("down_proj",))]
    stacked = base.endswith(".experts")
    n_e = hp.n_expert if stacked else 1
    ws, imps, outs = [], [], []
    for m in group:
        load, gname = loaders[m]
        w = load().float().numpy().reshape(n_e, *_expert_shape(hp, m))
        ws.append(w)
        imps.append(imatrix_for_tensor(imatrix, gname, w.shape[-1], n_e, log=log.warning))
        outs.append(np.empty((n_e, w.shape[1], w.shape[2] // 64 * 36), dtype=np.uint8))
    qs = quantize_nvfp4_group(ws, method, imps, names=[loaders[m][1] for m in group])
    del ws
    for k, q in enumerate(qs):
        for e in range(n_e):
            repack_modelopt_to_ggml(q.weight[e], q.weight_scale[e], name=f"{loaders[group[k]][1]} (expert {e})",
                                    out=outs[k][e])
    return {m: [o if stacked else o[0], np.asarray(q.weight_scale_2, dtype=np.float32).reshape(n_e), 2]
            for m, o, q in zip(group, outs, qs)}


def _expert_shape(hp: Q.HParams, module: str) -> tuple[int, int]:
    """[out, in] of one expert projection (routed or shared) of ``hp``."""
    proj = module.rsplit(".", 1)[1]
    n_ff = hp.n_ff_exp if ".experts" in module else hp.n_ff_shexp
    return (hp.n_embd, n_ff) if proj == "down_proj" else (n_ff, hp.n_embd)


# ----------------------------------------------------------------------------- metadata
def _find_tokenizer_dir(ck: Checkpoint, tokenizer_dir: str | os.PathLike | None) -> Path:
    cands = [Path(tokenizer_dir)] if tokenizer_dir else [ck.path, ck.path / "tokenizer", ck.path.parent / "tokenizer"]
    for d in cands:
        if (d / "tokenizer.json").is_file():
            return d
    raise ValueError(f"no tokenizer.json in {', '.join(str(c) for c in cands)} (pass tokenizer_dir)")


def _tok_content(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def check_tokenizer_pre(name) -> str:
    """``name`` if it can be a llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``), else ValueError.

    llama.cpp's names are lower case letters, digits and ``. _ -`` (``qwen35``, ``gpt-2``,
    ``a.x-4.0``); whether llama.cpp knows the name is checked when it loads the file.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ValueError(f"tokenizer_pre (--tokenizer-pre) must be a llama.cpp pre-tokenizer name such as "
                         f"qwen35, qwen2 or gpt-2, got {name!r}")
    return name


def tokenizer_metadata(tok_dir: Path, vocab_size: int, config: dict, *,
                       tokenizer_pre: str | None = None) -> dict[str, Any]:
    """gpt2-style BPE vocabulary for llama.cpp from a Hugging Face ``tokenizer.json``.

    Tokens are the byte-level BPE strings by id, padded to ``vocab_size`` with ``[PAD{i}]``
    (type UNUSED) like llama.cpp's converter; added tokens are CONTROL when special, else
    USER_DEFINED; merges as ``"a b"`` strings. ``pre`` (``tokenizer.ggml.pre``) is the llama.cpp
    pre-tokenizer that splits text as the tokenizer's own pre-tokenizer does
    (:func:`nexlab.tokenizer.pretokenizer_name`: ``qwen35`` for Qwen3.5's and Nex-N2-mini's,
    ``qwen2``, ``gpt-2``), or ``tokenizer_pre`` when given (an unrecognised pre-tokenizer is an
    error that points to it). llama.cpp's converter finds the name from a hash of the tokens of a
    test string instead, which only published tokenizers match.
    """
    T = _gguf().TokenType
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{tok_dir}/tokenizer.json: model type {model.get('type')!r}, expected byte-level BPE")
    pre = (check_tokenizer_pre(tokenizer_pre) if tokenizer_pre is not None
           else pretokenizer_name(tok_dir / "tokenizer.json"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(vocab.values())} but config vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = np.full(vocab_size, int(T.UNUSED), dtype=np.int32)
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    for tok, i in vocab.items():
        tokens[i] = tok
    types[ids] = int(T.NORMAL)
    for i, a in added.items():
        types[i] = int(T.CONTROL) if a.get("special") else int(T.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tc_path = tok_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    special: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        content = _tok_content(tc.get(f"{typ}_token"))
        if content is not None and content in vocab:
            special[typ] = vocab[content]
        elif isinstance(config.get(f"{typ}_token_id"), int):
            special[typ] = config[f"{typ}_token_id"]
    return {"pre": pre, "tokens": tokens, "types": types.tolist(), "merges": merges, "special": special,
            "add_bos": tc.get("add_bos_token"), "add_eos": tc.get("add_eos_token")}


def _general_metadata(w, *, name: str, license: str, quantized_by: str, source_url: str | None,
                      gguf_type: str | None = None) -> None:
    """general.type (``model``, or ``gguf_type``: ``mmproj``), name, size label, license, quantized_by
    and source URL, in the order llama.cpp's converter writes them."""
    g = _gguf()
    w.add_type(gguf_type or g.GGUFType.MODEL)
    w.add_name(name)
    total, shared, expert, n_exp = w.get_total_parameter_count()
    w.add_size_label(g.size_label(total, shared, expert, n_exp))
    w.add_license(license)
    w.add_quantized_by(quantized_by)
    if source_url:
        w.add_source_url(source_url)


def _tokenizer_gguf_metadata(w, tok: dict, template: str | None) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    sp = tok["special"]
    for typ, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                    ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if typ in sp:
            fn(int(sp[typ]))
    if tok["add_bos"] is not None:
        w.add_add_bos_token(bool(tok["add_bos"]))
    if tok["add_eos"] is not None:
        w.add_add_eos_token(bool(tok["add_eos"]))
    if template:
        w.add_chat_template(template)


@dataclass
class ConversionPlan(PlannedFile):
    """Everything a conversion will write: the tensors (with producers) and the metadata writer.

    ``file_nbytes`` is the exact size of the file (:mod:`nexlab.gguf_layout`, the same writer set-up
    :func:`write_gguf` uses).
    """

    variant: str
    hparams: Q.HParams
    tensors: list[PlannedTensor]
    add_metadata: Callable[[Any], None] = field(repr=False)
    arch = ARCH


def plan_conversion(ck: Checkpoint, variant: str = "bf16", chat_template: str = "fixed", *,
                    tokenizer_dir: str | os.PathLike | None = None, name: str | None = None,
                    license: str = "apache-2.0", quantized_by: str = "nexlab", source_url: str | None = None,
                    imatrix: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
                    experts: str | None = None, nvfp4_scales: str | None = None) -> ConversionPlan:
    """Validate the open checkpoint and plan the whole file (tensors and metadata); nothing is read
    but headers, per-tensor scalars, the tokenizer and the imatrix. ``tokenizer_pre``: see
    :func:`convert_checkpoint`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    g = _gguf()
    validate_checkpoint(ck)
    weights = quantize_weights(read_imatrix(imatrix)) if imatrix is not None else None
    plan = plan_tensors(ck, variant, weights, experts=experts, nvfp4_scales=nvfp4_scales)
    hp = checkpoint_hparams(ck)
    tok = tokenizer_metadata(_find_tokenizer_dir(ck, tokenizer_dir), hp.n_vocab, ck.config,
                             tokenizer_pre=tokenizer_pre)
    template = resolve_chat_template(chat_template, ck.path if chat_template == "original" else None)
    if chat_template == "original" and template is None:
        try:
            template = original_template(_find_tokenizer_dir(ck, tokenizer_dir))
        except ValueError:
            template = None
    ftype = Q.file_type(variant, [t.spec for t in plan])
    general = {"name": name or ck.raw_config.get("_name_or_path") or ck.path.name, "license": license,
               "quantized_by": quantized_by, "source_url": source_url}

    def add_metadata(w):
        _general_metadata(w, **general)
        Q.add_metadata(w, hp)
        w.add_file_type(int(ftype))
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        _tokenizer_gguf_metadata(w, tok, template)
        if variant != "bf16":
            # llama_model_quantize's gguf_set_val_u32 on an existing key removes it and appends it
            # again: general.quantization_version then general.file_type come last
            kv = w.kv_data[0]
            for k in (g.Keys.General.QUANTIZATION_VERSION, g.Keys.General.FILE_TYPE):
                kv[k] = kv.pop(k)

    return ConversionPlan(variant, hp, plan, add_metadata)


def predict_file_size(ckpt_dir: str | os.PathLike, variant: str = "bf16", **kwargs) -> int:
    """Exact size in bytes of the GGUF :func:`convert_checkpoint` writes with the same arguments."""
    with Checkpoint(ckpt_dir) as ck:
        return plan_conversion(ck, variant, **kwargs).file_nbytes


# ----------------------------------------------------------------------------- writing
def write_gguf(out_path: str | os.PathLike, arch: str, add_metadata: Callable[[Any], None],
               tensors: list[PlannedTensor], *, show_progress: bool = True, desc: str = "write") -> Path:
    """Write a GGUF through gguf-py's writer, streaming one tensor at a time; atomic.

    ``add_metadata(writer)`` adds the key/values (it may read ``writer.get_total_parameter_count()``,
    which already knows every tensor). Tensor data comes from each ``PlannedTensor.produce()`` in
    order and must have exactly ``nbytes`` bytes. The file is written under a temporary name
    (:mod:`nexlab.fileio`) in the target folder, fsynced and renamed at the end; on any error
    (Ctrl-C too) the writer is closed and the temporary file removed. The exact file size is known
    from the plan, so a folder without that much free space is refused before anything is written
    (OSError with needed, free, where); a disk that fills anyway (another writer) is an OSError
    naming the file and the cause.
    """
    out = Path(out_path)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"duplicate output tensor {dup}")
    w = make_writer(arch, add_metadata, tensors)
    needed = file_nbytes(w)
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(out, needed)
    try:
        _write_planned(w, out, tensors, show_progress, desc)
    except OSError as exc:
        full = disk_full_error(exc, out, needed)
        if full is None:
            raise
        raise full from None
    return out


def _write_planned(w, out: Path, tensors: list[PlannedTensor], show_progress: bool, desc: str) -> None:
    with atomic_output(out) as tmp:
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(t.nbytes for t in tensors)
            bar = (progress(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
                   if show_progress else _NoBar())
            # One writer thread: tensor k+1 is produced (read, repacked, quantized) while tensor k
            # goes to disk, so conversion time approaches the larger of the two, not their sum.
            # At most two tensors' bytes are held at once.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-write") as pool:
                pending = None
                try:
                    for t in tensors:
                        data = np.ascontiguousarray(t.produce())
                        if data.nbytes != t.nbytes:
                            raise ValueError(f"{t.name}: produced {data.nbytes} bytes, expected {t.nbytes} "
                                             f"({t.ggml_type.name} {list(t.shape)})")
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(_write_tensor, w, data.reshape(-1).view(np.uint8), bar, t.nbytes)
                        del data
                    if pending is not None:
                        pending.result()
                        pending = None
                    for f in w.fout:  # on disk before the rename: a crash cannot leave an empty file there
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    if pending is not None:
                        pending.cancel()
                    bar.close()
        finally:
            w.close()  # closes the temporary file; atomic_output renames it or removes it


def _write_tensor(w, data: np.ndarray, bar, nbytes: int) -> None:
    w.write_tensor_data(data)
    bar.update(nbytes)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class ConvertResult:
    path: Path
    n_tensors: int
    nbytes: int
    seconds: float
    types: dict[str, int]


def convert_checkpoint(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, variant: str = "bf16",
                       chat_template: str = "fixed", *, tokenizer_dir: str | os.PathLike | None = None,
                       name: str | None = None, license: str = "apache-2.0", quantized_by: str = "nexlab",
                       source_url: str | None = None, imatrix: str | os.PathLike | None = None,
                       tokenizer_pre: str | None = None, experts: str | None = None,
                       nvfp4_scales: str | None = None, show_progress: bool = True) -> ConvertResult:
    """Convert a Qwen3.5-MoE checkpoint (ModelOpt NVFP4 or BF16) to a qwen35moe GGUF.

    ``variant``: ``bf16`` (NVFP4 tensors kept, the rest BF16/F32: the "NVFP4-BF16" file); ``q8_0``
    and ``q4_k_m`` quantize the rest with llama-quantize's type mix and are laid out as
    llama_model_quantize writes them: byte-identical to llama.cpp's quantization of the bf16 file
    (NVFP4 kept, same imatrix). A tensor without an imatrix entry is quantized without importance
    weights, as llama.cpp does, with a warning (``nexlab.convert`` logger). ``chat_template``:
    ``fixed`` (nexlab's template, default), ``original`` (the checkpoint's own, unchanged) or a file
    path. ``imatrix``: a llama-imatrix GGUF whose column weights guide the K-quant search (q4_k_m).
    ``tokenizer_pre``: llama.cpp's pre-tokenizer name to write as ``tokenizer.ggml.pre``; default:
    recognised from tokenizer.json (:func:`nexlab.tokenizer.pretokenizer_name`), which refuses a
    pre-tokenizer it does not know. ``experts="nvfp4"``: quantize a BF16 checkpoint's routed and shared
    experts to NVFP4 with the scale rule ``nvfp4_scales`` (``max``: ModelOpt's, the default;
    ``4over6``; ``search``, weighted by ``imatrix`` when given: :mod:`nexlab.scales`). Raises
    ValueError naming the tensor on malformed input; never leaves a partial output file.
    """
    t0 = time.perf_counter()
    with Checkpoint(ckpt_dir) as ck:
        cp = plan_conversion(ck, variant, chat_template, tokenizer_dir=tokenizer_dir, name=name, license=license,
                             quantized_by=quantized_by, source_url=source_url, imatrix=imatrix,
                             tokenizer_pre=tokenizer_pre, experts=experts, nvfp4_scales=nvfp4_scales)
        path = write_gguf(out_path, ARCH, cp.add_metadata, cp.tensors, show_progress=show_progress,
                          desc=f"convert {Path(out_path).name}")
    types: dict[str, int] = {}
    for t in cp.tensors:
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
    return ConvertResult(path, len(cp.tensors), cp.tensor_nbytes, time.perf_counter() - t0, types)


def write_shape_gguf(path: str | os.PathLike, hp: Q.HParams, variant: str = "bf16", nvfp4: str = "mlp") -> list[Q.TensorSpec]:
    """A GGUF llama.cpp loads, with ``hp``'s tensor plan and metadata and zero weights.

    For sizing experiments: llama.cpp allocates its caches from the metadata alone, so the weights
    need no content (all-zero bytes are a valid block of every ggml type; ``.scale`` sidecars are 1).
    The tokenizer is ``none`` with ``qwen35moe.vocab_size`` dummy tokens. Atomic, like every write.
    Returns the tensor plan written.
    """
    g = _gguf()
    specs = Q.tensor_plan(hp, variant, nvfp4=nvfp4)
    ftype = Q.file_type(variant, specs)

    def zeros(spec):
        if spec.kind == "scale":
            return lambda: np.ones(spec.shape, dtype=np.float32)
        return lambda: np.zeros(spec.nbytes, dtype=np.uint8)

    def add_metadata(w):
        w.add_type(g.GGUFType.MODEL)
        w.add_name(hp.name)
        Q.add_metadata(w, hp)
        w.add_file_type(int(ftype))
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        w.add_uint32(f"{ARCH}.vocab_size", hp.n_vocab)
        w.add_tokenizer_model("none")

    write_gguf(path, ARCH, add_metadata, [PlannedTensor(s, zeros(s)) for s in specs], show_progress=False)
    return specs


def write_vocab_gguf(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, vocab_size: int | None = None,
                     tokenizer_pre: str | None = None) -> Path:
    """A vocabulary-only qwen35moe GGUF (no tensors, no hyper-parameters) of a Hugging Face tokenizer.

    The tokenizer metadata is exactly what :func:`convert_checkpoint` writes for that tokenizer
    (:func:`tokenizer_metadata`; ``vocab_size`` defaults to the tokenizer's own size), like
    llama.cpp's ``convert_hf_to_gguf.py --vocab-only``; llama.cpp loads it with ``vocab_only`` and
    tokenizes with it. Atomic, like every write.
    """
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer.json in {tok_dir}")
    if vocab_size is None:
        tj = json.loads((tok_dir / "tokenizer.json").read_text())
        vocab = (tj.get("model") or {}).get("vocab")
        ids = [*(vocab.values() if isinstance(vocab, dict) else ()), *(a["id"] for a in tj.get("added_tokens", []))]
        vocab_size = max(ids, default=-1) + 1  # tokenizer_metadata refuses what is not byte-level BPE
    tok = tokenizer_metadata(tok_dir, vocab_size, {}, tokenizer_pre=tokenizer_pre)

    def add_metadata(w):
        w.add_type(_gguf().GGUFType.MODEL)
        w.add_name(tok_dir.name)
        _tokenizer_gguf_metadata(w, tok, None)

    return write_gguf(path, ARCH, add_metadata, [], show_progress=False)


# ----------------------------------------------------------------------------- CLI
def _cli(args: argparse.Namespace) -> int:
    if args.quiet:
        os.environ["NEXLAB_NO_PROGRESS"] = "1"
    r = convert_checkpoint(args.ckpt_dir, args.output, variant=args.variant, chat_template=args.chat_template,
                           tokenizer_dir=args.tokenizer_dir, name=args.name, source_url=args.source_url,
                           imatrix=args.imatrix, tokenizer_pre=args.tokenizer_pre, experts=args.experts,
                           nvfp4_scales=args.nvfp4_scales)
    types = ", ".join(f"{k} {v}" for k, v in sorted(r.types.items()))
    print(f"wrote {r.path} ({r.nbytes / 2**20:.1f} MiB, {r.n_tensors} tensors: {types}) in {r.seconds:.1f} s")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="ModelOpt NVFP4 / BF16 Qwen3.5-MoE checkpoint -> qwen35moe GGUF",
                              description="Convert a checkpoint directory to a GGUF llama.cpp runs.")
    p.add_argument("ckpt_dir", help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="output .gguf path (written atomically)")
    p.add_argument("--variant", default="bf16", choices=VARIANTS,
                   help="bf16: NVFP4 kept, rest BF16 (default); q8_0 / q4_k_m: quantize the rest")
    p.add_argument("--chat-template", default="fixed",
                   help="fixed (nexlab's, default) | original (the checkpoint's, unchanged) | FILE")
    p.add_argument("--tokenizer-dir", default=None, help="where tokenizer.json lives (default: the checkpoint)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer name for tokenizer.ggml.pre (default: recognised from "
                        "tokenizer.json: qwen35, qwen2 or gpt-2)")
    p.add_argument("--name", default=None, help="general.name (default: config _name_or_path or folder name)")
    p.add_argument("--source-url", default=None, help="general.source.url")
    p.add_argument("--imatrix", default=None, help="importance matrix GGUF (llama-imatrix format) for q4_k_m "
                                                   "and --nvfp4-scales search")
    p.add_argument("--experts", default=None, choices=EXPERT_FORMATS,
                   help="nvfp4: quantize a BF16 checkpoint's routed and shared experts to NVFP4")
    p.add_argument("--nvfp4-scales", default=None, choices=("max", "4over6", "search"),
                   help="NVFP4 scale rule with --experts nvfp4: max (ModelOpt's, default), 4over6, or search "
                        "(per-block E4M3 scale search, imatrix-weighted with --imatrix)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)  # nexlab.mmproj adds --mmproj to this parser (it builds on this module)


# ----------------------------------------------------------------------------- notebook 02 helpers
def explain_block_repack(weight, weight_scale, row: int = 0, block: int = 0) -> dict[str, Any]:
    """The 64 values of one ggml block before (ModelOpt) and after (ggml) repacking.

    Returns the ModelOpt bytes (32 code bytes, adjacent pairs, even column low nibble; 4 E4M3 scale
    bytes), the ggml block (4 UE4M3 scale bytes then 32 code bytes; in 16-group ``s`` byte ``8s+j``
    holds value ``16s+j`` low and ``16s+j+8`` high), and the E2M1 codes of both read back in value
    order (they must be equal).
    """
    w = np.asarray(weight)[row:row + 1]
    s = (weight_scale if isinstance(weight_scale, np.ndarray) else _scale_bytes(weight_scale))[row:row + 1]
    mo_codes = w[0, block * 32:(block + 1) * 32]
    mo_scales = s[0, block * 4:(block + 1) * 4]
    g = repack_modelopt_to_ggml(w, s)[0, block * 36:(block + 1) * 36]
    codes_mo = unpack_nibbles_adjacent(mo_codes)
    codes_g, scales_g = unpack_nvfp4_ggml(g[None])
    return {"modelopt_code_bytes": mo_codes, "modelopt_scale_bytes": mo_scales, "ggml_block": g,
            "codes_modelopt_order": codes_mo.reshape(-1), "codes_ggml_order": np.asarray(codes_g).reshape(-1),
            "ggml_scale_bytes": np.asarray(scales_g).reshape(-1)}


def check_repack_lossless(ck: Checkpoint) -> dict[str, int]:
    """Dequantize every NVFP4 module from ModelOpt bytes and from the repacked ggml bytes; count
    values that differ (both without ``weight_scale_2``, which the GGUF keeps as ``.scale``).

    Uses ``nexlab.nvfp4.dequantize_nvfp4_modelopt`` and ``dequantize_nvfp4_ggml`` (each bit-exact
    with ModelOpt and ggml respectively). Streams one module at a time.
    """
    n_mod = n_val = n_bad = 0
    for name in ck.entries:
        if not name.endswith(".weight_scale"):
            continue
        m = name[: -len("_scale")]
        w, s = ck.load(m), ck.load(name)
        a = dequantize_nvfp4_modelopt(w, s, np.float32(1.0))
        b = dequantize_nvfp4_ggml(repack_modelopt_to_ggml(w.numpy(), _scale_bytes(s))).reshape(a.shape)
        n_mod += 1
        n_val += a.size
        n_bad += int((a.view(np.uint32) != b.astype(np.float32).view(np.uint32)).sum())
    return {"modules": n_mod, "values": n_val, "mismatches": n_bad}
