"""Writing a planned GGUF: streamed one tensor at a time, atomic, sized before the first byte.

A :class:`PlannedTensor` is a :class:`nexlab.ggufio.layout.TensorSpec` (name, ``ggml_type``, shape)
plus a ``produce`` callable that returns its bytes; :func:`write_gguf` builds gguf-py's writer from
the plan (:func:`nexlab.ggufio.layout.make_writer`), refuses a folder without room for the exact
file size, then writes header, key/values and tensor infos and streams the tensors (one writer
thread puts tensor k on disk while tensor k+1 is produced). The file appears under its name only when it
is complete (:func:`nexlab.core.fileio.atomic_output`); a full disk is an OSError naming the file.

The writer knows no model: the converters (:mod:`nexlab.convert`) make the plans.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.core.fileio import atomic_output, disk_full_error, ensure_free_space
from nexlab.core.progress import progress
from nexlab.ggufio import layout as Q
from nexlab.ggufio.layout import file_nbytes, make_writer


# ----------------------------------------------------------------------------- planning
@dataclass
class PlannedTensor:
    """One output tensor: its :class:`nexlab.ggufio.layout.TensorSpec` and how to make its bytes."""

    spec: Q.TensorSpec
    produce: Callable[[], np.ndarray] = field(repr=False)
    sources: tuple[str, ...] = ()

    name = property(lambda self: self.spec.name)
    ggml_type = property(lambda self: self.spec.ggml_type)
    shape = property(lambda self: self.spec.shape)
    layer = property(lambda self: self.spec.layer)
    nbytes = property(lambda self: self.spec.nbytes)


# ----------------------------------------------------------------------------- writing
def write_gguf(out_path: str | os.PathLike, arch: str, add_metadata: Callable[[Any], None],
               tensors: list[PlannedTensor], *, show_progress: bool = True, desc: str = "write") -> Path:
    """Write a GGUF through gguf-py's writer, streaming one tensor at a time; atomic.

    ``add_metadata(writer)`` adds the key/values (it may read ``writer.get_total_parameter_count()``,
    which already knows every tensor). Tensor data comes from each ``PlannedTensor.produce()`` in
    order and must have exactly ``nbytes`` bytes. The file is written under a temporary name
    (:mod:`nexlab.core.fileio`) in the target folder, fsynced and renamed at the end; on any error
    (Ctrl-C too) the writer is closed and the temporary file removed. The exact file size is known
    from the plan, so a folder without that much free space is refused before anything is written
    (OSError with needed, free, where); a disk that fills anyway (another writer) is an OSError
    naming the file and the cause.
    """
    out = Path(out_path)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise NexlabError(f"duplicate output tensor {dup}")
    w = make_writer(arch, add_metadata, tensors)
    needed = file_nbytes(w)
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(out, needed)
    try:
        _write_planned(w, out, tensors, show_progress, desc)
    except OSError as exc:
        full = disk_full_error(exc, out, needed)
        if full is None:
            raise
        raise full from None
    return out


def _write_planned(w, out: Path, tensors: list[PlannedTensor], show_progress: bool, desc: str) -> None:
    with atomic_output(out) as tmp:
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(t.nbytes for t in tensors)
            bar = progress(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                           show_progress=show_progress)
            # One writer thread: tensor k+1 is produced (read, repacked, quantized) while tensor k
            # goes to disk, so conversion time approaches the larger of the two, not their sum.
            # At most two tensors' bytes are held at once.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-write") as pool:
                pending = None
                try:
                    for t in tensors:
                        data = np.ascontiguousarray(t.produce())
                        if data.nbytes != t.nbytes:
                            raise NexlabError(f"{t.name}: produced {data.nbytes} bytes, expected {t.nbytes} "
                                             f"({t.ggml_type.name} {list(t.shape)})")
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(_write_tensor, w, data.reshape(-1).view(np.uint8), bar, t.nbytes)
                        del data
                    if pending is not None:
                        pending.result()
                        pending = None
                    for f in w.fout:  # on disk before the rename: a crash cannot leave an empty file there
                        f.flush()
                        os.fsync(f.fileno())
                finally:
                    if pending is not None:
                        pending.cancel()
                    bar.close()
        finally:
            w.close()  # closes the temporary file; atomic_output renames it or removes it


def _write_tensor(w, data: np.ndarray, bar, nbytes: int) -> None:
    w.write_tensor_data(data)
    bar.update(nbytes)



    def close(self) -> None:
        pass


@dataclass
class WriteResult:
    """What :func:`write_plan` wrote: the file, its tensor count and tensor bytes, the seconds it took
    (from ``started``), and the tensors per ggml type name in file order."""

    path: Path
    n_tensors: int
    nbytes: int
    seconds: float
    types: dict[str, int]


def write_plan(out_path: str | os.PathLike, plan, *, show_progress: bool = True, desc: str = "write",
               started: float | None = None) -> WriteResult:
    """Write a planned file (``plan.arch``, ``plan.add_metadata``, ``plan.tensors``, ``plan.tensor_nbytes``:
    the text converter's and the mmproj's plans alike) through :func:`write_gguf`: the one driver of both."""
    t0 = time.perf_counter() if started is None else started
    path = write_gguf(out_path, plan.arch, plan.add_metadata, plan.tensors, show_progress=show_progress, desc=desc)
    types = dict(Counter(t.ggml_type.name for t in plan.tensors))
    return WriteResult(path, len(plan.tensors), plan.tensor_nbytes, time.perf_counter() - t0, types)
