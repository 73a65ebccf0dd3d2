"""The one place nexlab reaches into gguf-py's writer beyond its public API (gguf==0.19.0, pinned).

Three things the public ``GGUFWriter`` does not offer, each needed to match llama.cpp byte for byte:

- the packed size of a key/value or a tensor-info name, to know a file's exact size before writing it
  (:mod:`nexlab.ggufio.layout`): the writer's own ``_pack_val``, so the prediction cannot drift from
  what ``write_kv_data_to_file`` writes;
- the key/value table of the (single) output file, ``kv_data[0]``: to read it for sizing, to move keys to
  the end (``llama_model_quantize`` re-appends ``general.quantization_version`` and ``general.file_type``)
  and to drop ``general.architecture`` (``llama-imatrix`` writes none).

A gguf-py upgrade that changes these internals fails here, in one module, and in the byte-equality tests.
"""

from __future__ import annotations

from typing import Any, Iterable

import gguf


def kv_table(writer: gguf.GGUFWriter) -> dict[str, Any]:
    """The writer's key/value table (key -> ``GGUFValue`` with ``value``, ``type``, ``sub_type``) of its one file."""
    return writer.kv_data[0]


def move_keys_to_end(writer: gguf.GGUFWriter, keys: Iterable[str]) -> None:
    """Re-append ``keys`` (in this order) after every other key, as ``gguf_set_val_*`` on an existing key does."""
    kv = kv_table(writer)
    for k in keys:
        kv[k] = kv.pop(k)


def drop_key(writer: gguf.GGUFWriter, key: str) -> None:
    """Remove ``key`` if present (``GGUFWriter(arch=...)`` always adds ``general.architecture``)."""
    kv_table(writer).pop(key, None)


def packed_string_nbytes(writer: gguf.GGUFWriter, s: str) -> int:
    """Bytes of a GGUF string (uint64 length + UTF-8) as the writer packs it."""
    return len(writer._pack_val(s, gguf.GGUFValueType.STRING, add_vtype=False))


def packed_value_nbytes(writer: gguf.GGUFWriter, value, vtype, sub_type=None) -> int:
    """Bytes of a typed value (its uint32 type, then the value; arrays with their item type and count)."""
    return len(writer._pack_val(value, vtype, add_vtype=True, sub_type=sub_type))
