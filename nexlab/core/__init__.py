"""nexlab.core: what every layer needs, and nothing about quantization, GGUF or models.

- errors: :class:`~nexlab.core.errors.NexlabError`, the one bad-input error (a ValueError subclass)
- fileio: atomic writes of files and folders, stale-temporary cleanup, free-space checks, locks
- progress: tqdm bars that look right in a terminal and in Jupyter (``NEXLAB_NO_PROGRESS=1``)
- text: int-list parameters, JSON-ready values, markdown tables

The bottom layer: it imports no other part of nexlab (the standard library, numpy and tqdm only).
"""
