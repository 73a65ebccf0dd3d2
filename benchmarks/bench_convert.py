"""Benchmark: nexlab's converter vs llama.cpp's convert_hf_to_gguf.py on the same checkpoint.

Both run as child processes in one invocation (nexlab.analysis.speed.benchmark_conversion);
prints both wall times and peak RSS, and the ratios nexlab / llama.cpp (the workbook's
convention, see the README: a time ratio below 1 means nexlab is faster, an RSS ratio below 1
that it needs less memory).

    .venv/bin/python benchmarks/bench_convert.py [CKPT_DIR] [--out-dir DIR] [--repeats N] [--json]

Default checkpoint: build/artifacts/slice/nvfp4 (notebook 00 writes it).
"""

from __future__ import annotations

import argparse
import json
import sys

from nexlab.analysis.speed import benchmark_conversion
from nexlab.llamacpp.source import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_dir", nargs="?", default=str(REPO_ROOT / "build" / "artifacts" / "slice" / "nvfp4"))
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--repeats", type=int, default=3, help="rounds, the order alternating (default 3)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep both GGUFs in --out-dir (to diff them)")
    a = ap.parse_args(argv)
    r = benchmark_conversion(a.ckpt_dir, a.out_dir, repeats=a.repeats, keep=a.keep)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"checkpoint {r['checkpoint']} ({r['checkpoint_mib']:.1f} MiB), {r['repeats']} rounds, order alternating, "
          f"inputs evicted from the page cache before every run")
    for k in ("nexlab", "llamacpp"):
        print(f"  {k:<9} median {r[k]['seconds']:8.2f} s  min {r[k]['min_seconds']:8.2f} s   "
              f"peak RSS {r[k]['peak_rss_mib']:8.1f} MiB   output {r[k]['file_mib']:.1f} MiB")
    print(f"  time ratio nexlab / llama.cpp {r['ratio_time']:.3f} of the medians ({r['ratio_time_min']:.3f} of the "
          f"minima; below 1: nexlab faster), "
          f"peak RSS ratio {r['ratio_rss']:.3f} (below 1: nexlab smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
