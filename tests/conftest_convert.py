"""Shared fixtures for the conversion tests (imported by test_checkpoint.py and test_convert.py).

The tiny checkpoints come from ``nexlab.models.ensure_tiny(smoke=True)`` (built once, reused);
llama.cpp's own converter runs through nexlab.llamacpp (``$NEXLAB_REFERENCE_CONVERT`` or
``../shared/tools/llamacpp-convert``) with this interpreter, once per checkpoint per session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nexlab.llamacpp import reference_converter, run_reference_converter


@pytest.fixture(scope="session")
def tiny():
    from nexlab.models import ensure_tiny

    return ensure_tiny(smoke=True)


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory):
    """``converted(kind)`` -> (nexlab GGUF, llama.cpp GGUF) for kind in bf16 / nvfp4 / nvfp4_all."""
    from nexlab.convert import convert_checkpoint

    cache: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("gguf")

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            ours, ref = root / f"nexlab-{kind}.gguf", root / f"llamacpp-{kind}.gguf"
            convert_checkpoint(tiny[kind], ours, show_progress=False)
            if reference_converter() is None:
                pytest.skip("llama.cpp's reference converter (llamacpp-convert) not available")
            run_reference_converter(tiny[kind], ref)
            cache[kind] = (ours, ref)
        return cache[kind]

    return get


@pytest.fixture
def ckpt_copy(tiny, tmp_path):
    """A private copy of the tiny MLP-scope NVFP4 checkpoint (to be damaged by a test)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny["nvfp4"], dst)
    return dst
