"""What the bytes are: a GGUF file region by region, for the file map and hex dump of chapter 03.

GGUF (v3, ``gguf-py/gguf/gguf_reader.py`` and ``ggml/src/gguf.cpp`` of the llama.cpp tree that
llama-cpp-python 0.3.36 vendors), all little-endian::

    offset 0   "GGUF"  magic, 4 bytes
           4   uint32  version (3)
           8   uint64  number of tensors
          16   uint64  number of key/value pairs
          24   key/values: string key (uint64 length + UTF-8 bytes), uint32 value type, value
               (arrays: uint32 element type, uint64 count, the elements)
           ..  tensor infos: string name, uint32 n_dims, uint64 ne[n_dims] (ne0 = row length first),
               uint32 ggml type, uint64 offset of the data, relative to the data section
           ..  zero padding up to a multiple of general.alignment (32 unless the file sets it)
               data section: each tensor's bytes, each padded to the alignment

:func:`gguf_regions` walks a file with :mod:`struct` only (no gguf-py reader; the same
:class:`nexlab.ggufio.check.GGUFCursor` that checks every file nexlab reads), so the layout above is the
whole explanation; the tests check every offset it finds against gguf-py's ``GGUFReader``.
:func:`hexdump` prints bytes with the region each line starts, :func:`tensor_location` says where a
tensor's data lies.

A Q4_K super-block field by field and what the imatrix buys per tensor are chapter 04's
(:mod:`nexlab.chapters.ch04`); the header validator every reader uses is :mod:`nexlab.ggufio.check`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from nexlab.core.errors import NexlabKeyError
from nexlab.ggufio.check import DEFAULT_ALIGNMENT, VALUE_TYPE_NAMES, BadGGUFError, GGUFCursor, check_gguf
from nexlab.ggufio.layout import pad


@dataclass
class Region:
    """Bytes ``[start, end)`` of a GGUF file: ``kind`` is header, kv, tensor_info, padding or data."""

    start: int
    end: int
    kind: str
    label: str
    detail: Any = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def gguf_regions(path: str | os.PathLike) -> dict[str, Any]:
    """Walk a GGUF file and return its layout: ``version``, ``n_tensors``, ``n_kv``, ``alignment``,
    ``data_offset`` (absolute start of the data section), ``file_bytes`` and ``regions`` (a list of
    :class:`Region` in file order covering every byte: the 24-byte header split into its four fields,
    one region per key/value, one per tensor info, the padding before the data, then per tensor its
    data and the padding after it).

    Matches gguf-py's ``GGUFReader``: a key/value region starts at ``reader.fields[key].offset``, a
    tensor info at ``tensor.field.offset``, a tensor's data at ``tensor.data_offset`` (tested).
    """
    path = Path(path)
    check_gguf(path)  # a damaged file fails here, in one line naming it
    with open(path, "rb") as f:
        raw = f.read()

    def fail(kind: str, detail: str):
        raise BadGGUFError(f"GGUF file {path}: {kind}: {detail}")

    c = GGUFCursor(memoryview(raw), len(raw), fail)
    regions = [Region(0, 4, "header", "magic 'GGUF'", "GGUF")]
    c.pos = 4
    version = c.unpack("I", "the version")
    regions.append(Region(4, 8, "header", f"version = {version}", version))
    n_tensors = c.unpack("Q", "the tensor count")
    regions.append(Region(8, 16, "header", f"tensor count = {n_tensors}", n_tensors))
    n_kv = c.unpack("Q", "the key/value count")
    regions.append(Region(16, 24, "header", f"key/value count = {n_kv}", n_kv))
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        start = c.pos
        key = c.string("a key").decode("utf-8", errors="replace")
        vtype = c.unpack("I", f"the type of key {key!r}")
        value = c.value(vtype, f"the value of key {key!r}")
        if key == "general.alignment":
            alignment = int(value)
        regions.append(Region(start, c.pos, "kv", f"{key} ({VALUE_TYPE_NAMES.get(vtype, vtype)})",
                              {"key": key, "type": VALUE_TYPE_NAMES.get(vtype, vtype), "value": value}))
    infos = []
    for _ in range(n_tensors):
        start = c.pos
        name = c.string("a tensor name").decode("utf-8", errors="replace")
        n_dims = c.unpack("I", f"tensor {name!r}")
        ne = [c.unpack("Q", f"tensor {name!r}") for _ in range(n_dims)]
        ggml_type = c.unpack("I", f"tensor {name!r}")
        rel = c.unpack("Q", f"tensor {name!r}")
        infos.append((name, ne, ggml_type, rel))
        regions.append(Region(start, c.pos, "tensor_info", f"tensor info {name}",
                              {"name": name, "ne": ne, "ggml_type": ggml_type, "relative_offset": rel}))
    data_offset = pad(c.pos, alignment)
    if data_offset > c.pos:
        regions.append(Region(c.pos, data_offset, "padding", f"zero padding to a multiple of {alignment}"))
    order = sorted(range(len(infos)), key=lambda i: infos[i][3])
    for k, i in enumerate(order):
        name, ne, ggml_type, rel = infos[i]
        start = data_offset + rel
        nbytes = _tensor_nbytes(ne, ggml_type)
        end_pad = data_offset + infos[order[k + 1]][3] if k + 1 < len(order) else len(raw)
        regions.append(Region(start, start + nbytes, "data", f"data of {name}",
                              {"name": name, "ne": ne, "ggml_type": ggml_type, "relative_offset": rel}))
        if end_pad > start + nbytes:
            regions.append(Region(start + nbytes, end_pad, "padding", f"zero padding after {name}"))
    return {"path": str(path), "version": version, "n_tensors": n_tensors, "n_kv": n_kv, "alignment": alignment,
            "data_offset": data_offset, "file_bytes": len(raw), "regions": regions}


def _tensor_nbytes(ne: list[int], ggml_type: int) -> int:
    """Bytes of a tensor: rows x row size, from gguf-py's table of block sizes (GGML_QUANT_SIZES)."""

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return math.prod(ne[1:]) * (ne[0] // block) * size


def tensor_location(layout: dict[str, Any], name: str) -> dict[str, Any]:
    """Where tensor ``name`` lies in a file walked by :func:`gguf_regions`: the byte range of its
    info entry, its data (absolute ``start`` = ``data_offset`` + the info's relative offset), bytes,
    and the zero padding that follows it."""
    info = next((r for r in layout["regions"] if r.kind == "tensor_info" and r.detail["name"] == name), None)
    if info is None:
        raise NexlabKeyError(f"{layout['path']}: no tensor named {name}")
    data = next(r for r in layout["regions"] if r.kind == "data" and r.detail["name"] == name)
    i = layout["regions"].index(data)
    nxt = layout["regions"][i + 1] if i + 1 < len(layout["regions"]) else None
    pad = nxt.nbytes if nxt is not None and nxt.kind == "padding" else 0
    return {"name": name, "info_start": info.start, "info_end": info.end,
            "relative_offset": data.detail["relative_offset"],
            "start": data.start, "end": data.end, "nbytes": data.nbytes, "padding_after": pad,
            "ne": data.detail["ne"], "ggml_type": data.detail["ggml_type"]}


def hexdump(path: str | os.PathLike, start: int, length: int, regions: list[Region] | None = None,
            width: int = 16) -> str:
    """``xxd``-style lines (offset, hex bytes, ASCII) for ``[start, start + length)``; with
    ``regions``, each line ends with the labels of the regions that begin on it."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(length)
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        a = start + off
        hx = " ".join(f"{b:02x}" for b in chunk).ljust(3 * width - 1)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk).ljust(width)
        notes = [r.label for r in (regions or []) if a <= r.start < min(a + width, start + length)]
        lines.append(f"{a:08x}  {hx}  |{asc}|" + ("  <- " + "; ".join(notes) if notes else ""))
    return "\n".join(lines)
