#!/usr/bin/env python
"""Throughput of nexlab's NVFP4 (ggml layout) quantize/dequantize against libggml's C.

Both sides run on one thread over the same Gaussian float32 tensor: nexlab's vectorised
numpy (``quantize_nvfp4_ggml`` / ``dequantize_nvfp4_ggml``) and libggml-base's
``quantize_row_nvfp4_ref`` / ``dequantize_row_nvfp4`` through ctypes. Each is run once to
warm up and check that the outputs are identical, then ``--repeat`` times; the median
time is reported as Melem/s, with the time ratio nexlab / ggml (the workbook's convention, see
the README: below 1 means nexlab is faster).

    python benchmarks/bench_nvfp4.py --rows 512 --cols 4096 --repeat 5 --json build/bench_nvfp4.json

The measurement itself is ``nexlab.analysis.speed.nvfp4_speed_vs_ggml`` (notebook 01 calls it too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from nexlab.analysis.speed import nvfp4_speed_vs_ggml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512, help="tensor rows (default 512)")
    ap.add_argument("--cols", type=int, default=4096, help="tensor columns, a multiple of 64 (default 4096)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions after one warm-up (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result dict to this file")
    args = ap.parse_args(argv)


    try:
        res = nvfp4_speed_vs_ggml(args.rows, args.cols, args.repeat, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"NVFP4, {res['rows']} x {res['cols']} = {res['elements']:,} values, median of {res['repeat']}, 1 thread")
    print(f"{'':12s}{'nexlab':>12s}{'ggml C':>12s}{'time ratio':>12s}"
          "   (Melem/s; time ratio = nexlab / ggml, below 1: nexlab faster)")
    for op in ("quantize", "dequantize"):
        nx, gg = res[f"nexlab_{op}_melem_s"], res[f"ggml_{op}_melem_s"]
        print(f"{op:12s}{nx:12.1f}{gg:12.1f}{res[f'{op}_time_ratio']:12.2f}")
    print(f"ModelOpt-semantics quantize (no C counterpart): {res['nexlab_modelopt_quantize_melem_s']:.1f} Melem/s")
    print(f"bytes identical: {res['quantize_bytes_identical']}, values identical: {res['dequantize_values_identical']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.json.parent, prefix=args.json.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, args.json)
    ok = res["quantize_bytes_identical"] and res["dequantize_values_identical"]
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
