"""Throughput of GGUF files on this machine, measured by llama.cpp's own benchmark tools.

nexlab times nothing that llama.cpp's tools time: it runs them, parses what they print and labels
every figure with what it needs to be compared later (file, variant, device, threads, llama.cpp
build, nexlab version, the exact command line).

- :func:`run_bench` runs, for each file and thread count, ``llama-bench`` (single stream: pp and tg
  tests, ``-o json``) and ``llama-batched-bench`` (B parallel streams of ``npl_pp`` prompt tokens and
  ``npl_tg`` generated tokens each, ``--output-format jsonl``), with one progress bar over the tool
  runs, and returns one flat record per measurement (:func:`llama_bench` and :func:`batched_bench`
  do one tool run each). ``nexlab bench FILE ...`` prints them as tables or JSON.
- :func:`measure_bandwidth`: this machine's memory bandwidth by a large numpy copy (the roofline's
  denominator for decode on CPU, :mod:`nexlab.analysis.roofline`). ``nexlab bandwidth``.
- :func:`make_stock_q4_k_m`: the "stock" Q4_K_M comparison file (experts K-quants, not NVFP4) made by
  ``llama-quantize`` from the NVFP4-BF16 GGUF. ``nexlab stock IN.gguf -o OUT.gguf``.

The tools are built by :mod:`nexlab.llamacpp.build` and run as :func:`nexlab.llamacpp.process.child_process`
children; thread and stream-count lists are parsed by :func:`nexlab.core.text.parse_int_list`.

What the tools measure (tools/llama-bench/llama-bench.cpp, tools/batched-bench/batched-bench.cpp of
the llama.cpp tree llama-cpp-python 0.3.36 vendors):

- ``llama-bench -p PP -n TG -r REPS`` runs two tests per model and thread count: ``ppPP`` (one batch
  of PP prompt tokens, n_gen = 0) and ``tgTG`` (TG single-token decodes, n_prompt = 0), each after
  one untimed warm-up run, REPS times; ``avg_ts`` is the mean over repetitions of
  (n_prompt + n_gen) / seconds, ``stddev_ts`` their sample standard deviation, ``samples_ns`` /
  ``samples_ts`` the repetitions themselves.
- ``llama-batched-bench -npp PP -ntg TG -npl B1,B2,...`` fills B sequences with PP random prompt
  tokens each (one decode call split into ``-b`` batches), then decodes TG rounds of B tokens (one
  per stream). Per B it prints PP, TG, B (``pl``), N_KV = B * (PP + TG), T_PP, S_PP = B * PP / T_PP,
  T_TG, S_TG = B * TG / T_TG, T = T_PP + T_TG and S = B * (PP + TG) / T. The JSONL keys are kept:
  ``pp, tg, pl, n_kv, t_pp, speed_pp, t_tg, speed_tg, t, speed`` (``pl`` is the table's B,
  ``speed_tg`` its S_TG t/s).
- batched-bench silently skips a stream count whose N_KV exceeds the context, so nexlab passes
  ``-c max(B) * (PP + TG)``: with the default split cache each of the ``max(B)`` sequences then gets
  ``PP + TG`` cells (llama.cpp rounds a sequence's share up to a multiple of 256).
- batched-bench prints its rows through llama.cpp's common logger, which writes from a background
  thread and is not flushed when the tool exits (common/log.cpp, ``common_log_main``; upstream
  issue ggml-org/llama.cpp#22142): now and then the last row, the largest B, never reaches stdout
  although the tool exits 0. nexlab reruns the stream counts whose rows are missing (each rerun
  measures only those, :data:`BATCHED_ATTEMPTS` runs in all) and records how many runs it took
  (``runs``); a row still missing after that is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from gguf import GGUFReader

from nexlab import __version__
from nexlab.core.errors import NexlabError, ToolError
from nexlab.core.fileio import atomic_output, atomic_write_text
from nexlab.core.progress import progress
from nexlab.core.text import int_at_least, markdown_table, parse_int_list, plain
from nexlab.ggufio.check import check_gguf, open_gguf
from nexlab.llamacpp import source as llamacpp
from nexlab.llamacpp.build import tool_path
from nexlab.llamacpp.process import child_process

#: llama-bench JSON fields copied into each record (names as llama-bench writes them)
LLAMA_BENCH_FIELDS = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends", "model_type", "model_size",
    "model_n_params", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "flash_attn", "n_prompt",
    "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts",
)  # fmt: skip


#: llama-batched-bench JSONL fields copied into each record
BATCHED_BENCH_FIELDS = (
    "n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared", "n_gpu_layers", "n_threads",
    "n_threads_batch", "pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed",
)  # fmt: skip


# tensor types a stock Q4_K_M may be made from: float weights and NVFP4 experts (anything else would
# be quantized twice)
_STOCK_SOURCE_TYPES = {"F32", "F16", "BF16", "NVFP4"}


# how llama-quantize names its output types in file names (a variant label is read from the file name)
_VARIANT_RE = re.compile(r"(?:^|[-_.])((?:nvfp4[-_])?(?:bf16|f16|f32|q8_0|q4_0|q4_1|q5_0|q5_1|q2_k|q3_k_[sml]|"
                         r"q4_k_[sm]|q5_k_[sm]|q6_k|mxfp4|nvfp4))$", re.IGNORECASE)


def gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Check ``path`` is a whole, readable GGUF file and summarise it.

    Returns ``{"path", "file_bytes", "tensor_types": {type: count}, "expert_types": {type: count}}``
    (expert types: the routed ``*_exps.weight`` tensors). FileNotFoundError for a missing file,
    ValueError (naming the file) for one that is not GGUF, is truncated (a tensor's data runs past
    the end) or that gguf-py cannot parse.
    """

    p = Path(path)
    r = open_gguf(p, "model")
    size = p.stat().st_size
    types: dict[str, int] = {}
    experts: dict[str, int] = {}
    for t in r.tensors:
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        if t.name.endswith("_exps.weight"):
            experts[name] = experts.get(name, 0) + 1
    return {"path": str(p), "file_bytes": size, "tensor_types": types, "expert_types": experts}


def variant_label(path: str | os.PathLike) -> str:
    """A variant label read from a file name: the type suffix llama.cpp's naming uses, upper-cased
    (``Nex-N2-mini-NVFP4-BF16.gguf`` -> ``NVFP4-BF16``, ``stock-q4_k_m.gguf`` -> ``Q4_K_M``), else the
    file name without ``.gguf``."""
    stem = Path(path).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    m = _VARIANT_RE.search(stem)
    return re.sub(r"^NVFP4_", "NVFP4-", m[1].upper()) if m else stem


# ----------------------------------------------------------------------------- what every record carries
def device_info() -> dict[str, Any]:
    """This machine as the CPU backend sees it: CPU model (``/proc/cpuinfo`` model name), logical
    CPUs, physical cores, CPUs this process may use, memory (``/proc/meminfo`` MemTotal, bytes)."""
    cpu, cores = None, set()
    phys = core = None
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines() + [""]:
            key, _, val = (x.strip() for x in line.partition(":"))
            if key == "model name" and cpu is None:
                cpu = val
            elif key == "physical id":
                phys = val
            elif key == "core id":
                core = val
            elif not key:  # a blank line ends one logical CPU's block
                if core is not None:
                    cores.add((phys, core))
                phys = core = None
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown"
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        available = os.cpu_count()
    return {"backend": "cpu", "cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": len(cores) or None,
            "cpus_available": available, "memory_bytes": mem, "machine": platform.machine(),
            "os": platform.platform()}


def llama_cpp_build() -> dict[str, Any]:
    """Which llama.cpp ran: the tree's pin and sdist hash (``SOURCE.json``) and how the tools were
    built (``BUILD.json``: compiler, cmake options, time). The tree carries no git commit, so
    llama-bench's own ``build_commit`` reads ``unknown``; the sdist hash identifies the source."""

    out: dict[str, Any] = {"llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON_VERSION,
                           "tools_dir": str(llamacpp.tools_dir())}
    for name, keys in (("SOURCE.json", ("sdist", "sdist_sha256")),
                       ("BUILD.json", ("cxx", "cmake_options", "built_at"))):
        f = (llamacpp.source_dir() if name == "SOURCE.json" else llamacpp.tools_dir()) / name
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out.update({k: info[k] for k in keys if k in info})
    return out


def _common(file: dict, label: str | None, threads: int, device: dict, build: dict, tool: str,
            cmd: list[str]) -> dict[str, Any]:
    return {"tool": tool, "variant": label or variant_label(file["path"]), "file": file["path"],
            "file_bytes": file["file_bytes"], "expert_types": file["expert_types"], "threads": threads,
            "device": device, "llama_cpp": build, "nexlab_version": __version__, "command": shlex.join(cmd)}


def _error_line(text: str) -> str:
    """The line of a tool's output that says what went wrong (the last mentioning an error, else the last)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return (errors or lines or ["no output"])[-1]




def _run_tool(cmd: list[str], file: str) -> str:
    """Run a llama.cpp tool, return its stdout; RuntimeError (one line, naming the file) on failure.
    An error or Ctrl-C while it runs stops it (:func:`nexlab.llamacpp.process.child_process`)."""

    with child_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        out, err = proc.communicate()
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if r.returncode != 0:
        raise ToolError(f"{Path(cmd[0]).name} failed (exit {r.returncode}) on {file}: "
                           f"{_error_line(r.stderr + chr(10) + r.stdout)}")
    return r.stdout


# ----------------------------------------------------------------------------- the two tools
#: llama-batched-bench runs per call at most: the first, then reruns of stream counts whose rows were lost
BATCHED_ATTEMPTS = 3


#: tokens of llama-batched-bench's warm-up decode, which must fit in its one batch of at most n_ctx tokens
BATCHED_WARMUP_TOKENS = 16


def batched_ctx(parallel: Sequence[int], npl_pp: int, npl_tg: int) -> int:
    """The ``-c`` nexlab gives llama-batched-bench: ``max(B) * (PP + TG)``, so the largest stream count
    fits (it needs N_KV = B * (PP + TG) cells; batched-bench skips a B that does not fit), and at least
    the :data:`BATCHED_WARMUP_TOKENS` of its warm-up (a smaller context aborts it in ``get_sub_batch``)."""
    return max(max(parallel) * (int(npl_pp) + int(npl_tg)), BATCHED_WARMUP_TOKENS)


def _check_common(threads: int, batch: int, ubatch: int) -> tuple[int, int, int]:
    return int_at_least(threads, "--threads", 1), int_at_least(batch, "--batch", 1), int_at_least(ubatch, "--ubatch", 1)


def llama_bench(file: str | os.PathLike, *, pp: int = 512, tg: int = 64, reps: int = 5, threads: int = 2,
                batch: int = 2048, ubatch: int = 512, label: str | None = None) -> list[dict[str, Any]]:
    """One ``llama-bench -m FILE -p PP -n TG -r REPS -t THREADS -b BATCH -ub UBATCH -o json`` run.

    Returns one record per test (``ppPP`` then ``tgTG``; a 0 skips that test): the common fields
    (``tool``, ``variant``, ``file``, ``file_bytes``, ``expert_types``, ``threads``, ``device``,
    ``llama_cpp``, ``nexlab_version``, ``command``), ``test``, ``reps`` and llama-bench's own
    :data:`LLAMA_BENCH_FIELDS` (``avg_ts``, ``stddev_ts`` in tokens/s, ``n_prompt``, ``n_gen``, ...).
    """
    pp, tg, reps = int_at_least(pp, "--pp", 0), int_at_least(tg, "--tg", 0), int_at_least(reps, "--reps", 1)
    if pp == 0 and tg == 0:
        raise NexlabError("--pp and --tg are both 0: llama-bench would run no test")
    threads, batch, ubatch = _check_common(threads, batch, ubatch)
    return _llama_bench(gguf_summary(file), device_info(), llama_cpp_build(), pp=pp, tg=tg, reps=reps,
                        threads=threads, batch=batch, ubatch=ubatch, label=label)


def _llama_bench(info: dict, device: dict, build: dict, *, pp: int, tg: int, reps: int, threads: int, batch: int,
                 ubatch: int, label: str | None) -> list[dict[str, Any]]:
    """:func:`llama_bench` on checked parameters and a :func:`gguf_summary`."""

    cmd = [str(tool_path("llama-bench")), "-m", info["path"], "-p", str(pp), "-n", str(tg), "-r", str(reps),
           "-t", str(threads), "-b", str(batch), "-ub", str(ubatch), "-o", "json"]
    out = _run_tool(cmd, info["path"])
    try:
        tests = json.loads(out)
    except ValueError:
        raise ToolError(f"llama-bench printed no JSON for {info['path']}: {_error_line(out)}") from None
    common = _common(info, label, threads, device, build, "llama-bench", cmd)
    records = []
    for t in tests:
        missing = [k for k in LLAMA_BENCH_FIELDS if k not in t]
        if missing:
            raise ToolError(f"llama-bench's JSON lacks {', '.join(missing)}: "
                            "update nexlab.analysis.bench.LLAMA_BENCH_FIELDS")
        test = f"pp{t['n_prompt']}" if t["n_gen"] == 0 else f"tg{t['n_gen']}" if t["n_prompt"] == 0 else \
            f"pp{t['n_prompt']}+tg{t['n_gen']}"
        records.append({**common, "test": test, "reps": reps, **{k: t[k] for k in LLAMA_BENCH_FIELDS}})
    want = [(pp, 0)] * (pp > 0) + [(0, tg)] * (tg > 0)
    got = [(r["n_prompt"], r["n_gen"]) for r in records]
    if got != want:
        raise ToolError(f"llama-bench ran tests {got} (n_prompt, n_gen) on {info['path']}, expected {want}")
    return records


def batched_bench(file: str | os.PathLike, *, parallel: str | Iterable[int] = (1, 2, 4, 8), npl_pp: int = 512,
                  npl_tg: int = 128, threads: int = 2, batch: int = 2048, ubatch: int = 512,
                  label: str | None = None) -> list[dict[str, Any]]:
    """One ``llama-batched-bench -m FILE -c CTX -b BATCH -ub UBATCH -npp PP -ntg TG -npl B1,B2,...
    -t THREADS --output-format jsonl`` run, ``CTX`` = :func:`batched_ctx`.

    Returns one record per stream count B, in the order asked: the common fields (see
    :func:`llama_bench`), ``ctx`` and batched-bench's :data:`BATCHED_BENCH_FIELDS` (``pl`` = B,
    ``speed_pp`` = S_PP, ``speed_tg`` = S_TG, ``speed`` = S, all tokens/s; ``t_*`` seconds).
    """
    parallel = parse_int_list(parallel, "--parallel")
    npl_pp, npl_tg = int_at_least(npl_pp, "--npl-pp", 1), int_at_least(npl_tg, "--npl-tg", 1)
    threads, batch, ubatch = _check_common(threads, batch, ubatch)
    return _batched_bench(gguf_summary(file), device_info(), llama_cpp_build(), parallel=parallel, npl_pp=npl_pp,
                          npl_tg=npl_tg, threads=threads, batch=batch, ubatch=ubatch, label=label)


def _batched_bench(info: dict, device: dict, build: dict, *, parallel: tuple[int, ...], npl_pp: int, npl_tg: int,
                   threads: int, batch: int, ubatch: int, label: str | None) -> list[dict[str, Any]]:
    """:func:`batched_bench` on checked parameters and a :func:`gguf_summary`."""

    ctx = batched_ctx(parallel, npl_pp, npl_tg)
    cmd = [str(tool_path("llama-batched-bench")), "-m", info["path"], "-c", str(ctx), "-b", str(batch),
           "-ub", str(ubatch), "-npp", str(npl_pp), "-ntg", str(npl_tg), "-npl", ",".join(map(str, parallel)),
           "-t", str(threads), "--output-format", "jsonl"]
    npl = cmd.index("-npl") + 1
    common = _common(info, label, threads, device, build, "llama-batched-bench", cmd)
    rows, runs = {}, {}
    for attempt in range(1, BATCHED_ATTEMPTS + 1):
        absent = [b for b in parallel if b not in rows]
        if not absent:
            break
        cmd[npl] = ",".join(map(str, absent))
        for line in _run_tool(cmd, info["path"]).splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                missing = [k for k in BATCHED_BENCH_FIELDS if k not in row]
                if missing:
                    raise ToolError(f"llama-batched-bench's JSONL lacks {', '.join(missing)}: "
                                       "update nexlab.analysis.bench.BATCHED_BENCH_FIELDS")
                rows.setdefault(row["pl"], row)
                runs.setdefault(row["pl"], attempt)
    absent = [b for b in parallel if b not in rows]
    if absent:
        raise ToolError(f"llama-batched-bench gave no row for {', '.join(map(str, absent))} streams on "
                           f"{info['path']} (context {ctx}) in {BATCHED_ATTEMPTS} runs")
    return [{**common, "ctx": ctx, "runs": runs[b], **{k: rows[b][k] for k in BATCHED_BENCH_FIELDS}}
            for b in parallel]


def run_bench(files: str | os.PathLike | Sequence[str | os.PathLike], *, pp: int = 512, tg: int = 64,
              reps: int = 5, parallel: str | Iterable[int] | None = (1, 2, 4, 8), npl_pp: int = 512,
              npl_tg: int = 128, threads: str | int | Iterable[int] | None = None,
              labels: Sequence[str] | None = None, batch: int = 2048, ubatch: int = 512, single: bool = True,
              show_progress: bool = True) -> list[dict[str, Any]]:
    """Benchmark each GGUF in ``files`` with llama-bench and llama-batched-bench, per thread count.

    ``threads``: an int, ``"1,2"`` or ints (default: the CPUs this process may use). ``labels``: one
    variant label per file (default :func:`variant_label`). ``parallel=None`` skips batched-bench,
    ``single=False`` skips llama-bench. Every parameter and file is checked before anything runs.
    One progress bar counts the tool runs. Returns the records of :func:`llama_bench` (``tool ==
    "llama-bench"``) and :func:`batched_bench` (``tool == "llama-batched-bench"``) in run order:
    file by file, thread count by thread count, llama-bench first.
    """

    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not files:
        raise NexlabError("no GGUF file given")
    if labels is not None and len(labels) != len(files):
        raise NexlabError(f"{len(labels)} labels for {len(files)} files: give one label per file")
    if threads is None:
        threads = (len(os.sched_getaffinity(0)),)
    thread_list = parse_int_list(threads, "--threads")
    pp, tg, reps = int_at_least(pp, "--pp", 0), int_at_least(tg, "--tg", 0), int_at_least(reps, "--reps", 1)
    if single and pp == 0 and tg == 0:
        raise NexlabError("--pp and --tg are both 0: llama-bench would run no test")
    par = None if parallel is None else parse_int_list(parallel, "--parallel")
    npl_pp, npl_tg = int_at_least(npl_pp, "--npl-pp", 1), int_at_least(npl_tg, "--npl-tg", 1)
    batch, ubatch = int_at_least(batch, "--batch", 1), int_at_least(ubatch, "--ubatch", 1)
    if not single and par is None:
        raise NexlabError("nothing to run: llama-bench and llama-batched-bench both skipped")
    infos = [gguf_summary(f) for f in files]
    if single:
        tool_path("llama-bench")
    if par is not None:
        tool_path("llama-batched-bench")
    device, build = device_info(), llama_cpp_build()
    runs = [(i, t, tool) for i in range(len(files)) for t in thread_list
            for tool in (("llama-bench",) * single + ("llama-batched-bench",) * (par is not None))]
    records: list[dict[str, Any]] = []
    with progress(total=len(runs), desc="bench", show_progress=show_progress) as bar:
        for i, t, tool in runs:
            info, label = infos[i], labels[i] if labels else None
            bar.set_postfix_str(f"{Path(info['path']).name} {tool} -t {t}")
            kw = {"threads": t, "batch": batch, "ubatch": ubatch, "label": label}
            if tool == "llama-bench":
                records += _llama_bench(info, device, build, pp=pp, tg=tg, reps=reps, **kw)
            else:
                records += _batched_bench(info, device, build, parallel=par, npl_pp=npl_pp, npl_tg=npl_tg, **kw)
            bar.update(1)
    return records


def llama_bench_rows(records: Iterable[dict]) -> list[dict[str, Any]]:
    """Short rows of the llama-bench records (for :func:`nexlab.core.text.markdown_table`)."""
    return [{"variant": r["variant"], "size MiB": r["file_bytes"] / 2**20, "threads": r["threads"],
             "test": r["test"], "t/s": r["avg_ts"], "± t/s": r["stddev_ts"], "reps": r["reps"]}
            for r in records if r["tool"] == "llama-bench"]


def batched_bench_rows(records: Iterable[dict]) -> list[dict[str, Any]]:
    """Short rows of the llama-batched-bench records, in its table's names (B, S_PP, S_TG, S)."""
    return [{"variant": r["variant"], "threads": r["threads"], "PP": r["pp"], "TG": r["tg"], "B": r["pl"],
             "N_KV": r["n_kv"], "S_PP t/s": r["speed_pp"], "S_TG t/s": r["speed_tg"], "S t/s": r["speed"]}
            for r in records if r["tool"] == "llama-batched-bench"]


# ----------------------------------------------------------------------------- memory bandwidth
def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """This machine's memory bandwidth from ``np.copyto`` of an ``nbytes`` uint8 array (best of
    ``repeats``, after one untimed copy that also faults the pages in).

    Returns ``{"nbytes", "repeats", "seconds": [...], "best_seconds", "copy_gb_s", "read_write_gb_s",
    "roofline_gb_s", "threads": 1, "method"}`` with GB = 1e9 bytes (the unit of GPU data sheets).

    - ``copy_gb_s`` = nbytes / best time: bytes copied per second.
    - ``read_write_gb_s`` = 2 * nbytes / best time: the copy reads nbytes and writes nbytes, so this is
      the traffic the memory system carried (glibc's memcpy, which numpy uses for a contiguous copy,
      writes large copies with non-temporal stores, so no extra read of the destination is counted).
    - ``roofline_gb_s`` = ``read_write_gb_s``. Convention: decode streams weights, i.e. it only reads;
      its bound is the bytes per second memory can deliver, and the read+write rate of a copy is that
      rate expressed as read-side bytes (one byte read or written is one byte of traffic). The copy
      rate would count only half the traffic and understate the bound twofold.

    numpy's copy runs on one thread: on a machine whose bandwidth needs several cores to saturate
    (most servers) this is a lower bound for what llama.cpp's multi-threaded decode can draw.
    """

    nbytes, repeats = int_at_least(nbytes, "nbytes", 1), int_at_least(repeats, "repeats", 1)
    src = np.empty(nbytes, dtype=np.uint8)
    src.fill(1)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        seconds.append(time.perf_counter() - t0)
    best = min(seconds)
    rw = 2 * nbytes / best / 1e9
    return {"nbytes": nbytes, "repeats": repeats, "seconds": seconds, "best_seconds": best,
            "copy_gb_s": nbytes / best / 1e9, "read_write_gb_s": rw, "roofline_gb_s": rw, "threads": 1,
            "method": "numpy.copyto of a contiguous uint8 array, one thread, best of repeats"}


# ----------------------------------------------------------------------------- the stock Q4_K_M file
_QUANTIZE_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def make_stock_q4_k_m(nvfp4_bf16_gguf: str | os.PathLike, out: str | os.PathLike,
                      imatrix: str | os.PathLike | None = None,
                      threads: int = 2, show_progress: bool = True) -> dict[str, Any]:
    """The "stock" comparison file: ``llama-quantize --allow-requantize [--imatrix F] IN OUT Q4_K_M THREADS``.

    From the NVFP4-BF16 GGUF (NVFP4 experts, the rest BF16/F32) llama-quantize applies its Q4_K_M mix
    to every tensor, the NVFP4 ones included: it dequantizes each NVFP4 tensor to float32 (ggml's
    ``to_float``: E2M1 code times block scale, without the per-tensor ``.scale``, which is copied as
    a separate F32 tensor and still multiplies the matmul output) and quantizes that. Those values
    (at most 6 significant bits, exponents well inside BF16's range) are exactly representable in
    BF16, so the result equals llama-quantize's Q4_K_M of a BF16 file whose expert weights are the
    NVFP4 values (a test checks this byte for byte). Types for qwen35moe's Q4_K_M mix: routed experts
    ``ffn_gate_exps`` / ``ffn_up_exps`` Q4_K, ``ffn_down_exps`` Q6_K in layers where
    ``use_more_bits(layer, n_layer)`` (20 of Nex-N2-mini's 40) else Q4_K; shared experts likewise;
    the rest as :mod:`nexlab.model.mixes` describes (output Q6_K, attn_v/attn_qkv Q6_K or Q4_K, ...).

    Refuses an input holding tensors already quantized to another type (they would be quantized
    twice). The output is written under a temporary name and renamed (``command`` shows the final
    name). Returns ``{"path", "file_bytes", "source", "imatrix", "command", "tensor_types",
    "expert_types": {tensor name: type}}``; RuntimeError (one line) if llama-quantize fails or leaves
    an NVFP4 expert.
    """


    threads = int_at_least(threads, "--threads", 1)
    src = gguf_summary(nvfp4_bf16_gguf)
    out = Path(out)
    if out.resolve() == Path(src["path"]).resolve():
        raise NexlabError(f"output {out} is the input file")
    r = GGUFReader(src["path"])
    for t in r.tensors:
        if t.tensor_type.name not in _STOCK_SOURCE_TYPES:
            raise NexlabError(f"{src['path']}: tensor {t.name} is already {t.tensor_type.name}; the stock Q4_K_M is "
                             f"made from the NVFP4-BF16 file (float weights, NVFP4 experts)")
    del r
    im_args: list[str] = []
    if imatrix is not None:

        check_gguf(imatrix, "imatrix file")
        im_args = ["--imatrix", str(imatrix)]
    exe = str(tool_path("llama-quantize"))
    shown = [exe, "--allow-requantize", *im_args, src["path"], str(out), "Q4_K_M", str(threads)]
    with atomic_output(out) as tmp:
        cmd = [*shown[:-3], str(tmp), *shown[-2:]]
        tail: list[str] = []
        # stopped with its children on an error or Ctrl-C; atomic_output then removes its file
        with child_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace") as proc, \
                progress(total=sum(src["tensor_types"].values()), desc=f"quantize {out.name}",
                         show_progress=show_progress) as bar:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = (tail + [line])[-40:]
                if m := _QUANTIZE_PROGRESS.match(line):
                    bar.update(int(m[1]) - bar.n)
            proc.wait()
        if proc.returncode != 0:
            raise ToolError(f"llama-quantize failed (exit {proc.returncode}) on {src['path']}: "
                               f"{_error_line(''.join(tail))}")
    res = gguf_summary(out)
    rr = GGUFReader(out)
    experts = {t.name: t.tensor_type.name for t in rr.tensors if t.name.endswith("_exps.weight")}
    if any(v == "NVFP4" for v in experts.values()):
        raise ToolError(f"llama-quantize left NVFP4 experts in {out}")
    return {"path": str(out), "file_bytes": res["file_bytes"], "source": src["path"],
            "imatrix": None if imatrix is None else str(imatrix), "command": shlex.join(shown),
            "tensor_types": res["tensor_types"], "expert_types": experts}


# ----------------------------------------------------------------------------- CLI
def _cmd_bench(args: argparse.Namespace) -> int:
    records = run_bench(args.files, pp=args.pp, tg=args.tg, reps=args.reps,
                        parallel=None if args.no_batched else args.parallel, npl_pp=args.npl_pp,
                        npl_tg=args.npl_tg, threads=args.threads, labels=args.label, batch=args.batch,
                        ubatch=args.ubatch, single=not args.no_single, show_progress=not args.quiet)

    text = json.dumps(plain(records), indent=2) + "\n"
    if args.output:

        atomic_write_text(args.output, text)
    if args.json:
        sys.stdout.write(text)
        return 0
    if rows := llama_bench_rows(records):
        print(markdown_table(rows, floatfmt=".2f"))
    if rows := batched_bench_rows(records):
        print()
        print(markdown_table(rows, floatfmt=".2f"))
    d = records[0]["device"]
    print(f"\n{d['cpu']}, {d['cpus_available']} CPUs available, llama.cpp of llama-cpp-python "
          f"{records[0]['llama_cpp']['llama_cpp_python']}, nexlab {__version__}"
          + (f"; records written to {args.output}" if args.output else ""))
    return 0


def _cmd_stock(args: argparse.Namespace) -> int:
    r = make_stock_q4_k_m(args.input, args.output, imatrix=args.imatrix, threads=args.threads,
                          show_progress=not args.quiet)
    kinds: dict[str, int] = {}
    for v in r["expert_types"].values():
        kinds[v] = kinds.get(v, 0) + 1
    print(f"wrote {r['path']} ({r['file_bytes'] / 2**20:.1f} MiB); routed experts: "
          + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    return 0


def _cmd_bandwidth(args: argparse.Namespace) -> int:
    if not args.gib > 0:
        raise NexlabError(f"--gib must be a positive size in GiB, got {args.gib}")
    r = measure_bandwidth(int(args.gib * 2**30), int_at_least(args.repeats, "--repeats", 1))
    print(f"copy of {r['nbytes'] / 2**30:.3g} GiB, best of {r['repeats']}: {r['copy_gb_s']:.2f} GB/s copied, "
          f"{r['read_write_gb_s']:.2f} GB/s read+write (roofline figure; numpy, one thread)")
    return 0


def register_cli(subparsers) -> None:
    """``nexlab bench FILE ...``, ``nexlab stock IN -o OUT``, ``nexlab bandwidth``."""
    p = subparsers.add_parser(
        "bench", help="llama-bench and llama-batched-bench on GGUF files (records as tables or JSON)",
        description="Run llama.cpp's llama-bench (single stream pp/tg) and llama-batched-bench (B parallel "
                    "streams) on each file and thread count; nexlab times nothing itself. batched-bench gets "
                    "-c max(B)*(npl-pp+npl-tg) so every stream count fits.")
    p.add_argument("files", nargs="+", metavar="FILE", help="GGUF model files")
    p.add_argument("--label", action="append", default=None,
                   help="variant label, once per file in order (default: from the file name)")
    p.add_argument("--pp", type=int, default=512, help="llama-bench prompt tokens (-p; 0 skips; default 512)")
    p.add_argument("--tg", type=int, default=64, help="llama-bench generated tokens (-n; 0 skips; default 64)")
    p.add_argument("--reps", type=int, default=5, help="llama-bench repetitions (-r; default 5)")
    p.add_argument("--parallel", default="1,2,4,8", help="batched-bench stream counts (-npl; default 1,2,4,8)")
    p.add_argument("--npl-pp", type=int, default=512, help="batched-bench prompt tokens per stream (default 512)")
    p.add_argument("--npl-tg", type=int, default=128, help="batched-bench generated tokens per stream (default 128)")
    p.add_argument("-t", "--threads", default=None,
                   help="thread counts, e.g. 1,2 (default: the CPUs this process may use)")
    p.add_argument("-b", "--batch", type=int, default=2048, help="logical batch (-b; default 2048)")
    p.add_argument("-ub", "--ubatch", type=int, default=512, help="physical batch (-ub; default 512)")
    p.add_argument("--no-batched", action="store_true", help="skip llama-batched-bench")
    p.add_argument("--no-single", action="store_true", help="skip llama-bench")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of tables")
    p.add_argument("-o", "--output", default=None, help="also write the records as JSON to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)

    s = subparsers.add_parser("stock", help="the stock Q4_K_M (K-quant experts) from an NVFP4-BF16 GGUF",
                              description="llama-quantize --allow-requantize IN OUT Q4_K_M: the NVFP4 experts "
                                          "are dequantized and requantized with Q4_K_M's mix.")
    s.add_argument("input", help="NVFP4-BF16 GGUF (nexlab convert --variant bf16)")
    s.add_argument("-o", "--output", required=True, help="output GGUF (written atomically)")
    s.add_argument("--imatrix", default=None, help="importance matrix for llama-quantize")
    s.add_argument("-t", "--threads", type=int, default=2, help="llama-quantize threads (default 2)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_stock)

    w = subparsers.add_parser("bandwidth", help="memory bandwidth by a large numpy copy (one thread)")
    w.add_argument("--gib", type=float, default=1.0, help="array size in GiB (default 1)")
    w.add_argument("--repeats", type=int, default=5, help="copies timed, best kept (default 5)")
    w.set_defaults(func=_cmd_bandwidth)
