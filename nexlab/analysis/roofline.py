"""A roofline for llama.cpp's decode step, and the routing the tiny model measures.

Everything here is a **model** (arithmetic on the tensor table and the hyper-parameters), except
:func:`distinct_experts_per_layer`, which **measures** the trained tiny model's router.

One decode step of ``b`` parallel sequences (one new token each, at context depth ``N``):

Bytes moved (what llama.cpp reads from device memory; the graph is ``src/models/qwen35moe.cpp``)
    * weights: every tensor once, except

      - ``token_embd``: a ``get_rows`` of ``b`` rows (``b * row_bytes``), not a matmul (with tied
        embeddings it is also the output matrix and is read whole);
      - the routed experts ``blk.N.ffn_*_exps.weight`` and their per-expert sidecars
        (``blk.N.ffn_*_exps.scale``, shape ``[n_expert]``): ``bytes * E(b) / n`` with
        ``E(b) = n * (1 - (1 - k/n)^b)`` the expected number of distinct experts ``b`` tokens
        touch when each chooses ``k`` of ``n`` uniformly (:func:`expected_experts`);
      - ``*.input_scale`` sidecars: llama.cpp loads them but no graph reads them (0 bytes).

      Assumed: each distinct expert's weights are read once per step. Kernels that handle
      (token, expert) pairs one by one may read an expert again (the L2 cache may absorb it);
      real routing is not uniform (see :func:`distinct_experts_per_layer`), which lowers E(b).
    * KV cache: every full-attention layer reads K and V of ``N`` positions per sequence:
      ``b * N * per-token KV bytes`` (from :func:`nexlab.analysis.memory.kv_cache_size`, f16 by default).
      llama.cpp's views span ``n_kv = pad(N, 256)`` cells; the model uses ``N`` exactly and
      leaves out the one new K/V row written per sequence.
    * recurrent state: each linear-attention layer **reads and writes** its conv and delta-rule
      state (F32) once per sequence: ``2 * b * recurrent_size(model, 1).bytes``.
    * activations, logits and compute buffers are left out (small next to the weights at
      decode batch sizes: at b = 16 the F32 logits of Nex-N2-mini are 16 MB per step).

Floating-point operations (flops = 2 * multiply-adds), per token
    * matmuls: one multiply-add per element of every matrix the token is multiplied by: every
      ``*.weight`` except ``token_embd`` (a row lookup) and the norms; the routed experts count
      ``k / n`` of their elements (``k`` experts per token, not ``E(b)``); ``ssm_conv1d``
      counts its ``d_conv`` taps per channel (a depth-wise convolution);
    * attention over ``N`` positions per full-attention layer: ``QK^T`` and ``PV`` are
      ``n_head * (head_dim_k + head_dim_v) * N`` multiply-adds;
    * the gated delta rule per linear-attention layer: :data:`DELTA_RULE_FLOPS_PER_STATE_ELEMENT`
      = 7 flops per state element (decay ``S *= g``: 1; ``S k``: 2; rank-1 update ``S += k d^T``:
      2; output ``S q``: 2; ggml's ``build_delta_net_autoregressive``);
    * element-wise work (norms, activations, softmax, rope, gates) is left out.

Bound
    ``tokens/s = b / max(bytes / bandwidth, flops / peak)`` per device. ``memory`` is
    ``b * bandwidth / bytes``; ``compute_bf16`` / ``compute_fp8`` / ``compute_fp4`` use the dense
    tensor peaks of :data:`DEVICES` (None where the device has no such tensor cores); ``bound``
    is the min of ``memory`` and ``compute_bf16`` (llama.cpp's quantized matmuls do not run at the
    FP4 rate, so the BF16 peak is the conservative compute roof). A device made from a measured
    bandwidth (``measured_bandwidth=``) has only the memory roof.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from nexlab.analysis.memory import ContextOverflowWarning, kv_cache_size, load_hparams, recurrent_size
from nexlab.analysis.reference import build_hf_model
from nexlab.core.errors import NexlabError
from nexlab.core.text import markdown_table
from nexlab.ggufio import layout
from nexlab.ggufio.check import open_gguf
from nexlab.model import hparams as Q
from nexlab.model import qwen35moe

DELTA_RULE_FLOPS_PER_STATE_ELEMENT = 7


THIS_MACHINE = "this machine"


_EXPERT_RE = re.compile(r"^blk\.\d+\.ffn_[a-z_]+_exps\.")


# ============================================================================ devices
@dataclass(frozen=True)
class Device:
    """One accelerator: memory bandwidth (GB/s = 1e9 B/s) and dense tensor peaks (TFLOPS = 1e12
    flop/s, no structured sparsity; None: no tensor cores for that type)."""

    name: str
    bandwidth_GBps: float
    bf16_tflops: float | None
    fp8_tflops: float | None
    fp4_tflops: float | None
    source: str

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_GBps * 1e9

    def peak(self, kind: str) -> float | None:
        v = getattr(self, f"{kind}_tflops")
        return None if v is None else v * 1e12


#: Data-sheet figures, dense. NVIDIA quotes most tensor peaks "with sparsity" (2:4 structured);
#: dense = sparse / 2. GeForce cards run FP16/BF16/FP8 with FP32 accumulate at half the
#: FP16-accumulate rate; the FP32-accumulate figure is listed (what BF16 GEMMs use).
DEVICES: tuple[Device, ...] = (
    Device("RTX 5090", 1792.0, 209.5, 419.0, 1676.0,
           "NVIDIA RTX Blackwell GPU Architecture whitepaper (GeForce RTX 5090): 1792 GB/s GDDR7; "
           "FP4 3352 TFLOPS sparse = 1676 dense; FP8 and BF16 with FP32 accumulate 838 / 419 sparse "
           "= 419 / 209.5 dense (uncertain: recalled, not re-read)"),
    Device("RTX 4090", 1008.0, 165.2, 330.3, None,
           "NVIDIA Ada Lovelace GPU Architecture whitepaper (GeForce RTX 4090): 1008 GB/s GDDR6X; "
           "BF16 and FP8 with FP32 accumulate 330.3 / 660.6 sparse = 165.2 / 330.3 dense; no FP4"),
    Device("H100 SXM", 3350.0, 989.4, 1978.9, None,
           "NVIDIA H100 Tensor Core GPU data sheet (H100 SXM): 3.35 TB/s HBM3; BF16 1979 and FP8 3958 "
           "TFLOPS with sparsity = 989.4 / 1978.9 dense; Hopper has no FP4 tensor cores"),
    Device("H200", 4800.0, 989.4, 1978.9, None,
           "NVIDIA H200 Tensor Core GPU data sheet (H200 SXM): 4.8 TB/s HBM3e; BF16 1979 and FP8 3958 "
           "TFLOPS with sparsity (the H100 SXM figures) = 989.4 / 1978.9 dense; no FP4 tensor cores"),
    Device("B200", 8000.0, 2250.0, 4500.0, 9000.0,
           "NVIDIA HGX B200 data sheet, per GPU: 8 TB/s HBM3e; FP4 18, FP8 9, BF16 4.5 PFLOPS with "
           "sparsity = 9 / 4.5 / 2.25 PFLOPS dense (uncertain: per-GPU peaks depend on the system's "
           "power limit)"),
)


def _norm_name(s: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(s)).lower()


def select_devices(names: Iterable[str | Device] | None = None,
                   measured_bandwidth: float | None = None) -> list[Device]:
    """Devices of :data:`DEVICES` by name (case, spaces and dashes ignored; a unique prefix such as
    ``h100`` suffices) or given as :class:`Device` rows, all of the table when ``names`` is None;
    plus :data:`THIS_MACHINE` (memory roof only) when ``measured_bandwidth`` (bytes/s) is given.
    An unknown or ambiguous name is a ValueError."""
    if measured_bandwidth is not None:
        if isinstance(measured_bandwidth, bool) or not isinstance(measured_bandwidth, (int, float)) \
                or not math.isfinite(measured_bandwidth) or measured_bandwidth <= 0:
            raise NexlabError(f"measured_bandwidth must be a positive number of bytes/s, got {measured_bandwidth!r}")
    known = {_norm_name(d.name): d for d in DEVICES}
    if names is None:
        chosen = list(DEVICES)
    else:
        if isinstance(names, str):
            names = [names]
        chosen = []
        for raw in names:
            if isinstance(raw, Device):
                if not raw.bandwidth_GBps > 0:
                    raise NexlabError(f"device {raw.name!r}: bandwidth must be > 0 GB/s")
                chosen.append(raw)
                continue
            key = _norm_name(raw)
            if key == _norm_name(THIS_MACHINE):
                if measured_bandwidth is None:
                    raise NexlabError(f"device {raw!r} needs a measured bandwidth (--bandwidth / measured_bandwidth=)")
                continue
            hits = [known[key]] if key in known else [d for k, d in known.items() if key and k.startswith(key)]
            if len(hits) != 1:
                what = "ambiguous" if hits else "unknown"
                raise NexlabError(f"{what} device {raw!r}: choose from {', '.join(d.name for d in DEVICES)}"
                                 f" or '{THIS_MACHINE}' (with a measured bandwidth)")
            if hits[0] not in chosen:
                chosen.append(hits[0])
    if measured_bandwidth is not None:
        chosen.append(Device(THIS_MACHINE, float(measured_bandwidth) / 1e9, None, None, None,
                             "measured bandwidth passed in (memory roof only)"))
    return chosen


# ============================================================================ routing model
def expected_experts(b: int | np.ndarray, k: int, n: int) -> float | np.ndarray:
    """Expected number of distinct experts ``b`` tokens touch when each picks ``k`` of ``n``
    uniformly at random: ``n * (1 - (1 - k/n)^b)`` (an expert is missed by one token with
    probability ``1 - k/n``, by all ``b`` independently)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or isinstance(n, bool) \
            or not isinstance(n, (int, np.integer)) or not 1 <= k <= n:
        raise NexlabError(f"experts used per token k={k!r} must be an int in [1, n_expert={n!r}]")
    b_arr = np.asarray(b)
    if np.any(b_arr < 0):
        raise NexlabError(f"batch must be >= 0, got {b!r}")
    out = n * (1.0 - (1.0 - k / n) ** b_arr.astype(float))
    return float(out) if out.ndim == 0 else out


# ============================================================================ the tensor table
@dataclass(frozen=True)
class TensorTable:
    """What the roofline needs of a model: its hyper-parameters and its tensors (name, numpy shape,
    ggml type), from a GGUF's tensor table or from :func:`nexlab.model.qwen35moe.tensor_plan`."""

    hp: Q.HParams
    specs: tuple[layout.TensorSpec, ...]
    name: str
    file: str | None
    variant: str | None


def _check_gguf(path: Path):
    """Open ``path`` with gguf-py's GGUFReader after :func:`nexlab.ggufio.check.check_gguf`;
    FileNotFoundError / ValueError naming the file."""

    return open_gguf(path, "model")


def load_tensor_table(model: str | os.PathLike | Q.HParams, variant: str | None = None,
                      nvfp4: str = "mlp") -> TensorTable:
    """The tensor table of ``model``: a ``.gguf`` file (its own tensors; ``variant`` must be None), an
    :class:`~nexlab.model.hparams.HParams`, ``nex-n2-mini`` or a ``config.json`` (or its folder):
    :func:`~nexlab.model.qwen35moe.tensor_plan` of ``variant`` (default ``q4_k_m``) with ``nvfp4`` scope."""

    if isinstance(model, Q.HParams):
        hp, file = model, None
    else:
        p = Path(model)
        if p.suffix == ".gguf":
            if variant is not None:
                raise NexlabError(f"variant applies to a configuration, not to the GGUF file {p.name}: "
                                 f"the file's own tensor types are used")
            reader = _check_gguf(p)
            hp = Q.hparams_from_gguf(reader, name=p.name)
            specs = tuple(layout.TensorSpec(t.name, tuple(int(x) for x in reversed(t.shape)), int(t.tensor_type))
                          for t in reader.tensors)
            return TensorTable(hp, specs, p.name, str(p), None)
        hp, file = load_hparams(model), None
    variant = "q4_k_m" if variant is None else variant
    if variant not in qwen35moe.VARIANTS:
        raise NexlabError(f"unknown variant {variant!r}; choose one of {', '.join(qwen35moe.VARIANTS)}")
    return TensorTable(hp, tuple(qwen35moe.tensor_plan(hp, variant, nvfp4=nvfp4)), hp.name, file, variant)


# ============================================================================ one decode step
def _check_batch(b) -> int:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise NexlabError(f"batch (parallel sequences) must be an int >= 1, got {b!r}")
    return int(b)


def _check_ctx(n_ctx) -> int:
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 0:
        raise NexlabError(f"n_ctx (context depth) must be an int >= 0, got {n_ctx!r}")
    return int(n_ctx)


def _kv_bytes_per_position(hp: Q.HParams, cache_type: str) -> int:
    """K + V bytes of one cached position over all full-attention layers (nexlab.analysis.memory's sizes:
    a 256-cell single-sequence cache divided by 256 is exact, the cache being linear in cells)."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextOverflowWarning)
        kv = kv_cache_size(hp, 256, cache_type, cache_type)
    return kv.bytes // kv.n_ctx_seq


def step_costs(table: TensorTable, batch: int, n_ctx: int = 0, cache_type: str = "f16") -> dict[str, Any]:
    """Bytes and flops of one decode step of ``batch`` sequences at context depth ``n_ctx`` (see the
    module docstring for what is counted). Returns ``{"batch", "expected_experts",
    "weight_bytes_read", "kv_bytes_read", "recurrent_bytes", "cache_bytes_read" (KV + recurrent),
    "bytes", "flops", "flops_breakdown": {"matmul", "attention", "delta_rule"}, "macs_per_token"}``."""

    b, N = _check_batch(batch), _check_ctx(n_ctx)
    hp = table.hp
    n, k = hp.n_expert, hp.n_expert_used
    e_b = expected_experts(b, k, n)
    names = {t.name for t in table.specs}
    tied = "output.weight" not in names
    weight_bytes = 0.0
    macs = 0.0
    for t in table.specs:
        nbytes = t.nbytes
        numel = math.prod(t.shape)
        if t.name.endswith(".input_scale"):
            continue  # loaded, never read by the graph
        if _EXPERT_RE.match(t.name):
            weight_bytes += nbytes * e_b / n
            if t.name.endswith(".weight"):
                macs += numel * k / n
            continue
        if t.name == "token_embd.weight":
            rows = math.prod(t.shape[:-1])
            if tied:  # also the output matrix: read whole, multiplied by every token
                weight_bytes += nbytes
                macs += numel
            else:
                weight_bytes += min(b, rows) * (nbytes // rows)
            continue
        weight_bytes += nbytes
        if t.name.endswith(".weight") and not t.name.endswith("_norm.weight"):
            macs += numel
    kv_bytes = b * N * _kv_bytes_per_position(hp, cache_type)
    recurrent_bytes = 2 * b * recurrent_size(hp, 1).bytes if hp.n_recr_layers else 0
    attn_flops = 2 * hp.n_attn_layers * hp.n_head * (hp.head_dim_k + hp.head_dim_v) * N
    delta_flops = DELTA_RULE_FLOPS_PER_STATE_ELEMENT * hp.n_recr_layers * hp.n_embd_s
    flops = {"matmul": b * 2.0 * macs, "attention": float(b * attn_flops), "delta_rule": float(b * delta_flops)}
    cache = kv_bytes + recurrent_bytes
    return {"batch": b, "expected_experts": e_b, "weight_bytes_read": weight_bytes, "kv_bytes_read": kv_bytes,
            "recurrent_bytes": recurrent_bytes, "cache_bytes_read": cache, "bytes": weight_bytes + cache,
            "flops": sum(flops.values()), "flops_breakdown": flops, "macs_per_token": macs}


def _bounds(step: dict, dev: Device) -> dict[str, float | None]:
    b = step["batch"]
    out: dict[str, float | None] = {"memory": b * dev.bandwidth / step["bytes"]}
    for kind in ("bf16", "fp8", "fp4"):
        peak = dev.peak(kind)
        out[f"compute_{kind}"] = None if peak is None else b * peak / step["flops"]
    out["bound"] = min(v for v in (out["memory"], out["compute_bf16"]) if v is not None)
    out["limited_by"] = "memory" if out["bound"] == out["memory"] else "compute"
    return out


def roofline(model: str | os.PathLike | Q.HParams, batches: Sequence[int] = (1, 4, 16), n_ctx: int = 0, *,
             variant: str | None = None, nvfp4: str = "mlp", cache_type: str = "f16",
             devices: Iterable[str | Device] | None = None, measured_bandwidth: float | None = None) -> dict[str, Any]:
    """Roofline of llama.cpp's decode step for ``model`` (a ``.gguf`` path, ``nex-n2-mini``, a
    ``config.json`` or an HParams; ``variant``: see :func:`load_tensor_table`) at each batch size
    (parallel sequences, one token each) and context depth ``n_ctx``.

    ``devices``: names from :data:`DEVICES` or :class:`Device` rows (default all of the table);
    ``measured_bandwidth`` (bytes/s) adds
    :data:`THIS_MACHINE`. Returns ``{"model", "file", "variant", "n_ctx", "cache_type",
    "recurrent_traffic": "read+write", "n_expert", "n_expert_used", "weight_bytes_total",
    "batches": [{**step_costs(...), "bound_tokens_per_s": {device: bound}, "bounds": {device:
    {"memory", "compute_bf16", "compute_fp8", "compute_fp4", "bound", "limited_by"}}}, ...],
    "devices": [asdict(Device), ...]}``. All figures are modelled, not measured.
    """
    if isinstance(batches, (int, np.integer)):
        batches = [batches]
    batches = [_check_batch(b) for b in batches]
    if not batches:
        raise NexlabError("batches is empty: give at least one batch size")
    n_ctx = _check_ctx(n_ctx)
    devs = select_devices(devices, measured_bandwidth)
    table = load_tensor_table(model, variant, nvfp4)
    _kv_bytes_per_position(table.hp, cache_type)  # validates cache_type before any work
    rows = []
    for b in batches:
        step = step_costs(table, b, n_ctx, cache_type)
        bounds = {d.name: _bounds(step, d) for d in devs}
        step["bound_tokens_per_s"] = {name: v["bound"] for name, v in bounds.items()}
        step["bounds"] = bounds
        rows.append(step)
    return {"model": table.name, "file": table.file, "variant": table.variant, "n_ctx": n_ctx,
            "cache_type": str(cache_type).lower(), "recurrent_traffic": "read+write",
            "n_expert": table.hp.n_expert, "n_expert_used": table.hp.n_expert_used,
            "weight_bytes_total": sum(t.nbytes for t in table.specs), "batches": rows,
            "devices": [asdict(d) for d in devs]}


# ============================================================================ measured routing
def distinct_experts_per_layer(ckpt_dir: str | os.PathLike, tokens, batch_sizes: Iterable[int] = range(1, 65),
                               draws: int = 8, seed: int = 0, *, n_positions: int = 256, chunk: int = 64,
                               context: int = 64, model=None) -> dict[str, Any]:
    """Measured: how many distinct experts each layer's router picks for ``b`` tokens.

    The routing is the float32 transformers reference model's (:func:`nexlab.analysis.reference.build_hf_model`
    on ``ckpt_dir``, NVFP4 weights dequantized), read from each layer's ``mlp.gate``
    (``Qwen3_5MoeTopKRouter``: its forward returns ``(router_logits, router_scores,
    router_indices)``; the indices ``[tokens, k]`` are recorded). The model runs once over
    ``n_positions`` held-out tokens: ``n_positions / chunk`` chunks spread evenly over ``tokens``
    (token ids, e.g. :func:`nexlab.analysis.quality.tokenize_text` of the held-out text), each preceded by
    ``context`` tokens whose routes are not recorded, so every recorded position has at least
    ``context`` tokens of left context. Then, per batch size ``b`` and draw, ``b`` distinct
    recorded positions are drawn (without replacement, seeded) as the next tokens of ``b``
    parallel sequences and each layer's distinct experts counted; counts are averaged over draws.
    ``model``: a model :func:`~nexlab.analysis.reference.build_hf_model` already built from ``ckpt_dir``, to
    reuse (its hooks are removed again); None builds one.

    Returns ``{"batch_sizes": [B], "per_layer": float array [B, n_layer], "mean": [B] (over layers),
    "std_over_draws": [B] (of the layer mean), "uniform": [B] (:func:`expected_experts`),
    "expert_load": [n_layer, n_expert] (fraction of recorded positions routed to each expert),
    "routes": int array [n_positions, n_layer, k], "n_expert", "n_expert_used", "n_positions",
    "draws", "seed", "routing": str}``.

    Kept in one function: the router replay and the counting share the model's hooks and state.
    """
    import torch  # noqa: PLC0415  (torch is heavy: imported only where tensors are made)


    ckpt = Path(ckpt_dir)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint folder (no config.json)")
    ids = np.asarray(tokens)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise NexlabError(f"tokens must be a 1-D array of token ids, got dtype {ids.dtype} shape {ids.shape}")
    for name, v, lo in (("draws", draws, 1), ("n_positions", n_positions, 1), ("chunk", chunk, 1),
                        ("context", context, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise NexlabError(f"{name} must be an int >= {lo}, got {v!r}")
    if n_positions % chunk:
        raise NexlabError(f"n_positions ({n_positions}) must be a multiple of chunk ({chunk})")
    bs = [_check_batch(b) for b in batch_sizes]
    if not bs:
        raise NexlabError("batch_sizes is empty")
    if max(bs) > n_positions:
        raise NexlabError(f"batch size {max(bs)} exceeds the {n_positions} recorded positions (n_positions)")
    n_chunks, span = n_positions // chunk, context + chunk
    if len(ids) < span * n_chunks:
        raise NexlabError(f"tokens has {len(ids)} ids; {n_chunks} chunks of {context} + {chunk} need {span * n_chunks}")

    if model is None:
        model = build_hf_model(ckpt)
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise NexlabError(f"token ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
    gates = [layer.mlp.gate for layer in model.model.layers]
    k, n = int(gates[0].top_k), int(gates[0].num_experts)
    recorded: list[torch.Tensor | None] = [None] * len(gates)

    def hook(i):
        def f(module, args, output):
            recorded[i] = output[2].detach().clone()  # router_indices [tokens, k]
        return f

    starts = np.linspace(0, len(ids) - span, n_chunks).astype(np.int64)
    batch = torch.as_tensor(np.stack([ids[s:s + span] for s in starts]).astype(np.int64))
    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates)]
    try:
        with torch.no_grad():
            model(batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    # [n_chunks * span, k] per layer -> keep the last `chunk` positions of each row
    routes = np.stack([r.reshape(n_chunks, span, k)[:, context:, :].reshape(-1, k).numpy() for r in recorded],
                      axis=1).astype(np.int64)  # [n_positions, n_layer, k]
    n_layer = routes.shape[1]
    member = np.zeros((n_positions, n_layer, n), dtype=bool)
    np.put_along_axis(member, routes, True, axis=2)

    rng = np.random.default_rng(seed)
    per_layer = np.zeros((len(bs), n_layer))
    std = np.zeros(len(bs))
    for i, b in enumerate(bs):
        counts = np.stack([member[rng.choice(n_positions, size=b, replace=False)].any(axis=0).sum(axis=1)
                           for _ in range(draws)])  # [draws, n_layer]
        per_layer[i] = counts.mean(axis=0)
        std[i] = counts.mean(axis=1).std()
    return {"batch_sizes": bs, "per_layer": per_layer, "mean": per_layer.mean(axis=1), "std_over_draws": std,
            "uniform": expected_experts(np.asarray(bs), k, n), "expert_load": member.mean(axis=0),
            "routes": routes, "n_expert": n, "n_expert_used": k, "n_positions": n_positions, "draws": draws,
            "seed": seed, "routing": "float32 transformers reference model (nexlab.analysis.reference.build_hf_model), "
                                     "router top-k from each layer's mlp.gate"}


# ============================================================================ CLI
def _parse_batches(s: str) -> list[int]:
    out = []
    for part in str(s).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise NexlabError(f"--batch must be comma-separated ints >= 1, got {s!r}") from None
        if v < 1:
            raise NexlabError(f"--batch sizes must be >= 1, got {v} in {s!r}")
        out.append(v)
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.3f}"


def format_report(res: dict[str, Any]) -> str:
    """The roofline as text: one row per batch size, one bound column per device (``m``: memory-bound,
    ``c``: compute-bound at the dense BF16 peak)."""

    head = (f"{res['model']}" + (f" ({res['variant']})" if res["variant"] else "") +
            f": weights {_gb(res['weight_bytes_total'])} GB, {res['n_expert_used']} of {res['n_expert']} experts, "
            f"n_ctx {res['n_ctx']}, KV cache {res['cache_type']}, recurrent state read+write (model, not measured)")
    rows = []
    for s in res["batches"]:
        r = {"batch": s["batch"], "E(b)": round(s["expected_experts"], 2),
             "weights GB/step": _gb(s["weight_bytes_read"]),
             "cache GB/step": _gb(s["cache_bytes_read"]), "GFLOP/step": f"{s['flops'] / 1e9:.2f}"}
        for name, v in s["bounds"].items():
            r[f"{name} t/s"] = f"{v['bound']:.1f} {v['limited_by'][0]}"
        rows.append(r)
    devs = []
    for d in res["devices"]:
        peaks = [f"{kind.upper()} {d[kind + '_tflops']:g}" for kind in ("bf16", "fp4") if d[kind + "_tflops"]]
        devs.append(f"{d['name']} {d['bandwidth_GBps']:g} GB/s" + (f", {' / '.join(peaks)} TFLOPS" if peaks else ""))
    devs = "; ".join(devs)
    return "\n".join([head, markdown_table(rows), "t/s: bound tokens/s (m memory-, c compute-bound); " + devs])


def _cli(args: argparse.Namespace) -> int:
    batches = _parse_batches(args.batch)
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise NexlabError(f"--bandwidth must be > 0 GB/s, got {args.bandwidth}")
    if args.ctx < 0:
        raise NexlabError(f"--ctx must be >= 0, got {args.ctx}")
    res = roofline(args.model, batches, args.ctx, variant=args.variant, cache_type=args.cache_type,
                   devices=args.device, measured_bandwidth=None if args.bandwidth is None else args.bandwidth * 1e9)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


def register_cli(subparsers) -> None:
    """Add ``nexlab roofline``."""
    p = subparsers.add_parser("roofline", help="bound decode tokens/s from bytes and flops per step",
                              description="Roofline of llama.cpp's decode step (b parallel sequences, one token "
                                          "each): weight, KV-cache and recurrent-state bytes, flops, and the "
                                          "bound tokens/s per device. A model, not a measurement.")
    p.add_argument("model", help="FILE.gguf, nex-n2-mini or CONFIG.json (or its folder)")
    p.add_argument("--variant", default=None, choices=list(qwen35moe.VARIANTS),
                   help="type mix for a configuration (default q4_k_m); not for a GGUF")
    p.add_argument("--batch", default="1,4,16", help="parallel sequences, comma-separated (default 1,4,16)")
    p.add_argument("--ctx", type=int, default=0, help="context depth N each sequence attends to (default 0)")
    p.add_argument("--cache-type", default="f16", help="KV cache type (K and V), as llama.cpp's --cache-type-k/-v")
    p.add_argument("--device", action="extend", nargs="+", default=None, metavar="NAME",
                   help="devices to show: " + ", ".join(d.name for d in DEVICES) + " (default all)")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GBps",
                   help=f"measured memory bandwidth of '{THIS_MACHINE}' in GB/s (1e9 bytes/s)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_cli)
