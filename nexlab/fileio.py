"""Writing files so that nothing half-written is ever left behind.

Every file nexlab produces (GGUF, imatrix, safetensors shards, JSON) goes through
:func:`atomic_output`: the data is written to a hidden temporary file in the target
folder and renamed onto the final name only when writing finished; on any error
(an exception, Ctrl-C) the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The rename is atomic on one filesystem (``os.replace``), so readers see either the
    old file or the complete new one.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
