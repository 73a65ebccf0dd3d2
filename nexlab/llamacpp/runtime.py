"""llama.cpp in this process, through llama-cpp-python: the model wrapper, log capture, allocation probe.

- :func:`open_model`: the one llama.cpp model wrapper of nexlab (``Llama`` on CPU, per-position
  logits, seed 0, quiet); the reference proofs, the quality chapter and the imatrix collector open
  GGUF files through it, after :func:`check_gguf_path` (:func:`nexlab.ggufio.check.check_gguf`: a
  damaged file is one error line, not a crash).
- :func:`capture_llama_log`: collect llama.cpp's log lines instead of printing them.
- :class:`LlamaCppProbe`: load a GGUF and read what a context allocates from llama.cpp's own log
  (padded ``n_ctx`` / ``n_ctx_seq``, the ``llama_kv_cache`` and ``llama_memory_recurrent`` lines) and
  ``llama_model_size()``; the memory chapter and tests compare :mod:`nexlab.analysis.memory` with it.
  :func:`llama_mib` formats bytes as those lines do.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from nexlab.core.errors import NexlabError, ToolError
from nexlab.ggufio.check import check_gguf


# ----------------------------------------------------------------------------- llama.cpp through llama-cpp-python
def check_gguf_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path after :func:`nexlab.ggufio.check.check_gguf` (a whole, consistent GGUF file;
    otherwise one error line naming the file and the fault), before llama.cpp opens it."""

    return check_gguf(path).path


def open_model(path: str | os.PathLike, n_ctx: int = 256, *, n_threads: int = 2, n_batch: int | None = None):
    """llama-cpp-python ``Llama`` on CPU with per-position logits (``logits_all``), seed 0, quiet.

    The one llama.cpp model wrapper of nexlab: the reference proofs, the quality chapter and the
    tests all open GGUF files through it. ``n_batch`` (default 512, llama-cpp-python's) also sets
    ``n_ubatch``; pass ``n_batch=n_ctx`` to evaluate a whole window as one batch.
    """
    from llama_cpp import Llama  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)

    p = check_gguf_path(path)
    kw = {} if n_batch is None else {"n_batch": int(n_batch), "n_ubatch": int(n_batch)}
    try:
        return Llama(model_path=str(p), n_ctx=int(n_ctx), n_threads=n_threads, n_threads_batch=n_threads,
                     logits_all=True, n_gpu_layers=0, seed=0, verbose=False, **kw)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        raise NexlabError(f"llama.cpp could not load {p}: {exc}") from None


def _ggml_type_id(name: str) -> int:

    try:
        return int(gguf.GGMLQuantizationType[str(name).upper()])
    except KeyError:
        raise NexlabError(f"unknown cache type {name!r}") from None


_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                       r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")


_RS_LINE = re.compile(r"llama_memory_recurrent: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers,"
                       r" +(\d+) seqs +(\d+) rs_seq\), "
                       r"R \((\w+)\): +([\d.]+) MiB, S \((\w+)\): +([\d.]+) MiB")


_CTX_LINE = re.compile(r"llama_context: n_ctx += (\d+)")


_CTX_SEQ_LINE = re.compile(r"llama_context: n_ctx_seq += (\d+)")


_OVERFLOW_LINE = re.compile(r"n_ctx_seq \(\d+\) > n_ctx_train \(\d+\) -- possible training context overflow")


def llama_mib(nbytes: int) -> str:
    """A byte count as llama.cpp prints it in its cache lines: ``(float)bytes / (1024.0f*1024.0f)``, ``%.2f``."""
    return "%.2f" % float(np.float32(nbytes) / np.float32(1024.0 * 1024.0))


@contextlib.contextmanager
def capture_llama_log(keep: int | None = None):
    """Collect llama.cpp's log lines (the last ``keep``, or all) instead of printing them; yields the
    list (a deque when ``keep``). llama-cpp-python's own log callback is put back afterwards."""

    import llama_cpp as ll  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)

    lines = collections.deque(maxlen=keep) if keep else []

    @ll.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        lines.append(text.decode("utf-8", "replace"))

    ll.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        try:
            from llama_cpp import _logger  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)

            ll.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except (ImportError, AttributeError):
            ll.llama_log_set(None, ctypes.c_void_p(0))


class LlamaCppProbe:
    """Load a GGUF in llama.cpp (CPU, mmap) and read what a context allocates, from llama.cpp's log.

    ``allocate()`` creates and frees one context and returns llama.cpp's own numbers: the padded
    ``n_ctx`` / ``n_ctx_seq``, the ``llama_kv_cache`` line (cells, layers, seqs/streams, K/V types
    and MiB) and the ``llama_memory_recurrent`` line (cells, layers, seqs, rs_seq, R/S MiB), plus
    the overflow warning if printed. ``model_size()`` is ``llama_model_size()`` (exact bytes).
    """

    def __init__(self, gguf_path: str | Path):
        import llama_cpp  # noqa: PLC0415  (llama-cpp-python loads libllama: only where llama.cpp runs)
        self._ll = llama_cpp
        self.path = str(gguf_path)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        with self._capture() as log:
            self.model = llama_cpp.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise ToolError(f"llama.cpp could not load {self.path}:\n{''.join(log)[-2000:]}")

    def _capture(self):
        return capture_llama_log()

    def model_size(self) -> int:
        return int(self._ll.llama_model_size(self.model))

    def allocate(self, n_ctx: int, type_k: str = "f16", type_v: str = "f16", n_seq: int = 1,
                 kv_unified: bool = False, flash_attn: bool = True, n_rs_seq: int = 0) -> dict:
        ll = self._ll
        if min(n_ctx, 64) < n_seq:
            # llama_context clamps n_batch to the *unpadded* n_ctx, then asserts n_seq <= n_batch: abort()
            raise NexlabError(f"llama.cpp aborts for n_ctx ({n_ctx}) < n_seq ({n_seq}); not probing")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = 64
        cp.n_ubatch = 64
        cp.n_seq_max = n_seq
        cp.n_rs_seq = n_rs_seq
        cp.n_threads = cp.n_threads_batch = 1
        cp.type_k = _ggml_type_id(type_k)
        cp.type_v = _ggml_type_id(type_v)
        cp.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        cp.kv_unified = kv_unified
        with self._capture() as log:
            ctx = ll.llama_init_from_model(self.model, cp)
            if ctx:
                ll.llama_free(ctx)
        text = "".join(log)
        if not ctx:
            raise ToolError(f"llama.cpp refused the context:\n{text[-2000:]}")
        out: dict[str, Any] = {"log": text, "overflow_warning": bool(_OVERFLOW_LINE.search(text))}
        if m := _CTX_LINE.search(text):
            out["n_ctx"] = int(m[1])
        if m := _CTX_SEQ_LINE.search(text):
            out["n_ctx_seq"] = int(m[1])
        if m := _KV_LINE.search(text):
            out["kv"] = {"mib": m[1], "cells": int(m[2]), "layers": int(m[3]), "n_seq": int(m[4]),
                         "n_stream": int(m[5]), "type_k": m[6], "k_mib": m[7], "type_v": m[8], "v_mib": m[9]}
        if m := _RS_LINE.search(text):
            out["rs"] = {"mib": m[1], "cells": int(m[2]), "layers": int(m[3]), "n_seq": int(m[4]),
                         "n_rs_seq": int(m[5]), "type_r": m[6], "r_mib": m[7], "type_s": m[8], "s_mib": m[9]}
        return out

    def close(self) -> None:
        if self.model:
            self._ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
