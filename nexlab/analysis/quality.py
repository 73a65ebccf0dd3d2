"""Quality of GGUF variants through llama.cpp: KL divergence, top-1 agreement, perplexity.

What llama.cpp's ``llama-perplexity --kl-divergence`` reports, computed here from the logits
llama-cpp-python returns, so that every variant is judged by the engine that will run it:

* held-out text is tokenized **once** with the checkpoint's tokenizer
  (:func:`nexlab.model.tokenizer.load_tokenizer`) and the same token ids are fed to every file with
  ``Llama.eval`` (llama.cpp's own tokenizer is never asked, so a tokenizer difference between files
  cannot leak into the comparison);
* the ids are cut into independent chunks of ``chunk_size`` tokens; each chunk starts from an empty
  context (``Llama.reset``), as llama-perplexity does;
* in a chunk, the logits at position ``t`` predict token ``t + 1``; positions ``t >= score_from`` are
  scored (llama-perplexity scores the second half, ``score_from = chunk_size // 2``; the default here
  scores every prediction because the tiny model's held-out text is short);
* per scored position: NLL of the true next token, KL(P_ref || P_variant) over the whole vocabulary,
  whether both argmaxes agree, and the change of the true token's probability.

Numerics: logits arrive as float32 from llama.cpp; log-softmax, KL and NLL are computed in float64
with the max-subtracted log-sum-exp, so rounding stays orders of magnitude below the differences
measured (a file compared with itself gives exactly 0 because the logits are bitwise equal).
KL uses ``sum p_ref * (log p_ref - log p_var)``, the same direction as llama-perplexity
(the base model's distribution is P). Perplexity is ``exp(mean NLL)`` over all scored positions; with
``score_from = chunk_size // 2`` it equals llama-perplexity's on the same ids to its printed 4 decimals,
when llama-perplexity runs one chunk per batch and without flash attention (``-b``/``-ub`` = ``-c``,
``-fa off``): llama-cpp-python opens contexts without it, and llama-perplexity's default ``-fa auto``
turns it on for the CPU, which moves the tiny model's perplexity by about 3e-4 relative (rounding of a
different attention kernel).

Memory: :func:`evaluate_variants` streams. Every file is opened at once (llama.cpp memory-maps the
weights, so a file costs address space, not RAM), and each chunk is evaluated by the reference and
then by every variant before the next chunk starts; a chunk's logits are compared and dropped at
once. What is held does not depend on the number of chunks: the reference's float64
log-probabilities of one chunk (``(chunk_size - 1 - score_from) * n_vocab * 8`` bytes; Nex-N2-mini,
vocabulary 248320, 512-token chunks scored from 256: 0.5 GB); float64 temporaries cut into row
blocks of at most 64 MiB per array (a few live at once); per open file, llama-cpp-python's float32
score buffer and llama.cpp's output buffer (``chunk_size * n_vocab * 4`` bytes each: 0.5 GB each at
512 tokens); and per scored position KL, NLL, top-1 agreement and the change of the true token's
probability (25 bytes), which the median and 99th percentile need. :func:`gguf_logits` and
:func:`compare_to_reference` are the whole-array forms for small inputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import gguf
import numpy as np

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.core.progress import progress
from nexlab.llamacpp.runtime import check_gguf_path, open_model


def chunk_tokens(tokens, chunk_size: int, n_chunks: int | None = None) -> np.ndarray:
    """Cut a flat id sequence into ``[n_chunks, chunk_size]`` int32 (a partial tail is dropped).

    ``n_chunks=None`` takes every whole chunk. Raises ValueError when there are fewer than
    ``chunk_size`` tokens, fewer tokens than ``n_chunks`` chunks need, ``chunk_size < 2`` (nothing to
    predict), or ids that are negative or not integers.
    """
    t = np.asarray(tokens)
    if t.ndim != 1:
        raise NexlabError(f"tokens must be a flat sequence of ids, got shape {t.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        raise NexlabTypeError(f"tokens must be integer ids, got dtype {t.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 2:
        raise NexlabError(f"chunk_size must be an int >= 2 (one context plus one predicted token), got {chunk_size!r}")
    if t.size and t.min() < 0:
        raise NexlabError(f"tokens contain a negative id ({int(t.min())})")
    have = t.size // chunk_size
    if have == 0:
        raise NexlabError(f"too few tokens: {t.size} tokens do not fill one chunk of {chunk_size}")
    if n_chunks is not None:
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, (int, np.integer)) or n_chunks < 1:
            raise NexlabError(f"n_chunks must be a positive int or None, got {n_chunks!r}")
        if n_chunks > have:
            raise NexlabError(f"too few tokens: {n_chunks} chunks of {chunk_size} need {n_chunks * chunk_size} "
                             f"tokens, the text has {t.size}")
        have = n_chunks
    return np.ascontiguousarray(t[: have * chunk_size].reshape(have, chunk_size).astype(np.int32))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis (max-subtracted log-sum-exp)."""
    x = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(x).all():
        raise NexlabError("logits contain NaN or Inf")
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))



def _eval_chunk(llm, chunk: np.ndarray) -> np.ndarray:
    """float32 logits ``[chunk_size, n_vocab]`` of one chunk from an empty context.

    A view of the model's score buffer: valid until the next evaluation of the same model.
    """
    llm.reset()
    llm.eval(chunk.tolist())
    return llm.scores[: chunk.size]


def _chunk_logits(llm, chunk: np.ndarray) -> np.ndarray:
    return np.array(_eval_chunk(llm, chunk), dtype=np.float32)


def gguf_logits(path: str | os.PathLike, chunks: np.ndarray, *, n_threads: int = 2,
                show_progress: bool = False) -> np.ndarray:
    """float32 logits ``[n_chunks, chunk_size, n_vocab]`` llama.cpp computes for each chunk (fresh context).

    Holds every chunk's logits at once (``n_chunks * chunk_size * n_vocab * 4`` bytes): for small
    inputs and tests; :func:`evaluate_variants` streams instead.
    """

    chunks = np.asarray(chunks)
    if chunks.ndim != 2:
        raise NexlabError(f"chunks must be [n_chunks, chunk_size], got shape {chunks.shape}")
    llm = open_model(path, chunks.shape[1], n_threads=n_threads, n_batch=chunks.shape[1])  # a window = one batch
    try:
        _check_vocab(llm, chunks, path)
        it = progress(chunks, total=len(chunks), desc=Path(path).name, show_progress=show_progress)
        return np.stack([_chunk_logits(llm, c) for c in it])
    finally:
        llm.close()


def _check_vocab(llm, chunks: np.ndarray, path) -> int:
    n_vocab = int(llm.n_vocab())
    if int(chunks.max()) >= n_vocab:
        raise NexlabError(f"token id {int(chunks.max())} is outside the vocabulary of {path} ({n_vocab} tokens): "
                         "tokenizer and model do not match")
    return n_vocab


def _targets(chunks: np.ndarray, score_from: int) -> tuple[slice, np.ndarray]:
    n = chunks.shape[1]
    if not 0 <= score_from <= n - 2:
        raise NexlabError(f"score_from must be in [0, chunk_size - 2] = [0, {n - 2}], got {score_from}")
    return slice(score_from, n - 1), chunks[:, score_from + 1:]


def score_logits(logits: np.ndarray, chunks: np.ndarray, score_from: int = 0) -> np.ndarray:
    """NLL (nats, float64) of each true next token, ``[n_chunks, chunk_size - 1 - score_from]``."""
    pos, tgt = _targets(np.asarray(chunks), score_from)
    lp = log_softmax(logits[:, pos])
    return -np.take_along_axis(lp, tgt[..., None].astype(np.int64), axis=-1)[..., 0]


# float64 work arrays are cut into row blocks of at most this many bytes (vocabulary 248320: 33 rows)
_BLOCK_BYTES = 64 << 20


def _row_blocks(n_rows: int, n_vocab: int):
    step = max(1, _BLOCK_BYTES // (8 * max(n_vocab, 1)))
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _compare_rows(lp: np.ndarray, logits: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, ...]:
    """KL, NLL, equal argmax, dp for rows of reference log-probabilities ``lp`` (float64) and variant
    logits over the same positions; ``tgt`` the true next tokens. Every figure is computed row by row,
    so a block of rows gives the same bits as the whole array."""
    lq = log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    idx = tgt[..., None].astype(np.int64)
    lq_t = np.take_along_axis(lq, idx, axis=-1)[..., 0]
    lp_t = np.take_along_axis(lp, idx, axis=-1)[..., 0]
    return kl, -lq_t, lp.argmax(-1) == lq.argmax(-1), np.exp(lq_t) - np.exp(lp_t)


def compare_to_reference(ref_logp: np.ndarray, logits: np.ndarray, chunks: np.ndarray, score_from: int = 0) -> dict:
    """Per-position arrays of one variant against the reference's log-probabilities.

    ``ref_logp``: reference log-softmax over the scored positions ``[n_chunks, m, n_vocab]``;
    ``logits``: the variant's raw logits ``[n_chunks, chunk_size, n_vocab]``. Returns ``kl``, ``nll``,
    ``top1_same`` (bool), ``dp`` (p_variant(true) - p_ref(true)), each ``[n_chunks, m]``. The
    whole-array form of what :func:`evaluate_variants` computes chunk by chunk.
    """
    pos, tgt = _targets(np.asarray(chunks), score_from)
    if logits.shape[-1] != ref_logp.shape[-1]:
        raise NexlabError(f"vocabulary sizes differ: reference {ref_logp.shape[-1]}, variant {logits.shape[-1]}")
    kl, nll, same, dp = _compare_rows(np.asarray(ref_logp, dtype=np.float64), logits[:, pos], tgt)
    return {"kl": kl, "nll": nll, "top1_same": same, "dp": dp}


@dataclass
class VariantQuality:
    """One file's figures (llama-perplexity --kl-divergence names in brackets)."""

    name: str
    path: str
    file_bytes: int
    n_scored: int
    mean_nll: float
    ppl: float  # exp(mean NLL)                                   [Mean PPL(Q)]
    ppl_ratio: float  # ppl / reference ppl                        [Mean PPL(Q)/PPL(base)]
    kl_mean: float  # nats                                          [Mean KLD]
    kl_median: float  #                                             [Median KLD]
    kl_p99: float  #                                                [99.0% KLD]
    kl_max: float  #                                                [Maximum KLD]
    top1_agreement: float  # share of positions with equal argmax   [Same top p]
    rms_dp: float  # RMS of p_var(true) - p_ref(true)               [RMS Δp]
    kl: np.ndarray = field(repr=False, default=None)  # per scored position [n_chunks, m]
    nll: np.ndarray = field(repr=False, default=None)

    def summary(self) -> dict:
        """The scalar figures (per-position arrays left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("kl", "nll")}


@dataclass
class QualityReport:
    reference: str
    chunk_size: int
    n_chunks: int
    score_from: int
    variants: dict[str, VariantQuality]

    def table(self) -> list[dict]:
        """One summary dict per variant (reference first), ready for ``pandas.DataFrame``."""
        return [v.summary() for v in self.variants.values()]

    def to_dict(self) -> dict:
        return {"reference": self.reference, "chunk_size": self.chunk_size, "n_chunks": self.n_chunks,
                "score_from": self.score_from, "variants": {k: v.summary() for k, v in self.variants.items()}}


def _summarise(name, path, cmp: dict, ref_ppl: float | None) -> VariantQuality:
    kl, nll = cmp["kl"], cmp["nll"]
    mean_nll = float(nll.mean())
    ppl = float(np.exp(mean_nll))
    return VariantQuality(
        name=name, path=str(path), file_bytes=Path(path).stat().st_size, n_scored=int(nll.size),
        mean_nll=mean_nll, ppl=ppl, ppl_ratio=ppl / (ref_ppl if ref_ppl is not None else ppl),
        kl_mean=float(kl.mean()), kl_median=float(np.median(kl)), kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(kl.max()), top1_agreement=float(cmp["top1_same"].mean()),
        rms_dp=float(np.sqrt(np.mean(cmp["dp"] ** 2))), kl=kl, nll=nll)


def evaluate_variants(files: Mapping[str, str | os.PathLike], tokens: Sequence[int] | np.ndarray, *,
                      reference: str | None = None, chunk_size: int = 256, n_chunks: int | None = None,
                      score_from: int = 0, n_threads: int = 2, show_progress: bool = True) -> QualityReport:
    """Run every GGUF in ``files`` ({name: path}) on the same held-out ``tokens`` and compare to ``reference``.

    ``reference`` (default: the first name, e.g. ``"NVFP4-BF16"``) is compared position by position
    with every file, itself included. Files are checked before anything runs (missing file, unknown
    reference, too few tokens, a token outside a file's vocabulary, vocabularies of different sizes ->
    FileNotFoundError/ValueError naming it). Streams (module docstring, Memory): all files are open at
    once, each chunk is evaluated by the reference and then by the others, compared, and dropped, so
    memory does not grow with ``n_chunks``; the figures equal :func:`gguf_logits` +
    :func:`compare_to_reference` on whole arrays bit for bit. One progress bar over variants x chunks.
    n_ctx = n_batch = chunk_size, ``n_threads`` llama.cpp threads per file.
    """

    if not files:
        raise NexlabError("no GGUF files given")
    files = {str(k): Path(v) for k, v in files.items()}
    reference = next(iter(files)) if reference is None else reference
    if reference not in files:
        raise NexlabError(f"reference {reference!r} is not one of the files: {', '.join(files)}")
    for p in files.values():
        check_gguf_path(p)
    chunks = chunk_tokens(tokens, chunk_size, n_chunks)
    pos, targets = _targets(chunks, score_from)
    order = [reference] + [k for k in files if k != reference]
    models: dict[str, object] = {}
    per: dict[str, dict[str, list]] = {name: {"kl": [], "nll": [], "top1_same": [], "dp": []} for name in order}
    pbar = None
    try:
        for name in order:
            models[name] = open_model(files[name], chunk_size, n_threads=n_threads, n_batch=chunk_size)
            n_vocab = _check_vocab(models[name], chunks, files[name])
            if name == reference:
                ref_vocab = n_vocab
            elif n_vocab != ref_vocab:
                raise NexlabError(f"vocabulary sizes differ: reference {files[reference]} has {ref_vocab} tokens, "
                                 f"{files[name]} has {n_vocab}")
        blocks = _row_blocks(pos.stop - pos.start, ref_vocab)
        pbar = progress(total=len(order) * len(chunks), desc="llama.cpp eval", show_progress=show_progress)
        for i, chunk in enumerate(chunks):
            tgt = targets[i]
            ref_lp = None
            for name in order:
                if pbar is not None:
                    pbar.set_description(f"llama.cpp eval chunk {i + 1}/{len(chunks)} {name}")
                logits = _eval_chunk(models[name], chunk)[pos]  # a view, consumed before this model runs again
                if ref_lp is None:  # the reference's log-probabilities of this chunk, once
                    ref_lp = np.empty(logits.shape, dtype=np.float64)
                    for b in blocks:
                        ref_lp[b] = log_softmax(logits[b])
                parts = [_compare_rows(ref_lp[b], logits[b], tgt[b]) for b in blocks]
                for key, arrays in zip(("kl", "nll", "top1_same", "dp"), zip(*parts)):
                    per[name][key].append(np.concatenate(arrays))
                if pbar is not None:
                    pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()
        for llm in models.values():
            llm.close()
    out: dict[str, VariantQuality] = {}
    ref_ppl = None
    for name in order:
        cmp = {k: np.stack(v) for k, v in per.pop(name).items()}
        out[name] = _summarise(name, files[name], cmp, ref_ppl)
        if ref_ppl is None:
            ref_ppl = out[name].ppl
    return QualityReport(reference, chunk_size, len(chunks), score_from, out)


def _layer_kind(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return -1, parts[0]


def importance_stats(imatrix, top_share: float = 0.01) -> list[dict]:
    """How concentrated each tensor's importance is: one row per imatrix entry.

    Importance of input column j = mean squared activation ``in_sum2[j] / count`` (what llama-quantize
    uses as weights, :func:`nexlab.ggufio.imatrix_file.column_weights`). Per matrix (per expert for stacked tensors;
    experts never routed to are left out): ``top_share`` = share of the total importance held by the top
    ``top_share`` fraction of channels (at least one channel); ``max_over_mean``; ``cv`` = std/mean.
    Reported as the mean over experts; ``energy`` = mean importance (the input's mean square).
    """
    rows = []
    for name, e in imatrix.entries.items():
        s = np.asarray(e.in_sum2, dtype=np.float64)
        c = np.asarray(e.counts, dtype=np.float64)
        live = c > 0
        if not live.any():
            continue
        w = s[live] / c[live, None]  # [n_live, ne0]
        ne0 = w.shape[1]
        k = max(1, int(round(top_share * ne0)))
        total = w.sum(1)
        top = -np.sort(-w, axis=1)[:, :k].sum(1)
        mean = w.mean(1)
        layer, kind = _layer_kind(name)
        rows.append({"name": name, "layer": layer, "kind": kind, "ne0": ne0, "n_matrices": int(s.shape[0]),
                     "n_live": int(live.sum()), "energy": float(mean.mean()),
                     "top_share": float(np.mean(np.where(total > 0, top / np.where(total > 0, total, 1), 0))),
                     "max_over_mean": float(np.mean(w.max(1) / np.where(mean > 0, mean, 1))),
                     "cv": float(np.mean(w.std(1) / np.where(mean > 0, mean, 1)))})
    return rows


def bytes_by_type(plans) -> dict[str, dict]:
    """``{ggml type: {tensors, elements, bytes}}`` of a type plan (``nexlab.model.mixes.plan_types`` output),
    bytes from gguf-py's block sizes (``ggml_nbytes``), plus an ``"all"`` row with bits per weight."""

    out: dict[str, dict] = {}
    for p in plans:
        n = int(np.prod(p.shape, dtype=np.int64))
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[p.ggml_type]]
        row = out.setdefault(p.ggml_type, {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += n
        row["bytes"] += n // block * size
    tot = {k: sum(r[k] for r in out.values()) for k in ("tensors", "elements", "bytes")}
    for r in list(out.values()) + [tot]:
        r["bits_per_weight"] = 8 * r["bytes"] / max(r["elements"], 1)
    out["all"] = tot
    return out
