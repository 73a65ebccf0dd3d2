"""``nexlab inspect FILE.gguf [--json]``: metadata and a tensor table with totals per type.

Reads the file with gguf-py's ``GGUFReader`` (memory-mapped; no tensor data is copied). Shapes are
printed in ggml order (``ne0`` first, the row length), as llama.cpp logs them. Bits per weight =
8 * bytes / elements, so NVFP4 shows 4.5 (36 bytes per 64 values) and BF16 16.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from nexlab.ggufio.check import open_gguf

_LONG_ARRAY = 16  # arrays longer than this are summarised in the text view


def _field_value(field) -> Any:
    """Plain Python value of a GGUFReader field (gguf-py's ``ReaderField.contents()``: strings
    decoded, arrays as lists)."""
    return field.contents()


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """Metadata (skipping the GGUF.* header fields), tensors and per-type totals of a GGUF file."""

    path = Path(path)
    r = open_gguf(path)
    meta = {k: _field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = []
    totals: dict[str, dict[str, float]] = {}
    for t in r.tensors:
        n = int(math.prod(int(x) for x in t.shape))
        nb = int(t.n_bytes)
        tn = t.tensor_type.name
        tensors.append({"name": t.name, "type": tn, "shape": [int(x) for x in t.shape], "elements": n,
                        "bytes": nb, "bits_per_weight": 8.0 * nb / n if n else 0.0})
        d = totals.setdefault(tn, {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += n
        d["bytes"] += nb
    for d in totals.values():
        d["bits_per_weight"] = 8.0 * d["bytes"] / d["elements"] if d["elements"] else 0.0
    n_all = sum(d["elements"] for d in totals.values())
    b_all = sum(d["bytes"] for d in totals.values())
    return {"path": str(path), "file_bytes": path.stat().st_size, "metadata": meta, "tensors": tensors,
            "totals": totals, "total": {"tensors": len(tensors), "elements": n_all, "bytes": b_all,
                                        "bits_per_weight": 8.0 * b_all / n_all if n_all else 0.0}}


def _short(v: Any) -> str:
    if isinstance(v, list) and len(v) > _LONG_ARRAY:
        return f"[{len(v)} items: {', '.join(repr(x) for x in v[:4])}, ...]"
    s = repr(v)
    return s if len(s) <= 200 else s[:197] + "..."


def format_report(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_gguf`'s result."""
    lines = [f"{info['path']}  ({info['file_bytes'] / 2**20:.2f} MiB)", "", "metadata:"]
    width = max((len(k) for k in info["metadata"]), default=0)
    lines += [f"  {k:<{width}} = {_short(v)}" for k, v in info["metadata"].items()]
    lines += ["", "tensors:"]
    nw = max((len(t["name"]) for t in info["tensors"]), default=4)
    lines.append(f"  {'name':<{nw}}  {'type':<7} {'shape (ne)':<22} {'bytes':>14} {'bpw':>7}")
    for t in info["tensors"]:
        shape = "{" + ", ".join(str(x) for x in t["shape"]) + "}"
        lines.append(f"  {t['name']:<{nw}}  {t['type']:<7} {shape:<22} {t['bytes']:>14,} {t['bits_per_weight']:>7.3f}")
    lines += ["", "totals per type:", f"  {'type':<7} {'tensors':>8} {'elements':>16} {'bytes':>16} {'bpw':>7}"]
    for k, d in sorted(info["totals"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {k:<7} {d['tensors']:>8} {d['elements']:>16,} {d['bytes']:>16,} {d['bits_per_weight']:>7.3f}")
    a = info["total"]
    lines.append(f"  {'all':<7} {a['tensors']:>8} {a['elements']:>16,} {a['bytes']:>16,} {a['bits_per_weight']:>7.3f}")
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    info = inspect_gguf(args.file)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print(format_report(info))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print a GGUF's metadata and tensor table",
                              description="Metadata, tensors (name, type, shape, bytes, bits per weight), "
                                          "totals per type.")
    p.add_argument("file", help="GGUF file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cli)


def diff_gguf(a: str | Path, b: str | Path, *, skip_key_prefixes: tuple[str, ...] = ("tokenizer.", "general."),
              compare_data: bool = True) -> list[str]:
    """Differences between two GGUF files: tensor names, types, shapes, bytes; metadata values.

    Keys starting with ``skip_key_prefixes`` are not compared (by default the vocabulary and the
    general.* descriptive fields, which legitimately differ between converters). Returns a list
    of human-readable differences (empty when the files agree).
    """

    ra, rb = GGUFReader(a), GGUFReader(b)
    out: list[str] = []
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    for n in sorted(set(ta) - set(tb)):
        out.append(f"tensor {n} only in {Path(a).name}")
    for n in sorted(set(tb) - set(ta)):
        out.append(f"tensor {n} only in {Path(b).name}")
    for n in sorted(set(ta) & set(tb)):
        x, y = ta[n], tb[n]
        if x.tensor_type != y.tensor_type:
            out.append(f"tensor {n}: type {x.tensor_type.name} vs {y.tensor_type.name}")
        elif list(x.shape) != list(y.shape):
            out.append(f"tensor {n}: shape {list(x.shape)} vs {list(y.shape)}")
        elif compare_data:
            da = np.asarray(x.data).reshape(-1).view(np.uint8)
            db = np.asarray(y.data).reshape(-1).view(np.uint8)
            if da.nbytes != db.nbytes or not np.array_equal(da, db):
                nd = int((da != db).sum()) if da.nbytes == db.nbytes else -1
                out.append(f"tensor {n}: data differs ({nd} of {da.nbytes} bytes)")
    ka = {k: _field_value(f) for k, f in ra.fields.items() if not k.startswith(("GGUF.",) + skip_key_prefixes)}
    kb = {k: _field_value(f) for k, f in rb.fields.items() if not k.startswith(("GGUF.",) + skip_key_prefixes)}
    for k in sorted(set(ka) | set(kb)):
        if k not in ka or k not in kb:
            out.append(f"key {k} only in {Path(a).name if k in ka else Path(b).name}: {_short(ka.get(k, kb.get(k)))}")
        elif ka[k] != kb[k] and not (isinstance(ka[k], float) and isinstance(kb[k], float)
                                     and np.float32(ka[k]) == np.float32(kb[k])):
            out.append(f"key {k}: {_short(ka[k])} vs {_short(kb[k])}")
    return out
