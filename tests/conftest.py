"""Shared pytest set-up: quiet progress bars, two torch threads, one-session artifacts."""

from __future__ import annotations

import os

os.environ.setdefault("NEXLAB_NO_PROGRESS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_addoption(parser):
    parser.addoption("--browser", action="store_true",
                     help="run the JupyterLab + Chromium tests (tests/test_browser.py; `make test-browser`)")


def pytest_collection_modifyitems(config, items):
    """Browser tests run only with --browser (they need Chromium and playwright: `make test-browser`)."""
    if config.getoption("--browser"):
        return
    keep = [i for i in items if "browser" not in i.keywords]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if "browser" in i.keywords])
        items[:] = keep
