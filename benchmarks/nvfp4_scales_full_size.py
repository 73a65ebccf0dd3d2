"""NVFP4 scale rules at real size: time to quantize Nex-N2-mini's 32B expert parameters on this machine.

Usage: python benchmarks/nvfp4_scales_full_size.py [--workdir build/full_size_scales] [--layers 40]
                                                   [--methods max,4over6,search] [--keep]
                                                   [--out data/results/nvfp4_scales_full_size.json]

Steps: ``nexlab synth nex-n2-mini`` (the published checkpoint's tensor names and shapes, 40 layers x 256
experts as ModelOpt NVFP4, ~24 GB; kept between runs with ``--keep``) -> per layer, the routed experts
(gate / up / down stacks, [256, 512, 2048] and [256, 2048, 512]) and the shared expert are read and
dequantized to float32, as ``nexlab convert --experts nvfp4`` reads a BF16 checkpoint's layer -> each scale
rule quantizes them as the converter does (:func:`nexlab.convert.plan._quantize_expert_group`'s call:
``nexlab.formats.scales.quantize_nvfp4_group`` on the gate+up pair and on down, one tensor scale per expert).
It times reading+dequantizing and each rule separately (wall seconds, one process, torch's threads =
the cores), and prints the total per rule for all layers with the ratio to ``max`` (ModelOpt's rule,
the reference). Errors are not compared here: the synthetic weights already lie on an NVFP4 grid, so
``max`` reproduces them exactly; notebook 07 measures quality on the trained tiny model.
Results go to ``data/results/nvfp4_scales_full_size.json`` with the machine described. Not part of
``make test``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_size import ROOT, log, machine  # noqa: E402

from nexlab.artifacts.synth import write_synth  # noqa: E402
from nexlab.core.progress import progress  # noqa: E402
from nexlab.formats.nvfp4 import dequantize_nvfp4_modelopt  # noqa: E402
from nexlab.formats.scales import METHODS, quantize_nvfp4_group  # noqa: E402
from nexlab.model.checkpoint import Checkpoint  # noqa: E402
from nexlab.workbook.records import write_record  # noqa: E402


def _dequant(ck: Checkpoint, module: str) -> np.ndarray:
    import torch  # noqa: PLC0415  (heavy: only once the arguments are checked)

    w = ck.load(module + ".weight").numpy()
    s = ck.load(module + ".weight_scale").view(torch.uint8).numpy()
    return dequantize_nvfp4_modelopt(w, s, float(ck.load(module + ".weight_scale_2")))


def layer_weights(ck: Checkpoint, layer: int, n_expert: int) -> dict[str, list[np.ndarray]]:
    """{"experts": [gate, up, down] stacks, "shared": [gate, up, down]} as float32, from the NVFP4 quartets."""
    p = f"model.layers.{layer}.mlp."
    out = {"experts": [], "shared": []}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        first = _dequant(ck, f"{p}experts.0.{proj}")
        stack = np.empty((n_expert,) + first.shape, dtype=np.float32)
        stack[0] = first
        for e in range(1, n_expert):
            stack[e] = _dequant(ck, f"{p}experts.{e}.{proj}")
        out["experts"].append(stack)
        out["shared"].append(_dequant(ck, f"{p}shared_expert.{proj}"))
    return out


def quantize_layer(w: dict[str, list[np.ndarray]], method: str) -> None:
    for kind in ("experts", "shared"):
        g, u, d = w[kind]
        quantize_nvfp4_group([g, u], method)
        quantize_nvfp4_group([d], method)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "full_size_scales")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "nvfp4_scales_full_size.json")
    ap.add_argument("--layers", type=int, default=40, help="layers to time (the model has 40)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint for the next run")
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        print(f"error: --methods must be a comma list of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    import torch  # noqa: PLC0415  (heavy: only once the arguments are checked)

    ckpt = a.workdir / "ckpt"
    t_start = time.time()
    t0, t_synth = time.perf_counter(), None
    if not (ckpt / "config.json").exists():
        log(f"nexlab synth nex-n2-mini -> {ckpt}")
        write_synth("nex-n2-mini", ckpt)
        t_synth = time.perf_counter() - t0
    rec = {"machine": machine(), "torch_threads": torch.get_num_threads(), "layers": a.layers, "methods": methods,
           "synth_seconds": t_synth, "checkpoint_reused": t_synth is None, "per_layer": []}
    try:
        with Checkpoint(ckpt) as ck:
            n_expert = int(ck.config["num_experts"])
            n_layers = int(ck.config["num_hidden_layers"])
            if not 1 <= a.layers <= n_layers:
                print(f"error: --layers must be 1..{n_layers}", file=sys.stderr)
                return 2
            if set(methods) & {"4over6", "search"}:
                quantize_layer(layer_weights(ck, 0, 2), "search")  # compiles the candidate kernel, untimed
            for layer in progress(range(a.layers), desc="layers", unit="layer"):
                t = time.perf_counter()
                w = layer_weights(ck, layer, n_expert)
                row = {"layer": layer, "params": int(sum(x.size for v in w.values() for x in v)),
                       "read_dequantize_s": time.perf_counter() - t}
                for m in methods:
                    t = time.perf_counter()
                    quantize_layer(w, m)
                    row[f"{m}_s"] = time.perf_counter() - t
                rec["per_layer"].append(row)
                del w
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    rows = rec["per_layer"]
    rec["params"] = sum(r["params"] for r in rows)
    rec["totals_s"] = {m: sum(r[f"{m}_s"] for r in rows) for m in methods}
    rec["read_dequantize_s"] = sum(r["read_dequantize_s"] for r in rows)
    if "max" in methods:
        rec["time_ratio_vs_max"] = {m: rec["totals_s"][m] / rec["totals_s"]["max"] for m in methods}
    rec["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_record(a.out, rec, started=t_start)  # with its provenance: commit, command, machine, versions
    print(f"{rec['params'] / 1e9:.2f} B expert parameters in {len(rows)} layers; read+dequantize "
          f"{rec['read_dequantize_s']:.0f} s")
    for m in methods:
        ratio = f" (time ratio to max {rec['time_ratio_vs_max'][m]:.2f})" if "max" in methods else ""
        print(f"  {m:7s} {rec['totals_s'][m]:7.1f} s = {rec['totals_s'][m] / 60:.1f} min, "
              f"{rec['params'] / rec['totals_s'][m] / 1e6:.0f} M params/s{ratio}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
