"""Memory sizing for a hybrid (Gated DeltaNet + full attention) MoE model in llama.cpp.

Everything here is byte arithmetic that mirrors what llama.cpp 0.3.36 (the tree vendored by
llama-cpp-python 0.3.36) allocates; the tests compare every number with llama.cpp itself:

* **GGUF file size**: the tensor plan of :mod:`nexlab.model.qwen35moe` (the same one the converter
  writes) laid out by :mod:`nexlab.ggufio.layout` (24-byte header, key/values, tensor infos,
  padding to ``general.alignment``, each tensor's data padded). Tensor data is
  ``ne0 / block_size * type_size`` bytes per row (``gguf.GGML_QUANT_SIZES``: NVFP4 36 B per 64,
  Q4_K 144/256, Q5_K 176/256, Q6_K 210/256, Q8_0 34/32, BF16/F16 2, F32 4). From a configuration
  alone the tokenizer's metadata is estimated; :func:`nexlab.convert.text.predict_file_size` is exact
  for a checkpoint.
* **Weights in memory** (:func:`weights_bytes`): the sum of the tensors' ``ggml_nbytes``; this
  is what ``llama_model_size()`` reports.
* **KV cache** (:func:`kv_cache_size`): llama-context.cpp pads ``n_ctx`` to a multiple of 256;
  with ``kv_unified=False`` (llama.cpp's default) each of the ``n_seq`` sequences gets its own
  stream of ``n_ctx_seq = pad(n_ctx / n_seq, 256)`` cells and ``n_ctx`` becomes
  ``n_ctx_seq * n_seq``; with ``kv_unified=True`` one stream holds ``n_ctx`` cells. Each
  full-attention layer holds a K tensor ``[n_embd_k_gqa, n_ctx_seq, n_stream]`` of type_k and a
  V tensor of type_v (llama-kv-cache.cpp). Linear-attention layers have no KV cache.
* **Recurrent state** (:func:`recurrent_size`): llama-memory-recurrent.cpp allocates, per
  linear-attention layer, ``r`` = F32 ``[n_embd_r, mem_size * (1 + n_rs_seq)]`` and ``s`` = F32
  ``[n_embd_s, mem_size * (1 + n_rs_seq)]`` with ``mem_size = max(1, n_seq)``,
  ``n_embd_r = (d_conv - 1) * (d_inner + 2 * n_group * d_state)`` and
  ``n_embd_s = d_state * d_inner``; it does not depend on the context length.
* **mmproj** (:func:`nexlab.convert.mmproj.mmproj_size`): the vision tower as llama.cpp's converter writes it.

The "reported" sizes are what llama.cpp prints in its ``llama_kv_cache: size = ...`` and
``llama_memory_recurrent: size = ...`` lines (sum of ``ggml_nbytes``); the backend buffer adds
at most one alignment per tensor (CPU 32 B, so nothing for these shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from nexlab.convert.mmproj import mmproj_size
from nexlab.core.errors import NexlabError
from nexlab.ggufio import layout
from nexlab.ggufio.check import open_gguf
from nexlab.ggufio.layout import header_nbytes, kv_nbytes, make_writer, pad
from nexlab.model import hparams as Q
from nexlab.model import qwen35moe
from nexlab.model.vision import SEED_MMPROJ_DTYPE

_CTX_PAD = 256       # llama-context.cpp: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)


LLAMA_MAX_SEQ = 256  # llama-cparams.h


# --cache-type-k/-v values llama.cpp accepts (common/arg.cpp kv_cache_types)
KV_CACHE_TYPES: dict[str, QT] = {
    "f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0,
    "q4_1": QT.Q4_1, "iq4_nl": QT.IQ4_NL, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1,
}


VARIANTS = qwen35moe.VARIANTS


# Device memory in bytes as the driver reports it (nvidia-smi "Total", MiB), or the nominal
# size for the DGX Spark, whose 128 GB LPDDR5x is shared with the CPU and the OS.
GPUS: dict[str, int] = {
    "RTX 4090 (24 GB)": 24564 * 2**20,
    "RTX 5090 (32 GB)": 32607 * 2**20,
    "H100 SXM (80 GB)": 81559 * 2**20,
    "DGX Spark (128 GB unified)": 128 * 2**30,
    "H200 (141 GB)": 143771 * 2**20,
}


class ContextOverflowWarning(UserWarning):
    """n_ctx_seq exceeds the trained context (llama.cpp logs the same warning and proceeds)."""


def load_hparams(spec: str | Path) -> Q.HParams:
    """``nex-n2-mini``, a ``config.json`` (or a checkpoint folder holding one), or a ``.gguf`` file,
    as :class:`nexlab.model.hparams.HParams`."""
    s = str(spec)
    if s.lower() in ("nex-n2-mini", "nex_n2_mini"):
        return Q.nex_n2_mini()
    p = Path(s)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"model {s!r} is neither 'nex-n2-mini' nor an existing config.json / .gguf")
    if p.suffix == ".gguf":

        return Q.hparams_from_gguf(open_gguf(p, "model"), name=p.name)
    return Q.hparams_from_hf_config(json.loads(p.read_text()), name=p.parent.name or p.name)


def tensor_nbytes(ne: Sequence[int], ggml_type: QT | int) -> int:
    """``ggml_nbytes`` of a contiguous tensor with ggml shape ``ne`` (fastest dimension first)."""
    return layout.tensor_nbytes_shape(tuple(reversed([int(n) for n in ne])), ggml_type)


def weights_bytes(specs: Iterable[layout.TensorSpec]) -> int:
    """Sum of the tensors' ``ggml_nbytes``; equals llama.cpp's ``llama_model_size()``."""
    return sum(s.nbytes for s in specs)


def weight_budget(hp: Q.HParams, variant: str = "bf16", nvfp4: str = "mlp") -> list[dict[str, Any]]:
    """Bytes of every tensor of the ``variant`` file, grouped for plotting: rows ``{layer_type, group,
    tensor, type, bytes}`` from :func:`nexlab.model.qwen35moe.tensor_plan` (sidecars count with their
    tensor's group)."""
    rows = []
    for t in qwen35moe.tensor_plan(hp, variant, nvfp4=nvfp4):
        lt = "other" if t.layer is None else ("linear_attention" if hp.recurrent[t.layer] else "full_attention")
        typ = QT(t.ggml_type).name
        group = ("routed experts" if "_exps." in t.name else "shared expert" if "_shexp." in t.name else
                 "embeddings + output" if lt == "other" and typ != "F32" else
                 "norms, routers, small (F32)" if typ == "F32" else
                 "linear attention" if lt == "linear_attention" else "full attention")
        rows.append({"layer_type": lt, "group": group, "tensor": t.name, "type": typ, "bytes": t.nbytes})
    return rows


def _specs_of_gguf(reader: "gguf.GGUFReader") -> list[layout.TensorSpec]:
    return [layout.TensorSpec(t.name, tuple(int(x) for x in reversed(t.shape)), QT(int(t.tensor_type)))
            for t in reader.tensors]


def gguf_file_size_from_gguf(path: str | Path, variant: str | None = None,
                             extra_metadata: Iterable[tuple[str, Any, VT, VT | None]] = ()) -> dict:
    """Predict the size of ``path`` re-typed to ``variant`` (None: as is), from its own header.

    The header keeps its size when only types change (``general.file_type`` is a u32), except
    that a quantized variant (q8_0, q4_k_m) is written as llama_model_quantize writes it: tensor
    shapes lose trailing 1-dims (``ggml_n_dims``), 8 bytes of tensor info each (the converter
    writes ``ffn_gate_inp_shexp`` as [n, 1]). Keys a quantizer adds (e.g.
    ``quantize.imatrix.*``) go in ``extra_metadata``.
    """

    reader = open_gguf(path, "model")
    align = int(reader.alignment)
    specs = _specs_of_gguf(reader)
    dims_before = sum(len(s.shape) for s in specs)
    if variant is not None and variant != "bf16":
        specs = qwen35moe.quantized_layout(specs, variant, Q.hparams_from_gguf(reader, name=Path(path).name))
    dropped_dims = dims_before - sum(len(s.shape) for s in specs)
    w = gguf.GGUFWriter(path=None, arch=Q.ARCH)  # gguf-py's packer sizes the extra key/values
    extra = sum(kv_nbytes(w, k, v, t, st) for k, v, t, st in extra_metadata) - 8 * dropped_dims
    header = pad(_unpadded_header_end(reader) + extra, align)
    return {"file_bytes": header + sum(pad(s.nbytes, align) for s in specs), "header_bytes": header,
            "weights_bytes": weights_bytes(specs), "specs": specs, "alignment": align}


def _unpadded_header_end(reader: "gguf.GGUFReader") -> int:
    """End of the last KV pair or tensor info (what gguf-py parsed), before alignment padding."""
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    return max(int(f.offset) + sum(int(p.nbytes) for p in f.parts) for f in fields)


def _estimated_header_nbytes(model: Q.HParams, specs: list[layout.TensorSpec], variant: str) -> int:
    """Header of the converted file: the real metadata and tensor infos (gguf-py's packer), the
    tokenizer part estimated (:func:`_tokenizer_estimate_bytes`)."""
    def add_metadata(w):
        w.add_type("model")
        w.add_name(model.name)
        qwen35moe.add_metadata(w, model)
        w.add_file_type(int(qwen35moe.file_type(variant, specs)))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen35")

    w = make_writer(Q.ARCH, add_metadata, specs)
    return pad(header_nbytes(w) + _tokenizer_estimate_bytes(model.n_vocab), w.data_alignment)


def _tokenizer_estimate_bytes(n_vocab: int) -> int:
    tokens = 12 + n_vocab * (8 + 7)          # string array
    types = 12 + n_vocab * 4                 # int32 array
    merges = 12 + (n_vocab - 1000) * (8 + 12)
    return tokens + types + merges + 4096    # special-token ids, chat template


def _cache_type(t: str | QT) -> QT:
    if isinstance(t, QT):
        if t not in KV_CACHE_TYPES.values():
            raise NexlabError(f"unsupported cache type {t.name}: choose one of {', '.join(KV_CACHE_TYPES)}")
        return t
    key = str(t).lower()
    if key not in KV_CACHE_TYPES:
        raise NexlabError(f"unknown cache type {t!r}: choose one of {', '.join(KV_CACHE_TYPES)}")
    return KV_CACHE_TYPES[key]


@dataclass(frozen=True)
class KVCacheSize:
    n_ctx_requested: int
    n_ctx: int          # after llama.cpp's padding / rounding
    n_ctx_seq: int      # cells per stream (llama_kv_cache kv_size)
    n_stream: int
    n_seq: int
    n_layers: int
    type_k: str
    type_v: str
    k_bytes: int
    v_bytes: int
    warnings: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes


def llama_ctx_layout(n_ctx: int, n_seq: int = 1, kv_unified: bool = False) -> tuple[int, int, int]:
    """``(n_ctx, n_ctx_seq, n_stream)`` exactly as llama_context's constructor derives them."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise NexlabError(f"n_ctx must be an int >= 1, got {n_ctx!r}")
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= LLAMA_MAX_SEQ:
        raise NexlabError(f"n_seq (parallel sequences) must be an int in [1, {LLAMA_MAX_SEQ}], got {n_seq!r}")
    ctx = pad(n_ctx, _CTX_PAD)
    if kv_unified:
        return ctx, ctx, 1
    ctx_seq = pad(ctx // n_seq, _CTX_PAD)
    if ctx_seq == 0:
        raise NexlabError("n_ctx_seq == 0")  # llama.cpp throws the same
    return ctx_seq * n_seq, ctx_seq, n_seq


def kv_cache_size(model: Q.HParams, n_ctx: int, type_k: str | QT = "f16", type_v: str | QT = "f16",
                  n_seq: int = 1, kv_unified: bool = False, flash_attn: bool = True) -> KVCacheSize:
    """KV cache of the full-attention layers as llama_kv_cache allocates it (exact bytes).

    Per layer: K ``[n_embd_k_gqa, n_ctx_seq, n_stream]`` of type_k and V likewise of type_v
    (without flash attention V is stored transposed with the same element count). A context
    above the trained one gets llama.cpp's warning (as a :class:`ContextOverflowWarning`) and
    the size it would allocate. Quantized V needs flash attention, as in llama.cpp.
    """
    tk, tv = _cache_type(type_k), _cache_type(type_v)
    if not flash_attn and tv not in (QT.F32, QT.F16, QT.BF16):
        raise NexlabError(f"quantized V cache ({tv.name.lower()}) requires flash_attn, as in llama.cpp")
    for t, hd in ((tk, model.head_dim_k), (tv, model.head_dim_v)):
        blk = gguf.GGML_QUANT_SIZES[t][0]
        if hd % blk:
            raise NexlabError(f"cache type {t.name.lower()} (block {blk}) does not divide head dim {hd}")
    ctx, ctx_seq, n_stream = llama_ctx_layout(n_ctx, n_seq, kv_unified)
    warns = []
    if ctx_seq > model.n_ctx_train:
        msg = (f"n_ctx_seq ({ctx_seq}) > n_ctx_train ({model.n_ctx_train}) -- possible training context overflow")
        warns.append(msg)
        warnings.warn(msg, ContextOverflowWarning, stacklevel=2)
    L = model.n_attn_layers
    kb = L * tensor_nbytes((model.n_embd_k_gqa, ctx_seq, n_stream), tk)
    vb = L * tensor_nbytes((model.n_embd_v_gqa, ctx_seq, n_stream), tv)
    return KVCacheSize(n_ctx, ctx, ctx_seq, n_stream, n_seq, L, tk.name.lower(), tv.name.lower(), kb, vb, tuple(warns))


@dataclass(frozen=True)
class RecurrentSize:
    cells: int
    n_seq: int
    n_rs_seq: int
    n_layers: int
    r_bytes: int
    s_bytes: int

    @property
    def bytes(self) -> int:
        return self.r_bytes + self.s_bytes


def recurrent_size(model: Q.HParams, n_seq: int = 1, n_rs_seq: int = 0) -> RecurrentSize:
    """Conv (r) and delta-rule (s) states of the linear-attention layers, F32, per sequence.

    llama_memory_recurrent: ``mem_size = max(1, n_seq_max)`` cells, ``(1 + n_rs_seq)`` rows per
    cell (rollback snapshots; llama.cpp's default is 0), per recurrent layer.
    """
    if isinstance(n_seq, bool) or not isinstance(n_seq, int) or not 1 <= n_seq <= LLAMA_MAX_SEQ:
        raise NexlabError(f"n_seq must be an int in [1, {LLAMA_MAX_SEQ}], got {n_seq!r}")
    if isinstance(n_rs_seq, bool) or not isinstance(n_rs_seq, int) or n_rs_seq < 0:
        raise NexlabError(f"n_rs_seq must be an int >= 0, got {n_rs_seq!r}")
    cells = max(1, n_seq)
    rows = cells * (1 + n_rs_seq)
    L = model.n_recr_layers
    return RecurrentSize(cells, n_seq, n_rs_seq, L, L * tensor_nbytes((model.n_embd_r, rows), QT.F32),
                         L * tensor_nbytes((model.n_embd_s, rows), QT.F32))


@dataclass
class MemoryEstimate:
    model: str
    variant: str | None
    n_ctx: int
    n_seq: int
    type_k: str
    type_v: str
    weights_bytes: int
    gguf_file_bytes: int
    gguf_file_exact: bool
    kv_bytes: int
    recurrent_bytes: int
    mmproj_bytes: int
    kv: dict = field(default_factory=dict)
    recurrent: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.mmproj_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def estimate(model: Q.HParams | str | Path, variant: str | None = "q4_k_m", n_ctx: int = 262144,
             type_k: str = "f16", type_v: str = "f16", n_seq: int = 1, mmproj_bytes: int | None = 0,
             kv_unified: bool = False, n_rs_seq: int = 0, nvfp4_scope: str = "mlp") -> MemoryEstimate:
    """Weights + KV cache + recurrent state + mmproj for one configuration.

    ``model`` may be a :class:`Q.HParams`, ``"nex-n2-mini"``, a config.json path or a GGUF path.
    For a GGUF the weights come from its own tensor list (re-typed when ``variant`` is given) and
    the file size from its own header (exact); from a config the header's tokenizer part is an
    estimate (``gguf_file_exact=False``). ``mmproj_bytes=None``: the exact size of the seed's mmproj
    layout for the vision config (:func:`nexlab.convert.mmproj.mmproj_size` with
    :data:`nexlab.model.vision.SEED_MMPROJ_DTYPE`: 902.82 MB for Nex-N2-mini, the model card's 903 MB).
    Compute buffers (activations) are not included.
    """
    gguf_path = None
    if not isinstance(model, Q.HParams):
        if str(model).endswith(".gguf"):
            gguf_path = Path(model)
        model = load_hparams(model)
    if variant is not None and variant not in VARIANTS:
        raise NexlabError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kv = kv_cache_size(model, n_ctx, type_k, type_v, n_seq, kv_unified)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    rs = recurrent_size(model, n_seq, n_rs_seq)
    if gguf_path is not None:
        g = gguf_file_size_from_gguf(gguf_path, variant)
        wbytes, fbytes, exact = g["weights_bytes"], g["file_bytes"], True
    else:
        specs = qwen35moe.tensor_plan(model, variant or "bf16", nvfp4=nvfp4_scope)
        header = _estimated_header_nbytes(model, specs, variant or "bf16")
        wbytes, fbytes, exact = (weights_bytes(specs),
                                 header + sum(pad(s.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for s in specs), False)
    if mmproj_bytes is None:
        if not model.vision:
            raise NexlabError(f"{model.name} has no vision config: pass mmproj_bytes explicitly")

        mmproj_bytes = mmproj_size(model.vision, SEED_MMPROJ_DTYPE)
    if isinstance(mmproj_bytes, bool) or not isinstance(mmproj_bytes, int) or mmproj_bytes < 0:
        raise NexlabError(f"mmproj_bytes must be an int >= 0, got {mmproj_bytes!r}")
    return MemoryEstimate(
        model=model.name, variant=variant, n_ctx=kv.n_ctx, n_seq=n_seq, type_k=kv.type_k, type_v=kv.type_v,
        weights_bytes=wbytes, gguf_file_bytes=fbytes, gguf_file_exact=exact, kv_bytes=kv.bytes,
        recurrent_bytes=rs.bytes, mmproj_bytes=mmproj_bytes,
        kv={k: v for k, v in asdict(kv).items()} | {"bytes": kv.bytes},
        recurrent=asdict(rs) | {"bytes": rs.bytes}, warnings=list(kv.warnings))


def fits(total_bytes: int, gpu_bytes: int, reserve_bytes: int = 0) -> tuple[bool, int]:
    """(fits, headroom) of ``total_bytes`` plus a ``reserve`` (compute buffers, CUDA context) on a GPU."""
    head = gpu_bytes - total_bytes - reserve_bytes
    return head >= 0, head


def _fmt(n: int) -> str:
    return f"{n:>15,d} B  {n / 2**20:>11.2f} MiB  {n / 1e9:>8.3f} GB"


def _cli(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():  # printed below as llama.cpp prints it, once
        warnings.simplefilter("ignore", ContextOverflowWarning)
        est = estimate(args.model, variant=args.variant, n_ctx=args.ctx, type_k=args.cache_type_k,
                       type_v=args.cache_type_v, n_seq=args.parallel,
                       mmproj_bytes=args.mmproj, kv_unified=args.kv_unified)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    kv, rs = est.kv, est.recurrent
    print(f"model {est.model}  variant {est.variant}  n_ctx {est.n_ctx} (asked {kv['n_ctx_requested']}, "
          f"{kv['n_stream']} stream(s) x {kv['n_ctx_seq']} cells)  sequences {est.n_seq}")
    print(f"  weights          {_fmt(est.weights_bytes)}")
    print(f"  gguf file        {_fmt(est.gguf_file_bytes)}  "
          f"({'exact' if est.gguf_file_exact else 'tokenizer metadata estimated'})")
    print(f"  KV cache         {_fmt(est.kv_bytes)}  ({kv['n_layers']} layers, "
          f"K {kv['type_k']} {kv['k_bytes']:,} B, V {kv['type_v']} {kv['v_bytes']:,} B)")
    print(f"  recurrent state  {_fmt(est.recurrent_bytes)}  ({rs['n_layers']} layers, {rs['cells']} cells, "
          f"r {rs['r_bytes']:,} B, s {rs['s_bytes']:,} B)")
    print(f"  mmproj           {_fmt(est.mmproj_bytes)}")
    print(f"  total            {_fmt(est.total_bytes)}  (compute buffers not included)")
    for w in est.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _mmproj_arg(s: str) -> int | None:
    if s.lower() == "auto":
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mmproj must be a byte count or 'auto', got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("--mmproj must be >= 0")
    return v


def register_cli(subparsers) -> None:
    """Add ``nexlab memory``."""
    p = subparsers.add_parser("memory", help="weights + KV cache + recurrent state + mmproj bytes",
                              description="Memory llama.cpp needs for a qwen35moe model at a given context.")
    p.add_argument("--model", default="nex-n2-mini", help="nex-n2-mini, CONFIG.json (or its folder) or FILE.gguf")
    p.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="type mix (default: q4_k_m for a config, the file as is for a GGUF)")
    p.add_argument("--ctx", type=int, default=262144, help="context length (n_ctx)")
    p.add_argument("--cache-type-k", default="f16", help="K cache type: " + ", ".join(KV_CACHE_TYPES))
    p.add_argument("--cache-type-v", default="f16", help="V cache type (quantized V needs flash attention)")
    p.add_argument("--parallel", type=int, default=1, help="parallel sequences (n_seq_max)")
    p.add_argument("--kv-unified", action="store_true", help="one KV stream shared by all sequences")
    p.add_argument("--mmproj", type=_mmproj_arg, default=0, help="mmproj bytes, or 'auto' (from the vision config)")
    p.add_argument("--json", action="store_true", help="print a JSON object")

    def handler(args):
        if args.variant is None and not str(args.model).endswith(".gguf"):
            args.variant = "q4_k_m"
        return _cli(args)

    p.set_defaults(func=handler)
