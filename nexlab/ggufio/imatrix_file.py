"""Importance matrices in llama.cpp's GGUF imatrix format, and the column weights llama-quantize uses.

File format (``save_imatrix`` of tools/imatrix/imatrix.cpp; read by ``common_imatrix_load`` in
common/imatrix-loader.cpp; llama.cpp as vendored by llama-cpp-python 0.3.36): ``general.type =
"imatrix"``, ``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``, and per weight
tensor ``<name>`` (sorted) ``<name>.in_sum2`` F32 ``[ne0, n_mat]`` (per input column the sum over
tokens of x^2, one row per expert) and ``<name>.counts`` F32 ``[1, n_mat]`` (tokens seen); a dense
entry is stored 1-D. In numpy an :class:`ImatrixEntry` is ``in_sum2 [n_mat, ne0]`` and ``counts
[n_mat]``; an :class:`Imatrix` holds the entries and the metadata.

:func:`write_imatrix` / :func:`read_imatrix` write and read that file (atomic; the reader applies the
loader's checks). :func:`column_weights` / :func:`quantize_weights` give what ``load_imatrix`` of
tools/quantize/quantize.cpp hands to ``ggml_quantize_chunk``: ``in_sum2 / lround(counts)`` per
expert in float32, 1 for an expert that saw no tokens. Collection is in :mod:`nexlab.analysis.imatrix`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.core.fileio import atomic_output
from nexlab.ggufio.check import open_gguf
from nexlab.ggufio.gguf_internals import drop_key

KEY_DATASETS = "imatrix.datasets"


KEY_CHUNK_COUNT = "imatrix.chunk_count"


KEY_CHUNK_SIZE = "imatrix.chunk_size"


SUFFIX_SUM2 = ".in_sum2"


SUFFIX_COUNTS = ".counts"


@dataclass
class ImatrixEntry:
    """Statistics of one weight tensor: ``in_sum2`` float32 [n_mat, ne0], ``counts`` float32 [n_mat]."""

    in_sum2: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        s = np.asarray(self.in_sum2, dtype=np.float32)
        if s.ndim == 1:
            s = s[None, :]
        c = np.asarray(self.counts, dtype=np.float32).reshape(-1)
        if s.ndim != 2 or s.shape[0] != c.shape[0] or s.shape[1] == 0:
            raise NexlabError(f"in_sum2 {s.shape} and counts {c.shape} do not describe [n_mat, ne0] and [n_mat]")
        self.in_sum2 = np.ascontiguousarray(s)
        self.counts = c

    @property
    def n_mat(self) -> int:
        return self.in_sum2.shape[0]

    @property
    def ne0(self) -> int:
        return self.in_sum2.shape[1]


@dataclass
class Imatrix:
    """A whole importance matrix: entries by GGUF tensor name plus the ``imatrix.*`` metadata."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def _validate(im: Imatrix, where: str) -> None:
    if not im.entries:
        raise NexlabError(f"{where}: imatrix has no entries")
    for name, e in im.entries.items():
        if not np.isfinite(e.in_sum2).all():
            raise NexlabError(f"{where}: imatrix entry {name}: in_sum2 has non-finite values (NaN/Inf)")
        if not np.isfinite(e.counts).all():
            raise NexlabError(f"{where}: imatrix entry {name}: counts has non-finite values (NaN/Inf)")
        if (e.in_sum2 < 0).any() or (e.counts < 0).any():
            raise NexlabError(f"{where}: imatrix entry {name}: negative sums of squares or counts")


def write_imatrix(path: str | os.PathLike, imatrix: Imatrix) -> Path:
    """Write ``imatrix`` as a GGUF imatrix file llama-quantize and llama-imatrix read.

    Key order, tensor order (sorted names, in_sum2 then counts) and tensor shapes follow
    llama-imatrix's ``save_imatrix``. The file is written to a temporary name in the target folder
    and renamed, so no half-written file is left behind.
    """

    path = Path(path)
    _validate(imatrix, str(path))
    if not imatrix.datasets:
        raise NexlabError(f"{path}: imatrix.datasets must name at least one dataset (llama-imatrix records its text "
                         "file; gguf-py cannot write an empty array)")
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        drop_key(w, gguf.Keys.General.ARCHITECTURE)  # llama-imatrix writes no architecture
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, [str(d) for d in imatrix.datasets])
        w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            s, c = e.in_sum2, e.counts
            if e.n_mat == 1:  # ggml_n_dims drops the trailing 1
                s, c = s.reshape(-1), c.reshape(1)
            else:
                c = c.reshape(e.n_mat, 1)
            w.add_tensor(name + SUFFIX_SUM2, np.ascontiguousarray(s, dtype=np.float32))
            w.add_tensor(name + SUFFIX_COUNTS, np.ascontiguousarray(c, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix with the checks of common_imatrix_load and llama-quantize.

    Raises ValueError for: a file without the ``imatrix.*`` metadata, an ``in_sum2`` without its
    ``counts`` (or the reverse), non-F32 tensors, sums whose size is not a multiple of the count size,
    non-finite values. (The legacy ``.dat`` format is not supported.)
    """


    path = Path(path)
    r = open_gguf(path, "imatrix file")  # the legacy .dat format fails here: "not a GGUF file"
    fields = r.fields
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:
        raise NexlabError(f"{path}: missing imatrix metadata {missing} (llama-quantize refuses such a file)")
    datasets = list(fields[KEY_DATASETS].contents())
    chunk_count = int(fields[KEY_CHUNK_COUNT].contents())
    chunk_size = int(fields[KEY_CHUNK_SIZE].contents())

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, dst in ((SUFFIX_SUM2, sums), (SUFFIX_COUNTS, counts)):
            if t.name.endswith(suffix):
                base = t.name[: -len(suffix)]
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise NexlabError(f"{path}: {t.name} is {t.tensor_type.name}, sums and counts must be F32")
                dst[base] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums and not counts:
        raise NexlabError(f"{path}: no imatrix entries")
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise NexlabError(f"{path}: mismatched sums and counts for {name}")
        s, c = sums[name], counts[name]
        if c.size == 0 or s.size % c.size:
            raise NexlabError(f"{path}: {name}: {s.size} sums are not a whole number of rows for {c.size} counts")
        entries[name] = ImatrixEntry(s.reshape(c.size, -1), c)
    im = Imatrix(entries, datasets, chunk_count, chunk_size)
    _validate(im, str(path))
    return im


def column_weights(entry: ImatrixEntry) -> np.ndarray:
    """The float32 importance vector llama-quantize builds for one tensor: ``[n_mat * ne0]``.

    Matches load_imatrix (GGUF format): counts are rounded with ``lround`` (half away from zero),
    then ``in_sum2 / count`` in float32 per expert; an expert with count 0 gets weights 1.
    """
    c = np.floor(np.abs(entry.counts.astype(np.float64)) + 0.5) * np.sign(entry.counts)  # lround
    cf = c.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = entry.in_sum2 / cf[:, None]
    w = np.where((cf > 0)[:, None], w, np.float32(1)).astype(np.float32)
    return np.ascontiguousarray(w.reshape(-1))


def quantize_weights(imatrix: Imatrix) -> dict[str, np.ndarray]:
    """``{name: column_weights(entry)}`` for every entry: what llama-quantize passes as
    ``llama_model_quantize_params.imatrix`` (checked for non-finite values as llama_model_quantize does)."""
    out = {}
    for name, e in imatrix.entries.items():
        w = column_weights(e)
        if not np.isfinite(w).all():
            raise NexlabError(f"imatrix entry {name}: column weights are non-finite")
        out[name] = w
    return out
