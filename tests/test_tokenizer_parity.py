"""tokenizer.ggml.pre follows the tokenizer's own pre-tokenizer, so llama.cpp tokenizes as Hugging Face does.

Oracles: Hugging Face ``tokenizers`` (the ids a tokenizer gives itself), llama.cpp through
llama-cpp-python (``Llama(vocab_only=True).tokenize``) on GGUFs nexlab writes, llama.cpp's
``src/llama-vocab.cpp`` (the tokenizer.json regexes it quotes for its ``qwen35`` and ``qwen2``
pre-tokenizers) and llama.cpp's converter (the vocabulary it writes for the tiny checkpoint). Byte-level
BPE tokenizers are trained here in a second on multilingual text (combining marks in Devanagari, Thai
and accented Latin, CJK, digits, code) under each pre-tokenizer nexlab recognises.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from nexlab.artifacts.corpus import train_tokenizer
from nexlab.cli import main as nexlab_main
from nexlab.convert import text as cv
from nexlab.ggufio.inspector import inspect_gguf
from nexlab.llamacpp.source import llamacpp_source, run_reference_converter
from nexlab.model.tokenizer import (
    PRETOKENIZERS,
    QWEN2_SPLIT_PATTERN,
    QWEN35_SPLIT_PATTERN,
    TINY_PRETOKENIZER,
    load_tokenizer,
    pretokenizer_name,
)

TRAIN_TEXT = """\
नमस्ते दुनिया! यह एक छोटा सा परीक्षण है। हिन्दी भाषा में मात्राएँ अक्षरों के साथ जुड़ती हैं। भारत की राजधानी नई दिल्ली है।
สวัสดีครับ ยินดีต้อนรับสู่ประเทศไทย ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ วันนี้อากาศดีมาก ขอบคุณครับ
naïve café, résumé, façade, coöperate; Ärger, Übung, Straße; mañana, niño, corazón. It's what we'll do, isn't it?
日本語の文章を書きます。東京は日本の首都です。今日はいい天気ですね。中文的句子也在这里，我们一起学习。
한국어 문장입니다. 서울은 대한민국의 수도입니다. Привет, мир! Это небольшой тест.
x = 12345 + f(y)
def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text if c.isalnum()]
for i in range(10):  print(i ** 2, "done")
"""

#: Held-out text (not in TRAIN_TEXT as written); Devanagari and Thai first: their vowel signs and
#: viramas are combining marks (\p{M}), which Qwen3.5's regex keeps with the letters and Qwen2's does not.
HELDOUT = {
    "devanagari": "नमस्ते, आज का दिन अच्छा है। हिन्दी में लिखिए।",
    "thai": "สวัสดีค่ะ วันนี้อากาศร้อนมาก ขอบคุณค่ะ",
    "accents": "naïve coöperation at the café; Übung macht den Meister. e\u0301te\u0301 à Paris",
    "cjk": "日本語の文章と中文的句子。今日は晴れです。한국어와 Русский язык.",
    "code": "y = 67890 - g(x)  # comment\n\tif x:\n        return None\n",
    "contractions": "Ich hab's, we'll see, it's 'TIS' 3.14159 I'VE",
    "whitespace": "  leading spaces\n\n\nand   trailing   \r\n ",
    "emoji": "🚀 emoji 😶\u200d🌫️ ✅ 🦙🦙",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``{pre: tokenizer folder}``: one byte-level BPE (vocabulary 700) per pre-tokenizer."""
    root = tmp_path_factory.mktemp("tokenizers")
    corpus = root / "train.txt"
    corpus.write_text(TRAIN_TEXT * 3, encoding="utf-8")
    for pre in PRETOKENIZERS:
        train_tokenizer(corpus, root / pre, vocab_size=700, pretokenizer=pre)
    return {pre: root / pre for pre in PRETOKENIZERS}


def _llama_vocab(gguf_path):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)


def _pre(gguf_path) -> str:
    return inspect_gguf(gguf_path)["metadata"]["tokenizer.ggml.pre"]


def _mismatches(tok_dir, gguf_path) -> dict[str, tuple[list[int], list[int]]]:
    """``{text name: (Hugging Face ids, llama.cpp ids)}`` for every held-out text where they differ."""
    hf = load_tokenizer(tok_dir)
    llm = _llama_vocab(gguf_path)
    out = {}
    for name, text in HELDOUT.items():
        want = hf(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if got != want:
            out[name] = (want, got)
    return out


def _quoted_tokenizer_json_regex(vocab_cpp: str, pre_type: str) -> str:
    """The "original regex from tokenizer.json" llama-vocab.cpp quotes in ``case LLAMA_VOCAB_PRE_TYPE_<pre_type>:``."""
    start = vocab_cpp.index(f"case LLAMA_VOCAB_PRE_TYPE_{pre_type}:")
    block = vocab_cpp[start:vocab_cpp.index("break;", start)]
    m = re.search(r"// original regex from tokenizer\.json\s*\n\s*//\s*(\"(?:[^\"\\]|\\.)*\")", block)
    assert m, f"no quoted tokenizer.json regex under LLAMA_VOCAB_PRE_TYPE_{pre_type}"
    return json.loads(m[1])  # a C string literal whose only escapes are \\ reads as JSON


# --------------------------------------------------------------------------- the regexes


def test_split_patterns_are_the_tokenizer_json_regexes_llamacpp_quotes():
    vocab_cpp = (llamacpp_source() / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    assert _quoted_tokenizer_json_regex(vocab_cpp, "QWEN35") == QWEN35_SPLIT_PATTERN
    assert _quoted_tokenizer_json_regex(vocab_cpp, "QWEN2") == QWEN2_SPLIT_PATTERN
    assert QWEN35_SPLIT_PATTERN != QWEN2_SPLIT_PATTERN and r"[\p{L}\p{M}]+" in QWEN35_SPLIT_PATTERN


# --------------------------------------------------------------------------- parity with Hugging Face


@pytest.mark.parametrize("pre", PRETOKENIZERS)
def test_llamacpp_tokenizes_heldout_multilingual_text_like_hugging_face(trained, pre, tmp_path):
    tok_dir = trained[pre]
    assert pretokenizer_name(tok_dir) == pre
    gguf_path = cv.write_vocab_gguf(tmp_path / "vocab.gguf", tok_dir)
    assert _pre(gguf_path) == pre
    assert _mismatches(tok_dir, gguf_path) == {}
    # the vocabulary really merges inside the scripts with combining marks (not byte by byte)
    hf = load_tokenizer(tok_dir)
    for name in ("devanagari", "thai"):
        text = HELDOUT[name]
        assert len(hf(text, add_special_tokens=False)["input_ids"]) < len(text.encode("utf-8")) / 2, name


def test_qwen2_on_a_qwen35_tokenizer_splits_devanagari_and_thai_differently(trained, tmp_path):
    """The negative control: llama.cpp's qwen2 pre-tokenizer on Nex-N2-mini's kind of tokenizer
    (the name nexlab used to write) breaks words at combining marks, so the ids differ."""
    tok_dir = trained["qwen35"]
    gguf_path = cv.write_vocab_gguf(tmp_path / "forced-qwen2.gguf", tok_dir, tokenizer_pre="qwen2")
    assert _pre(gguf_path) == "qwen2"
    bad = _mismatches(tok_dir, gguf_path)
    assert {"devanagari", "thai"} <= set(bad)
    assert not {"code", "contractions", "whitespace"} & set(bad)  # text without marks splits the same


# --------------------------------------------------------------------------- refusal and override


def _with_pre_tokenizer(src, dst, pre_tokenizer):
    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = pre_tokenizer
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return dst


LLAMA3_SPLIT = QWEN2_SPLIT_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|")
UNKNOWN_PRE_TOKENIZERS = {
    "metaspace": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
    "other_split_regex": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
    "prefix_space": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "none": None,
}


@pytest.mark.parametrize("kind", sorted(UNKNOWN_PRE_TOKENIZERS))
def test_an_unknown_pretokenizer_is_refused_naming_the_file_and_the_option(trained, kind, tmp_path):
    bad = _with_pre_tokenizer(trained["qwen2"], tmp_path / "tok", UNKNOWN_PRE_TOKENIZERS[kind])
    pattern = re.escape(str(bad / "tokenizer.json")) + r".*pre-tokenizer.*--tokenizer-pre NAME"
    with pytest.raises(ValueError, match=pattern):
        pretokenizer_name(bad)
    out = tmp_path / "vocab.gguf"
    with pytest.raises(ValueError, match=pattern):
        cv.write_vocab_gguf(out, bad)
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]  # nothing written, nothing half-written


def test_tokenizer_pre_overrides_detection_and_must_look_like_a_name(trained, tmp_path):
    bad = _with_pre_tokenizer(trained["qwen2"], tmp_path / "tok", UNKNOWN_PRE_TOKENIZERS["other_split_regex"])
    out = cv.write_vocab_gguf(tmp_path / "llama3.gguf", bad, tokenizer_pre="llama3")
    assert _pre(out) == "llama3"
    assert _pre(cv.write_vocab_gguf(tmp_path / "o.gguf", trained["qwen35"], tokenizer_pre="qwen2")) == "qwen2"
    for name in ("", "Qwen 2", "qwen2\n", 2):
        with pytest.raises(ValueError, match="tokenizer_pre .*--tokenizer-pre"):
            cv.write_vocab_gguf(tmp_path / "x.gguf", trained["qwen35"], tokenizer_pre=name)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_refuses_an_unknown_pretokenizer_in_one_line_and_takes_tokenizer_pre(tiny, tmp_path, capsys):
    bad = _with_pre_tokenizer(tiny["tokenizer"], tmp_path / "tok", UNKNOWN_PRE_TOKENIZERS["other_split_regex"])
    out = tmp_path / "tiny.gguf"
    args = ["convert", str(tiny["bf16"]), "-o", str(out), "--tokenizer-dir", str(bad), "-q"]
    assert nexlab_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--tokenizer-pre NAME" in err and str(bad / "tokenizer.json") in err
    assert not out.exists()
    assert nexlab_main([*args, "--tokenizer-pre", "llama3"]) == 0
    assert _pre(out) == "llama3"


# --------------------------------------------------------------------------- the tiny model, end to end


def test_tiny_gguf_names_qwen35_and_llamacpp_tokenizes_like_its_tokenizer(tiny, nexlab_gguf):
    assert TINY_PRETOKENIZER == "qwen35" and pretokenizer_name(tiny["tokenizer"]) == "qwen35"
    path = nexlab_gguf("bf16")
    assert _pre(path) == "qwen35"
    assert _mismatches(tiny["tokenizer"], path) == {}
    code = tiny["heldout_text"].read_text(encoding="utf-8")[:20000]
    hf = load_tokenizer(tiny["tokenizer"])
    assert _llama_vocab(path).tokenize(code.encode("utf-8"), add_bos=False, special=False) == \
        hf(code, add_special_tokens=False)["input_ids"]


def test_reference_converter_writes_the_same_vocabulary_given_the_name(tiny, nexlab_gguf, tmp_path):
    """llama.cpp's converter (--vocab-only) cannot name a self-made tokenizer's pre-tokenizer (it
    hashes the tokens of a test string); given ``qwen35`` it writes every tokenizer key as nexlab
    does, except the chat template (nexlab writes its own fixed one by default)."""
    ours = inspect_gguf(nexlab_gguf("bf16"))["metadata"]
    ref = run_reference_converter(tiny["bf16"], tmp_path / "ref.gguf", extra_args=("--vocab-only",),
                                  tokenizer_pre="qwen35")
    theirs = inspect_gguf(ref)["metadata"]
    keys = {k for k in {*ours, *theirs} if k.startswith("tokenizer.") and k != "tokenizer.chat_template"}
    assert {"tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"} <= keys
    assert {k: ours.get(k) for k in keys} == {k: theirs.get(k) for k in keys}
    fallback = run_reference_converter(tiny["bf16"], tmp_path / "fallback.gguf", extra_args=("--vocab-only",))
    assert _pre(fallback) == "qwen2"  # without the name: the patched converter's fallback
