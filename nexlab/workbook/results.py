"""Recording and showing what a notebook measured: results.json, figures, tables and versions.

Every notebook ends by calling :func:`record` so that ``OUTPUT_DIR/results.json``
holds its figures (numbers people compare between runs); plots are saved next to
it with :func:`save_figure`. Values are converted to plain JSON (numpy scalars and
arrays included) and the file is replaced atomically. Tables shown inline go
through :func:`nexlab.core.text.markdown_table`, the workbook's one table formatter.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from nexlab.core.fileio import atomic_output
from nexlab.core.text import plain


def load(output_dir: str | os.PathLike) -> dict:
    """Return the results recorded so far in ``output_dir/results.json`` (empty if none)."""
    path = Path(output_dir) / "results.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


#: Committed benchmark results (``data/results/NAME.json``), written by the scripts in benchmarks/.
COMMITTED_RESULTS = Path(__file__).resolve().parents[2] / "data" / "results"


def committed_result(name: str) -> dict:
    """The committed result ``data/results/{name}.json`` of a benchmark too long to run in a notebook
    (e.g. ``full_size``: ``python benchmarks/full_size.py``); FileNotFoundError naming the command."""
    path = COMMITTED_RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python benchmarks/{name}.py` to produce it")
    return json.loads(path.read_text())


def record(output_dir: str | os.PathLike, **figures: Any) -> Path:
    """Merge ``figures`` into ``output_dir/results.json`` and return its path.

    Keys already present are overwritten; the file is written to a temporary name
    and renamed, so a crash never leaves half a JSON file.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load(out)
    data.update(plain(figures))
    with atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out / "results.json"


def save_figure(fig, output_dir: str | os.PathLike, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``output_dir/name.png`` (and return the path)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def versions() -> dict[str, str]:
    """Versions of Python and the packages the workbook depends on (missing ones say so)."""

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("nexlab", "numpy", "torch", "gguf", "safetensors", "transformers", "nvidia-modelopt",
                "llama_cpp_python", "ml_dtypes", "papermill", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
