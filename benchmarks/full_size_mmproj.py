"""Nex-N2-mini's mmproj at real size: nexlab's writer against llama.cpp's converter on the real vision tower.

Usage: python benchmarks/full_size_mmproj.py [--workdir build/full_size_mmproj] [--keep]
                                             [--out data/results/full_size_mmproj.json]

Steps: ``nexlab synth`` of Nex-N2-mini's configuration with the text part cut to 4 layers (the vision
tower, 27 blocks of width 1152, is the published one, in full; the mmproj does not read the text layers)
-> for ``--mmproj f16`` and ``bf16``: ``nexlab convert --mmproj`` and llama.cpp's ``convert_hf_to_gguf.py
--mmproj`` on the same checkpoint, each timed -> the two files compared tensor for tensor and key for key
(``nexlab.ggufio.inspector.diff_gguf``, only general.name / license / quantized_by may differ) and their sizes
against the plan of the full configuration (``nexlab.convert.mmproj.mmproj_file_nbytes`` with the same
general.name; with the name Nex-N2-mini the plan gives 899,282,976 and 902,821,920 bytes, the latter the
seed's 903 MB). Results go to ``data/results/full_size_mmproj.json``
with the time ratio nexlab / reference. About 5 GB of disk; removed at the end unless ``--keep``.
Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_size import ROOT, log, machine  # noqa: E402

from nexlab.artifacts.synth import write_synth  # noqa: E402
from nexlab.chapters.ch03 import explain_seed_size
from nexlab.convert.mmproj import convert_mmproj, mmproj_file_nbytes  # noqa: E402
from nexlab.ggufio.inspector import diff_gguf  # noqa: E402
from nexlab.llamacpp.source import run_reference_converter  # noqa: E402
from nexlab.model.config import real_config  # noqa: E402
from nexlab.workbook.records import write_record  # noqa: E402

DESCRIPTIVE = ("general.name", "general.license", "general.quantized_by")
TEXT_LAYERS = 4


def short_text_config() -> dict:
    """Nex-N2-mini's config.json with the text model cut to :data:`TEXT_LAYERS` layers (one full-attention
    layer, as every 4th is); the vision configuration untouched."""
    cfg = real_config()
    t = cfg["text_config"]
    t["num_hidden_layers"] = TEXT_LAYERS
    t["layer_types"] = t["layer_types"][:TEXT_LAYERS]
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "full_size_mmproj")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "full_size_mmproj.json")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    # general.name of both files is the folder name; "ckpt" is one gguf-py's naming heuristics leave alone
    # (a folder "Nex-N2-mini" makes llama.cpp's converter add general.basename "Nex-N2", size_label "mini")
    ckpt = a.workdir / "ckpt"
    seed = explain_seed_size()
    t_start = time.time()
    rec = {"machine": machine(), "text_layers": TEXT_LAYERS, "vision_config": real_config()["vision_config"],
           "planned": {d: mmproj_file_nbytes(real_config(), d, name=ckpt.name) for d in ("f16", "bf16")},
           "seed_plan": {"f16": seed["f16_file"], "bf16": seed["bf16_file"], "name": "Nex-N2-mini"}, "runs": {}}
    try:
        if not (ckpt / "config.json").exists():
            log(f"nexlab synth (Nex-N2-mini, text cut to {TEXT_LAYERS} layers) -> {ckpt}")
            write_synth(short_text_config(), ckpt)
        for dtype in ("f16", "bf16"):
            ours, ref = a.workdir / f"nexlab-mmproj-{dtype}.gguf", a.workdir / f"llamacpp-mmproj-{dtype}.gguf"
            t = time.perf_counter()
            convert_mmproj(ckpt, ours, dtype, show_progress=False)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            run_reference_converter(ckpt, ref, mmproj=dtype)
            t_ref = time.perf_counter() - t
            diff = diff_gguf(ours, ref, skip_key_prefixes=DESCRIPTIVE)
            run = {"nexlab_bytes": ours.stat().st_size, "reference_bytes": ref.stat().st_size,
                   "planned_bytes": rec["planned"][dtype], "differences": diff, "nexlab_s": t_ours,
                   "reference_s": t_ref, "time_ratio": t_ours / t_ref}
            rec["runs"][dtype] = run
            log(f"{dtype}: nexlab {run['nexlab_bytes']:,} B in {t_ours:.1f} s, llama.cpp {run['reference_bytes']:,} B "
                f"in {t_ref:.1f} s (ratio {run['time_ratio']:.2f}), plan {run['planned_bytes']:,} B, "
                f"{len(diff)} differences")
            ours.unlink()
            ref.unlink()
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    rec["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # equal: every tensor and every non-descriptive key as llama.cpp's, and nexlab's size = the plan's; the
    # reference file is smaller by the descriptive keys nexlab adds (general.license, general.quantized_by)
    rec["equal"] = all(not r["differences"] and r["nexlab_bytes"] == r["planned_bytes"] for r in rec["runs"].values())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_record(a.out, rec, started=t_start)  # with its provenance: commit, command, machine, versions
    print(f"{'equal' if rec['equal'] else 'DIFFERENT'}: f16 {rec['runs']['f16']['nexlab_bytes']:,} B "
          f"({rec['runs']['f16']['nexlab_bytes'] / 1e6:.2f} MB), bf16 {rec['runs']['bf16']['nexlab_bytes']:,} B "
          f"({rec['runs']['bf16']['nexlab_bytes'] / 1e6:.2f} MB); wrote {a.out}")
    return 0 if rec["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
