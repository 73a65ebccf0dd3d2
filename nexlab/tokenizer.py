"""Text every machine has, and a byte-level BPE tokenizer trained on it.

The corpus is the source of the running Python's standard library (found with
``sysconfig.get_paths()["stdlib"]``), so nothing is downloaded. Files are split, by file,
into three disjoint sets: ``train`` (model and tokenizer training), ``calib`` (ModelOpt
calibration, importance matrices) and ``heldout`` (perplexity), shuffled with ``seed``.

The tokenizer is a Hugging Face ``tokenizers`` byte-level BPE with Qwen3.5's pre-tokenizer (the
split regex of Qwen3.5's tokenizer.json, which keeps combining marks with letters, then the
byte-level mapping without its own regex), as Nex-N2-mini's tokenizer has; llama.cpp implements
that regex as its ``qwen35`` pre-tokenizer, so it splits text exactly as Hugging Face does. No
normalizer: llama.cpp applies none. The specials
``<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>`` get ids 0..4.

:func:`pretokenizer_name` reads a ``tokenizer.json`` and names llama.cpp's pre-tokenizer that
splits text as it does (``qwen35``, ``qwen2`` or ``gpt-2``); the converter writes that name as
``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

from .config import SPECIAL_TOKENS
from .fileio import atomic_directory, atomic_write_text

#: Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2/Qwen3 models, as quoted by the
#: "original regex from tokenizer.json" comment of LLAMA_VOCAB_PRE_TYPE_QWEN2 in llama.cpp's
#: src/llama-vocab.cpp); llama.cpp's ``qwen2`` pre-tokenizer implements it.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Qwen3.5's pre-tokenizer split pattern (tokenizer.json of Qwen3.5 models and Nex-N2-mini, as
#: quoted by the "original regex from tokenizer.json" comment of LLAMA_VOCAB_PRE_TYPE_QWEN35 in
#: llama.cpp's src/llama-vocab.cpp): Qwen2's with letters widened to letters and combining marks
#: (``[\p{L}\p{M}]+``), so Devanagari, Thai and accented text split into whole words. llama.cpp's
#: ``qwen35`` pre-tokenizer implements it.
QWEN35_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``) for each split pattern nexlab recognises.
SPLIT_PATTERN_PRETOKENIZERS = {QWEN35_SPLIT_PATTERN: "qwen35", QWEN2_SPLIT_PATTERN: "qwen2"}

#: The pre-tokenizers :func:`pre_tokenizer_object` builds and :func:`pretokenizer_name` recognises
#: (``gpt-2``: GPT-2's built-in byte-level regex; llama.cpp spells it with a dash).
PRETOKENIZERS = ("qwen35", "qwen2", "gpt-2")

#: The pre-tokenizer of the tiny model's tokenizer (Nex-N2-mini's).
TINY_PRETOKENIZER = "qwen35"

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


def pre_tokenizer_object(name: str = TINY_PRETOKENIZER):
    """The ``tokenizers`` pre-tokenizer that llama.cpp's pre-tokenizer ``name`` implements.

    ``qwen35`` / ``qwen2``: the Split of :data:`QWEN35_SPLIT_PATTERN` / :data:`QWEN2_SPLIT_PATTERN`
    (isolated matches), then byte-level without its own regex, as Qwen's tokenizer.json has it;
    ``gpt-2``: byte-level with GPT-2's built-in regex and no prefix space, as GPT-2's has it.
    """
    from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415

    patterns = {v: k for k, v in SPLIT_PATTERN_PRETOKENIZERS.items()}
    if name in patterns:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(patterns[name]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    if name == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    raise ValueError(f"pre-tokenizer {name!r}: nexlab builds {', '.join(PRETOKENIZERS)}")


def _describe(pre) -> str:
    text = json.dumps(pre, ensure_ascii=False)
    return text if len(text) <= 400 else text[:400] + " ..."


def _split_pattern(step: dict) -> str | None:
    """The regex of a Split step that yields each match as its own piece, else None."""
    pat = step.get("pattern") or {}
    if step.get("behavior") != "Isolated" or step.get("invert") is not False or "Regex" not in pat:
        return None
    return pat["Regex"]


def _plain_byte_level(step: dict, *, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and step.get("add_prefix_space") is False
            and step.get("use_regex", True) is use_regex)


def pretokenizer_name(tokenizer: str | os.PathLike | dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a Hugging Face ``tokenizer.json`` (``tokenizer.ggml.pre``).

    ``tokenizer``: the file, the folder holding it, or its parsed content. Recognised, exactly:

    - a Sequence of Split(:data:`QWEN35_SPLIT_PATTERN`, isolated) then ByteLevel(use_regex=False,
      no prefix space): ``qwen35`` (Qwen3.5, Nex-N2-mini);
    - the same with :data:`QWEN2_SPLIT_PATTERN`: ``qwen2`` (Qwen2, Qwen3);
    - ByteLevel(use_regex=True, no prefix space), alone or as the only step of a Sequence:
      ``gpt-2`` (GPT-2's built-in regex).

    These are the regexes of LLAMA_VOCAB_PRE_TYPE_QWEN35 / _QWEN2 / _GPT2 in llama.cpp's
    src/llama-vocab.cpp. Anything else raises ValueError naming the file and what it holds: a
    tokenizer whose pre-tokenizer llama.cpp knows under another name can be converted with that
    name given explicitly (``nexlab convert --tokenizer-pre NAME``, ``tokenizer_pre=`` in Python).
    The normalizer is not looked at (llama.cpp applies none; Qwen's tokenizers carry NFC).
    """
    if isinstance(tokenizer, dict):
        where, spec = "tokenizer.json", tokenizer
    else:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        where = str(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{where}: no such tokenizer file") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: not a readable tokenizer.json ({exc})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: not a tokenizer.json (top level is {type(spec).__name__})")
    pre = spec.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if isinstance(steps, list) and all(isinstance(x, dict) for x in steps):
        if len(steps) == 1 and _plain_byte_level(steps[0], use_regex=True):
            return "gpt-2"
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and _plain_byte_level(steps[1], use_regex=False)
                and (name := SPLIT_PATTERN_PRETOKENIZERS.get(_split_pattern(steps[0]))) is not None):
            return name
    raise ValueError(
        f"{where}: pre-tokenizer {_describe(pre)} is not one nexlab recognises (Qwen3.5's split regex -> "
        f"qwen35, Qwen2's -> qwen2, GPT-2's byte-level regex -> gpt-2); if llama.cpp implements it under "
        f"another name, give that name explicitly: nexlab convert --tokenizer-pre NAME (tokenizer_pre= in Python)")


def build_tokenizer_object(train_files: list[str | os.PathLike], vocab_size: int = 2048,
                           pretokenizer: str = TINY_PRETOKENIZER):
    """Train the byte-level BPE (``tokenizers.Tokenizer``) on ``train_files``.

    Pre-tokenizer :func:`pre_tokenizer_object` (``pretokenizer``; default Qwen3.5's, as
    Nex-N2-mini's tokenizer has), byte-level decoder, specials first (ids 0..4), the 256 byte
    symbols as initial alphabet. The BPE trainer breaks count ties by pair order, so the result
    is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be an int > {256 + len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer_object(pretokenizer)
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


def train_tokenizer(train_file: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int = 2048,
                    pretokenizer: str = TINY_PRETOKENIZER):
    """Train (:func:`build_tokenizer_object`) and save the tokenizer in Hugging Face format
    (tokenizer.json, tokenizer_config.json, chat_template placeholder) to ``out_dir`` (written to a
    temp folder, then renamed). Returns the loaded ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

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


def load_tokenizer(path: str | os.PathLike):
    """Load a saved tokenizer folder as ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {p}")
    return PreTrainedTokenizerFast.from_pretrained(str(p))
