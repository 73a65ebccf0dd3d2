"""Text every machine has, split for training, calibration and evaluation, and the tiny tokenizer.

The corpus is the source of the running Python's standard library (:func:`stdlib_source_files`,
found with ``sysconfig.get_paths()["stdlib"]``, test suites and site-packages left out), so nothing
is downloaded. :func:`make_text_splits` splits it by file into three disjoint sets, shuffled with
``seed``: ``train`` (model and tokenizer training), ``calib`` (ModelOpt calibration, importance
matrices) and ``heldout`` (perplexity), with ``files.json`` listing each split's files.

:func:`train_tokenizer` trains the byte-level BPE of :mod:`nexlab.model.tokenizer` (Qwen3.5's
pre-tokenizer, the ChatML specials) on ``train.txt`` and saves it in Hugging Face format.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

from nexlab.core.errors import NexlabError
from nexlab.core.fileio import atomic_directory, atomic_write_text
from nexlab.model.config import SPECIAL_TOKENS
from nexlab.model.tokenizer import (
    CHAT_TEMPLATE_PLACEHOLDER,
    SPLIT_CHARS,
    TINY_PRETOKENIZER,
    build_tokenizer_object,
    load_tokenizer,
)


def stdlib_source_files() -> list[Path]:
    """Every ``.py`` file of the running Python's standard library, sorted, excluding
    ``site-packages`` and test suites (their generated data files are not representative)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)]
    if not files:
        raise FileNotFoundError(f"no Python standard library sources under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def make_text_splits(out_dir: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write ``train.txt``, ``calib.txt``, ``heldout.txt`` (disjoint stdlib files) to ``out_dir``.

    Files are shuffled with ``random.Random(seed)``, then heldout, calib and train take whole
    files in that order until each reaches its size (``SPLIT_CHARS``). Files are joined with a
    blank line. Also writes ``files.json`` listing each split's files. Deterministic for a given
    Python installation and seed. Existing complete splits are kept.
    """
    out = Path(out_dir)
    paths = {name: out / f"{name}.txt" for name in ("train", "calib", "heldout")}
    if all(p.is_file() for p in paths.values()) and (out / "files.json").is_file():
        return paths
    sizes = dict(SPLIT_CHARS if sizes is None else sizes)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files()
    random.Random(seed).shuffle(files)
    chosen: dict[str, list[Path]] = {"heldout": [], "calib": [], "train": []}
    texts: dict[str, list[str]] = {k: [] for k in chosen}
    it = iter(files)
    for name in ("heldout", "calib", "train"):
        n = 0
        for path in it:
            text = _read(path)
            if not text.strip():
                continue
            chosen[name].append(path)
            texts[name].append(text)
            n += len(text)
            if n >= sizes[name]:
                break
        if n == 0:
            raise NexlabError(f"standard library too small to fill the {name!r} split")
    for name, parts in texts.items():
        atomic_write_text(paths[name], "\n\n".join(parts))
    listing = {k: [p.relative_to(root).as_posix() for p in v] for k, v in chosen.items()}
    atomic_write_text(out / "files.json", json.dumps({"stdlib": str(root), "seed": seed, **listing}, indent=1))
    return paths


def train_tokenizer(train_file: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int = 2048,
                    pretokenizer: str = TINY_PRETOKENIZER):
    """Train (:func:`build_tokenizer_object`) and save the tokenizer in Hugging Face format
    (tokenizer.json, tokenizer_config.json, chat_template placeholder) to ``out_dir`` (written to a
    temp folder, then renamed). Returns the loaded ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)

    out = Path(out_dir)
    tok = build_tokenizer_object([train_file], vocab_size, pretokenizer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE_PLACEHOLDER
    with atomic_directory(out) as tmp:
        fast.save_pretrained(tmp)
    return load_tokenizer(out)
