"""nexlab.chapters: one module per notebook, ``chNN.py`` for ``notebooks/NN_*.ipynb``.

Each holds the helpers only that chapter uses (tables, explanations of one block or one file); the
algorithms they show live in the layers below. Chapters without helpers of their own have no module.

A top layer beside :mod:`nexlab.workbook`: may import anything below (:mod:`nexlab.artifacts` and
down), not the workbook; nothing in the package imports it (the notebooks and tests do).
"""
