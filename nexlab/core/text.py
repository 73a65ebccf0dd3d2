"""Small text helpers every layer shares: int-list parameters, JSON-ready values, markdown tables.

- :func:`parse_int_list` turns ``"1,2,4"``, an int or an iterable of ints into a tuple of positive
  ints (order kept, repeats dropped), with one error naming the flag or parameter; the thread and
  batch lists of ``nexlab bench`` and the chapters' parameter checks (:mod:`nexlab.workbook.params`)
  use it.
- :func:`plain` converts numpy / torch scalars and arrays, paths and tuples to plain JSON values
  (NaN and Inf kept visible as text), for ``results.json`` and the benchmark records.
- :func:`markdown_table` renders rows of dicts as a GitHub markdown table (no pandas), the
  workbook's one table formatter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from nexlab.core.errors import NexlabError


# ----------------------------------------------------------------------------- parameters and inputs
def int_at_least(value: Any, flag: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; ValueError naming ``flag`` otherwise (bools and floats too)."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise NexlabError(f"{flag} must be an integer >= {minimum}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise NexlabError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise NexlabError(f"{flag} must be an integer >= {minimum}, got {value}")
    return value


def parse_int_list(value: str | int | Iterable[int], flag: str) -> tuple[int, ...]:
    """Positive integers from ``"1,2,4"``, an int or an iterable of ints; ValueError naming ``flag``.

    Order is kept and repeats are dropped (the tools would run a repeated value twice).
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise NexlabError(f"{flag} must be a comma-separated list of positive integers, got {value!r}")
        items = parts
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        items = [value]
    if not items:
        raise NexlabError(f"{flag} must name at least one positive integer")
    out: list[int] = []
    for v in items:
        try:
            n = int_at_least(v, flag, 1)
        except ValueError:
            raise NexlabError(f"{flag} must be a comma-separated list of positive integers, got {value!r}") from None
        if n not in out:
            out.append(n)
    return tuple(out)


def plain(value: Any) -> Any:
    """Convert numpy / torch scalars and arrays, paths and tuples to JSON-ready values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # torch tensor
        return plain(value.detach().cpu().tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as text
    return value


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
