"""Progress bars that look right both in a terminal and in Jupyter.

Every long loop in nexlab goes through :func:`progress` so that a notebook shows a
widget bar and a shell shows a text bar. ``NEXLAB_NO_PROGRESS=1`` silences them
(useful in CI logs).
"""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _tqdm_class():
    try:
        from IPython import get_ipython  # noqa: PLC0415  (optional: only a Jupyter kernel has it loaded)

        shell = get_ipython()
        if shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell":
            from tqdm.notebook import tqdm as nb_tqdm  # noqa: PLC0415  (needs ipywidgets: only in a notebook)

            return nb_tqdm
    except Exception:  # IPython missing or no kernel: plain text bar
        pass

    return tqdm


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             show_progress: bool = True, **kwargs):
    """Wrap ``iterable`` in a tqdm bar (notebook-aware). ``show_progress=False`` (the one progress switch
    of every nexlab function) or ``NEXLAB_NO_PROGRESS=1`` gives a silent bar with the same interface."""
    disable = not show_progress or os.environ.get("NEXLAB_NO_PROGRESS", "") not in ("", "0")
    return _tqdm_class()(iterable, total=total, desc=desc, disable=disable, leave=kwargs.pop("leave", True), **kwargs)
