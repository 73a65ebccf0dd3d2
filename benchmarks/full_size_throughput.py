"""Decode throughput at real size on this machine: llama-bench and llama-batched-bench on 35B files.

Usage: python benchmarks/full_size_throughput.py [--workdir build/full_size_tp] [--tg 16] [--reps 3]
                                                 [--parallel 1,2,4] [--out data/results/full_size_throughput.json]

Steps: ``nexlab synth nex-n2-mini`` (the published checkpoint's layout, random values) -> ``nexlab convert``
NVFP4-BF16 and NVFP4-Q4_K_M -> the checkpoint is deleted -> stock Q4_K_M (``llama-quantize
--allow-requantize`` of the NVFP4-BF16 file: experts Q4_K / Q6_K) -> ``nexlab bench`` on each file
(``llama-bench -p 0 -n TG``, ``llama-batched-bench`` with short prompts) -> the roofline's memory bound for this
machine at the bandwidth measured in the same run. Records go to ``data/results/full_size_throughput.json``;
notebook 06 compares them with its extrapolation from the 4-layer slice. Disk peak: checkpoint + two files
(~66 GB); everything is deleted at the end unless ``--keep``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_size import PY, ROOT, log, machine, must, run  # noqa: E402

from nexlab.analysis import bench
from nexlab.analysis import roofline as RL
from nexlab.analysis.memory import estimate
from nexlab.artifacts.synth import DISK_MARGIN, synth_config, synth_nbytes
from nexlab.core import text
from nexlab.workbook.records import write_record  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "full_size_tp")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "full_size_throughput.json")
    ap.add_argument("--tg", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parallel", default="1,2,4")
    ap.add_argument("--npl-pp", type=int, default=32)
    ap.add_argument("--npl-tg", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)


    parallel = text.parse_int_list(a.parallel, "--parallel")
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    ck_bytes = synth_nbytes(synth_config("nex-n2-mini"))
    need = ck_bytes + estimate("nex-n2-mini", "bf16", 4096).gguf_file_bytes \
        + estimate("nex-n2-mini", "q4_k_m", 4096).gguf_file_bytes + 2 * DISK_MARGIN
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"full_size_throughput: {work} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f} GB", file=sys.stderr)
        return 1
    t_start = time.time()
    res: dict = {"command": "python benchmarks/full_size_throughput.py " + " ".join(sys.argv[1:]),
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    ckpt = work / "nex-n2-mini-nvfp4"
    files = {"NVFP4-BF16": work / "Nex-N2-mini-NVFP4-BF16.gguf", "NVFP4-Q4_K_M": work / "Nex-N2-mini-NVFP4-Q4_K_M.gguf",
             "stock Q4_K_M": work / "Nex-N2-mini-stock-Q4_K_M.gguf"}
    try:
        log("nexlab synth nex-n2-mini")
        must(run([PY, "-m", "nexlab.cli", "synth", "nex-n2-mini", "-o", str(ckpt)]), "synth")
        for label, v in (("NVFP4-BF16", "bf16"), ("NVFP4-Q4_K_M", "q4_k_m")):
            log(f"nexlab convert -> {label}")
            must(run([PY, "-m", "nexlab.cli", "convert", str(ckpt), "-o", str(files[label]), "--variant", v, "-q"]),
                 label)
        shutil.rmtree(ckpt)
        log("stock Q4_K_M (llama-quantize --allow-requantize)")
        stock = bench.make_stock_q4_k_m(files["NVFP4-BF16"], files["stock Q4_K_M"], threads=a.threads,
                                        show_progress=False)
        res["stock"] = {k: stock[k] for k in ("file_bytes", "command")}
        log("bandwidth")
        bw = bench.measure_bandwidth(1 << 30, repeats=5)
        res["bandwidth"] = bw
        log(f"nexlab bench: tg{a.tg} x {a.reps}, streams {list(parallel)}, {a.threads} threads")
        labels = list(files)
        recs = bench.run_bench([files[k] for k in labels], labels=labels, pp=0, tg=a.tg, reps=a.reps, parallel=parallel,
                               npl_pp=a.npl_pp, npl_tg=a.npl_tg, threads=a.threads)
        res["records"] = recs
        res["roofline"] = {k: RL.roofline(files[k], parallel, a.npl_pp + a.npl_tg // 2, devices=[],
                                          measured_bandwidth=bw["roofline_gb_s"] * 1e9)["batches"] for k in labels}
        for k in labels:
            tg = next(r for r in recs if r["variant"] == k and r["tool"] == "llama-bench")
            log(f"  {k}: tg{a.tg} {tg['avg_ts']:.2f} ± {tg['stddev_ts']:.2f} t/s; S_TG "
                + ", ".join(f"B={r['pl']}: {r['speed_tg']:.2f}" for r in recs if r["variant"] == k
                            and r["tool"] == "llama-batched-bench"))
        res["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_record(a.out, res, started=t_start)  # with its provenance: commit, command, machine, versions
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
