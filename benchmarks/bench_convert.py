"""Benchmark: nexlab's converter vs llama.cpp's convert_hf_to_gguf.py on the same checkpoint.

Both run as child processes in one invocation of this script; each child's wall time comes from
``time.perf_counter`` and its peak resident memory from GNU ``/usr/bin/time -f %M`` (the
reference wrapper ``exec``s python, so the measured process is the converter itself).
Prints both figures and the ratios nexlab / llama.cpp (below 1 is better for nexlab).

    .venv/bin/python benchmarks/bench_convert.py [CKPT_DIR] [--out-dir DIR] [--repeats N]

Default checkpoint: build/artifacts/slice/nvfp4. ``run_benchmark`` is the same as a function
(notebook 03 calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_TOOL = Path(os.environ.get("NEXLAB_REFERENCE_CONVERT", "/work/shared/tools/llamacpp-convert"))


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


def run_benchmark(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, repeats: int = 1,
                  python: str = sys.executable, keep: bool = False) -> dict:
    """Convert ``ckpt_dir`` with nexlab and with the reference converter; return times, RSS, ratios.

    Each tool runs ``repeats`` times (alternating); the best wall time and the largest peak RSS are
    reported. Output files are deleted unless ``keep``.
    """
    ckpt_dir = Path(ckpt_dir)
    tmp = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NEXLAB_NO_PROGRESS="1", PYTHON=python, PYTHONPATH=str(ROOT))
    runs: dict[str, list[dict]] = {"nexlab": [], "llamacpp": []}
    outs = {"nexlab": tmp / "nexlab.gguf", "llamacpp": tmp / "llamacpp.gguf"}
    for _ in range(repeats):
        runs["nexlab"].append(_run([python, "-m", "nexlab.cli", "convert", str(ckpt_dir), "-o", str(outs["nexlab"]), "-q"], env))
        runs["llamacpp"].append(_run([str(REFERENCE_TOOL), str(ckpt_dir), str(outs["llamacpp"])], env))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_dir", nargs="?", default=str(ROOT / "build" / "artifacts" / "slice" / "nvfp4"))
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep both GGUFs in --out-dir (to diff them)")
    a = ap.parse_args(argv)
    r = run_benchmark(a.ckpt_dir, a.out_dir, repeats=a.repeats, keep=a.keep)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"checkpoint {r['checkpoint']} ({r['checkpoint_mib']:.1f} MiB), best of {r['repeats']}")
    for k in ("nexlab", "llamacpp"):
        print(f"  {k:<9} {r[k]['seconds']:8.2f} s   peak RSS {r[k]['peak_rss_mib']:8.1f} MiB   output {r[k]['file_mib']:.1f} MiB")
    print(f"  ratio nexlab/llama.cpp: time {r['ratio_time']:.3f}, peak RSS {r['ratio_rss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
