"""nexlab.workbook: running the notebooks.

- params: checks of each chapter's papermill parameters (``CHAPTERS``)
- results: ``results.json``, figures and versions each notebook records
- records: the committed benchmark records' provenance (commit, command, machine, versions)
- readme: README.md's measured figures written from those records, ``nexlab readme``
- runner: every notebook in order through papermill, ``nexlab workbook``

A top layer beside :mod:`nexlab.chapters`: may import :mod:`nexlab.artifacts` and everything below
it, not the chapters.
"""
