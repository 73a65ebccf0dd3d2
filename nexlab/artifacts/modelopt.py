"""ModelOpt NVFP4 checkpoints: the real nvidia-modelopt export, and its semantics for large models.

:func:`modelopt_nvfp4_export` quantizes a BF16 checkpoint with nvidia-modelopt on CPU:
``mtq.quantize`` with ``NVFP4_MLP_ONLY_CFG`` (``scope="mlp"``, the Nex-N2-mini scope: routed and shared
experts) or ``NVFP4_DEFAULT_CFG`` (``scope="all"``), max calibration on :func:`calibration_batches`
windows, then ModelOpt's own ``export_hf_checkpoint``.

Models too big for ModelOpt on CPU (the slice, the synthetic checkpoints) get the same tensors from
:func:`quantize_mlp_group_modelopt` / :func:`quantize_layer_modelopt`, built on
:func:`nexlab.formats.nvfp4.quantize_nvfp4_modelopt`: gate and up of one expert share
``weight_scale_2`` (:func:`shared_weight_scale_2`) as ModelOpt's export makes them; the tests check
them against ModelOpt. ``mlp_scope_excludes`` is the ``exclude_modules`` list ModelOpt writes.
"""

from __future__ import annotations

import copy
from importlib.metadata import version
from pathlib import Path
from typing import Any

from nexlab.artifacts.checkpoints import checkpoint_index, copy_tokenizer
from nexlab.artifacts.train import tokenize_file
from nexlab.core.errors import NexlabError
from nexlab.core.fileio import atomic_directory
from nexlab.formats.nvfp4 import nvfp4_tensor_scale, quantize_nvfp4_modelopt

NVFP4_SCOPES = {"mlp": "NVFP4_MLP_ONLY_CFG", "all": "NVFP4_DEFAULT_CFG"}


def calibration_batches(tokenizer, calib_path, n_windows: int, seq_len: int):
    """``n_windows`` consecutive non-overlapping windows of ``seq_len`` tokens of the calibration text."""

    ids = tokenize_file(tokenizer, calib_path)
    n = min(n_windows, ids.numel() // seq_len)
    if n < 1:
        raise NexlabError(f"calibration text {calib_path} has fewer than seq_len={seq_len} tokens")
    return ids[: n * seq_len].reshape(n, seq_len)


def modelopt_nvfp4_export(bf16_dir, out_dir, calib_windows, *, scope: str = "mlp", batch_size: int = 4,
                          min_shards: int = 2, tokenizer_dir=None) -> Path:
    """Quantize a BF16 checkpoint with nvidia-modelopt (NVFP4, max calibration) and export it.

    ``scope="mlp"``: ``mtq.NVFP4_MLP_ONLY_CFG`` (Nex-N2-mini's published scope); ``scope="all"``:
    ``mtq.NVFP4_DEFAULT_CFG``. ``calib_windows``: int64 [n, seq_len] token windows. The export is
    ModelOpt's ``export_hf_checkpoint`` (BF16 for unquantized tensors) with a shard size giving at
    least ``min_shards`` shards. Runs on CPU in seconds for the tiny model.
    """
    import modelopt.torch.quantization as mtq  # noqa: PLC0415  (ModelOpt is heavy: only the reference quantizer needs it)
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)
    from modelopt.torch.export import export_hf_checkpoint  # noqa: PLC0415  (ModelOpt is heavy: only the reference quantizer needs it)
    from transformers import Qwen3_5MoeForConditionalGeneration  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)

    if scope not in NVFP4_SCOPES:
        raise NexlabError(f"scope must be one of {sorted(NVFP4_SCOPES)}, got {scope!r}")
    if calib_windows.ndim != 2 or calib_windows.dtype != torch.long:
        raise NexlabError("calib_windows must be an int64 tensor [n, seq_len]")
    out = Path(out_dir)
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(bf16_dir), dtype=torch.bfloat16)
    model.eval()

    def forward_loop(m):
        with torch.no_grad():
            for b in range(0, calib_windows.shape[0], batch_size):
                m(input_ids=calib_windows[b:b + batch_size])

    qcfg = copy.deepcopy(getattr(mtq, NVFP4_SCOPES[scope]))
    model = mtq.quantize(model, qcfg, forward_loop=forward_loop)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # NVFP4 shrinks the quantized part ~3.5x: aim below half the smallest plausible size.
    shard = max(1 << 20, bf16_bytes // (4 * min_shards))
    with atomic_directory(out) as tmp:
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp, max_shard_size=shard)
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        n_shards = len(set(checkpoint_index(tmp).values()))
        if n_shards < min_shards:
            raise NexlabError(f"ModelOpt export wrote {n_shards} shard(s), fewer than min_shards={min_shards}")
    return out


def _modelopt_linear(prefix: str, w, ws2=None, input_scale: float = 1.0) -> dict[str, Any]:
    """ModelOpt's four tensors of one NVFP4 Linear from its BF16/F32 weight [out, in]."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)


    q, s, s2 = quantize_nvfp4_modelopt(w, ws2, name=prefix + ".weight")
    return {
        prefix + ".weight": torch.from_numpy(q),
        prefix + ".weight_scale": torch.from_numpy(s).view(torch.float8_e4m3fn),
        prefix + ".weight_scale_2": torch.tensor(float(s2), dtype=torch.float32),
        prefix + ".input_scale": torch.tensor(float(input_scale), dtype=torch.float32),
    }


def shared_weight_scale_2(*weights) -> float:
    """ModelOpt's shared ``weight_scale_2`` for projections fused at inference (gate and up of
    one expert): amax over all of them / (6 * 448), in float32."""
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)

    amax = max(float(torch.as_tensor(w).abs().max().float()) for w in weights)

    return float(nvfp4_tensor_scale(amax))


def quantize_layer_modelopt(layer_prefix: str, tensors: dict[str, Any], cfg: dict, *, scope: str = "mlp",
                            input_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """nexlab's ModelOpt-semantics quantization of one decoder layer's BF16 tensors.

    ``tensors``: the layer's checkpoint tensors named relative to ``layer_prefix``, experts per
    expert (``mlp.experts.{e}.gate_proj.weight``...) as in a BF16 checkpoint. Quantized (scope
    "mlp"): routed experts and the shared expert; gate and up of one expert (and of the shared
    expert) share ``weight_scale_2`` as ModelOpt's export makes them. ``input_scale`` needs
    activations, so it is taken from ``input_scales`` (projection kind -> value; one value per
    kind, as ModelOpt shares input amax across experts) or 1.0. Other tensors pass through.
    """
    if scope != "mlp":
        raise NexlabError(f"the nexlab writer implements the 'mlp' scope only, got {scope!r}")
    t = cfg["text_config"] if "text_config" in cfg else cfg
    ins = input_scales or {}
    out: dict[str, Any] = {}
    groups = [f"mlp.experts.{e}" for e in range(t["num_experts"])] + ["mlp.shared_expert"]
    consumed = set()
    for g in groups:
        gate, up, down = (f"{g}.{k}_proj.weight" for k in ("gate", "up", "down"))
        for k in (gate, up, down):
            if k not in tensors:
                raise NexlabError(f"layer {layer_prefix}: tensor {k!r} missing")
        out.update(quantize_mlp_group_modelopt(f"{layer_prefix}{g}", tensors[gate], tensors[up], tensors[down], ins))
        consumed.update((gate, up, down))
    for k, v in tensors.items():
        if k not in consumed:
            out[layer_prefix + k] = v
    return out


def quantize_mlp_group_modelopt(prefix: str, gate, up, down,
                                input_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """One SwiGLU group (a routed expert or the shared expert) as ModelOpt exports it: gate and up
    share ``weight_scale_2`` = amax(gate, up) / (6 * 448) (they are fused at inference), down has
    its own; ``input_scale`` from ``input_scales`` keyed ``"experts.gate_proj"`` /
    ``"shared_expert.down_proj"``..., else 1.0. ``prefix`` e.g. ``...layers.0.mlp.experts.7``."""
    ins = input_scales or {}
    kind = "shared_expert" if prefix.endswith("shared_expert") else "experts"
    s2 = shared_weight_scale_2(gate, up)
    out = _modelopt_linear(f"{prefix}.gate_proj", gate, s2, ins.get(f"{kind}.gate_proj", 1.0))
    out.update(_modelopt_linear(f"{prefix}.up_proj", up, s2, ins.get(f"{kind}.up_proj", 1.0)))
    out.update(_modelopt_linear(f"{prefix}.down_proj", down, None, ins.get(f"{kind}.down_proj", 1.0)))
    return out


def modelopt_version() -> str:
    try:

        return version("nvidia-modelopt")
    except Exception:  # pragma: no cover
        return "0.47.0"


def mlp_scope_excludes(t: dict) -> list[str]:
    """The ``exclude_modules`` ModelOpt writes for NVFP4_MLP_ONLY_CFG on a Qwen3_5Moe model
    (same order: sorted names)."""
    lm = "model.language_model."
    ex = ["lm_head", lm + "embed_tokens"]
    for i, kind in enumerate(t["layer_types"]):
        mixer = "linear_attn*" if kind == "linear_attention" else "self_attn*"
        ex += [f"{lm}layers.{i}.{mixer}", f"{lm}layers.{i}.mlp.gate", f"{lm}layers.{i}.mlp.shared_expert_gate"]
    ex.append("model.visual*")
    return sorted(ex)
