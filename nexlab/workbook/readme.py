"""``nexlab readme [--check]``: the measured figures of README.md, written from the committed records.

Every figure README.md quotes from a benchmark lives between two markers::

    <!-- nexlab readme: full_size -->
    ...generated text...
    <!-- /nexlab readme: full_size -->

and is rendered here from ``data/results/NAME.json`` (:mod:`nexlab.workbook.records`), never typed by hand.
``nexlab readme`` rewrites those blocks; ``nexlab readme --check`` (and tests/test_readme.py) fails when
the text and the records disagree, naming the block. Each block starts with the record's provenance
line (the command, the commit, how many commits of ``nexlab/`` it is behind), so a reader sees how old
a figure is.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Callable

from nexlab.core.errors import NexlabError
from nexlab.core.fileio import atomic_write_text
from nexlab.workbook.records import REPO_ROOT, describe_record
from nexlab.workbook.results import COMMITTED_RESULTS

README = REPO_ROOT / "README.md"

_BLOCK = re.compile(r"(<!-- nexlab readme: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /nexlab readme: (?P=name) -->)",
                    re.S)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _flag(command: str, flag: str, default: int) -> int:
    m = re.search(rf"{re.escape(flag)}[ =](\d+)", command or "")
    return int(m.group(1)) if m else default


def render_full_size(rec: dict[str, Any]) -> str:
    """The full-size rehearsal (``benchmarks/full_size.py``): the machine, the table of steps and the
    sentence on sizes and llama.cpp's allocation."""
    m, conv, bound = rec["machine"], rec["convert"], rec["disk_write_bound"]
    ref, im = rec.get("reference_converter") or {}, rec["imatrix"]
    bw = bound["bytes_per_s"]
    how = bound.get("method", "`dd` with `fdatasync`")
    cmd = rec.get("command", "")
    lines = [f"{describe_record('full_size', rec)}.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; disk-write bound "
             f"{bw / 1e6:.0f} MB/s ({how}). Ratios are nexlab / reference, as everywhere:", "",
             "| step | nexlab | reference | time ratio |", "|---|---|---|---|",
             f"| synthetic checkpoint, {rec['synth']['bytes'] / 1e9:.1f} GB | {rec['synth']['seconds']:.0f} s, "
             f"{_gib(rec['synth']['max_rss_bytes'])} peak RSS | - | - |"]
    b = conv["bf16"]
    if ref.get("outcome") == "ok":
        ref_cell = f"llama.cpp's converter: {ref['seconds']:.0f} s, {_gib(ref['max_rss_bytes'])}"
        ratio = f"{b['seconds'] / ref['seconds']:.2f}"
    else:
        ref_cell, ratio = f"llama.cpp's converter: {ref.get('outcome', 'not run')}", "-"
    lines.append(f"| checkpoint -> NVFP4-BF16 ({b['file_bytes'] / 1e9:.1f} GB; the disk alone: "
                 f"{b['file_bytes'] / bw:.0f} s) | {b['seconds']:.0f} s, {_gib(b['max_rss_bytes'])} | {ref_cell} "
                 f"| {ratio} |")
    for v, label, refname in (("q8_0", "-> NVFP4-Q8_0", "`llama-quantize` of the BF16 file"),
                              ("q4_k_m", "-> NVFP4-Q4_K_M with the imatrix", "`llama-quantize`")):
        c, q = conv[v], conv[v]["llama_quantize"]
        lines.append(f"| {label} | {c['seconds']:.0f} s, {_gib(c['max_rss_bytes'])} | {refname}: "
                     f"{q['seconds']:.0f} s, {_gib(q['max_rss_bytes'])} | {c['seconds'] / q['seconds']:.2f} |")
    chunks, ctx = _flag(cmd, "--imatrix-chunks", 2), _flag(cmd, "--imatrix-ctx", 128)
    t_ours, t_ref = im["nexlab"]["seconds"], im["llama_imatrix"]["seconds"]
    lines.append(f"| imatrix, {chunks} chunks of {ctx} tokens | {t_ours:.0f} s | `llama-imatrix`: {t_ref:.0f} s "
                 f"| {t_ours / t_ref:.2f} |")
    pred = rec["predicted"]
    kv, rs, ours = rec["context"]["llama"]["kv"], rec["context"]["llama"]["rs"], rec["context"]["nexlab"]
    same = all(conv[v]["file_equals_prediction"] for v in ("bf16", "q8_0", "q4_k_m"))
    quant = all(conv[v]["tensor_data_equals_llama_quantize"] for v in ("q8_0", "q4_k_m"))
    gib = " / ".join(f"{pred[v]['tensor_gib_nexlab_memory']:.2f}" for v in ("bf16", "q8_0", "q4_k_m"))
    if "page_cache" not in rec:
        lines += ["", "These timings predate fair timing: one run of each step, nexlab's conversion right after the "
                  "checkpoint was written (its input still in the page cache), llama.cpp's converter last, the disk "
                  f"measured with `dd` (that nexlab's conversion took {b['seconds'] / (b['file_bytes'] / bw):.2f}x "
                  "of it shows it was not a bound). They "
                  "favour nexlab; the next run of the benchmark evicts every input first and measures the bound "
                  "as the converter writes."]
    lines += ["", "Tensor data " + gib
              + " GiB (NVFP4-BF16 / Q8_0 / Q4_K_M); each file " + ("equal" if same else "NOT equal")
              + " in size to the prediction from config.json; the Q8_0 and Q4_K_M tensors "
              + ("byte-identical" if quant else "NOT identical") + " to `llama-quantize`'s"
              + (", the BF16 file's to llama.cpp's converter's" if ref.get("tensor_data_equals_nexlab") else "")
              + f"; at a {rec['context']['llama']['n_ctx']:,}-token context llama.cpp allocates {kv['mib']} MiB of KV "
              f"cache and {rs['mib']} MiB of recurrent state, `nexlab memory` predicts "
              f"{ours['kv_bytes'] / 2**20:.2f} and {ours['recurrent_bytes'] / 2**20:.2f} MiB."]
    return "\n".join(lines) + "\n"


def render_full_size_mmproj(rec: dict[str, Any]) -> str:
    """Nex-N2-mini's mmproj at real size (``benchmarks/full_size_mmproj.py``)."""
    f16, bf16 = rec["runs"]["f16"], rec["runs"]["bf16"]
    return (f"{describe_record('full_size_mmproj', rec)}.\n\n"
            f"On Nex-N2-mini's real vision tower nexlab's mmproj "
            f"{'equals' if rec['equal'] else 'DIFFERS from'} llama.cpp's converter `--mmproj` tensor for tensor and "
            f"key for key: {f16['nexlab_bytes'] / 1e6:.2f} MB as F16, {bf16['nexlab_bytes'] / 1e6:.2f} MB as BF16 "
            f"(the converter writes the patch embedding as F32 for every type but F16); F16 in {f16['nexlab_s']:.1f} s "
            f"against the converter's {f16['reference_s']:.1f} s (time ratio {f16['time_ratio']:.2f}).\n")


#: block name -> (record name, renderer)
BLOCKS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "full_size": ("full_size", render_full_size),
    "full_size_mmproj": ("full_size_mmproj", render_full_size_mmproj),
}


def render(name: str) -> str:
    """The text of block ``name`` from its committed record."""
    if name not in BLOCKS:
        raise NexlabError(f"unknown README block {name!r}; known: {', '.join(BLOCKS)}")
    record, fn = BLOCKS[name]
    path = COMMITTED_RESULTS / f"{record}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python benchmarks/{record}.py` to make it")
    return fn(json.loads(path.read_text()))


def update_readme(path: str | Path = README, *, check: bool = False) -> list[str]:
    """Render every marked block of ``path``; return the names of the blocks whose text differed. With
    ``check`` nothing is written. A block without a renderer, or a renderer without a block, is an error."""
    path = Path(path)
    text = path.read_text()
    found = [m.group("name") for m in _BLOCK.finditer(text)]
    unknown = [n for n in found if n not in BLOCKS]
    missing = [n for n in BLOCKS if n not in found]
    if unknown or missing:
        raise NexlabError(f"{path}: README blocks without a renderer {unknown}, renderers without a block {missing}")
    stale: list[str] = []

    def sub(m: re.Match) -> str:
        new = render(m.group("name"))
        if m.group("body") != new:
            stale.append(m.group("name"))
        return m.group(1) + new + m.group(4)

    out = _BLOCK.sub(sub, text)
    if stale and not check:
        atomic_write_text(path, out)
    return stale


def _cli(args: argparse.Namespace) -> int:
    stale = update_readme(args.readme, check=args.check)
    if args.check:
        if stale:
            print(f"nexlab readme: {', '.join(stale)} in {args.readme} differ from data/results/: run `nexlab readme`")
            return 1
        print(f"{args.readme}: every measured block equals its record")
        return 0
    print(f"{args.readme}: rewrote {', '.join(stale)}" if stale else f"{args.readme}: already equal to the records")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("readme",
                              help="write README.md's measured figures from data/results/ (--check: compare)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when a block differs from its record")
    p.add_argument("--readme", type=Path, default=README,
                   help="the file to update (default: the repository's README.md)")
    p.set_defaults(func=_cli)
