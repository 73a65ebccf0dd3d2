"""ModelOpt NVFP4 (or BF16) Qwen3.5-MoE checkpoint -> qwen35moe GGUF that llama.cpp runs.

What the file holds (names, types, shapes, order, metadata, transforms) is decided by
:mod:`nexlab.model.qwen35moe`, the one model of the architecture; :mod:`nexlab.convert.plan` attaches
"how to make the bytes" to each planned tensor, and this module puts the file together and writes it
(``nexlab convert``). Pipeline (one tensor, or one layer's experts, in memory at a time):

1. :class:`nexlab.model.checkpoint.Checkpoint` indexes the safetensors headers; :func:`validate_checkpoint`
   rejects a malformed checkpoint before anything is written.
2. :func:`plan_conversion` plans every tensor (:func:`nexlab.convert.plan.plan_tensors`) and the
   metadata (general, ``qwen35moe.*``, tokenizer from :mod:`nexlab.model.vocab`, chat template from
   :mod:`nexlab.model.chat_template`); the header is known before the first tensor is read, and so is
   the exact file size (:func:`predict_file_size`, through :mod:`nexlab.ggufio.layout`).
3. :func:`convert_checkpoint` streams the tensors with :func:`nexlab.ggufio.writer.write_gguf`
   (atomic: no partial GGUF is ever left).

What is written matches llama.cpp's own ``convert_hf_to_gguf.py`` (``Qwen3_5MoeTextModel`` of the
llama.cpp tree in llama-cpp-python 0.3.36, ``--outtype bf16 --no-mtp``) byte for byte, and for
``q8_0`` / ``q4_k_m`` llama_model_quantize's output on that file. :func:`write_shape_gguf` and
:func:`write_vocab_gguf` write zero-weight and vocabulary-only files for tests; ``--mmproj`` hands
over to :mod:`nexlab.convert.mmproj`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from nexlab.convert.mmproj import cli_convert_mmproj
from nexlab.convert.plan import EXPERT_FORMATS, checkpoint_hparams, plan_tensors
from nexlab.core.errors import NexlabError
from nexlab.ggufio import layout
from nexlab.ggufio.gguf_internals import move_keys_to_end
from nexlab.ggufio.imatrix_file import quantize_weights, read_imatrix
from nexlab.ggufio.layout import PlannedFile
from nexlab.ggufio.metadata import add_general_metadata
from nexlab.ggufio.writer import PlannedTensor, WriteResult, write_gguf, write_plan
from nexlab.model import hparams
from nexlab.model import qwen35moe as Q
from nexlab.model.chat_template import original_template, resolve_chat_template
from nexlab.model.checkpoint import Checkpoint, validate_checkpoint
from nexlab.model.vision import DTYPES as MMPROJ_DTYPES
from nexlab.model.vocab import add_tokenizer_metadata, find_tokenizer_dir, tokenizer_metadata

ARCH = hparams.ARCH


VARIANTS = Q.VARIANTS


log = logging.getLogger(__name__)




@dataclass
class ConversionPlan(PlannedFile):
    """Everything a conversion will write: the tensors (with producers) and the metadata writer.

    ``file_nbytes`` is the exact size of the file (:mod:`nexlab.ggufio.layout`, the same writer set-up
    :func:`write_gguf` uses).
    """

    variant: str
    hparams: hparams.HParams
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
        raise NexlabError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    g = gguf
    validate_checkpoint(ck)
    weights = quantize_weights(read_imatrix(imatrix)) if imatrix is not None else None
    plan = plan_tensors(ck, variant, weights, experts=experts, nvfp4_scales=nvfp4_scales)
    hp = checkpoint_hparams(ck)
    tok = tokenizer_metadata(find_tokenizer_dir(ck, tokenizer_dir), hp.n_vocab, ck.config,
                             tokenizer_pre=tokenizer_pre)
    template = resolve_chat_template(chat_template, ck.path if chat_template == "original" else None)
    if chat_template == "original" and template is None:
        try:
            template = original_template(find_tokenizer_dir(ck, tokenizer_dir))
        except ValueError:
            template = None
    ftype = Q.file_type(variant, [t.spec for t in plan])
    general = {"name": name or ck.raw_config.get("_name_or_path") or ck.path.name, "license": license,
               "quantized_by": quantized_by, "source_url": source_url}

    def add_metadata(w):
        add_general_metadata(w, **general)
        Q.add_metadata(w, hp)
        w.add_file_type(int(ftype))
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        add_tokenizer_metadata(w, tok, template)
        if variant != "bf16":
            # llama_model_quantize's gguf_set_val_u32 on an existing key removes it and appends it
            # again: general.quantization_version then general.file_type come last
            move_keys_to_end(w, (g.Keys.General.QUANTIZATION_VERSION, g.Keys.General.FILE_TYPE))

    return ConversionPlan(variant, hp, plan, add_metadata)


def predict_file_size(ckpt_dir: str | os.PathLike, variant: str = "bf16", **kwargs) -> int:
    """Exact size in bytes of the GGUF :func:`convert_checkpoint` writes with the same arguments."""
    with Checkpoint(ckpt_dir) as ck:
        return plan_conversion(ck, variant, **kwargs).file_nbytes


def convert_checkpoint(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, variant: str = "bf16",
                       chat_template: str = "fixed", *, tokenizer_dir: str | os.PathLike | None = None,
                       name: str | None = None, license: str = "apache-2.0", quantized_by: str = "nexlab",
                       source_url: str | None = None, imatrix: str | os.PathLike | None = None,
                       tokenizer_pre: str | None = None, experts: str | None = None,
                       nvfp4_scales: str | None = None, show_progress: bool = True) -> WriteResult:
    """Convert a Qwen3.5-MoE checkpoint (ModelOpt NVFP4 or BF16) to a qwen35moe GGUF.

    ``variant``: ``bf16`` (NVFP4 tensors kept, the rest BF16/F32: the "NVFP4-BF16" file); ``q8_0``
    and ``q4_k_m`` quantize the rest with llama-quantize's type mix and are laid out as
    llama_model_quantize writes them: byte-identical to llama.cpp's quantization of the bf16 file
    (NVFP4 kept, same imatrix). A tensor without an imatrix entry is quantized without importance
    weights, as llama.cpp does, with a warning (``nexlab.convert.plan`` logger). ``chat_template``:
    ``fixed`` (nexlab's template, default), ``original`` (the checkpoint's own, unchanged) or a file
    path. ``imatrix``: a llama-imatrix GGUF whose column weights guide the K-quant search (q4_k_m).
    ``tokenizer_pre``: llama.cpp's pre-tokenizer name to write as ``tokenizer.ggml.pre``; default:
    recognised from tokenizer.json (:func:`nexlab.model.tokenizer.pretokenizer_name`), which refuses a
    pre-tokenizer it does not know. ``experts="nvfp4"``: quantize a BF16 checkpoint's routed and shared
    experts to NVFP4 with the scale rule ``nvfp4_scales`` (``max``: ModelOpt's, the default;
    ``4over6``; ``search``, weighted by ``imatrix`` when given: :mod:`nexlab.formats.scales`). Raises
    ValueError naming the tensor on malformed input; never leaves a partial output file.
    """
    t0 = time.perf_counter()
    with Checkpoint(ckpt_dir) as ck:
        cp = plan_conversion(ck, variant, chat_template, tokenizer_dir=tokenizer_dir, name=name, license=license,
                             quantized_by=quantized_by, source_url=source_url, imatrix=imatrix,
                             tokenizer_pre=tokenizer_pre, experts=experts, nvfp4_scales=nvfp4_scales)
        return write_plan(out_path, cp, show_progress=show_progress, desc=f"convert {Path(out_path).name}", started=t0)


def write_shape_gguf(path: str | os.PathLike, hp: hparams.HParams, variant: str = "bf16",
                     nvfp4: str = "mlp") -> list[layout.TensorSpec]:
    """A GGUF llama.cpp loads, with ``hp``'s tensor plan and metadata and zero weights.

    For sizing experiments: llama.cpp allocates its caches from the metadata alone, so the weights
    need no content (all-zero bytes are a valid block of every ggml type; ``.scale`` sidecars are 1).
    The tokenizer is ``none`` with ``qwen35moe.vocab_size`` dummy tokens. Atomic, like every write.
    Returns the tensor plan written.
    """
    g = gguf
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
        raise NexlabError(f"no tokenizer.json in {tok_dir}")
    if vocab_size is None:
        tj = json.loads((tok_dir / "tokenizer.json").read_text())
        vocab = (tj.get("model") or {}).get("vocab")
        ids = [*(vocab.values() if isinstance(vocab, dict) else ()), *(a["id"] for a in tj.get("added_tokens", []))]
        vocab_size = max(ids, default=-1) + 1  # tokenizer_metadata refuses what is not byte-level BPE
    tok = tokenizer_metadata(tok_dir, vocab_size, {}, tokenizer_pre=tokenizer_pre)

    def add_metadata(w):
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(tok_dir.name)
        add_tokenizer_metadata(w, tok, None)

    return write_gguf(path, ARCH, add_metadata, [], show_progress=False)


# ----------------------------------------------------------------------------- CLI
def _cli(args: argparse.Namespace) -> int:
    if args.mmproj:
        return cli_convert_mmproj(args)
    r = convert_checkpoint(args.ckpt_dir, args.output, variant=args.variant, chat_template=args.chat_template,
                           tokenizer_dir=args.tokenizer_dir, name=args.name, source_url=args.source_url,
                           imatrix=args.imatrix, tokenizer_pre=args.tokenizer_pre, experts=args.experts,
                           nvfp4_scales=args.nvfp4_scales, show_progress=not args.quiet)
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
    p.add_argument("--mmproj", nargs="?", const="f16", default=None, choices=MMPROJ_DTYPES,
                   help="write the vision tower as llama.cpp's mmproj GGUF instead (default type f16), as "
                        "convert_hf_to_gguf.py --mmproj does; for llama-mtmd-cli / llama-server --mmproj")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
