"""Where the bytes of a GGUF file go: one writer set-up for writing and for predicting sizes.

A GGUF file (v3, as gguf-py's ``GGUFWriter`` and llama.cpp's ``gguf_write`` lay it out) is a 24-byte
header (magic, version, tensor count, key/value count), the key/value metadata, the tensor infos
(name, dimensions, type, offset), zero padding to ``general.alignment`` (32 unless set), then each
tensor's data padded to the alignment (the last one too).

:func:`make_writer` builds gguf-py's writer with the tensor infos and metadata of a plan, without
opening a file: :func:`nexlab.ggufio.writer.write_gguf` writes through it, and :func:`file_nbytes` sizes
the same writer by packing its key/values and tensor infos with gguf-py's own packer. A size
predicted here and the file written from the same plan therefore agree byte for byte (a test
checks it for every variant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from nexlab.core.errors import NexlabError
from nexlab.ggufio.gguf_internals import kv_table, packed_string_nbytes, packed_value_nbytes


def pad(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment`` (GGML_PAD)."""
    return -(-int(n) // int(alignment)) * int(alignment)


def make_writer(arch: str, add_metadata: Callable[[Any], None], tensors: Iterable[Any]):
    """gguf-py ``GGUFWriter`` (no file yet) holding the tensor infos of ``tensors`` (objects with
    ``name``, ``shape`` in numpy order, ``ggml_type`` and ``nbytes``) and the metadata
    ``add_metadata(writer)`` adds (it may read ``writer.get_total_parameter_count()``, which already
    knows every tensor)."""

    w = gguf.GGUFWriter(path=None, arch=arch)
    for t in tensors:
        # logical shape, marked non-uint8 so gguf-py keeps it as is (byte size given explicitly)
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    add_metadata(w)
    return w


def kv_nbytes(writer, key: str, value, vtype, sub_type=None) -> int:
    """Bytes of one key/value pair as ``write_kv_data_to_file`` packs it (gguf-py's own packer)."""
    return packed_string_nbytes(writer, key) + packed_value_nbytes(writer, value, vtype, sub_type)


def header_nbytes(writer) -> int:
    """Bytes before the first tensor's data (header, key/values, tensor infos, padding), packed with
    gguf-py's own ``_pack_val`` exactly as ``write_kv_data_to_file`` / ``write_ti_data_to_file`` do."""

    if len(writer.tensors) != 1 or len(writer.kv_data) != 1:
        raise NexlabError("split GGUF files are not sized")
    n = 4 + 4 + 8 + 8
    for key, val in kv_table(writer).items():
        n += kv_nbytes(writer, key, val.value, val.type, val.sub_type)
    for name, ti in writer.tensors[0].items():
        n += packed_string_nbytes(writer, name) + 4 + 8 * len(ti.shape) + 4 + 8
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


# ============================================================================ the tensor plan
def tensor_nbytes_shape(shape: tuple[int, ...], ggml_type) -> int:
    """``ggml_nbytes`` of a contiguous tensor of numpy ``shape`` (rows of ``shape[-1]`` values)."""

    qt = QT(ggml_type)
    if qt not in gguf.GGML_QUANT_SIZES:
        raise NexlabError(f"unknown ggml type {qt!r}")
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 0 for s in shape):
        raise NexlabError(f"bad tensor shape {list(shape)}")
    if shape[-1] % bs:
        raise NexlabError(f"row of {shape[-1]} values is not a multiple of {qt.name}'s block of {bs}")
    return math.prod(shape[:-1]) * (shape[-1] // bs) * ts


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor of the plan.

    ``shape`` is numpy order (``ne`` reversed); ``kind`` says how the converter makes it:
    ``"float"`` (a float HF tensor, transformed and encoded), ``"nvfp4"`` (a repacked ModelOpt
    module), ``"scale"`` / ``"input_scale"`` (F32 sidecars of NVFP4 tensors). ``hf`` names the
    source: the HF tensor for a float tensor, the HF module for NVFP4 and sidecars, and for
    stacked experts ``model.layers.N.mlp.experts.{proj}`` (``stacked`` True).
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: QT
    kind: str = "float"
    hf: str = ""
    layer: int | None = None
    stacked: bool = False

    def __post_init__(self):  # stored as the GGMLQuantizationType, given as it, its int or its name
        t = QT[self.ggml_type] if isinstance(self.ggml_type, str) else QT(self.ggml_type)
        object.__setattr__(self, "ggml_type", t)

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        return tensor_nbytes_shape(self.shape, self.ggml_type)
