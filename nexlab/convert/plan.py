"""The text model's tensor plan with producers: how each tensor of the qwen35moe GGUF gets its bytes.

:func:`plan_tensors` takes :func:`nexlab.model.qwen35moe.tensor_plan` for a checkpoint (from its
safetensors headers and per-tensor scalars only), checks every source tensor's shape and that no
checkpoint tensor is left over, and gives each :class:`nexlab.ggufio.writer.PlannedTensor` a
``produce`` callable:

- ModelOpt NVFP4 modules are repacked losslessly into ggml NVFP4 (:func:`repack_nvfp4_module`,
  :func:`nexlab.formats.nvfp4.repack_modelopt_to_ggml`; routed experts stacked), with their
  ``.scale`` / ``.input_scale`` sidecars when non-trivial;
- float tensors get the qwen35moe transforms and :func:`nexlab.formats.registry.encode_tensor`
  (BF16, or a K-quant with the imatrix's column weights);
- ``experts="nvfp4"``: a BF16 checkpoint's experts quantized to NVFP4 by a scale rule of
  :mod:`nexlab.formats.scales` (:data:`EXPERT_FORMATS`); hyper-parameters from :func:`checkpoint_hparams`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import gguf
import numpy as np

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.formats.minifloat import GGML_NVFP4_BLOCK, GGML_NVFP4_BYTES, NVFP4_GROUP
from nexlab.formats.nvfp4 import repack_modelopt_to_ggml
from nexlab.formats.registry import encode_tensor
from nexlab.formats.scales import METHODS, quantize_nvfp4_group
from nexlab.ggufio import layout
from nexlab.ggufio.writer import PlannedTensor
from nexlab.model import hparams
from nexlab.model import qwen35moe as Q
from nexlab.model.checkpoint import Checkpoint, e4m3_bytes_nan_mask
from nexlab.model.qwen35moe import imatrix_for_tensor

log = logging.getLogger(__name__)

_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                gguf.GGMLQuantizationType.BF16)


def scale_bytes(scale) -> np.ndarray:
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    if scale.dtype != torch.float8_e4m3fn:
        raise NexlabTypeError(f"weight_scale dtype {scale.dtype}, expected float8_e4m3fn")
    return scale.contiguous().view(torch.uint8).numpy()


def repack_nvfp4_module(ck: Checkpoint, module: str, cfg: dict, out: np.ndarray | None = None) -> np.ndarray:
    """Load one NVFP4 module, check its block scales, reorder if needed, repack to ggml bytes
    (into ``out`` when given: one expert's slot of a stacked tensor)."""
    w = ck.load(f"{module}.weight")
    s = ck.load(f"{module}.weight_scale")
    nan = e4m3_bytes_nan_mask(scale_bytes(s))
    if nan.any():
        r, c = np.argwhere(nan)[0]
        raise NexlabError(f"{module}.weight_scale: NaN block scale at row {r}, block {c}")
    w, s = Q.transform_nvfp4(f"{module}.weight", w, s, cfg)
    return repack_modelopt_to_ggml(w.numpy(), scale_bytes(s), name=module, out=out)


def checkpoint_hparams(ck: Checkpoint) -> hparams.HParams:
    """The checkpoint's hyper-parameters (:func:`nexlab.model.hparams.hparams_from_hf_config`); tied
    embeddings when it has no ``lm_head.weight``."""
    hp = hparams.hparams_from_hf_config(ck.raw_config, name=ck.path.name)
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

    if experts is None:
        if nvfp4_scales is not None:
            raise NexlabError(f"--nvfp4-scales {nvfp4_scales} needs --experts nvfp4 (a BF16 checkpoint's experts "
                             "quantized by nexlab); a ModelOpt checkpoint's NVFP4 experts are repacked as they are")
        return None
    if experts not in EXPERT_FORMATS:
        raise NexlabError(f"unknown --experts {experts!r}; choose one of {', '.join(EXPERT_FORMATS)}")
    method = nvfp4_scales or "max"
    if method not in METHODS:
        raise NexlabError(f"unknown --nvfp4-scales {method!r}; choose one of {', '.join(METHODS)}")
    quantized = [m for m in ck.entries if m.endswith(".weight_scale") and Q.nvfp4_scope("mlp")(m)]
    if quantized:
        raise NexlabError(f"{ck.path}: the experts are NVFP4 already ({quantized[0]}, ...): convert without "
                         "--experts to repack them losslessly, or point --experts nvfp4 at a BF16 checkpoint")
    return method


class TensorPlanner:
    """The tensor plan of one checkpoint: every output tensor of the GGUF with the producer of its bytes.

    Built from headers (and per-tensor scalars) only; nothing is loaded until a producer runs. The
    list is :func:`nexlab.model.qwen35moe.tensor_plan` for this checkpoint, and each part below is
    one question the converter asks of it:

    - :meth:`made_nvfp4`: is this module NVFP4 made here from BF16 (``experts="nvfp4"``)?
    - :meth:`sidecar_values` / :meth:`keep_sidecar`: the F32 ``.scale`` / ``.input_scale`` values of
      an NVFP4 module, and whether they are written (trivial all-1.0 sidecars are dropped, as
      llama.cpp's converter does);
    - :meth:`check_shape` / :meth:`check_nvfp4_module`: a source's header against the plan;
    - :meth:`expert_loader`: a layer's routed experts as one float tensor ``[n_expert, out, in]``;
    - :meth:`made_tensor`: the NVFP4 bytes or ``.scale`` values of a made group, quantized once;
    - :meth:`planned` (one spec) and :meth:`plan` (all of them, then no checkpoint tensor left over).

    ``imatrix``: ``{gguf_name: column weights}`` (:func:`nexlab.ggufio.imatrix_file.quantize_weights`)
    used when a float tensor is quantized to a K-quant; a missing entry falls back to no importance
    weights, as llama.cpp does, with a warning. ``experts="nvfp4"``: the routed and shared experts of
    a BF16 checkpoint become NVFP4 with the scale rule ``nvfp4_scales`` (:mod:`nexlab.formats.scales`;
    gate and up of an expert share a tensor scale, as ModelOpt's export; ``.scale`` sidecars, no
    ``.input_scale``: that needs activation calibration), the imatrix weighting ``search``. Errors name
    the tensor: a missing source, a wrong shape, a checkpoint tensor with no place in the file.
    """

    def __init__(self, ck: Checkpoint, variant: str = "bf16", imatrix: dict[str, np.ndarray] | None = None, *,
                 experts: str | None = None, nvfp4_scales: str | None = None):
        self.ck, self.variant, self.imatrix = ck, variant, imatrix
        self.cfg = ck.config
        self.hp = checkpoint_hparams(ck)
        self.method = _check_experts(ck, experts, nvfp4_scales)
        self._made_scope = Q.nvfp4_scope("mlp") if self.method is not None else None
        self._scalars: dict[tuple[str, str], np.ndarray] = {}
        self._made: dict[str, list] = {}  # module -> [ggml bytes, scale values, uses left]
        self._loaders: dict[str, tuple[Callable[[], Any], str]] = {}  # module -> (loader of [E?, out, in], gguf name)
        self.used: set[str] = set()  # checkpoint tensors the plan reads

    # --------------------------------------------------------------- which tensors, which sidecars
    def made_nvfp4(self, module: str) -> bool:
        """True when ``module`` is a routed or shared expert that this conversion quantizes to NVFP4."""
        return self._made_scope is not None and self._made_scope(module)

    def sidecar_values(self, module: str, suffix: str) -> np.ndarray:
        """The F32 values of ``module``'s ``suffix`` sidecar (``.scale``: ``weight_scale_2``,
        ``.input_scale``), one per expert for a stack ``model.layers.N.mlp.experts.{proj}``; 1.0 for a
        scalar the checkpoint lacks."""
        src = ".weight_scale_2" if suffix == ".scale" else ".input_scale"
        key = (module, src)
        if key not in self._scalars:
            stacked = module.split(".")[-2] == "experts"
            mods = _expert_modules(module, self.hp.n_expert) if stacked else [module]
            self._scalars[key] = _scalars(self.ck, [m + src for m in mods])
        return self._scalars[key]

    def keep_sidecar(self, module: str, suffix: str) -> bool:
        """Whether the sidecar is written: always ``.scale`` of a made module (never its
        ``.input_scale``); otherwise only when some value differs from 1.0 (llama.cpp's converter)."""
        if self.made_nvfp4(module):
            return suffix == ".scale"
        vals = self.sidecar_values(module, suffix)
        if vals.size > 1:
            return not np.allclose(vals, 1.0, atol=Q.SCALE_TRIVIAL_ATOL)
        return abs(float(vals.sum()) - 1.0) >= Q.SCALE_TRIVIAL_ATOL

    def specs(self) -> list[layout.TensorSpec]:
        """The file's tensors for this checkpoint, in file order (:func:`nexlab.model.qwen35moe.tensor_plan`)."""
        return Q.tensor_plan(self.hp, self.variant, nvfp4=lambda m: self.ck.is_nvfp4(m) or self.made_nvfp4(m),
                             sidecars=self.keep_sidecar, lm_head="lm_head.weight" in self.ck)

    def column_weights(self, spec: layout.TensorSpec) -> np.ndarray | None:
        """The imatrix column weights for a float tensor quantized to a K-quant, or None."""
        if self.imatrix is None or spec.ggml_type in _FLOAT_TYPES:
            return None
        shape = spec.shape
        return imatrix_for_tensor(self.imatrix, spec.name, shape[-1], shape[0] if len(shape) == 3 else 1,
                                  log=log.warning)

    # --------------------------------------------------------------- source checks and loaders
    def check_shape(self, hf: str, shape: tuple[int, ...]) -> None:
        """The source's header shape must be the planned one (conv1d squeezed; q8_0 / q4_k_m plans drop
        leading 1s, as ggml_n_dims does)."""
        got = tuple(self.ck.info(hf).shape)
        if hf.endswith("conv1d.weight"):
            got = tuple(x for x in got if x != 1) or (1,)
        if Q.ggml_n_dims_shape(got) != Q.ggml_n_dims_shape(shape):
            raise NexlabError(f"tensor {hf!r} has shape {list(got)}, the configuration needs {list(shape)}")

    def check_nvfp4_module(self, module: str, shape: tuple[int, ...]) -> None:
        """A ModelOpt NVFP4 module's packed ``weight`` [out, in/2] and ``weight_scale`` [out, in/16]."""
        w, s = self.ck.info(module + ".weight"), self.ck.info(module + ".weight_scale")
        out, n_in = shape[-2], shape[-1]
        if tuple(w.shape) != (out, n_in // 2) or tuple(s.shape) != (out, n_in // NVFP4_GROUP):
            raise NexlabError(f"NVFP4 module {module!r}: weight {list(w.shape)} / weight_scale {list(s.shape)}, "
                              f"the configuration needs [{out}, {n_in // 2}] / [{out}, {n_in // NVFP4_GROUP}]")

    def expert_loader(self, layer: int, proj: str) -> tuple[Callable[[], Any], tuple[str, ...]]:
        """A loader of a layer's routed experts ``proj`` as one float tensor [n_expert, out, in] (fused
        ``gate_up_proj`` / ``down_proj`` or per-expert modules; shapes checked) and its sources."""
        import torch  # noqa: PLC0415  (heavy: only when experts are stacked from per-expert tensors)

        hp, ck = self.hp, self.ck
        per_expert = (hp.n_ff_exp, hp.n_embd) if proj != "down_proj" else (hp.n_embd, hp.n_ff_exp)
        if ck.experts_fused(layer):
            p = f"model.layers.{layer}.mlp.experts."
            gu, dn = p + "gate_up_proj", p + "down_proj"
            self.used.update([gu, dn])
            n_ff = hp.n_ff_exp
            if proj == "down_proj":
                self.check_shape(dn, (hp.n_expert,) + per_expert)
                return (lambda: ck.load(dn)), (dn,)
            self.check_shape(gu, (hp.n_expert, 2 * n_ff, hp.n_embd))
            rows = slice(0, n_ff) if proj == "gate_proj" else slice(n_ff, 2 * n_ff)
            return (lambda: ck.load(gu)[:, rows, :]), (gu,)
        mods = _expert_modules(f"model.layers.{layer}.mlp.experts.{proj}", hp.n_expert)
        for m in mods:
            self.check_shape(m + ".weight", per_expert)
        srcs = tuple(m + ".weight" for m in mods)
        self.used.update(srcs)
        return (lambda: torch.stack([ck.load(n) for n in srcs])), srcs

    def made_tensor(self, module: str, what: int) -> np.ndarray:
        """Quantize the group holding ``module`` (an expert's gate and up share a tensor scale) with the
        chosen scale rule on first use; ``what`` 0: its ggml bytes, 1: its ``.scale`` values. Each part
        is handed out once, then dropped."""
        if module not in self._made:
            self._made.update(_quantize_expert_group(module, self.hp, self._loaders, self.method, self.imatrix))
        item = self._made[module]
        out, item[what] = item[what], None
        item[2] -= 1
        if item[2] == 0:
            del self._made[module]
        return out

    # --------------------------------------------------------------- the plan
    def planned(self, spec: layout.TensorSpec) -> PlannedTensor:
        """One spec with the producer of its bytes (and the checkpoint tensors it reads)."""
        ck, cfg, hf = self.ck, self.cfg, spec.hf
        if spec.kind in ("scale", "input_scale") and self.made_nvfp4(hf):
            return PlannedTensor(spec, lambda m=hf: self.made_tensor(m, 1), (hf,))
        if spec.kind == "nvfp4" and self.made_nvfp4(hf):
            if spec.stacked:
                load, srcs = self.expert_loader(spec.layer, hf.rsplit(".", 1)[1])
            else:
                self.check_shape(hf + ".weight", spec.shape)
                self.used.add(hf + ".weight")
                load, srcs = (lambda m=hf: ck.load(m + ".weight")), (hf + ".weight",)
            self._loaders[hf] = (load, spec.name)
            return PlannedTensor(spec, lambda m=hf: self.made_tensor(m, 0), srcs)
        if spec.kind in ("scale", "input_scale"):
            vals = self.sidecar_values(hf, spec.name[spec.name.rindex("."):])
            return PlannedTensor(spec, lambda v=vals: v, (hf,))
        if spec.kind == "nvfp4" and not spec.stacked:
            self.check_nvfp4_module(hf, spec.shape)
            self.used.update(hf + s for s in (".weight",) + Q.MODELOPT_SCALE_SUFFIXES)
            return PlannedTensor(spec, lambda m=hf: repack_nvfp4_module(ck, m, cfg), (hf + ".weight",))
        if spec.kind == "nvfp4":
            mods = _expert_modules(hf, self.hp.n_expert)
            for m in mods:
                self.check_nvfp4_module(m, spec.shape)
                self.used.update(m + s for s in (".weight",) + Q.MODELOPT_SCALE_SUFFIXES)

            def produce(mods=mods, spec=spec):
                stacked = np.empty(spec.nbytes, dtype=np.uint8).reshape(spec.shape[0], spec.shape[1], -1)
                for k, m in enumerate(mods):
                    repack_nvfp4_module(ck, m, cfg, out=stacked[k])
                return stacked

            return PlannedTensor(spec, produce, tuple(m + ".weight" for m in mods))
        if spec.stacked:
            load, srcs = self.expert_loader(spec.layer, hf.rsplit(".", 1)[1])
            return PlannedTensor(spec, lambda load=load, spec=spec:
                                 encode_tensor(load(), spec.ggml_type, spec.name, self.column_weights(spec)), srcs)
        self.check_shape(hf, spec.shape)
        self.used.add(hf)
        return PlannedTensor(spec, lambda hf=hf, spec=spec: encode_tensor(
            Q.transform_float(hf, ck.load(hf), cfg), spec.ggml_type, spec.name, self.column_weights(spec)), (hf,))

    def plan(self) -> list[PlannedTensor]:
        """Every output tensor in file order; refuses a checkpoint tensor that has no place in the file."""
        plan = [self.planned(spec) for spec in self.specs()]
        left = sorted(n for n in self.ck.entries if n not in self.used and not n.endswith(Q.IGNORED_SUFFIXES))
        if left:
            raise NexlabError(f"{len(left)} checkpoint tensors have no place in the qwen35moe GGUF, e.g. {left[:3]}")
        return plan


def plan_tensors(ck: Checkpoint, variant: str = "bf16", imatrix: dict[str, np.ndarray] | None = None, *,
                 experts: str | None = None, nvfp4_scales: str | None = None) -> list[PlannedTensor]:
    """Every output tensor of the GGUF, in file order, from headers only: :meth:`TensorPlanner.plan`."""
    return TensorPlanner(ck, variant, imatrix, experts=experts, nvfp4_scales=nvfp4_scales).plan()


def _quantize_expert_group(module: str, hp: hparams.HParams, loaders: dict, method: str,
                           imatrix: dict[str, np.ndarray] | None) -> dict[str, list]:
    """NVFP4 of the projections that share a tensor scale with ``module`` (gate and up of each expert;
    down alone) by :func:`nexlab.formats.scales.quantize_nvfp4_group`, expert by expert, repacked to ggml:
    ``{module: [ggml bytes, .scale values, 2]}``. Column weights from the imatrix entry of each GGUF
    tensor (per expert for ``*_exps``); an expert without routed tokens gets llama-quantize's uniform
    weights, which the search treats as unweighted."""

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
        outs.append(np.empty((n_e, w.shape[1], w.shape[2] // GGML_NVFP4_BLOCK * GGML_NVFP4_BYTES), dtype=np.uint8))
    qs = quantize_nvfp4_group(ws, method, imps, names=[loaders[m][1] for m in group])
    del ws
    for k, q in enumerate(qs):
        for e in range(n_e):
            repack_modelopt_to_ggml(q.weight[e], q.weight_scale[e], name=f"{loaders[group[k]][1]} (expert {e})",
                                    out=outs[k][e])
    return {m: [o if stacked else o[0], np.asarray(q.weight_scale_2, dtype=np.float32).reshape(n_e), 2]
            for m, o, q in zip(group, outs, qs)}


def _expert_shape(hp: hparams.HParams, module: str) -> tuple[int, int]:
    """[out, in] of one expert projection (routed or shared) of ``hp``."""
    proj = module.rsplit(".", 1)[1]
    n_ff = hp.n_ff_exp if ".experts" in module else hp.n_ff_shexp
    return (hp.n_embd, n_ff) if proj == "down_proj" else (n_ff, hp.n_embd)
