"""The tokenizer's ``tokenizer.ggml.*`` metadata for a GGUF, from a Hugging Face ``tokenizer.json``.

:func:`tokenizer_metadata` reads a byte-level BPE tokenizer (plus ``tokenizer_config.json``) the way
llama.cpp's ``convert_hf_to_gguf.py`` writes a ``gpt2`` vocabulary: tokens by id padded to the
model's vocabulary with ``[PAD{i}]`` (UNUSED), added tokens CONTROL or USER_DEFINED, merges, the
bos/eos/unk/pad ids and add_bos/add_eos flags (gguf-py's ``SpecialVocab``, as the converter). The
pre-tokenizer name (``tokenizer.ggml.pre``) comes from :func:`nexlab.model.tokenizer.pretokenizer_name`
(or an explicit name checked by :func:`check_tokenizer_pre`), not from llama.cpp's hash of a test
string, which only published tokenizers match. :func:`add_tokenizer_metadata` adds those keys (and the
chat template) to a writer; :mod:`nexlab.convert.text` calls both.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from nexlab.core.errors import NexlabError
from nexlab.model.checkpoint import Checkpoint
from nexlab.model.tokenizer import pretokenizer_name


# ----------------------------------------------------------------------------- metadata
def find_tokenizer_dir(ck: Checkpoint, tokenizer_dir: str | os.PathLike | None) -> Path:
    cands = [Path(tokenizer_dir)] if tokenizer_dir else [ck.path, ck.path / "tokenizer", ck.path.parent / "tokenizer"]
    for d in cands:
        if (d / "tokenizer.json").is_file():
            return d
    raise NexlabError(f"no tokenizer.json in {', '.join(str(c) for c in cands)} (pass tokenizer_dir)")


def check_tokenizer_pre(name) -> str:
    """``name`` if it can be a llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``), else ValueError.

    llama.cpp's names are lower case letters, digits and ``. _ -`` (``qwen35``, ``gpt-2``,
    ``a.x-4.0``); whether llama.cpp knows the name is checked when it loads the file.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise NexlabError(f"tokenizer_pre (--tokenizer-pre) must be a llama.cpp pre-tokenizer name such as "
                         f"qwen35, qwen2 or gpt-2, got {name!r}")
    return name


def tokenizer_metadata(tok_dir: Path, vocab_size: int, config: dict, *,
                       tokenizer_pre: str | None = None) -> dict[str, Any]:
    """gpt2-style BPE vocabulary for llama.cpp from a Hugging Face ``tokenizer.json``.

    Tokens are the byte-level BPE strings by id, padded to ``vocab_size`` with ``[PAD{i}]``
    (type UNUSED) like llama.cpp's converter; added tokens are CONTROL when special, else
    USER_DEFINED. Merges, the special token ids, add_bos/add_eos (and the chat template, set when
    written) are gguf-py's ``SpecialVocab``, as in llama.cpp's converter. ``pre``
    (``tokenizer.ggml.pre``) is the llama.cpp pre-tokenizer that splits text as the tokenizer's own pre-tokenizer does
    (:func:`nexlab.model.tokenizer.pretokenizer_name`: ``qwen35`` for Qwen3.5's and Nex-N2-mini's,
    ``qwen2``, ``gpt-2``), or ``tokenizer_pre`` when given (an unrecognised pre-tokenizer is an
    error that points to it). llama.cpp's converter finds the name from a hash of the tokens of a
    test string instead, which only published tokenizers match.
    """
    T = gguf.TokenType
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise NexlabError(f"{tok_dir}/tokenizer.json: model type {model.get('type')!r}, expected byte-level BPE")
    pre = (check_tokenizer_pre(tokenizer_pre) if tokenizer_pre is not None
           else pretokenizer_name(tok_dir / "tokenizer.json"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    if max(vocab.values()) >= vocab_size:
        raise NexlabError(f"tokenizer has id {max(vocab.values())} but config vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = np.full(vocab_size, int(T.UNUSED), dtype=np.int32)
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    for tok, i in vocab.items():
        tokens[i] = tok
    types[ids] = int(T.NORMAL)
    for i, a in added.items():
        types[i] = int(T.CONTROL) if a.get("special") else int(T.USER_DEFINED)
    # merges, special token ids, add_bos/add_eos and the chat template: gguf-py's SpecialVocab, which
    # llama.cpp's converter itself uses; an id it finds nowhere comes from the model's config
    sv = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
    for typ in ("bos", "eos", "unk", "pad"):
        if typ not in sv.special_token_ids and isinstance(config.get(f"{typ}_token_id"), int):
            sv.special_token_ids[typ] = config[f"{typ}_token_id"]
    return {"pre": pre, "tokens": tokens, "types": types.tolist(), "special_vocab": sv}


def add_tokenizer_metadata(w, tok: dict, template: str | None) -> None:
    """The ``tokenizer.ggml.*`` keys of :func:`tokenizer_metadata` in llama.cpp's converter's order (model,
    pre, tokens, types, then SpecialVocab's merges, special ids, add flags), and ``template`` as
    ``tokenizer.chat_template`` (none when None: the tokenizer's own template is not carried over here)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    sv = tok["special_vocab"]
    sv.chat_template = template
    sv.add_to_gguf(w, quiet=True)
