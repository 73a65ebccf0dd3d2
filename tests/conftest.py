"""Shared pytest set-up: quiet progress bars, two torch threads, one-session artifacts, and the fixtures
every conversion test shares.

The tiny checkpoints come from ``nexlab.artifacts.tiny.ensure_tiny(smoke=True)`` (built once, reused).
``nexlab_gguf(kind)`` is nexlab's GGUF alone; ``converted(kind)`` adds llama.cpp's own converter
(:func:`nexlab.llamacpp.source.run_reference_converter`: the converter of llama-cpp-python 0.3.36's tree,
run by this interpreter, fetched into the user cache on first use), once per checkpoint per session; it
is told the tiny tokenizer's pre-tokenizer (``qwen35``), which it cannot recognise by hash. A reference
that cannot be fetched or run is an error, never a skip.
"""

from __future__ import annotations

import os

# before numpy and torch are imported (through nexlab): their thread pools read these once
os.environ.setdefault("NEXLAB_NO_PROGRESS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from nexlab.artifacts.tiny import ensure_tiny  # noqa: E402
from nexlab.convert.text import convert_checkpoint  # noqa: E402
from nexlab.llamacpp.source import run_reference_converter  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny():
    return ensure_tiny(smoke=True)


@pytest.fixture(scope="session")
def nexlab_gguf(tiny, tmp_path_factory):
    """``nexlab_gguf(kind)`` -> nexlab's GGUF of the tiny checkpoint, kind in bf16 / nvfp4 / nvfp4_all."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("gguf-nexlab")

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = root / f"nexlab-{kind}.gguf"
            convert_checkpoint(tiny[kind], cache[kind], show_progress=False)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def converted(tiny, nexlab_gguf, tmp_path_factory):
    """``converted(kind)`` -> (nexlab GGUF, llama.cpp GGUF) for kind in bf16 / nvfp4 / nvfp4_all."""
    cache: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("gguf-llamacpp")

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            ref = root / f"llamacpp-{kind}.gguf"
            run_reference_converter(tiny[kind], ref, tokenizer_pre="qwen35")  # the tiny tokenizer is Qwen3.5's
            cache[kind] = (nexlab_gguf(kind), ref)
        return cache[kind]

    return get


@pytest.fixture
def ckpt_copy(tiny, tmp_path):
    """A private copy of the tiny MLP-scope NVFP4 checkpoint (to be damaged by a test)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny["nvfp4"], dst)
    return dst
