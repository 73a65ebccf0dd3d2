"""Recording and showing what a notebook measured: results.json, figures, tables and versions.

Every notebook ends by calling :func:`record` so that ``OUTPUT_DIR/results.json``
holds its figures (numbers people compare between runs); plots are saved next to
it with :func:`save_figure`. Values are converted to plain JSON (numpy scalars and
arrays included) and the file is replaced atomically. Tables shown inline go
through :func:`markdown_table`, the workbook's one table formatter.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

from nexlab.fileio import atomic_output


def _plain(value: Any) -> Any:
    """Convert numpy / torch scalars and arrays, paths and tuples to JSON-ready values."""
    try:
        import numpy as np  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if np is not None:
        if isinstance(value, np.ndarray):
            return _plain(value.tolist())
        if isinstance(value, np.generic):
            return _plain(value.item())
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # torch tensor
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as text
    return value


def load(output_dir: str | os.PathLike) -> dict:
    """Return the results recorded so far in ``output_dir/results.json`` (empty if none)."""
    path = Path(output_dir) / "results.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


#: Committed benchmark results (``data/results/NAME.json``), written by the scripts in benchmarks/.
COMMITTED_RESULTS = Path(__file__).resolve().parent.parent / "data" / "results"


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
    data.update(_plain(figures))
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


def _cell(value: Any, floatfmt: str) -> str:
    """One table cell: ints with ``,`` thousands separators, floats with ``floatfmt``, the rest ``str``.

    numpy scalars count as their Python kind; bools stay ``True`` / ``False`` (they are ints to
    Python, but ``1`` would hide what they mean).
    """
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".4g") -> str:
    """Rows of dicts as a GitHub markdown table (for ``IPython.display.Markdown``; no pandas needed).

    ``columns`` picks and orders the columns (default: the keys of the first row); a row without
    a column gets an empty cell. Ints are written with ``,`` thousands separators, floats with
    ``floatfmt`` (a :func:`format` spec), anything else with ``str``. No rows give ``""``.
    """
    if not rows:
        return ""
    cols = list(columns) if columns is not None else list(rows[0])
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c], floatfmt) if c in r else "" for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Versions of Python and the packages the workbook depends on (missing ones say so)."""
    from importlib import metadata  # noqa: PLC0415

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("nexlab", "numpy", "torch", "gguf", "safetensors", "transformers", "nvidia-modelopt",
                "llama_cpp_python", "ml_dtypes", "papermill", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
