"""Shared fixtures for the conversion tests (imported by test_checkpoint.py, test_convert.py, ...).

The tiny checkpoints come from ``nexlab.models.ensure_tiny(smoke=True)`` (built once, reused).
``nexlab_gguf(kind)`` is nexlab's GGUF alone; ``converted(kind)`` adds llama.cpp's own converter
(nexlab.llamacpp.run_reference_converter: the converter of llama-cpp-python 0.3.36's tree, run by
this interpreter, fetched into the user cache on first use), once per checkpoint per session; it is
told the tiny tokenizer's pre-tokenizer (``qwen35``), which it cannot recognise by hash.
A reference that cannot be fetched or run is an error, never a skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nexlab.convert import convert_checkpoint
from nexlab.llamacpp import run_reference_converter
from nexlab.models import ensure_tiny


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
