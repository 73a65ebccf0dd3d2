"""Full-size rehearsal: the real Nex-N2-mini's shapes end to end on this machine, measured in one run.

Usage: python benchmarks/full_size.py [--workdir build/full_size] [--imatrix-ctx 128] [--imatrix-chunks 2]
                                      [--skip-reference-converter] [--out data/results/full_size.json]

Steps (every command a child process, timed, with its own peak RSS reported by a small launcher):

1. the disk-write bound of the work folder for the NVFP4-BF16 file: buffered writes of its size, then
   fsync, as nexlab's writer writes (a bound no conversion can beat); every timed run below starts with
   its inputs evicted from the page cache;
2. ``nexlab synth nex-n2-mini``: a random-weight checkpoint with the published layout (~23 GB);
3. ``nexlab convert`` -> NVFP4-BF16; file size against ``predict_file_size`` and tensor data against
   ``nexlab memory`` (``memory.estimate``) and the seed's 21.31 GiB; time against the write bound;
4. llama.cpp (llama-cpp-python) loads the file and decodes a few tokens (finite logits);
   llama.cpp's allocated KV-cache and recurrent-state bytes at a 262144-token context against
   ``nexlab memory``;
5. ``nexlab imatrix`` on the BF16 GGUF (through llama.cpp's evaluation callback) and ``llama-imatrix``
   on the same file, text, context and chunks: time, RSS, largest relative difference;
6. per variant (NVFP4-Q8_0, NVFP4-Q4_K_M with the imatrix): ``nexlab convert`` from the checkpoint and
   ``llama-quantize`` of the BF16 file (NVFP4 tensors kept by ``--tensor-type``): time, RSS, sha256 of
   the tensor data of both (equal = nexlab wrote llama.cpp's bytes), llama.cpp decodes nexlab's file;
   each file is deleted after use, so the disk peak is checkpoint + BF16 + one variant (~67 GB);
7. llama.cpp's own converter (``convert_hf_to_gguf.py`` of the pinned tree) on the same checkpoint:
   time and peak RSS, or how it failed (out of memory, time limit); its tensor data against nexlab's.

Results (with the machine described) go to ``data/results/full_size.json``; notebooks 03 and 05 plot
them. Everything in the work folder is removed at the end unless ``--keep``. Not part of
``make test``: it needs ~70 GB of free disk and about half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import gguf
import numpy as np

from nexlab.analysis import memory
from nexlab.analysis.bench import device_info, llama_cpp_build
from nexlab.artifacts.checkpoints import default_artifacts_dir
from nexlab.artifacts.synth import DISK_MARGIN, synth_config, synth_nbytes
from nexlab.artifacts.tiny import ensure_text_and_tokenizer
from nexlab.convert.text import predict_file_size
from nexlab.core.fileio import evict_from_page_cache
from nexlab.llamacpp.build import tool_path
from nexlab.llamacpp.source import reference_command
from nexlab.model import hparams as Q
from nexlab.workbook.records import write_record
from nexlab.workbook.results import versions

ROOT = Path(__file__).resolve().parent.parent
SEED_GIB = {"bf16": 21.31, "q8_0": 19.30, "q4_k_m": 18.41}  # the seed's model card (tensor data, GiB)
LLAMA_TYPE = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
KEEP_NVFP4 = r"ffn_(gate|up|down)_(exps|shexp)=nvfp4"  # llama-quantize --tensor-type: NVFP4 kept as is
PY = sys.executable


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# The measured command runs under a small launcher: a child forked from this (large) process would
# inherit its resident size as a starting high-water mark (Linux keeps the pre-exec address space's
# peak in ru_maxrss), so the launcher, a fresh interpreter, starts the command and reports its
# children's peak RSS (RUSAGE_CHILDREN), which only the command itself can raise.
_LAUNCHER = (
    "import os, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))\n"
    "sys.exit(rc if rc >= 0 else 128 - rc)\n"
)


def run(cmd: list[str], *, env: dict | None = None, timeout: float | None = None, cwd=None) -> dict:
    """Run ``cmd``; wall seconds, its own peak RSS (bytes), exit status (128 + N: killed by signal N),
    whether the time limit stopped it, the tail of its output."""

    t0 = time.perf_counter()
    fd, rss_file = tempfile.mkstemp(prefix="full_size.rss.")
    os.close(fd)
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen([PY, "-c", _LAUNCHER, rss_file, *map(str, cmd)], stdout=out, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd, start_new_session=True)
        timed_out = False
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            timed_out = True
        out.seek(0)
        tail = out.read()[-4000:].decode("utf-8", "replace")
    try:
        rss = int(Path(rss_file).read_text() or 0)
    except (OSError, ValueError):
        rss = 0
    Path(rss_file).unlink(missing_ok=True)
    return {"cmd": " ".join(map(str, cmd)), "seconds": round(time.perf_counter() - t0, 2),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "max_rss_bytes": rss, "returncode": p.returncode, "timed_out": timed_out, "tail": tail[-1500:]}


def must(r: dict, what: str) -> dict:
    if r["returncode"] != 0:
        raise SystemExit(f"{what} failed ({r['returncode']}):\n{r['tail']}")
    return r


def python_json(code: str, *, timeout: float | None = None) -> tuple[dict, dict]:
    """Run ``code`` (which prints one JSON line last) in a child interpreter: (its JSON, run record)."""
    r = must(run([PY, "-c", code], timeout=timeout), "python step")
    last = [ln for ln in r["tail"].splitlines() if ln.startswith("{")][-1]
    return json.loads(last), r


def tensor_data_sha256(path: Path) -> tuple[str, int]:
    """One sha256 over every tensor's bytes, taken in name order (each tensor's own sha256, then a
    digest of "name type digest" lines), and the number of tensor bytes: equal digests = the same
    tensors with the same types and bytes, whatever order the file stores them in."""

    lines, n = [], 0
    for t in gguf.GGUFReader(str(path)).tensors:
        data = np.asarray(t.data).reshape(-1).view(np.uint8)
        h = hashlib.sha256()
        for i in range(0, data.size, 64 << 20):
            h.update(data[i:i + (64 << 20)])
        lines.append(f"{t.name} {t.tensor_type.name} {h.hexdigest()}")
        n += data.size
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest(), n


def machine() -> dict:
    """The machine as nexlab.analysis.bench describes it for every benchmark record (CPU, cores, memory), with
    ``cores`` the logical CPUs, the kernel, the package versions and how llama.cpp was built."""

    dev = device_info()
    return {**dev, "cores": dev["logical_cpus"], "kernel": platform.release(), "versions": versions(),
            "llama_cpp_build": llama_cpp_build()}


def write_bound(folder: Path, nbytes: int, piece: int = 16 << 20) -> dict:
    """The disk-write bound of a converter writing an ``nbytes`` file: buffered writes of ``piece`` bytes,
    then fsync, as nexlab's writer does (:func:`nexlab.core.fileio.atomic_output`), timed from open to
    the end of the fsync. No conversion that writes a file of this size to this folder can beat it."""
    f = folder / "write-bound.bin"
    buf = np.random.default_rng(0).integers(0, 256, piece, dtype=np.uint8).tobytes()  # not zeros: no sparse tricks
    t = time.perf_counter()
    with open(f, "wb") as out:
        left = nbytes
        while left > 0:
            left -= out.write(buf[:min(piece, left)])
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - t
    f.unlink(missing_ok=True)
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds,
            "method": f"buffered writes of {piece >> 20} MiB pieces of the NVFP4-BF16 file's size, then fsync"}


DECODE = """
import json, time, numpy as np
from nexlab.llamacpp.runtime import open_model
t = time.perf_counter()
m = open_model({path!r}, 64, n_threads={threads})
load = time.perf_counter() - t
ids = list(range(100, 100 + {n}))
t = time.perf_counter(); m.eval(ids); ev = time.perf_counter() - t
l = np.asarray(m.scores[:{n}])
print(json.dumps({{"load_s": load, "eval_s": ev, "tokens": {n}, "finite": bool(np.isfinite(l).all()),
                  "logit_std": float(l.std()), "n_vocab": int(l.shape[1])}}))
"""

PROBE = """
import json
from nexlab.analysis import memory
from nexlab.llamacpp.runtime import LlamaCppProbe
with LlamaCppProbe({path!r}) as p:
    a = p.allocate({n_ctx})
    size = p.model_size()
e = memory.estimate({path!r}, None, n_ctx={n_ctx})
a.pop("log", None)
print(json.dumps({{"llama": a, "llama_model_size": size, "nexlab": {{"kv_bytes": e.kv_bytes,
                  "recurrent_bytes": e.recurrent_bytes, "weights_bytes": e.weights_bytes, "n_ctx": e.n_ctx}}}}))
"""

IMATRIX_DIFF = """
import json
from nexlab.analysis.imatrix import compare_imatrix, unrouted_experts
from nexlab.ggufio.imatrix_file import read_imatrix
a, b = read_imatrix({a!r}), read_imatrix({b!r})
never = unrouted_experts(a)
print(json.dumps({{**compare_imatrix(a, b), "unrouted_experts": {{str(k): v for k, v in never.items()}},
                  "unrouted_same_as_llama_imatrix": never == unrouted_experts(b)}}))
"""


def _hp(cfg: dict):

    return Q.hparams_from_hf_config(cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="nex-n2-mini", help="configuration to rehearse (tiny/slice: a dry run)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "full_size")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "full_size.json")
    ap.add_argument("--imatrix-ctx", type=int, default=128)
    ap.add_argument("--imatrix-chunks", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--n-ctx", type=int, default=262144)
    ap.add_argument("--skip-reference-converter", action="store_true")
    ap.add_argument("--reference-timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)


    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    cfg = synth_config(a.config)
    ck_bytes = synth_nbytes(cfg)
    bf16_est = memory.estimate(a.config if a.config == "nex-n2-mini" else _hp(cfg), "bf16", n_ctx=a.n_ctx)
    need = ck_bytes + 2 * bf16_est.gguf_file_bytes + 2 * DISK_MARGIN
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"full_size: {work} has {free / 1e9:.1f} GB free, the rehearsal needs {need / 1e9:.1f} GB at its peak "
              f"(checkpoint {ck_bytes / 1e9:.1f} GB + NVFP4-BF16 + one more variant)", file=sys.stderr)
        return 1
    t_start = time.time()
    res: dict = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT))
                                                  if Path(sys.argv[0]).is_absolute() else sys.argv[0]]
                                                 + sys.argv[1:]),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                 "workdir_free_bytes": free, "seed_tensor_gib": SEED_GIB}
    res["config"] = a.config
    ckpt, bf16 = work / f"{a.config}-nvfp4", work / f"{a.config}-NVFP4-BF16.gguf"
    calib = ensure_text_and_tokenizer(default_artifacts_dir())["calib_text"]
    threads = str(a.threads)

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_record(a.out, res, started=t_start)  # with its provenance: commit, command, machine, versions

    try:
        log(f"nexlab synth {a.config}")
        r = must(run([PY, "-m", "nexlab.cli", "synth", a.config, "-o", str(ckpt)]), "synth")
        res["synth"] = {**r, "bytes": ck_bytes, "bytes_per_s": ck_bytes / r["seconds"]}
        log(f"  {r['seconds']:.0f} s, {r['max_rss_bytes'] / 2**30:.2f} GiB RSS")
        save()

        pred = {}
        for v in ("bf16", "q8_0", "q4_k_m"):
            est = memory.estimate(a.config if a.config == "nex-n2-mini" else _hp(cfg), v, n_ctx=a.n_ctx)
            pred[v] = {"file_bytes_from_checkpoint": predict_file_size(ckpt, v),
                       "tensor_bytes_nexlab_memory": est.weights_bytes,
                       "tensor_gib_nexlab_memory": round(est.weights_bytes / 2**30, 2)}
        res["predicted"] = pred
        res["page_cache"] = "every timed run's inputs evicted first (fsync + posix_fadvise DONTNEED)"
        log(f"disk-write bound for {pred['bf16']['file_bytes_from_checkpoint'] / 1e9:.1f} GB in {work}")
        res["disk_write_bound"] = write_bound(work, pred["bf16"]["file_bytes_from_checkpoint"])
        log(f"  {res['disk_write_bound']['bytes_per_s'] / 1e6:.0f} MB/s")

        log("nexlab convert -> NVFP4-BF16")
        evict_from_page_cache(ckpt)  # synth just wrote it: no warm cache for nexlab that llama.cpp's converter lacks
        r = must(run([PY, "-m", "nexlab.cli", "convert", str(ckpt), "-o", str(bf16), "-q"]), "convert bf16")
        bound = res["disk_write_bound"]["bytes_per_s"]
        size = bf16.stat().st_size
        sha, data_len = tensor_data_sha256(bf16)
        res["convert"] = {"bf16": {**r, "file_bytes": size, "bytes_per_s": size / r["seconds"],
                                   "time_over_disk_bound": r["seconds"] / (size / bound),
                                   "file_equals_prediction": size == pred["bf16"]["file_bytes_from_checkpoint"],
                                   "tensor_data_sha256": sha}}
        log(f"  {r['seconds']:.0f} s ({r['seconds'] / (size / bound):.2f}x the disk-write bound), "
            f"{r['max_rss_bytes'] / 2**30:.2f} GiB RSS")
        save()

        log("llama.cpp decodes NVFP4-BF16")
        dec, r = python_json(DECODE.format(path=str(bf16), threads=a.threads, n=a.decode_tokens))
        res["decode"] = {"bf16": {**dec, "seconds": r["seconds"], "max_rss_bytes": r["max_rss_bytes"]}}
        log(f"  {dec}")
        log(f"llama.cpp allocates a {a.n_ctx}-token context")
        probe, r = python_json(PROBE.format(path=str(bf16), n_ctx=a.n_ctx))
        res["context"] = {**probe, "seconds": r["seconds"], "max_rss_bytes": r["max_rss_bytes"]}
        res["convert"]["bf16"]["llama_model_size"] = probe["llama_model_size"]
        save()

        im_ours, im_ref = work / "nexlab.imatrix.gguf", work / "llama.imatrix.gguf"
        log("imatrix: nexlab (llama.cpp callback) and llama-imatrix")
        evict_from_page_cache(bf16, calib)
        r1 = must(run([PY, "-m", "nexlab.cli", "imatrix", str(bf16), "--text", str(calib), "--ctx", str(a.imatrix_ctx),
                       "--chunks", str(a.imatrix_chunks), "--threads", threads, "-o", str(im_ours)]), "nexlab imatrix")
        evict_from_page_cache(bf16, calib)
        r2 = must(run([str(tool_path("llama-imatrix")), "-m", str(bf16), "-f", str(calib), "-c", str(a.imatrix_ctx),
                       "--chunks", str(a.imatrix_chunks), "-t", threads, "--no-ppl", "-o", str(im_ref)]),
                  "llama-imatrix")  # the command nexlab.analysis.imatrix.run_llama_imatrix runs, timed as a child here
        diff, _ = python_json(IMATRIX_DIFF.format(a=str(im_ours), b=str(im_ref)))
        res["imatrix"] = {"nexlab": r1, "llama_imatrix": r2, "time_ratio": r1["seconds"] / r2["seconds"], **diff}
        log(f"  nexlab {r1['seconds']:.0f} s, llama-imatrix {r2['seconds']:.0f} s, {diff}")
        save()

        for v in ("q8_0", "q4_k_m"):
            ours, theirs = work / f"nexlab-{v}.gguf", work / f"llama-{v}.gguf"
            imat = ["--imatrix", str(im_ours)] if v == "q4_k_m" else []
            log(f"nexlab convert -> NVFP4-{v.upper()}")
            evict_from_page_cache(ckpt, im_ours)
            r1 = must(run([PY, "-m", "nexlab.cli", "convert", str(ckpt), "-o", str(ours), "--variant", v, "-q", *imat]),
                      f"convert {v}")
            size = ours.stat().st_size
            sha1, n1 = tensor_data_sha256(ours)
            dec, _ = python_json(DECODE.format(path=str(ours), threads=a.threads, n=a.decode_tokens))
            res["decode"][v] = dec
            ours.unlink()
            log(f"  {r1['seconds']:.0f} s, {r1['max_rss_bytes'] / 2**30:.2f} GiB RSS; llama-quantize {LLAMA_TYPE[v]}")
            evict_from_page_cache(bf16, im_ours)
            r2 = must(run([str(tool_path("llama-quantize")), "--tensor-type", KEEP_NVFP4, *imat, str(bf16), str(theirs),
                           LLAMA_TYPE[v], threads]), f"llama-quantize {v}")
            sha2, n2 = tensor_data_sha256(theirs)
            theirs.unlink()
            res["convert"][v] = {**r1, "file_bytes": size, "tensor_data_bytes": n1,
                                 "file_equals_prediction": size == pred[v]["file_bytes_from_checkpoint"],
                                 "tensor_data_sha256": sha1, "llama_quantize": r2,
                                 "tensor_data_equals_llama_quantize": sha1 == sha2 and n1 == n2,
                                 "time_ratio_vs_llama_quantize": r1["seconds"] / r2["seconds"]}
            log(f"  llama-quantize {r2['seconds']:.0f} s; tensor data equal: {sha1 == sha2}")
            save()

        if not a.skip_reference_converter:
            bf16.unlink()  # room for the reference converter's file
            ref = work / "llamacpp-convert.gguf"
            log("llama.cpp's convert_hf_to_gguf.py on the same checkpoint")
            cmd, env = reference_command(ckpt, ref, tokenizer_pre="qwen35")
            evict_from_page_cache(ckpt)
            r = run(cmd, env=env, cwd=Path(cmd[1]).parent, timeout=a.reference_timeout)
            entry = {**r, "outcome": "ok" if r["returncode"] == 0 else
                     ("time limit" if r["timed_out"] else
                      ("killed (out of memory)" if r["returncode"] == 128 + 9 else "failed"))}
            if r["returncode"] == 0:
                sha, n = tensor_data_sha256(ref)
                entry["tensor_data_equals_nexlab"] = sha == res["convert"]["bf16"]["tensor_data_sha256"]
                entry["time_ratio_nexlab_over_reference"] = res["convert"]["bf16"]["seconds"] / r["seconds"]
                entry["rss_ratio_nexlab_over_reference"] = (res["convert"]["bf16"]["max_rss_bytes"]
                                                            / max(r["max_rss_bytes"], 1))
            ref.unlink(missing_ok=True)
            res["reference_converter"] = entry
            log(f"  {entry['outcome']}, {r['seconds']:.0f} s, {r['max_rss_bytes'] / 2**30:.2f} GiB RSS")
        res["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        save()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
