"""Where the bytes of a GGUF file go: one writer set-up for writing and for predicting sizes.

A GGUF file (v3, as gguf-py's ``GGUFWriter`` and llama.cpp's ``gguf_write`` lay it out) is a 24-byte
header (magic, version, tensor count, key/value count), the key/value metadata, the tensor infos
(name, dimensions, type, offset), zero padding to ``general.alignment`` (32 unless set), then each
tensor's data padded to the alignment (the last one too).

:func:`make_writer` builds gguf-py's writer with the tensor infos and metadata of a plan, without
opening a file: :func:`nexlab.convert.write_gguf` writes through it, and :func:`file_nbytes` sizes
the same writer by packing its key/values and tensor infos with gguf-py's own packer. A size
predicted here and the file written from the same plan therefore agree byte for byte (a test
checks it for every variant).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np


def pad(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (GGML_PAD)."""
    return -(-int(n) // int(alignment)) * int(alignment)


def make_writer(arch: str, add_metadata: Callable[[Any], None], tensors: Iterable[Any]):
    """gguf-py ``GGUFWriter`` (no file yet) holding the tensor infos of ``tensors`` (objects with
    ``name``, ``shape`` in numpy order, ``ggml_type`` and ``nbytes``) and the metadata
    ``add_metadata(writer)`` adds (it may read ``writer.get_total_parameter_count()``, which already
    knows every tensor)."""
    import gguf  # noqa: PLC0415

    w = gguf.GGUFWriter(path=None, arch=arch)
    for t in tensors:
        # logical shape, marked non-uint8 so gguf-py keeps it as is (byte size given explicitly)
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    add_metadata(w)
    return w


def kv_nbytes(writer, key: str, value, vtype, sub_type=None) -> int:
    """Bytes of one key/value pair as ``write_kv_data_to_file`` packs it (gguf-py's own ``_pack_val``)."""
    import gguf  # noqa: PLC0415

    return (len(writer._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
            + len(writer._pack_val(value, vtype, add_vtype=True, sub_type=sub_type)))


def header_nbytes(writer) -> int:
    """Bytes before the first tensor's data (header, key/values, tensor infos, padding), packed with
    gguf-py's own ``_pack_val`` exactly as ``write_kv_data_to_file`` / ``write_ti_data_to_file`` do."""
    import gguf  # noqa: PLC0415

    if len(writer.tensors) != 1 or len(writer.kv_data) != 1:
        raise ValueError("split GGUF files are not sized")
    S = gguf.GGUFValueType.STRING
    n = 4 + 4 + 8 + 8
    for key, val in writer.kv_data[0].items():
        n += kv_nbytes(writer, key, val.value, val.type, val.sub_type)
    for name, ti in writer.tensors[0].items():
        n += len(writer._pack_val(name, S, add_vtype=False)) + 4 + 8 * len(ti.shape) + 4 + 8
    return pad(n, writer.data_alignment)


def file_nbytes(writer) -> int:
    """Size of the file ``writer`` would write: :func:`header_nbytes` plus every tensor's data padded
    to the alignment."""
    return header_nbytes(writer) + sum(pad(ti.nbytes, writer.data_alignment) for ti in writer.tensors[0].values())


class PlannedFile:
    """Sizes of a planned GGUF (a dataclass with ``tensors`` of ``nbytes`` and ``add_metadata``, and the
    class attribute ``arch``): ``file_nbytes`` is the exact file size from the writer's own set-up."""

    arch: str

    @property
    def file_nbytes(self) -> int:
        return file_nbytes(make_writer(self.arch, self.add_metadata, self.tensors))

    @property
    def tensor_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)
