"""Collecting importance matrices, as llama-imatrix does, and checking them against llama-imatrix.

An importance matrix holds, per weight tensor and expert, the sum over calibration tokens of each
input column's x^2 and the token count; the file format (llama.cpp's GGUF imatrix), its reader and
writer and the column weights llama-quantize derives from it are :mod:`nexlab.ggufio.imatrix_file`.

Collection, two ways (``nexlab imatrix MODEL`` picks one from MODEL):

* :func:`collect_imatrix_gguf` - a GGUF file, through llama.cpp with an evaluation callback, as
  llama-imatrix does (same chunks, same nodes, same names; tests/test_imatrix_gguf.py runs the real
  llama-imatrix beside it). The weights stay memory-mapped: this is the path for the real model.
* :func:`nexlab.analysis.imatrix_torch.collect_imatrix` - a checkpoint directory, through
  transformers' reference model (a float32 copy of the whole model: the tiny teaching model only).

:func:`run_llama_imatrix` runs llama.cpp's own ``llama-imatrix`` as the reference;
:func:`compare_imatrix`, :func:`relative_drift` and :func:`unrouted_experts` compare and inspect the
results. ``nexlab imatrix-show FILE`` prints a file's entries.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nexlab.analysis.imatrix_torch import collect_imatrix
from nexlab.analysis.reference import build_hf_model
from nexlab.core.errors import NexlabError, ToolError
from nexlab.core.progress import progress
from nexlab.ggufio.imatrix_file import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from nexlab.llamacpp.build import tool_path
from nexlab.llamacpp.libggml import (
    GGML_OP_MUL_MAT,
    GGML_OP_MUL_MAT_ID,
    GGML_TYPE_F32,
    GGML_TYPE_I32,
    GgmlTensor,
    ggml_collector_lib,
)
from nexlab.llamacpp.runtime import capture_llama_log, check_gguf_path, open_model
from nexlab.model.tokenizer import encode_text

_MIN_DENSE_ROWS = 16  # llama-imatrix asks for no dense matmul over fewer than 16 activation rows


def _weight_name(raw: bytes) -> str:
    """llama-imatrix's ``filter_tensor_name``: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


class _EvalCollector:
    """The evaluation callback: ``IMatrixCollector::collect_imatrix`` of llama-imatrix, vectorised.

    Sums of squares are accumulated in float64 (llama-imatrix: float32); counts are integers. An
    exception inside the callback cannot cross into C: it is kept, the callback answers False (the
    scheduler stops the split) and the driver raises it after ``llama_decode`` returns.
    """

    def __init__(self, process_output: bool):
        import llama_cpp  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)

        self.L = ggml_collector_lib()
        self.process_output = bool(process_output)
        self.sums: dict[str, np.ndarray] = {}  # float64 [rows, ne0]: rows = experts, or matrices of a 3-D weight
        self.counts: dict[str, np.ndarray] = {}  # int64 [n_counts]: experts, or 1 for a dense weight
        self.error: BaseException | None = None
        self.c_callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def _callback(self, t, ask, user_data) -> bool:  # noqa: ARG002
        if self.error is not None:
            return False
        try:
            node = GgmlTensor.from_address(t)
            if ask:
                return self._wanted(node)
            self._collect(node)
            return True
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised by the driver
            self.error = exc
            return False

    def _wanted(self, node: GgmlTensor) -> bool:
        if node.op == GGML_OP_MUL_MAT_ID:
            return True  # every indirect matmul: the routed experts
        if node.op != GGML_OP_MUL_MAT:
            return False
        src1 = GgmlTensor.from_address(node.src[1])
        if src1.ne[1] < _MIN_DENSE_ROWS or src1.type != GGML_TYPE_F32:
            return False
        name = _weight_name(GgmlTensor.from_address(node.src[0]).name)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _array(self, ptr: int, t: GgmlTensor, dtype, what: str) -> np.ndarray:
        """The tensor's data as a numpy view ``[ne3, ne2, ne1, ne0]`` honouring its byte strides ``nb``
        (copied first when it lives outside host memory)."""
        dtype = np.dtype(dtype)
        if t.nb[0] != dtype.itemsize:
            raise NexlabError(f"{what}: element stride {t.nb[0]} bytes is not one {dtype} element")
        if not t.data:
            raise NexlabError(f"{what}: tensor has no data")
        nbytes = self.L.ggml_nbytes(ptr)
        if not t.buffer or self.L.ggml_backend_buffer_is_host(t.buffer):  # no buffer: a plain ggml_context's memory
            raw = (ctypes.c_char * nbytes).from_address(t.data)
        else:
            raw = ctypes.create_string_buffer(nbytes)
            self.L.ggml_backend_tensor_get(ptr, raw, 0, nbytes)
        return np.ndarray(tuple(t.ne)[::-1], dtype, buffer=raw, strides=tuple(t.nb)[::-1])

    def _entry(self, name: str, rows: int, ne0: int, n_counts: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((rows, ne0), np.float64)
            self.counts[name] = np.zeros(n_counts, np.int64)
        s, c = self.sums[name], self.counts[name]
        if s.size != rows * ne0 or c.size != n_counts:
            raise NexlabError(f"inconsistent sizes for {name}: {rows} x {ne0} values and {n_counts} counts now, "
                             f"{s.size} values and {c.size} counts before")
        return s, c

    def _collect(self, node: GgmlTensor) -> None:
        src0 = GgmlTensor.from_address(node.src[0])
        src1 = GgmlTensor.from_address(node.src[1])
        name = _weight_name(src0.name)
        if src1.type != GGML_TYPE_F32:
            raise NexlabError(f"{name}: activations of type {src1.type}, llama-imatrix reads F32 only")
        x = self._array(node.src[1], src1, np.float32, f"{name} activations")  # [ne3, ne2, ne1, ne0]
        ne0 = int(src1.ne[0])
        if node.op == GGML_OP_MUL_MAT_ID:
            # src1 [ne0, ne11 (1 = shared by all slots, or n_expert_used), n_tokens]; ids [n_used, n_tokens]
            ids_t = GgmlTensor.from_address(node.src[2])
            n_as, n_tok, ne11 = int(src0.ne[2]), int(src1.ne[2]), int(src1.ne[1])
            if ids_t.type != GGML_TYPE_I32 or ids_t.ne[1] != n_tok:
                raise NexlabError(f"{name}: expert ids of type {ids_t.type} and shape {list(ids_t.ne)} do not match "
                                 f"{n_tok} tokens")
            if src1.ne[3] != 1:
                raise NexlabError(f"{name}: activations have more than 3 dimensions ({list(src1.ne)})")
            ids = self._array(node.src[2], ids_t, np.int32, f"{name} expert ids")[0, 0]  # [n_tokens, n_used]
            n_used = ids.shape[1]
            ex = ids.reshape(-1).astype(np.int64)
            if ex.size and (ex.min() < 0 or ex.max() >= n_as):
                raise NexlabError(f"{name}: expert id out of range [0, {n_as})")
            sums, counts = self._entry(name, n_as, ne0, n_as)
            # one squared activation row per (token, slot); slot i uses src1 row i % ne11
            sq = np.square(x[0].astype(np.float64)).reshape(n_tok * ne11, ne0)
            rows = (np.arange(n_tok)[:, None] * ne11 + np.arange(n_used)[None, :] % ne11).reshape(-1)
            order = np.argsort(ex, kind="stable")
            experts, starts = np.unique(ex[order], return_index=True)
            if experts.size:
                part = np.add.reduceat(sq[rows[order]], starts, axis=0)
                if not np.isfinite(part).all():
                    raise NexlabError(f"non-finite activations detected in {name}")
                sums[experts] += part
            counts += np.bincount(ex, minlength=n_as)
        else:
            n_mat = int(src0.ne[2] * src0.ne[3])  # a 3-D/4-D weight: one row of sums per matrix, one count
            sums, counts = self._entry(name, n_mat, ne0, 1)
            part = np.square(x.astype(np.float64)).sum(axis=2)  # [ne3, ne2, ne0]
            i3, i2 = np.meshgrid(np.arange(src1.ne[3]), np.arange(src1.ne[2]), indexing="ij")
            mat = (i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])
            np.add.at(sums, mat.reshape(-1), part.reshape(-1, ne0))
            if not np.isfinite(sums).all():
                raise NexlabError(f"non-finite activations detected in {name}")
            counts += int(src1.ne[1] * src1.ne[2] * src1.ne[3]) // n_mat

    def imatrix(self, dataset: str, chunk_size: int) -> Imatrix:
        """The collected statistics as an :class:`Imatrix`; ``chunk_count`` as llama-imatrix counts it
        (the largest count of any entry, in whole chunks)."""
        entries = {}
        chunk_count = 0
        for name in sorted(self.sums):
            c = self.counts[name]
            entries[name] = ImatrixEntry(self.sums[name].reshape(c.size, -1).astype(np.float32), c.astype(np.float32))
            chunk_count = max(chunk_count, int(c.max(initial=0)) // chunk_size)
        return Imatrix(entries, [dataset] if dataset else [], chunk_count, chunk_size)


def _positive(name: str, value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise NexlabError(f"{name} ({flag}) must be a positive integer, got {value!r}")
    return int(value)


def collect_imatrix_gguf(model_path: str | os.PathLike, text: str | bytes | Sequence[int], *, n_ctx: int = 512,
                         n_chunks: int | None = None, n_threads: int | None = None, n_batch: int = 2048,
                         n_ubatch: int = 512, process_output: bool = False, dataset: str = "",
                         show_progress: bool = True) -> Imatrix:
    """Collect an importance matrix from a GGUF model through llama.cpp, as ``llama-imatrix`` does.

    Matches llama-imatrix of the tree llama-cpp-python 0.3.36 vendors (tools/imatrix/imatrix.cpp,
    ``compute_imatrix`` and ``IMatrixCollector::collect_imatrix``), which the tests run as the
    reference on the same file and text:

    * the model is opened with :func:`nexlab.llamacpp.runtime.open_model` (CPU, memory-mapped: a model larger
      than RAM works) and a second context is created on it with an evaluation callback;
    * ``text`` (str or bytes) is tokenized by llama.cpp's tokenizer with special tokens added and not
      parsed (``common_tokenize(ctx, text, true, false)``); a sequence of ints is taken as token ids.
      At least ``2 * n_ctx`` tokens are required (llama-imatrix's rule);
    * the tokens are cut into ``n_ctx``-token chunks (at most ``n_chunks``; a partial last chunk is
      dropped); each chunk is its own sequence from position 0 with a cleared memory, its first token
      replaced by BOS when the vocabulary adds BOS; ``max(1, n_batch // n_ctx)`` chunks are decoded
      together as parallel sequences (``n_batch`` tokens per decode, ``n_ubatch`` per graph), every
      token with an output;
    * the callback collects every ``MUL_MAT_ID`` node (routed experts: per expert, the sum over the
      (token, slot) pairs routed to it of the squared input row, and the number of such pairs) and
      every ``MUL_MAT`` node whose weight is a ``blk.*`` tensor (``output.weight`` too with
      ``process_output``), whose activations are F32 and have at least 16 rows (smaller graphs are
      skipped by llama-imatrix); entries are named after the weight (``filter_tensor_name``);
    * an expert never routed to keeps ``in_sum2 = 0`` and ``count = 0``: llama-imatrix stores it so
      (and warns of "partial data"), and llama-quantize gives it column weights 1, i.e. quantizes it
      without importance (:func:`nexlab.ggufio.imatrix_file.column_weights`; :func:`unrouted_experts` lists them);
    * ``chunk_size = n_ctx`` and ``chunk_count`` = the largest count of any entry // n_ctx.

    Sums are accumulated in float64 (llama-imatrix: float32) and stored as float32, so values agree
    with llama-imatrix's to float32 rounding, counts exactly. Activations are read through the
    ggml_tensor's byte strides. Raises ValueError / FileNotFoundError for a missing or unreadable GGUF,
    bad sizes or too little text.
    """
    import llama_cpp as ll  # noqa: PLC0415  (heavy: llama-cpp-python's bindings)

    n_ctx = _positive("n_ctx", n_ctx, "--ctx")
    if n_chunks is not None:
        n_chunks = _positive("n_chunks", n_chunks, "--chunks")
    n_threads = _positive("n_threads", n_threads if n_threads is not None else (os.cpu_count() or 1), "--threads")
    n_batch = _positive("n_batch", n_batch, "--batch-size")
    n_ubatch = _positive("n_ubatch", n_ubatch, "--ubatch-size")
    path = check_gguf_path(model_path)
    n_batch_arg = n_batch
    n_seq = max(1, n_batch // n_ctx)  # llama-imatrix's main(): parallel sequences per decode
    n_batch = min(n_batch, n_seq * n_ctx)
    if n_seq > ll.llama_max_parallel_sequences():
        raise NexlabError(f"--ctx {n_ctx} with --batch-size {n_batch_arg} means {n_seq} parallel chunks; llama.cpp "
                          f"allows {ll.llama_max_parallel_sequences()}: raise --ctx or lower --batch-size")

    collector = _EvalCollector(process_output)
    llm = open_model(path, n_ctx=64, n_threads=n_threads, n_batch=64)
    ctx = None
    try:
        vocab = ll.llama_model_get_vocab(llm.model)
        if ll.llama_vocab_get_add_eos(vocab):
            raise NexlabError(f"{path}: the vocabulary appends EOS to every text; llama-imatrix refuses such a model")
        tokens = _calibration_tokens(llm, vocab, text, n_ctx)
        total = tokens.size // n_ctx if n_chunks is None else min(tokens.size // n_ctx, n_chunks)
        ctx = _collector_context(llm, path, collector, n_seq * n_ctx, n_seq, n_batch, n_ubatch, n_threads)
        bos = int(ll.llama_vocab_bos(vocab)) if ll.llama_vocab_get_add_bos(vocab) else None
        _decode_chunks(ctx, tokens, total, n_seq, n_ctx, n_batch, bos, collector, show_progress)
    finally:
        if ctx:
            ll.llama_free(ctx)
        llm.close()
    if not collector.sums:
        raise NexlabError(f"{path}: llama.cpp ran no matrix multiplication llama-imatrix would collect")
    return collector.imatrix(dataset, n_ctx)


def _calibration_tokens(llm, vocab, text: str | bytes | Sequence[int], n_ctx: int) -> np.ndarray:
    """``text`` tokenized by llama.cpp (BOS added, specials not parsed: ``common_tokenize(ctx, text, true,
    false)``), or token ids checked against the vocabulary; at least ``2 * n_ctx`` of them."""
    import llama_cpp as ll  # noqa: PLC0415  (heavy: llama-cpp-python's bindings)

    if isinstance(text, (str, bytes)):
        data = text.encode("utf-8") if isinstance(text, str) else text
        tokens = np.asarray(llm.tokenize(data, add_bos=True, special=False), np.int32)
    else:
        tokens = np.asarray(list(text), np.int64)
        n_vocab = ll.llama_vocab_n_tokens(vocab)
        if tokens.ndim != 1 or (tokens.size and (tokens.min() < 0 or tokens.max() >= n_vocab)):
            raise NexlabError(f"token ids must be a flat sequence in [0, {n_vocab})")
        tokens = tokens.astype(np.int32)
    if tokens.size < 2 * n_ctx:
        raise NexlabError(f"the calibration text tokenizes to {tokens.size} tokens; llama-imatrix needs at least "
                          f"2 * ctx = {2 * n_ctx} for --ctx {n_ctx}")
    return tokens


def _collector_context(llm, path: Path, collector: _EvalCollector, n_kv: int, n_seq: int, n_batch: int,
                       n_ubatch: int, n_threads: int):
    """A second llama.cpp context on the open model with the collector as its evaluation callback, set up
    as ``common_context_params_to_llama`` sets llama-imatrix's."""
    import llama_cpp as ll  # noqa: PLC0415  (heavy: llama-cpp-python's bindings)

    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.n_batch, cp.n_ubatch = n_kv, n_seq, n_batch, n_ubatch
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.swa_full = False
    cp.no_perf = False
    cp.cb_eval = collector.c_callback
    cp.cb_eval_user_data = None
    with capture_llama_log(200) as log:
        ctx = ll.llama_init_from_model(llm.model, cp)
    if not ctx:
        raise NexlabError(f"llama.cpp could not create a context for {path} (n_ctx {n_kv}, {n_seq} sequences): "
                          + " ".join("".join(log).split())[-500:])
    return ctx


class _Batch:
    """A ``llama_batch`` whose token, position and sequence arrays are numpy buffers (every token an
    output, as llama-imatrix: ``output.weight`` sees them all)."""

    def __init__(self, n_batch: int):
        import llama_cpp as ll  # noqa: PLC0415  (heavy: llama-cpp-python's bindings)

        self.tok = np.zeros(n_batch, np.int32)
        self.pos = np.zeros(n_batch, np.int32)
        self.n_seq_id = np.ones(n_batch, np.int32)
        self.seq = np.zeros(n_batch, np.int32)
        self.seq_ptr = (self.seq.ctypes.data + self.seq.itemsize * np.arange(n_batch)).astype(np.uintp)
        self.logits = np.ones(n_batch, np.int8)
        self.batch = ll.llama_batch(
            n_tokens=0, token=self.tok.ctypes.data_as(ctypes.POINTER(ll.llama_token)), embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self.seq_ptr.ctypes.data, ctypes.POINTER(ctypes.POINTER(ll.llama_seq_id))),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))

    def fill(self, seg: np.ndarray, first_pos: int) -> None:
        """``seg`` [n_seq, size]: sequence k's tokens at positions ``first_pos ..``."""
        n_seq, size = seg.shape
        n = n_seq * size
        self.tok[:n] = seg.reshape(-1)
        self.pos[:n] = np.tile(first_pos + np.arange(size, dtype=np.int32), n_seq)
        self.seq[:n] = np.repeat(np.arange(n_seq, dtype=np.int32), size)
        self.batch.n_tokens = n


def _decode_chunks(ctx, tokens: np.ndarray, total: int, n_seq: int, n_ctx: int, n_batch: int, bos: int | None,
                   collector: _EvalCollector, show_progress: bool) -> None:
    """llama-imatrix's ``compute_imatrix`` loop: ``n_seq`` chunks at a time as parallel sequences from
    position 0 with a cleared memory, the first token of each replaced by ``bos`` (when the vocabulary
    adds one), ``n_batch`` tokens per ``llama_decode``."""
    import llama_cpp as ll  # noqa: PLC0415  (heavy: llama-cpp-python's bindings)

    b = _Batch(n_batch)
    num_batches = -(-n_ctx // n_batch)
    pbar = progress(total=total, desc="imatrix chunks", show_progress=show_progress)
    try:
        for i in range(0, total, n_seq):
            n_seq_batch = min(n_seq, total - i)
            start, end = i * n_ctx, (i + 1) * n_ctx
            ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
            for j in range(num_batches):
                batch_start = start + j * n_batch
                size = min(end - batch_start, n_batch)
                seg = tokens[batch_start + np.arange(n_seq_batch)[:, None] * n_ctx + np.arange(size)[None, :]]
                if bos is not None and j == 0:
                    seg[:, 0] = bos
                b.fill(seg, j * n_batch)
                with capture_llama_log(200) as log:
                    rc = ll.llama_decode(ctx, b.batch)
                if collector.error is not None:
                    raise collector.error
                if rc != 0:
                    raise ToolError(f"llama_decode failed ({rc}) on chunks {i + 1}..{i + n_seq_batch}: "
                                    + " ".join("".join(log).split())[-500:])
            pbar.update(n_seq_batch)
    finally:
        pbar.close()


def read_calibration_text(path: str | os.PathLike) -> bytes:
    """The calibration text as llama-imatrix's ``-f FILE`` reads it: the file's bytes, one trailing
    newline dropped (common/arg.cpp). A missing or empty file is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration text file {p} does not exist")
    data = p.read_bytes()
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data.strip():
        raise NexlabError(f"calibration text file {p} is empty")
    return data


def run_llama_imatrix(model_path: str | os.PathLike, text_file: str | os.PathLike, out_path: str | os.PathLike, *,
                      n_ctx: int = 512, n_chunks: int | None = None, n_threads: int = 2,
                      extra_args: Sequence[str] = (), timeout: float | None = None) -> Imatrix:
    """Run llama.cpp's own ``llama-imatrix`` (the reference of :func:`collect_imatrix_gguf`) and read
    what it wrote: ``-m MODEL -f TEXT -c n_ctx [--chunks N] -t n_threads --no-ppl -o OUT``. Raises
    RuntimeError with the tool's last output when it fails; FileNotFoundError when it is not built."""


    cmd = [str(tool_path("llama-imatrix")), "-m", str(model_path), "-f", str(text_file), "-c", str(int(n_ctx)),
           "-t", str(int(n_threads)), "--no-ppl", "-o", str(out_path)]
    if n_chunks is not None:
        cmd += ["--chunks", str(int(n_chunks))]
    r = subprocess.run(cmd + [str(a) for a in extra_args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise ToolError(f"llama-imatrix failed ({r.returncode}) on {model_path}:\n{r.stderr[-3000:]}")
    return read_imatrix(out_path)


def compare_imatrix(a: Imatrix, b: Imatrix) -> dict:
    """How far ``a`` is from ``b``: same entry names, counts exactly equal, the largest relative difference
    of ``in_sum2`` over all entries (``|a - b| / |b|``, zeros where both are zero)."""
    worst, counts_equal = 0.0, True
    same = sorted(a.entries) == sorted(b.entries)
    for name in sorted(set(a.entries) & set(b.entries)):
        x, y = a.entries[name], b.entries[name]
        if x.in_sum2.shape != y.in_sum2.shape:
            same = False
            continue
        counts_equal &= bool(np.array_equal(x.counts, y.counts))
        xd, yd = x.in_sum2.astype(np.float64), y.in_sum2.astype(np.float64)
        d = np.abs(xd - yd)
        rel = np.divide(d, np.abs(yd), out=np.where(d > 0, np.inf, 0.0), where=yd != 0)
        worst = max(worst, float(rel.max(initial=0.0)))
    return {"same_entries": same, "counts_equal": counts_equal, "max_rel_diff": worst, "entries": len(a.entries)}


def relative_drift(a: Imatrix, b: Imatrix) -> dict[str, float]:
    """Per dense entry (one matrix) present in both: ``||a - b|| / ||b||`` of the per-column mean squares
    (``in_sum2 / count``), e.g. llama.cpp's collection against transformers' float32 one."""
    out = {}
    for name in sorted(set(a.entries) & set(b.entries)):
        x, y = a.entries[name], b.entries[name]
        if x.n_mat != 1 or y.n_mat != 1:
            continue
        mx, my = x.in_sum2 / x.counts[:, None], y.in_sum2 / y.counts[:, None]
        out[name] = float(np.linalg.norm(mx - my) / np.linalg.norm(my))
    return out


def unrouted_experts(imatrix: Imatrix) -> dict[int, list[int]]:
    """``{layer: expert indices}`` of the experts that saw no token (count 0) in some per-expert entry.

    llama-imatrix stores such experts with ``in_sum2 = 0`` and ``count = 0`` (and warns "partial
    data"); llama-quantize then gives them column weights 1, i.e. quantizes them without importance.
    """
    out: dict[int, set[int]] = {}
    for name, e in imatrix.entries.items():
        if e.n_mat > 1 and name.startswith("blk.") and (e.counts == 0).any():
            layer = int(name.split(".")[1])
            out.setdefault(layer, set()).update(np.flatnonzero(e.counts == 0).tolist())
    return {k: sorted(v) for k, v in sorted(out.items())}


def summary_line(path, imatrix: Imatrix) -> str:
    """The one line the CLI prints after writing ``imatrix`` to ``path``, unrouted experts included."""
    line = f"wrote {path}: {len(imatrix.entries)} entries, {imatrix.chunk_count} chunks of {imatrix.chunk_size} tokens"
    unrouted = unrouted_experts(imatrix)
    if unrouted:
        parts = [f"{len(v)} expert{'s' if len(v) > 1 else ''} of layer {k} never routed ({', '.join(map(str, v))})"
                 for k, v in unrouted.items()]
        line += "; " + ", ".join(parts) + " (stored with count 0: llama-quantize weights them uniformly)"
    return line


def _cmd_imatrix(args) -> int:
    model = Path(args.model)
    if model.is_dir():
        return _cmd_imatrix_checkpoint(args)
    if args.tokenizer is not None:
        raise NexlabError("--tokenizer applies to a checkpoint directory; a GGUF file carries its own tokenizer")
    text = read_calibration_text(args.text)
    im = collect_imatrix_gguf(model, text, n_ctx=args.ctx, n_chunks=args.chunks, n_threads=args.threads,
                              n_batch=args.batch_size, n_ubatch=args.ubatch_size, dataset=str(args.text),
                              process_output=args.process_output)
    out = write_imatrix(args.output, im)
    print(summary_line(out, im))
    return 0


def _cmd_imatrix_checkpoint(args) -> int:

    model_dir = Path(args.model)

    tok_dir = Path(args.tokenizer) if args.tokenizer else model_dir
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.exists():
        raise NexlabError(f"{tok_file} not found (use --tokenizer DIR)")
    if args.ctx < 1:
        raise NexlabError(f"--ctx must be a positive number of tokens, got {args.ctx}")
    if args.chunks is not None and args.chunks < 1:
        raise NexlabError(f"--chunks must be at least 1, got {args.chunks}")
    text = Path(args.text).read_text(encoding="utf-8")
    ids = encode_text(text, tok_file).tolist()
    model = build_hf_model(model_dir)
    im = collect_imatrix(model, ids, chunk_size=args.ctx, n_chunks=args.chunks, dataset=str(args.text),
                         process_output=args.process_output)
    out = write_imatrix(args.output, im)
    print(summary_line(out, im))
    return 0


def _cmd_imatrix_show(args) -> int:
    im = read_imatrix(args.imatrix)
    print(f"datasets={im.datasets} chunk_count={im.chunk_count} chunk_size={im.chunk_size} entries={len(im.entries)}")
    for name, e in im.entries.items():
        print(f"{name:48s} ne0={e.ne0:6d} n_mat={e.n_mat:4d} tokens={int(e.counts.max()):8d}")
    return 0


def register_cli(subparsers) -> None:
    """``nexlab imatrix MODEL --text FILE [--ctx N] [--chunks N] -o OUT`` and ``nexlab imatrix-show FILE``.

    MODEL is a GGUF file (collected through llama.cpp, as llama-imatrix does: works for a model of any
    size, the weights stay memory-mapped) or a checkpoint directory (the transformers reference path,
    meant for the tiny teaching model: it builds a float32 copy of the whole model).
    """
    p = subparsers.add_parser("imatrix", help="collect an importance matrix (llama.cpp GGUF imatrix format)")
    p.add_argument("model", help="a .gguf model (collected through llama.cpp) or a checkpoint directory "
                                 "(ModelOpt NVFP4 or BF16, through transformers; small models only)")
    p.add_argument("--text", required=True, help="calibration text file (llama-imatrix -f)")
    p.add_argument("-c", "--ctx", "--chunk-size", dest="ctx", type=int, default=512,
                   help="tokens per chunk (llama-imatrix -c; default 512)")
    p.add_argument("--chunks", type=int, default=None, help="maximum number of chunks (default: all)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for a GGUF model (default: all cores)")
    p.add_argument("-b", "--batch-size", type=int, default=2048,
                   help="logical batch for a GGUF model (llama-imatrix -b; default 2048: 2048/ctx chunks per batch)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512,
                   help="physical batch for a GGUF model (llama-imatrix -ub; default 512)")
    p.add_argument("--tokenizer", default=None, help="checkpoint directory only: folder with tokenizer.json "
                                                     "(default: MODEL)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight (as llama-imatrix)")
    p.add_argument("-o", "--output", required=True, help="output imatrix .gguf")
    p.set_defaults(func=_cmd_imatrix)
    s = subparsers.add_parser("imatrix-show", help="print the entries of a GGUF imatrix file")
    s.add_argument("imatrix", help="GGUF imatrix file")
    s.set_defaults(func=_cmd_imatrix_show)
