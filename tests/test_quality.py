"""nexlab.analysis.quality: llama.cpp (llama-cpp-python) logits on held-out text -> KL, top-1 agreement, perplexity.

The oracles are independent of nexlab.analysis.quality: raw logits straight from ``llama_cpp.Llama`` in a
context of our own, scipy's log_softmax / rel_entr, the ``tokenizers`` library reading the
checkpoint's tokenizer.json, llama.cpp's own GGUF tokenizer, and llama.cpp's ``llama-perplexity``
tool (built by ``nexlab setup``) for the perplexity.
"""

from __future__ import annotations

import re
import subprocess
import tracemalloc
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import scipy.special as scipy_special

from nexlab.analysis import quality as Q
from nexlab.model.tokenizer import encode_text

CHUNK = 64
N_CHUNKS = 3
THREADS = 1  # 2 spinning llama.cpp threads on the 2 shared cores are ~10-40x slower than 1 here


def _artifacts() -> Path:
    from nexlab.artifacts.checkpoints import default_artifacts_dir

    return Path(default_artifacts_dir())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer dir, held-out tokens and the tiny NVFP4-BF16 / NVFP4-Q8_0 / NVFP4-Q4_K_M GGUFs."""
    from nexlab.artifacts.tiny import ensure_tiny
    from nexlab.convert import text as convert

    paths = ensure_tiny(smoke=True)
    d = tmp_path_factory.mktemp("quality")
    files = {}
    for variant, label in (("bf16", "NVFP4-BF16"), ("q8_0", "NVFP4-Q8_0"), ("q4_k_m", "NVFP4-Q4_K_M")):
        shipped = _artifacts() / "gguf" / f"tiny-{label}.gguf"
        if shipped.is_file():
            files[label] = shipped
            continue
        files[label] = d / f"tiny-{label}.gguf"
        convert.convert_checkpoint(paths["nvfp4"], files[label], variant=variant, show_progress=False)
    text = paths["heldout_text"].read_text(encoding="utf-8")[:20000]
    tokens = encode_text(text, paths["tokenizer"])
    return {"dir": d, "files": files, "tokens": tokens, "text": text, "tokenizer": paths["tokenizer"]}


@pytest.fixture(scope="module")
def report(tiny):
    return Q.evaluate_variants(tiny["files"], tiny["tokens"], reference="NVFP4-BF16", chunk_size=CHUNK,
                               n_chunks=N_CHUNKS, n_threads=THREADS, show_progress=False)


def _raw_logits(path, chunks) -> np.ndarray:
    """Logits from a llama_cpp.Llama of our own, one fresh context per chunk (the oracle)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=chunks.shape[1], n_batch=chunks.shape[1],
                          n_threads=THREADS, n_threads_batch=THREADS, logits_all=True, verbose=False)
    out = []
    for c in chunks:
        llm.reset()
        llm.eval([int(t) for t in c])
        out.append(np.array(llm.scores[: len(c)], dtype=np.float64))
    llm.close()
    return np.stack(out)


# --------------------------------------------------------------------------- tokens


def test_tokens_equal_the_checkpoint_tokenizer_and_llama_cpp(tiny):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(Path(tiny["tokenizer"]) / "tokenizer.json")).encode(tiny["text"],
                                                                                      add_special_tokens=False).ids
    assert tiny["tokens"].dtype == np.int32
    assert tiny["tokens"].tolist() == ref
    llm = llama_cpp.Llama(model_path=str(tiny["files"]["NVFP4-BF16"]), n_ctx=64, verbose=False, vocab_only=True)
    try:
        ll = llm.tokenize(tiny["text"][:4000].encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    assert ll == encode_text(tiny["text"][:4000], tiny["tokenizer"]).tolist()


def test_chunks_are_consecutive_token_windows():
    t = np.arange(1000)
    c = Q.chunk_tokens(t, 64)
    assert c.shape == (15, 64) and c.dtype == np.int32
    assert np.array_equal(c.reshape(-1), t[:960])
    assert Q.chunk_tokens(t, 100, 3).shape == (3, 100)


# --------------------------------------------------------------------------- figures vs independent oracles


def test_kl_of_a_file_to_itself_is_exactly_zero(tiny):
    f = tiny["files"]["NVFP4-Q4_K_M"]
    r = Q.evaluate_variants({"a": f, "b": f}, tiny["tokens"], chunk_size=CHUNK, n_chunks=2, n_threads=THREADS,
                            show_progress=False)
    b = r.variants["b"]
    assert np.all(b.kl == 0.0)
    assert b.kl_max == 0.0 and b.top1_agreement == 1.0 and b.rms_dp == 0.0
    assert b.ppl == r.variants["a"].ppl and b.ppl_ratio == 1.0


def test_ppl_is_exp_mean_nll_of_raw_llama_logits(tiny, report):
    chunks = Q.chunk_tokens(tiny["tokens"], CHUNK, N_CHUNKS)
    for name, path in tiny["files"].items():
        raw = _raw_logits(path, chunks)
        lp = scipy_special.log_softmax(raw[:, :-1], axis=-1)
        nll = -np.take_along_axis(lp, chunks[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
        v = report.variants[name]
        assert v.n_scored == N_CHUNKS * (CHUNK - 1)
        np.testing.assert_allclose(v.nll, nll, rtol=1e-12, atol=1e-12)
        assert v.ppl == pytest.approx(np.exp(nll.mean()), rel=1e-12)
        assert v.ppl_ratio == pytest.approx(v.ppl / report.variants["NVFP4-BF16"].ppl, rel=1e-12)


def test_kl_and_top1_equal_scipy_on_raw_llama_logits(tiny, report):
    chunks = Q.chunk_tokens(tiny["tokens"], CHUNK, N_CHUNKS)
    ref = _raw_logits(tiny["files"]["NVFP4-BF16"], chunks)[:, :-1]
    p = scipy_special.softmax(ref, axis=-1)
    for name in ("NVFP4-Q8_0", "NVFP4-Q4_K_M"):
        q = scipy_special.softmax(_raw_logits(tiny["files"][name], chunks)[:, :-1], axis=-1)
        kl = scipy_special.rel_entr(p, q).sum(-1)
        v = report.variants[name]
        np.testing.assert_allclose(v.kl, kl, rtol=1e-6, atol=1e-12)
        assert v.kl_mean == pytest.approx(kl.mean(), rel=1e-6)
        assert v.top1_agreement == pytest.approx(np.mean(p.argmax(-1) == q.argmax(-1)))


def test_kl_is_non_negative_and_quantization_costs_something(report):
    q8, q4 = report.variants["NVFP4-Q8_0"], report.variants["NVFP4-Q4_K_M"]
    for v in report.variants.values():
        assert v.kl.min() >= -1e-12 and np.isfinite(v.kl).all()
    assert q8.kl_mean > 0 and q4.kl_mean > 0
    assert q4.kl_mean > q8.kl_mean  # 4.5-6.6 bits per weight lose more than 8.5
    assert report.variants["NVFP4-BF16"].kl_max == 0.0
    assert [r["name"] for r in report.table()] == ["NVFP4-BF16", "NVFP4-Q8_0", "NVFP4-Q4_K_M"]


def test_every_chunk_starts_from_an_empty_context(tiny):
    """The logits of chunk 2 do not depend on chunks 0 and 1 having been evaluated before it."""
    chunks = Q.chunk_tokens(tiny["tokens"], CHUNK, 3)
    all3 = Q.gguf_logits(tiny["files"]["NVFP4-Q8_0"], chunks, n_threads=THREADS)
    alone = Q.gguf_logits(tiny["files"]["NVFP4-Q8_0"], chunks[2:], n_threads=THREADS)
    assert all3.shape == (3, CHUNK, alone.shape[-1]) and all3.dtype == np.float32
    assert np.array_equal(all3[2], alone[0])


def test_score_from_scores_the_second_half_like_llama_perplexity(tiny, report):
    r = Q.evaluate_variants({"NVFP4-BF16": tiny["files"]["NVFP4-BF16"]}, tiny["tokens"], chunk_size=CHUNK,
                            n_chunks=N_CHUNKS, score_from=CHUNK // 2, n_threads=THREADS, show_progress=False)
    full = report.variants["NVFP4-BF16"].nll
    assert np.array_equal(r.variants["NVFP4-BF16"].nll, full[:, CHUNK // 2:])


# --------------------------------------------------------------------------- streaming


def test_streamed_figures_equal_the_whole_array_computation_bit_for_bit(tiny, monkeypatch):
    """evaluate_variants (chunk by chunk, row blocks) == gguf_logits + compare_to_reference on whole arrays.

    The row blocks are shrunk to 5 rows (uneven last block) so the blocked path runs on the tiny model.
    """
    n_chunks, score_from = 2, CHUNK // 3
    chunks = Q.chunk_tokens(tiny["tokens"], CHUNK, n_chunks)
    n_vocab = Q.gguf_logits(tiny["files"]["NVFP4-BF16"], chunks[:1], n_threads=THREADS).shape[-1]
    monkeypatch.setattr(Q, "_BLOCK_BYTES", 5 * 8 * n_vocab)
    assert len(Q._row_blocks(CHUNK - 1 - score_from, n_vocab)) > 2
    r = Q.evaluate_variants(tiny["files"], tiny["tokens"], reference="NVFP4-BF16", chunk_size=CHUNK,
                            n_chunks=n_chunks, score_from=score_from, n_threads=THREADS, show_progress=False)
    whole = {name: Q.gguf_logits(path, chunks, n_threads=THREADS) for name, path in tiny["files"].items()}
    ref_lp = Q.log_softmax(whole["NVFP4-BF16"][:, score_from:-1])
    for name, logits in whole.items():
        cmp = Q.compare_to_reference(ref_lp, logits, chunks, score_from)
        v = r.variants[name]
        assert v.kl.shape == v.nll.shape == (n_chunks, CHUNK - 1 - score_from)
        assert np.array_equal(v.kl, cmp["kl"]) and np.array_equal(v.nll, cmp["nll"]), name
        assert v.top1_agreement == cmp["top1_same"].mean()
        assert v.rms_dp == np.sqrt(np.mean(cmp["dp"] ** 2))
        assert v.kl_median == np.median(cmp["kl"]) and v.kl_p99 == np.percentile(cmp["kl"], 99)
        assert v.ppl == np.exp(cmp["nll"].mean())
    assert r.variants["NVFP4-Q4_K_M"].kl_mean > 0  # the comparison is not against itself


def test_memory_does_not_grow_with_the_number_of_chunks(tiny):
    """Peak traced memory (numpy registers its buffers with tracemalloc) of 6 chunks vs 2 chunks.

    Holding the logits or log-probabilities of every chunk, as a whole-array evaluation does, costs at
    least CHUNK * n_vocab * 4 bytes per extra chunk and file; streaming may only add the per-position
    result arrays (kl, nll, dp float64, top-1 bool) with room for their copies in the summary.
    """
    files = {k: tiny["files"][k] for k in ("NVFP4-BF16", "NVFP4-Q4_K_M")}

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            Q.evaluate_variants(files, tiny["tokens"], chunk_size=CHUNK, n_chunks=n, n_threads=THREADS,
                                show_progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    n_vocab = Q.gguf_logits(files["NVFP4-BF16"], Q.chunk_tokens(tiny["tokens"], CHUNK, 1),
                            n_threads=THREADS).shape[-1]
    peak(1)  # one-time allocations (imports, caches) happen outside the measurement
    p2, p6 = peak(2), peak(6)
    one_chunk = (CHUNK - 1) * n_vocab * 8  # one chunk's float64 reference log-probabilities
    assert p2 > one_chunk  # the reference log-probabilities of a chunk are seen by tracemalloc
    allowance = (6 - 2) * (CHUNK - 1) * (8 + 8 + 8 + 1) * len(files) * 4 + (64 << 10)
    assert allowance < CHUNK * n_vocab * 4  # smaller than one chunk of one file's float32 logits
    assert p6 - p2 < allowance, (p2, p6)


# --------------------------------------------------------------------------- llama-perplexity


def _llama_perplexity_ids(path, text: str, n_tokens: int, chunk_size: int) -> np.ndarray:
    """The ids llama-perplexity evaluates: ``-f`` drops one trailing newline, the text is tokenized by
    llama.cpp with special tokens added (BOS only where the vocabulary asks for it), and the first token
    of every chunk is replaced by BOS when the vocabulary adds one."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        prompt = text[:-1] if text.endswith("\n") else text
        ids = np.asarray(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False), np.int32)[:n_tokens]
        if add_bos:
            ids.reshape(-1, chunk_size)[:, 0] = llama_cpp.llama_vocab_bos(vocab)
    finally:
        llm.close()
    return ids


@pytest.mark.parametrize("label", ["NVFP4-BF16", "NVFP4-Q8_0", "NVFP4-Q4_K_M"])
def test_perplexity_equals_llama_perplexity(tiny, tmp_path, label):
    """nexlab's perplexity with score_from = chunk_size // 2 == llama-perplexity's on the same file and text.

    llama-perplexity runs one chunk per batch (-b = -ub = -c, n_seq = 1), one thread, and flash attention
    off (-fa off) as llama-cpp-python opens its contexts: its default, -fa auto, turns flash attention on
    for the CPU and moves the tiny model's perplexity by about 3e-4 relative (float rounding of a
    different attention kernel). It prints the running perplexity after each chunk with 4 decimals.
    """
    from nexlab.llamacpp.build import tool_path

    path, n_chunks = tiny["files"][label], 3
    text_file = tmp_path / "heldout.txt"
    text_file.write_text(tiny["text"], encoding="utf-8")
    cmd = [str(tool_path("llama-perplexity")), "-m", str(path), "-f", str(text_file), "-c", str(CHUNK),
           "-b", str(CHUNK), "-ub", str(CHUNK), "--chunks", str(n_chunks), "-t", str(THREADS), "-fa", "off"]
    # its last lines can be lost: llama.cpp's logger is not flushed at exit (see nexlab.analysis.bench)
    for _ in range(3):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log = run.stdout + run.stderr
        if run.returncode != 0 or "Final estimate" in log:
            break
    assert run.returncode == 0, log[-3000:]
    assert f"over {n_chunks} chunks, n_ctx={CHUNK}, batch_size={CHUNK}, n_seq=1" in log, log[-3000:]
    running = [float(x) for x in re.findall(r"\[\d+\](\d+\.\d{4}),", run.stdout)]
    final = float(re.search(r"Final estimate: PPL = (\d+\.\d+)", log).group(1))
    assert len(running) == n_chunks and running[-1] == final

    ids = _llama_perplexity_ids(path, tiny["text"], n_chunks * CHUNK, CHUNK)
    r = Q.evaluate_variants({label: path}, ids, chunk_size=CHUNK, n_chunks=n_chunks, score_from=CHUNK // 2,
                            n_threads=THREADS, show_progress=False)
    v = r.variants[label]
    assert v.n_scored == n_chunks * (CHUNK - 1 - CHUNK // 2)  # llama-perplexity's count: n_ctx - 1 - n_ctx/2
    ours = [float(np.exp(v.nll[: i + 1].mean())) for i in range(n_chunks)]
    assert ours[-1] == v.ppl
    # printed to 4 decimals; the rest is float32-vs-float64 log-softmax rounding, far below the 3e-4 of -fa auto
    assert ours == pytest.approx(running, rel=1e-6, abs=5e-5)


# --------------------------------------------------------------------------- bad input


def test_missing_file_and_bad_reference_are_named(tiny, tmp_path):
    f = tiny["files"]["NVFP4-BF16"]
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Q.evaluate_variants({"ref": f, "x": tmp_path / "nope.gguf"}, tiny["tokens"], show_progress=False)
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="bad.gguf is not a GGUF"):
        Q.evaluate_variants({"ref": f, "x": tmp_path / "bad.gguf"}, tiny["tokens"], show_progress=False)
    with pytest.raises(ValueError, match="reference 'zzz' is not one of the files"):
        Q.evaluate_variants({"ref": f}, tiny["tokens"], reference="zzz", show_progress=False)
    with pytest.raises(ValueError, match="no GGUF files"):
        Q.evaluate_variants({}, tiny["tokens"], show_progress=False)


def test_too_few_tokens_and_bad_chunking_are_refused(tiny):
    f = {"ref": tiny["files"]["NVFP4-BF16"]}
    with pytest.raises(ValueError, match="too few tokens: 10 tokens do not fill one chunk of 64"):
        Q.evaluate_variants(f, tiny["tokens"][:10], chunk_size=64, show_progress=False)
    with pytest.raises(ValueError, match="too few tokens: 5 chunks of 64 need 320"):
        Q.chunk_tokens(np.arange(300), 64, 5)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 2"):
        Q.chunk_tokens(np.arange(300), 1)
    with pytest.raises(ValueError, match="negative id"):
        Q.chunk_tokens(np.array([1, -2, 3, 4]), 2)
    with pytest.raises(TypeError, match="integer ids"):
        Q.chunk_tokens(np.ones(8, np.float32), 2)
    with pytest.raises(ValueError, match="score_from must be in"):
        Q.evaluate_variants(f, tiny["tokens"], chunk_size=64, n_chunks=1, score_from=63, show_progress=False)


def test_token_outside_the_vocabulary_is_refused_before_llama_runs(tiny):
    bad = np.full(64, 10**6, np.int32)
    with pytest.raises(ValueError, match="outside the vocabulary .*tokenizer and model do not match"):
        Q.evaluate_variants({"ref": tiny["files"]["NVFP4-BF16"]}, bad, chunk_size=64, show_progress=False)


def test_files_with_different_vocabularies_are_refused_before_llama_runs(tiny, monkeypatch):
    real_open = Q.open_model

    class OneTokenShort:
        def __init__(self, llm):
            self.llm = llm

        def n_vocab(self):
            return self.llm.n_vocab() - 1

        def eval(self, tokens):
            raise AssertionError("a file was evaluated before the vocabularies were checked")

        def close(self):
            self.llm.close()

    def open_short(path, n_ctx, **kw):
        llm = real_open(path, n_ctx, **kw)
        return OneTokenShort(llm) if path == tiny["files"]["NVFP4-Q8_0"] else llm

    monkeypatch.setattr(Q, "open_model", open_short)
    files = {k: tiny["files"][k] for k in ("NVFP4-BF16", "NVFP4-Q8_0")}
    with pytest.raises(ValueError, match=r"vocabulary sizes differ: reference .*BF16.gguf has \d+ tokens, "
                                         r".*Q8_0.gguf has \d+"):
        Q.evaluate_variants(files, tiny["tokens"], chunk_size=CHUNK, n_chunks=1, n_threads=THREADS,
                            show_progress=False)


def test_non_finite_logits_are_refused():
    x = np.zeros((2, 5))
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.log_softmax(x)


def test_missing_text_file_is_named(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        encode_text(tmp_path / "missing.txt", tiny["tokenizer"])



# --------------------------------------------------------------------------- summaries used by notebook 04


def test_importance_concentration_of_known_profiles():
    from nexlab.ggufio import imatrix_file as IM

    ne0 = 200
    flat = np.full((1, ne0), 3.0, np.float32)
    spike = np.zeros((1, ne0), np.float32)
    spike[0, 17] = 5.0
    experts = np.stack([np.full(ne0, 1.0, np.float32), np.arange(ne0, dtype=np.float32), np.ones(ne0, np.float32)])
    im = IM.Imatrix(entries={"blk.0.attn_qkv.weight": IM.ImatrixEntry(flat, np.array([4.0], np.float32)),
                             "blk.2.ssm_out.weight": IM.ImatrixEntry(spike, np.array([4.0], np.float32)),
                             "blk.1.ffn_down_exps.weight": IM.ImatrixEntry(experts,
                                                                           np.array([2.0, 1.0, 0.0], np.float32))},
                    datasets=["x"], chunk_count=1, chunk_size=8)
    rows = {r["name"]: r for r in Q.importance_stats(im, top_share=0.01)}
    assert rows["blk.0.attn_qkv.weight"]["top_share"] == pytest.approx(2 / ne0)  # top 1% = 2 channels
    assert rows["blk.0.attn_qkv.weight"]["energy"] == pytest.approx(0.75) and rows["blk.0.attn_qkv.weight"]["cv"] == 0
    assert rows["blk.2.ssm_out.weight"]["top_share"] == 1.0
    assert rows["blk.2.ssm_out.weight"]["max_over_mean"] == pytest.approx(ne0)
    e = rows["blk.1.ffn_down_exps.weight"]
    ramp = np.arange(ne0, dtype=np.float64)
    assert e["n_live"] == 2 and (e["layer"], e["kind"]) == (1, "ffn_down_exps")
    assert e["top_share"] == pytest.approx((2 / ne0 + (ramp[-2:].sum() / ramp.sum())) / 2)


def test_bytes_by_type_equals_the_tensor_bytes_gguf_py_reads(tiny):
    import gguf

    from nexlab.model import mixes as QZ

    src = gguf.GGUFReader(str(tiny["files"]["NVFP4-BF16"]))
    triples = [(t.name, tuple(int(s) for s in reversed(t.shape)), t.tensor_type.name) for t in src.tensors]
    n_layer = int(src.fields["qwen35moe.block_count"].parts[-1][0])
    n_exp = int(src.fields["qwen35moe.expert_count"].parts[-1][0])
    for variant, label in (("bf16", "NVFP4-BF16"), ("q8_0", "NVFP4-Q8_0"), ("q4_k_m", "NVFP4-Q4_K_M")):
        by = Q.bytes_by_type(QZ.plan_types(triples, variant, n_layer, n_expert=n_exp))
        real: dict[str, int] = {}
        for t in gguf.GGUFReader(str(tiny["files"][label])).tensors:
            real[t.tensor_type.name] = real.get(t.tensor_type.name, 0) + int(t.n_bytes)
        assert {k: v["bytes"] for k, v in by.items() if k != "all"} == real, variant
        assert by["all"]["bytes"] == sum(real.values())
