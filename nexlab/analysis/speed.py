"""How fast nexlab's numpy code is against llama.cpp's C, on the same input.

- :func:`nvfp4_speed_vs_ggml`: NVFP4 quantize / dequantize (ggml layout) against libggml's
  ``quantize_row_nvfp4_ref`` / ``dequantize_row_nvfp4`` (:mod:`nexlab.llamacpp.libggml`, one thread),
  with ModelOpt-semantics quantization for context.
- :func:`kquant_speed_vs_ggml`: Q4_K / Q6_K (with and without an imatrix) and Q8_0 against
  ``ggml_quantize_chunk``.
- :func:`benchmark_conversion`: ``nexlab convert`` against llama.cpp's ``convert_hf_to_gguf.py``
  (:func:`nexlab.llamacpp.source.reference_command`), both as child processes: wall time, peak RSS.

Each also reports whether both sides gave identical bytes. Ratios are nexlab time / llama.cpp time
(the workbook's convention: below 1 means nexlab is faster). Chapters 01, 03 and 04 and the scripts
in benchmarks/ call these.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.core.fileio import evict_from_page_cache
from nexlab.formats.kquant_search import F32
from nexlab.formats.kquants import GGML_TYPE_IDS, quantize, row_size
from nexlab.formats.minifloat import GGML_NVFP4_BLOCK
from nexlab.formats.nvfp4 import dequantize_nvfp4_ggml, quantize_nvfp4_ggml, quantize_nvfp4_modelopt
from nexlab.llamacpp import libggml as ggml_ref
from nexlab.llamacpp.process import run_measured
from nexlab.llamacpp.source import REPO_ROOT, reference_command


def _best_time(fn, repeat: int) -> tuple[float, Any]:
    out = fn()  # warm-up, also the result we check
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def nvfp4_speed_vs_ggml(rows: int = 256, cols: int = 4096, repeat: int = 3, seed: int = 0) -> dict:
    """Time nexlab's NVFP4 (ggml layout) quantize/dequantize against libggml's C reference
    (``quantize_row_nvfp4_ref`` / ``dequantize_row_nvfp4`` via ctypes, one thread) on the
    same Gaussian tensor, and ModelOpt-semantics quantization for context.

    Returns a dict with median seconds, throughputs in Melem/s, the time ratios
    ``quantize_time_ratio`` / ``dequantize_time_ratio`` = nexlab time / ggml time (the workbook's
    benchmark convention, stated in the README: below 1 means nexlab is faster) and whether the
    outputs were identical.
    """

    if rows <= 0 or cols <= 0 or cols % GGML_NVFP4_BLOCK:
        raise NexlabError(f"cols must be a positive multiple of 64 and rows positive, got rows={rows}, cols={cols}")
    if repeat < 1:
        raise NexlabError(f"repeat must be >= 1, got {repeat}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    n = rows * cols
    t_nq, q_nex = _best_time(lambda: quantize_nvfp4_ggml(x), repeat)
    t_gq, q_ggml = _best_time(lambda: ggml_ref.quantize_row_nvfp4_ref(x.reshape(-1)), repeat)
    t_nd, d_nex = _best_time(lambda: dequantize_nvfp4_ggml(q_ggml.reshape(rows, -1)), repeat)
    t_gd, d_ggml = _best_time(lambda: ggml_ref.dequantize_row_nvfp4(q_ggml, n), repeat)
    t_mo, _ = _best_time(lambda: quantize_nvfp4_modelopt(x), repeat)
    mel = lambda t: n / t / 1e6  # noqa: E731
    return {
        "rows": rows,
        "cols": cols,
        "elements": n,
        "repeat": repeat,
        "threads": 1,
        "nexlab_quantize_s": t_nq,
        "ggml_quantize_s": t_gq,
        "nexlab_dequantize_s": t_nd,
        "ggml_dequantize_s": t_gd,
        "nexlab_quantize_melem_s": mel(t_nq),
        "ggml_quantize_melem_s": mel(t_gq),
        "nexlab_dequantize_melem_s": mel(t_nd),
        "ggml_dequantize_melem_s": mel(t_gd),
        "quantize_time_ratio": t_nq / t_gq,
        "dequantize_time_ratio": t_nd / t_gd,
        "nexlab_modelopt_quantize_melem_s": mel(t_mo),
        "quantize_bytes_identical": bool(np.array_equal(q_nex.reshape(-1), q_ggml.reshape(-1))),
        "dequantize_values_identical": bool(
            np.array_equal(d_nex.reshape(-1).view(np.uint32), d_ggml.reshape(-1).view(np.uint32))
        ),
    }


def kquant_speed_vs_ggml(
    shape: tuple[int, int] = (1024, 2048),
    cases: tuple[tuple[str, bool], ...] = (("Q4_K", True), ("Q4_K", False), ("Q6_K", True), ("Q6_K", False),
                                           ("Q8_0", False)),
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Time nexlab and ggml's C on the same tensor, single thread, best of ``repeats``.

    The C side is ``ggml_quantize_chunk`` called through ctypes on libggml-base (the
    :mod:`nexlab.llamacpp.libggml` handle) with preallocated input/output buffers, so only the
    quantization is timed; numpy runs single-threaded for these elementwise ops. Returns
    ``{"Q4_K+imatrix": {"nexlab_s", "ggml_s", "time_ratio", "bytes_equal", "melem_per_s_nexlab",
    "melem_per_s_ggml"}, ...}`` where ``time_ratio`` is nexlab time / C time (the workbook's benchmark
    convention, stated in the README: below 1 means nexlab is faster; the target is <= 2).
    """

    lib = ggml_ref.lib()
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(rng.standard_normal(shape), dtype=F32)
    imat = np.ascontiguousarray((rng.random(shape[1]) * 2) ** 2, dtype=F32)
    results: dict = {}
    for t, use_im in cases:
        im = imat if use_im else None
        ref = np.zeros((shape[0], row_size(t, shape[1])), dtype=np.uint8)
        tn, tc = [], []
        ours = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = quantize(x, t, im)
            tn.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lib.ggml_quantize_chunk(
                GGML_TYPE_IDS[t], x.ctypes.data, ref.ctypes.data, 0, shape[0], shape[1],
                None if im is None else im.ctypes.data,
            )
            tc.append(time.perf_counter() - t0)
        key = t + ("+imatrix" if use_im else "")
        results[key] = {
            "nexlab_s": min(tn),
            "ggml_s": min(tc),
            "time_ratio": min(tn) / min(tc),
            "bytes_equal": bool(np.array_equal(ours, ref)),
            "melem_per_s_nexlab": x.size / min(tn) / 1e6,
            "melem_per_s_ggml": x.size / min(tc) / 1e6,
        }
    return results


def benchmark_conversion(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, repeats: int = 3,
                         python: str = sys.executable, keep: bool = False) -> dict:
    """Convert ``ckpt_dir`` with nexlab and with the reference converter; return times, RSS, ratios.

    Both run as child processes of the same interpreter (``python -m nexlab.cli convert`` and
    ``python convert_hf_to_gguf.py``), so wall time and peak RSS are the converters' own. Fair timing:
    ``repeats`` rounds, the order alternating (nexlab first in even rounds, the reference first in odd
    ones), the checkpoint and the previous outputs evicted from the page cache before every run
    (:func:`nexlab.core.fileio.evict_from_page_cache`); each converter's min and median wall time are
    reported and the time ratio is taken from the medians; peak RSS is the largest seen. Output files
    are deleted unless ``keep``; on an error or Ctrl-C both converters are stopped
    (:func:`nexlab.llamacpp.process.child_process`) and their files deleted.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise NexlabError(f"repeats must be a positive integer, got {repeats!r}")
    ckpt_dir = Path(ckpt_dir)
    made = out_dir is None
    tmp = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        return _benchmark_conversion(ckpt_dir, tmp, repeats, python, keep)
    except BaseException:
        for name in ("nexlab.gguf", "llamacpp.gguf"):
            (tmp / name).unlink(missing_ok=True)
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _benchmark_conversion(ckpt_dir: Path, tmp: Path, repeats: int, python: str, keep: bool) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    outs = {"nexlab": tmp / "nexlab.gguf", "llamacpp": tmp / "llamacpp.gguf"}
    ref_cmd, ref_env = reference_command(ckpt_dir, outs["llamacpp"], python=python)
    ref_env["NEXLAB_NO_PROGRESS"] = "1"
    env = dict(os.environ, NEXLAB_NO_PROGRESS="1", PYTHONPATH=str(REPO_ROOT))
    cmds = {"nexlab": ([python, "-m", "nexlab.cli", "convert", str(ckpt_dir), "-o", str(outs["nexlab"]), "-q"],
                       env, None),
            "llamacpp": (ref_cmd, ref_env, Path(ref_cmd[1]).parent)}
    runs: dict[str, list[dict]] = {"nexlab": [], "llamacpp": []}
    order = []
    for i in range(repeats):
        for name in (("nexlab", "llamacpp") if i % 2 == 0 else ("llamacpp", "nexlab")):
            outs[name].unlink(missing_ok=True)
            evict_from_page_cache(ckpt_dir, *outs.values())
            cmd, e, cwd = cmds[name]
            runs[name].append(run_measured(cmd, e, cwd=cwd))
            order.append(name)
    res: dict = {}
    for k, v in runs.items():
        secs = sorted(r["seconds"] for r in v)
        res[k] = {"seconds": float(np.median(secs)), "min_seconds": secs[0], "all_seconds": [r["seconds"] for r in v],
                  "peak_rss_mib": max(r["peak_rss_mib"] for r in v), "file_mib": outs[k].stat().st_size / 2**20}
    res["ratio_time"] = res["nexlab"]["seconds"] / res["llamacpp"]["seconds"]  # medians
    res["ratio_time_min"] = res["nexlab"]["min_seconds"] / res["llamacpp"]["min_seconds"]
    res["ratio_rss"] = res["nexlab"]["peak_rss_mib"] / res["llamacpp"]["peak_rss_mib"]
    res["checkpoint"] = str(ckpt_dir)
    res["checkpoint_mib"] = sum(p.stat().st_size for p in ckpt_dir.glob("*.safetensors")) / 2**20
    res["repeats"] = repeats
    res["order"] = order
    res["page_cache"] = "checkpoint and outputs evicted (fsync + posix_fadvise DONTNEED) before every run"
    if not keep:
        for p in outs.values():
            p.unlink(missing_ok=True)
    return res
