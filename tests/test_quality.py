"""nexlab.quality: llama.cpp (llama-cpp-python) logits on held-out text -> KL, top-1 agreement, perplexity.

The oracles are independent of nexlab.quality: raw logits straight from ``llama_cpp.Llama`` in a
context of our own, scipy's log_softmax / rel_entr, the ``tokenizers`` library reading the
checkpoint's tokenizer.json, and llama.cpp's own GGUF tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import scipy.special as scipy_special

from nexlab import quality as Q

CHUNK = 64
N_CHUNKS = 3
THREADS = 1  # 2 spinning llama.cpp threads on the 2 shared cores are ~10-40x slower than 1 here


def _artifacts() -> Path:
    from nexlab.models import default_artifacts_dir

    return Path(default_artifacts_dir())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer dir, held-out tokens and the tiny NVFP4-BF16 / NVFP4-Q8_0 / NVFP4-Q4_K_M GGUFs."""
    from nexlab import convert
    from nexlab.models import ensure_tiny

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
    tokens = Q.tokenize_text(text, paths["tokenizer"])
    return {"dir": d, "files": files, "tokens": tokens, "text": text, "tokenizer": paths["tokenizer"]}


@pytest.fixture(scope="module")
def report(tiny):
    return Q.evaluate_variants(tiny["files"], tiny["tokens"], reference="NVFP4-BF16", chunk_size=CHUNK,
                               n_chunks=N_CHUNKS, n_threads=THREADS, progress=False)


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
    assert ll == Q.tokenize_text(tiny["text"][:4000], tiny["tokenizer"]).tolist()


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
                            progress=False)
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
                            n_chunks=N_CHUNKS, score_from=CHUNK // 2, n_threads=THREADS, progress=False)
    full = report.variants["NVFP4-BF16"].nll
    assert np.array_equal(r.variants["NVFP4-BF16"].nll, full[:, CHUNK // 2:])


# --------------------------------------------------------------------------- bad input


def test_missing_file_and_bad_reference_are_named(tiny, tmp_path):
    f = tiny["files"]["NVFP4-BF16"]
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Q.evaluate_variants({"ref": f, "x": tmp_path / "nope.gguf"}, tiny["tokens"], progress=False)
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="bad.gguf is not a GGUF"):
        Q.evaluate_variants({"ref": f, "x": tmp_path / "bad.gguf"}, tiny["tokens"], progress=False)
    with pytest.raises(ValueError, match="reference 'zzz' is not one of the files"):
        Q.evaluate_variants({"ref": f}, tiny["tokens"], reference="zzz", progress=False)
    with pytest.raises(ValueError, match="no GGUF files"):
        Q.evaluate_variants({}, tiny["tokens"], progress=False)


def test_too_few_tokens_and_bad_chunking_are_refused(tiny):
    f = {"ref": tiny["files"]["NVFP4-BF16"]}
    with pytest.raises(ValueError, match="too few tokens: 10 tokens do not fill one chunk of 64"):
        Q.evaluate_variants(f, tiny["tokens"][:10], chunk_size=64, progress=False)
    with pytest.raises(ValueError, match="too few tokens: 5 chunks of 64 need 320"):
        Q.chunk_tokens(np.arange(300), 64, 5)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 2"):
        Q.chunk_tokens(np.arange(300), 1)
    with pytest.raises(ValueError, match="negative id"):
        Q.chunk_tokens(np.array([1, -2, 3, 4]), 2)
    with pytest.raises(TypeError, match="integer ids"):
        Q.chunk_tokens(np.ones(8, np.float32), 2)
    with pytest.raises(ValueError, match="score_from must be in"):
        Q.evaluate_variants(f, tiny["tokens"], chunk_size=64, n_chunks=1, score_from=63, progress=False)


def test_token_outside_the_vocabulary_is_refused_before_llama_runs(tiny):
    bad = np.full(64, 10**6, np.int32)
    with pytest.raises(ValueError, match="outside the vocabulary .*tokenizer and model do not match"):
        Q.evaluate_variants({"ref": tiny["files"]["NVFP4-BF16"]}, bad, chunk_size=64, progress=False)


def test_non_finite_logits_are_refused():
    x = np.zeros((2, 5))
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.log_softmax(x)


def test_missing_text_file_is_named(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Q.tokenize_text(tmp_path / "missing.txt", tiny["tokenizer"])



# --------------------------------------------------------------------------- summaries used by notebook 04


def test_importance_concentration_of_known_profiles():
    from nexlab import imatrix as IM

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

    from nexlab import quantize as QZ

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
