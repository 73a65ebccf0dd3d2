"""A byte-level BPE tokenizer with Qwen3.5's pre-tokenizer, and llama.cpp's name for a tokenizer's split.

The tokenizer is a Hugging Face ``tokenizers`` byte-level BPE with Qwen3.5's pre-tokenizer (the
split regex of Qwen3.5's tokenizer.json, which keeps combining marks with letters, then the
byte-level mapping without its own regex), as Nex-N2-mini's tokenizer has; llama.cpp implements
that regex as its ``qwen35`` pre-tokenizer, so it splits text exactly as Hugging Face does. No
normalizer: llama.cpp applies none. The specials
``<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>`` get ids 0..4.

:func:`pretokenizer_name` reads a ``tokenizer.json`` and names llama.cpp's pre-tokenizer that
splits text as it does (``qwen35``, ``qwen2`` or ``gpt-2``); the converter writes that name as
``tokenizer.ggml.pre``. :func:`build_tokenizer_object` trains the BPE, :func:`load_tokenizer` loads a
saved one (transformers' fast tokenizer). The corpus it is trained on (the standard library's source,
split into train / calib / heldout) and the saved tokenizer are :mod:`nexlab.artifacts.corpus`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from nexlab.core.errors import NexlabError, NexlabTypeError
from nexlab.model.config import SPECIAL_TOKENS

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
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
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


def pre_tokenizer_object(name: str = TINY_PRETOKENIZER):
    """The ``tokenizers`` pre-tokenizer that llama.cpp's pre-tokenizer ``name`` implements.

    ``qwen35`` / ``qwen2``: the Split of :data:`QWEN35_SPLIT_PATTERN` / :data:`QWEN2_SPLIT_PATTERN`
    (isolated matches), then byte-level without its own regex, as Qwen's tokenizer.json has it;
    ``gpt-2``: byte-level with GPT-2's built-in regex and no prefix space, as GPT-2's has it.
    """

    patterns = {v: k for k, v in SPLIT_PATTERN_PRETOKENIZERS.items()}
    if name in patterns:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(patterns[name]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    if name == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    raise NexlabError(f"pre-tokenizer {name!r}: nexlab builds {', '.join(PRETOKENIZERS)}")


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
            raise NexlabError(f"{where}: no such tokenizer file") from None
        except (OSError, ValueError) as exc:
            raise NexlabError(f"{where}: not a readable tokenizer.json ({exc})") from None
        if not isinstance(spec, dict):
            raise NexlabError(f"{where}: not a tokenizer.json (top level is {type(spec).__name__})")
    pre = spec.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if isinstance(steps, list) and all(isinstance(x, dict) for x in steps):
        if len(steps) == 1 and _plain_byte_level(steps[0], use_regex=True):
            return "gpt-2"
        if (len(steps) == 2 and steps[0].get("type") == "Split"
                and _plain_byte_level(steps[1], use_regex=False)
                and (name := SPLIT_PATTERN_PRETOKENIZERS.get(_split_pattern(steps[0]))) is not None):
            return name
    raise NexlabError(
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

    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise NexlabError(f"vocab_size must be an int > {256 + len(SPECIAL_TOKENS)}, got {vocab_size!r}")
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


def load_tokenizer(path: str | os.PathLike):
    """Load a saved tokenizer folder as ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415  (transformers is heavy: only the reference model needs it)

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {p}")
    return PreTrainedTokenizerFast.from_pretrained(str(p))


def encode_text(text: str | os.PathLike, tokenizer) -> np.ndarray:
    """Token ids (int32) of ``text``: the one way nexlab turns text into ids.

    ``text`` is the text itself, or a path read as UTF-8. ``tokenizer`` is a folder holding
    ``tokenizer.json``, that file, a loaded ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
    No special tokens are added (no BOS/EOS, as ``llama.tokenize(add_bos=False)``), so training, the
    imatrix, the quality measurements and the reference proofs all feed a model the same ids.
    """
    if isinstance(text, os.PathLike):
        p = Path(text)
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        text = p.read_text(encoding="utf-8")
    if not isinstance(text, str):
        raise NexlabTypeError(f"text must be a str or a path, got {type(text).__name__}")
    if isinstance(tokenizer, (str, os.PathLike)):
        f = Path(tokenizer)
        f = f / "tokenizer.json" if f.is_dir() else f
        if not f.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {Path(tokenizer)}")
        tokenizer = Tokenizer.from_file(str(f))
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers' fast tokenizer wraps one
    return np.asarray(backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)
