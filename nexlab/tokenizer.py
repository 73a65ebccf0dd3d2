"""Text every machine has, and a byte-level BPE tokenizer trained on it.

The corpus is the source of the running Python's standard library (found with
``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded. Files are split, by file,
into three disjoint sets: ``train`` (model and tokenizer training), ``calib`` (ModelOpt
calibration, importance matrices) and ``heldout`` (perplexity), shuffled with ``seed``.

The tokenizer is a Hugging Face ``tokenizers`` byte-level BPE with Qwen2's pre-tokenizer
(the same split regex and byte-level mapping as Qwen's tokenizers), so that llama.cpp, whose
reference converter falls back to its ``qwen2`` pre-tokenizer for self-made BPE vocabularies,
splits text exactly as Hugging Face does. No normalizer: llama.cpp applies none. The specials
``<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>`` get ids 0..4.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

from .config import SPECIAL_TOKENS
from .fileio import atomic_directory, atomic_write_text

#: Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2/Qwen3 models); llama.cpp's
#: LLAMA_VOCAB_PRE_TYPE_QWEN2 implements the same regex.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Placeholder ChatML template with a thinking block; the conversion chapter supplies the
#: real Nex-N2-mini template.
CHAT_TEMPLATE_PLACEHOLDER = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)

#: Characters per split (file granularity, so sizes are approximate upper bounds).
SPLIT_CHARS = {"train": 3_000_000, "calib": 200_000, "heldout": 200_000}


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
            raise ValueError(f"standard library too small to fill the {name!r} split")
    for name, parts in texts.items():
        atomic_write_text(paths[name], "\n\n".join(parts))
    listing = {k: [p.relative_to(root).as_posix() for p in v] for k, v in chosen.items()}
    atomic_write_text(out / "files.json", json.dumps({"stdlib": str(root), "seed": seed, **listing}, indent=1))
    return paths


def build_tokenizer_object(train_files: list[str | os.PathLike], vocab_size: int = 2048):
    """Train the byte-level BPE (``tokenizers.Tokenizer``) on ``train_files``.

    Qwen2 pre-tokenizer (split regex, then byte-level without its own regex), byte-level
    decoder, specials first (ids 0..4), the 256 byte symbols as initial alphabet.
    The BPE trainer breaks count ties by pair order, so the result is deterministic.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be an int > {256 + len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in train_files], trainer)
    return tok


def train_tokenizer(train_file: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int = 2048):
    """Train and save the tokenizer in Hugging Face format (tokenizer.json, tokenizer_config.json,
    chat_template placeholder) to ``out_dir`` (written to a temp folder, then renamed).
    Returns the loaded ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    out = Path(out_dir)
    tok = build_tokenizer_object([train_file], vocab_size)
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


def load_tokenizer(path: str | os.PathLike):
    """Load a saved tokenizer folder as ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {p}")
    return PreTrainedTokenizerFast.from_pretrained(str(p))
