"""Throughput of nexlab's numpy K-quants against ggml's C, same tensor, one thread.

Usage: python benchmarks/bench_kquants.py [--rows 1024] [--cols 2048] [--repeats 3]

The C side is ggml_quantize_chunk from llama-cpp-python's libggml-base.so (ctypes), the function
llama-quantize calls; both sides get the same float32 tensor and the same imatrix. Prints, per type,
the best-of-N time of each side, Melem/s and the time ratio nexlab / C (the workbook's convention,
see the README: below 1 means nexlab is faster; target: <= 2), and checks that the bytes are equal.
Run it on an otherwise idle machine: the ratio is only meaningful when both sides see the same load.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from nexlab.analysis.speed import kquant_speed_vs_ggml  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    res = kquant_speed_vs_ggml(shape=(a.rows, a.cols), repeats=a.repeats, seed=a.seed)
    print(f"tensor {a.rows} x {a.cols} float32, best of {a.repeats}, single thread")
    print(f"{'case':<14} {'nexlab ms':>10} {'ggml ms':>9} {'nexlab Me/s':>12} {'ggml Me/s':>10} "
          f"{'time ratio':>10}  bytes")
    ok = True
    for k, v in res.items():
        print(
            f"{k:<14} {v['nexlab_s'] * 1e3:>10.1f} {v['ggml_s'] * 1e3:>9.1f} {v['melem_per_s_nexlab']:>12.1f}"
            f" {v['melem_per_s_ggml']:>10.1f} {v['time_ratio']:>10.2f}  {'equal' if v['bytes_equal'] else 'DIFFER'}"
        )
        ok &= v["bytes_equal"]
    print("time ratio = nexlab / ggml C (below 1: nexlab faster)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
