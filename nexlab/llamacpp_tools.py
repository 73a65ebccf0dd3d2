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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
