"""llama.cpp's own converter (convert_hf_to_gguf.py) as a reference, and the conversion benchmark.

The converter is the one in the llama-cpp-python 0.3.36 sdist, run by the wrapper script
``llamacpp-convert CKPT_DIR OUT.gguf`` (BF16 outtype, no MTP, self-made BPE tokenizers accepted),
found through ``$NEXLAB_REFERENCE_CONVERT`` or at ``../shared/tools/llamacpp-convert`` beside
the repository. Tests that compare against it skip, saying why, where it is absent.

``benchmark_conversion`` converts one checkpoint with nexlab and with the reference in one
run, each as a child process: wall time from ``time.perf_counter``, peak resident memory from
GNU ``/usr/bin/time -f %M`` (the wrapper ``exec``s python, so the measured process is the
converter itself). ``benchmarks/bench_convert.py`` is its command line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_converter() -> Path | None:
    """Path of the ``llamacpp-convert`` wrapper, or None when this machine has none."""
    env = os.environ.get("NEXLAB_REFERENCE_CONVERT")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "tools" / "llamacpp-convert")
    return next((p for p in candidates if p.is_file()), None)


def require_reference_converter() -> Path:
    tool = reference_converter()
    if tool is None:
        raise FileNotFoundError("llama.cpp's reference converter not found: set NEXLAB_REFERENCE_CONVERT to the "
                                "llamacpp-convert script (or place it at ../shared/tools/llamacpp-convert)")
    return tool


def reference_env(python: str = sys.executable) -> dict:
    """Environment for the wrapper: it runs the converter with ``$PYTHON`` (this interpreter)."""
    return dict(os.environ, PYTHON=python, PATH=f"{Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_reference_converter(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                            python: str = sys.executable, timeout: float = 1800) -> Path:
    """Convert ``ckpt_dir`` with llama.cpp's converter to ``out_path``; raise with its stderr on failure."""
    tool = require_reference_converter()
    r = subprocess.run([str(tool), str(ckpt_dir), str(out_path)], env=reference_env(python),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {ckpt_dir} ({r.returncode}):\n{r.stderr[-3000:]}")
    return Path(out_path)


def _run(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds and the child's peak RSS (MiB).

    Peak RSS comes from GNU ``/usr/bin/time -f %M`` (kB): ``time`` is a small process, so the RSS
    that Linux carries over fork+exec into the child's high-water mark is tiny, unlike a fork of
    this (possibly large, e.g. Jupyter with torch loaded) interpreter. Without ``/usr/bin/time``
    ``os.wait4`` is used (then the figure includes this process's RSS at fork time).
    """
    with tempfile.TemporaryDirectory() as td:
        rss_file, err_file = Path(td) / "rss", Path(td) / "err"
        full = ["/usr/bin/time", "-o", str(rss_file), "-f", "%M", *cmd] if Path("/usr/bin/time").exists() else cmd
        with open(err_file, "wb") as errf:
            t0 = time.perf_counter()
            proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=errf, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            err = err_file.read_text(errors="replace")
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed with {code}:\n{err[-3000:]}")
        if full is not cmd:
            kb = float(rss_file.read_text().split()[-1])
        else:
            kb = float(usage.ru_maxrss)
    return {"seconds": wall, "peak_rss_mib": kb / 1024.0}


def benchmark_conversion(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, repeats: int = 1,
                  python: str = sys.executable, keep: bool = False) -> dict:
    """Convert ``ckpt_dir`` with nexlab and with the reference converter; return times, RSS, ratios.

    Each tool runs ``repeats`` times (alternating); the best wall time and the largest peak RSS are
    reported. Output files are deleted unless ``keep``.
    """
    tool = require_reference_converter()
    ckpt_dir = Path(ckpt_dir)
    tmp = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NEXLAB_NO_PROGRESS="1", PYTHON=python, PYTHONPATH=str(REPO_ROOT))
    runs: dict[str, list[dict]] = {"nexlab": [], "llamacpp": []}
    outs = {"nexlab": tmp / "nexlab.gguf", "llamacpp": tmp / "llamacpp.gguf"}
    for _ in range(repeats):
        runs["nexlab"].append(_run([python, "-m", "nexlab.cli", "convert", str(ckpt_dir), "-o", str(outs["nexlab"]), "-q"], env))
        runs["llamacpp"].append(_run([str(tool), str(ckpt_dir), str(outs["llamacpp"])], env))
    res = {k: {"seconds": min(r["seconds"] for r in v), "peak_rss_mib": max(r["peak_rss_mib"] for r in v),
               "file_mib": outs[k].stat().st_size / 2**20} for k, v in runs.items()}
    res["ratio_time"] = res["nexlab"]["seconds"] / res["llamacpp"]["seconds"]
    res["ratio_rss"] = res["nexlab"]["peak_rss_mib"] / res["llamacpp"]["peak_rss_mib"]
    res["checkpoint"] = str(ckpt_dir)
    res["checkpoint_mib"] = sum(p.stat().st_size for p in ckpt_dir.glob("*.safetensors")) / 2**20
    res["repeats"] = repeats
    if not keep:
        for p in outs.values():
            p.unlink(missing_ok=True)
    return res


# ----------------------------------------------------------------------------- llama.cpp through llama-cpp-python
def check_gguf_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path after checking it is a file starting with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{p} is not a GGUF file (bad magic)")
    return p


def open_model(path: str | os.PathLike, n_ctx: int = 256, *, n_threads: int = 2, n_batch: int | None = None):
    """llama-cpp-python ``Llama`` on CPU with per-position logits (``logits_all``), seed 0, quiet.

    The one llama.cpp model wrapper of nexlab: the reference proofs, the quality chapter and the
    tests all open GGUF files through it. ``n_batch`` (default 512, llama-cpp-python's) also sets
    ``n_ubatch``; pass ``n_batch=n_ctx`` to evaluate a whole window as one batch.
    """
    from llama_cpp import Llama  # noqa: PLC0415

    p = check_gguf_path(path)
    kw = {} if n_batch is None else {"n_batch": int(n_batch), "n_ubatch": int(n_batch)}
    try:
        return Llama(model_path=str(p), n_ctx=int(n_ctx), n_threads=n_threads, n_threads_batch=n_threads,
                     logits_all=True, n_gpu_layers=0, seed=0, verbose=False, **kw)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        raise ValueError(f"llama.cpp could not load {p}: {exc}") from None


def _ggml_type_id(name: str) -> int:
    import gguf  # noqa: PLC0415

    try:
        return int(gguf.GGMLQuantizationType[str(name).upper()])
    except KeyError:
        raise ValueError(f"unknown cache type {name!r}") from None


# ----------------------------------------------------------------------------- what llama.cpp allocates

_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                       r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_RS_LINE = re.compile(r"llama_memory_recurrent: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+) seqs +(\d+) rs_seq\), "
                       r"R \((\w+)\): +([\d.]+) MiB, S \((\w+)\): +([\d.]+) MiB")
_CTX_LINE = re.compile(r"llama_context: n_ctx += (\d+)")
_CTX_SEQ_LINE = re.compile(r"llama_context: n_ctx_seq += (\d+)")
_OVERFLOW_LINE = re.compile(r"n_ctx_seq \(\d+\) > n_ctx_train \(\d+\) -- possible training context overflow")


def llama_mib(nbytes: int) -> str:
    """A byte count as llama.cpp prints it in its cache lines: ``(float)bytes / (1024.0f*1024.0f)``, ``%.2f``."""
    import numpy as np  # noqa: PLC0415
    return "%.2f" % float(np.float32(nbytes) / np.float32(1024.0 * 1024.0))


class LlamaCppProbe:
    """Load a GGUF in llama.cpp (CPU, mmap) and read what a context allocates, from llama.cpp's log.

    ``allocate()`` creates and frees one context and returns llama.cpp's own numbers: the padded
    ``n_ctx`` / ``n_ctx_seq``, the ``llama_kv_cache`` line (cells, layers, seqs/streams, K/V types
    and MiB) and the ``llama_memory_recurrent`` line (cells, layers, seqs, rs_seq, R/S MiB), plus
    the overflow warning if printed. ``model_size()`` is ``llama_model_size()`` (exact bytes).
    """

    def __init__(self, gguf_path: str | Path):
        import llama_cpp  # noqa: PLC0415
        self._ll = llama_cpp
        self.path = str(gguf_path)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        with self._capture() as log:
            self.model = llama_cpp.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}:\n{''.join(log)[-2000:]}")

    def _capture(self):
        import contextlib  # noqa: PLC0415
        import ctypes  # noqa: PLC0415
        ll = self._ll

        @contextlib.contextmanager
        def cm():
            lines: list[str] = []

            @ll.llama_log_callback
            def cb(level, text, user_data):  # noqa: ARG001
                lines.append(text.decode("utf-8", "replace"))

            ll.llama_log_set(cb, ctypes.c_void_p(0))
            try:
                yield lines
            finally:
                try:
                    from llama_cpp import _logger  # noqa: PLC0415
                    ll.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
                except (ImportError, AttributeError):
                    ll.llama_log_set(None, ctypes.c_void_p(0))  # back to llama.cpp's stderr default
        return cm()

    def model_size(self) -> int:
        return int(self._ll.llama_model_size(self.model))

    def allocate(self, n_ctx: int, type_k: str = "f16", type_v: str = "f16", n_seq: int = 1,
                 kv_unified: bool = False, flash_attn: bool = True, n_rs_seq: int = 0) -> dict:
        ll = self._ll
        if min(n_ctx, 64) < n_seq:
            # llama_context clamps n_batch to the *unpadded* n_ctx, then asserts n_seq <= n_batch: abort()
            raise ValueError(f"llama.cpp aborts for n_ctx ({n_ctx}) < n_seq ({n_seq}); not probing")
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
            raise RuntimeError(f"llama.cpp refused the context:\n{text[-2000:]}")
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
