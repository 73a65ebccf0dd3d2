"""One check of a GGUF file's structure, used by every command that reads a GGUF or imatrix file.

gguf-py's ``GGUFReader`` and llama.cpp's loader fail on a damaged file with a traceback
(``struct.error``, ``IndexError``, numpy's "mmap length is greater than file size") or a crash;
:func:`check_gguf` walks the header itself first and raises :class:`BadGGUFError` (a ValueError)
with one line that names the file and what is wrong:

* empty: the file has 0 bytes;
* wrong magic: the first 4 bytes are not ``GGUF``;
* wrong version: not 2 or 3 (the versions gguf-py and llama.cpp read), or a byte-swapped header;
* truncated: the header, or a tensor's data, runs past the end of the file;
* inconsistent: an unknown key/value or tensor type, a tensor whose row length is not a whole
  number of blocks, an offset off the file's alignment, overlapping tensors, a repeated name.

Layout (gguf-py ``constants.py``, llama.cpp ``ggml/src/gguf.cpp``), little-endian: magic, uint32
version, uint64 tensor count, uint64 key/value count; key/values (string key, uint32 value type,
value; strings are a uint64 length then bytes; arrays a uint32 item type, a uint64 count, items);
tensor infos (name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml type, uint64 offset); padding to
``general.alignment`` (default 32); tensor data at ``data_offset + offset``. Only the header is read
(memory-mapped), so checking a 21 GB file takes as long as walking its vocabulary.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from gguf import GGML_QUANT_SIZES

from nexlab.core.errors import NexlabError
from nexlab.ggufio.layout import pad

GGUF_MAGIC = gguf.GGUF_MAGIC.to_bytes(4, "little")  # b"GGUF"

SUPPORTED_VERSIONS = (2, 3)

DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # 32

#: gguf-py's value types (``GGUFValueType``) by id: their names, and the struct format (standard sizes,
#: little-endian) of the fixed-size ones; strings and arrays have their own layout
VALUE_TYPE_NAMES = {int(vt): vt.name.lower() for vt in gguf.GGUFValueType}
_VT = gguf.GGUFValueType
_STRING, _ARRAY = int(_VT.STRING), int(_VT.ARRAY)
_SCALAR = {int(vt): f for vt, f in ((_VT.UINT8, "B"), (_VT.INT8, "b"), (_VT.UINT16, "H"), (_VT.INT16, "h"),
                                    (_VT.UINT32, "I"), (_VT.INT32, "i"), (_VT.FLOAT32, "f"), (_VT.BOOL, "?"),
                                    (_VT.UINT64, "Q"), (_VT.INT64, "q"), (_VT.FLOAT64, "d"))}


class BadGGUFError(NexlabError):
    """A GGUF (or imatrix) file that cannot be read; the message names the file and the fault."""


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFHeader:
    """What :func:`check_gguf` read: enough to tell a whole file from a damaged one."""

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    tensor_info_end: int  # where the tensor infos end (before the alignment padding)
    keys: list[str] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)


def _type_sizes() -> dict[int, tuple[int, int]]:
    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


class GGUFCursor:
    """Reads little-endian GGUF fields from a buffer (the mapped file); running past its end calls
    ``fail("truncated", detail)``. :func:`check_gguf` skips values with it, the file anatomy of
    :mod:`nexlab.ggufio.regions` reads them."""

    def __init__(self, buf, size: int, fail):
        self.buf, self.size, self.pos, self.fail = buf, size, 0, fail

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail("truncated", f"{what} needs bytes up to {self.pos + n:,}, the file has {self.size:,}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int, what: str, keep: int = 4):
        """Read one value: a scalar, a string (UTF-8), or an array as ``{"type", "count", "head"}``
        (its first ``keep`` items; the others are skipped)."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what).decode("utf-8", errors="replace")
        if vtype == _ARRAY:
            etype, count = self.unpack("I", what), self.unpack("Q", what)
            name = VALUE_TYPE_NAMES.get(etype, str(etype))
            if etype in _SCALAR:  # fixed size: keep the first few, skip the rest
                size = struct.calcsize("<" + _SCALAR[etype])
                self.need(count * size, f"{what} ({count:,} items)")
                head = [struct.unpack_from("<" + _SCALAR[etype], self.buf, self.pos + i * size)[0]
                        for i in range(min(count, keep))]
                self.pos += size * count
                return {"type": name, "count": count, "head": head}
            head = [self.value(etype, f"{what} item {i}", keep) for i in range(count)][:keep]
            return {"type": name, "count": count, "head": head}
        self.fail("inconsistent", f"{what} has unknown value type {vtype}")
        return None

    def skip_value(self, vtype: int, what: str):
        """Skip one value; return it when it is a scalar (``general.alignment`` is needed)."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STRING:
            n = self.unpack("Q", what)
            self.need(n, what)
            self.pos += n
            return None
        if vtype == _ARRAY:
            itype, count = self.unpack("I", what), self.unpack("Q", what)
            if itype in _SCALAR:
                self.need(count * struct.calcsize(_SCALAR[itype]), f"{what} ({count:,} items)")
                self.pos += count * struct.calcsize(_SCALAR[itype])
            elif itype == _STRING:
                self.need(count * 8, f"{what} ({count:,} strings)")  # each string has at least its length
                buf, pos, size = self.buf, self.pos, self.size
                for _ in range(count):
                    if pos + 8 > size:
                        break
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                    if pos > size:
                        break
                self.pos = pos
                self.need(0, f"{what} ({count:,} strings)")
            elif itype == _ARRAY:
                for i in range(count):
                    self.skip_value(_ARRAY, f"{what} item {i}")
            else:
                self.fail("inconsistent", f"{what} is an array of unknown value type {itype}")
            return None
        self.fail("inconsistent", f"{what} has unknown value type {vtype}")
        return None


def check_gguf(path: str | os.PathLike, what: str = "GGUF file") -> GGUFHeader:
    """Check that ``path`` is a whole, consistent GGUF file and return its header.

    Raises FileNotFoundError when it does not exist (or is a folder), :class:`BadGGUFError` (a
    ValueError) otherwise: ``"<what> <path> is empty ..."``, ``"<what> <path> is not a GGUF file: ..."``
    (wrong magic) or ``"<what> <path>: <fault>: <detail>"`` with fault ``unsupported GGUF version``,
    ``truncated`` or ``inconsistent``.
    ``what`` says which file the command expected ("model", "imatrix file", ...).

    Kept in one function: one forward walk of the header, each field checked where it is read.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
    if not p.is_file():
        raise BadGGUFError(f"{what} {p} is not a file")

    def fail(kind: str, detail: str):
        raise BadGGUFError(f"{what} {p}: {kind}: {detail}")

    size = p.stat().st_size
    if size == 0:
        raise BadGGUFError(f"{what} {p} is empty (0 bytes: an interrupted copy or download?)")
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = GGUFCursor(buf, size, fail)
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            if size < 4:
                fail("truncated", f"{size} bytes, shorter than the 4-byte GGUF magic")
            raise BadGGUFError(f"{what} {p} is not a GGUF file: it starts with {magic!r}, a GGUF file with b'GGUF'")
        c.pos = 4
        version = c.unpack("I", "the version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                fail("unsupported GGUF version", "the header is big-endian (byte-swapped); llama.cpp here reads "
                     "little-endian files")
            fail("unsupported GGUF version", f"version {version}, nexlab and llama.cpp read versions "
                 f"{' and '.join(map(str, SUPPORTED_VERSIONS))}")
        n_tensors = c.unpack("Q", "the tensor count")
        n_kv = c.unpack("Q", "the key/value count")
        # every key/value takes at least 13 bytes (empty key, type, 1-byte value), every tensor info 28
        c.need(n_kv * 13 + n_tensors * 28, f"{n_kv:,} key/values and {n_tensors:,} tensor infos")
        keys: list[str] = []
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = c.string(f"key {i} of {n_kv}").decode("utf-8", errors="replace")
            vtype = c.unpack("I", f"the type of key {key!r}")
            value = c.skip_value(vtype, f"the value of key {key!r}")
            if key == "general.alignment":
                if vtype != 4 or not value or value & (value - 1):
                    fail("inconsistent", f"general.alignment is {value!r} (type {vtype}), it must be a uint32 "
                         "power of two")
                alignment = value
            keys.append(key)
        sizes = _type_sizes()
        tensors: list[TensorInfo] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            name = c.string(f"the name of tensor {i} of {n_tensors}").decode("utf-8", errors="replace")
            n_dims = c.unpack("I", f"tensor {name!r}")
            if n_dims > 4:
                fail("inconsistent", f"tensor {name!r} has {n_dims} dimensions, ggml has at most 4")
            ne = tuple(c.unpack("Q", f"tensor {name!r}") for _ in range(n_dims))
            ggml_type = c.unpack("I", f"tensor {name!r}")
            offset = c.unpack("Q", f"tensor {name!r}")
            if name in seen:
                fail("inconsistent", f"tensor {name!r} appears twice")
            seen.add(name)
            if ggml_type not in sizes:
                fail("inconsistent", f"tensor {name!r} has unknown ggml type {ggml_type}")
            block, type_size = sizes[ggml_type]
            if ne and ne[0] % block:
                fail("inconsistent", f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                     f"{block}-value block of its type")
            if offset % alignment:
                fail("inconsistent", f"tensor {name!r}: data offset {offset} is not a multiple of the "
                     f"alignment {alignment}")
            nbytes = math.prod(ne) // block * type_size
            tensors.append(TensorInfo(name, ne, ggml_type, offset, nbytes))
        info_end = c.pos
        data_offset = pad(c.pos, alignment)
        end = data_offset
        for t in sorted(tensors, key=lambda t: t.offset):
            if data_offset + t.offset < end:
                fail("inconsistent", f"tensor {t.name!r} overlaps the tensor before it")
            end = data_offset + t.offset + t.nbytes
            if end > size:
                fail("truncated", f"tensor {t.name!r} needs bytes up to {end:,}, the file has {size:,}")
    return GGUFHeader(p, version, size, alignment, data_offset, info_end, keys, tensors)


def open_gguf(path: str | os.PathLike, what: str = "GGUF file"):
    """:func:`check_gguf` then gguf-py's ``GGUFReader`` on the file; any reader error becomes a
    :class:`BadGGUFError` naming the file."""

    h = check_gguf(path, what)
    try:
        return gguf.GGUFReader(h.path)
    except Exception as exc:  # noqa: BLE001  gguf-py: ValueError, struct.error, IndexError, ...
        raise BadGGUFError(f"{what} {h.path}: gguf-py cannot read it: {exc}") from None
