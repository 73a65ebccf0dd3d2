"""``nexlab imatrix MODEL.gguf``: nexlab's collector through llama.cpp, proved against llama-imatrix.

The reference is the real ``llama-imatrix`` of the tree llama-cpp-python 0.3.36 vendors
(:func:`nexlab.llamacpp.build.tool_path`, built by ``nexlab setup``); a missing tool fails these tests.
Same GGUF, same text, same ``-c`` / ``--chunks`` / ``-b`` / ``-ub``: the same entry names, counts
exactly equal, ``in_sum2`` equal within 1e-3 relative (llama-imatrix sums in float32, nexlab in
float64), the same ``imatrix.*`` metadata. The stride handling, which llama.cpp's graphs may not
exercise, is proved on ggml tensors built with libggml itself against numpy.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

from nexlab.analysis import imatrix as IM
from nexlab.cli import main
from nexlab.convert.text import convert_checkpoint
from nexlab.ggufio import imatrix_file
from nexlab.llamacpp import libggml


@pytest.fixture(scope="module")
def calib_text(tiny, tmp_path_factory):
    text = Path(tiny["calib_text"]).read_text(encoding="utf-8")[:12000]
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def q8_gguf(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "tiny-NVFP4-Q8_0.gguf"
    convert_checkpoint(tiny["nvfp4"], out, variant="q8_0", show_progress=False)
    return out


def llama_imatrix(model, text, out, n_ctx, n_chunks, *extra) -> imatrix_file.Imatrix:
    """The real llama-imatrix (no perplexity, 2 threads) through nexlab.analysis.imatrix.run_llama_imatrix."""
    return IM.run_llama_imatrix(model, text, out, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=2, extra_args=extra,
                                timeout=300)


def test_compare_imatrix_sees_a_difference(tmp_path):
    a = imatrix_file.Imatrix({"blk.0.attn_qkv.weight": imatrix_file.ImatrixEntry(np.ones((1, 4), np.float32),
                                                                                  np.ones(1, np.float32))},
                   [], 1, 4)
    b = imatrix_file.Imatrix({"blk.0.attn_qkv.weight": imatrix_file.ImatrixEntry(np.full((1, 4), 1.01, np.float32),
                                                                                  np.ones(1, np.float32))},
                   [], 1, 4)
    assert IM.compare_imatrix(a, a)["max_rel_diff"] == 0.0
    assert 0.009 < IM.compare_imatrix(a, b)["max_rel_diff"] < 0.011
    assert IM.relative_drift(b, a) == pytest.approx({"blk.0.attn_qkv.weight": 0.01}, rel=1e-5)


def assert_same_imatrix(mine: imatrix_file.Imatrix, ref: imatrix_file.Imatrix) -> None:
    assert sorted(mine.entries) == sorted(ref.entries)
    assert (mine.datasets, mine.chunk_count, mine.chunk_size) == (ref.datasets, ref.chunk_count, ref.chunk_size)
    for name, r in ref.entries.items():
        m = mine.entries[name]
        assert m.in_sum2.shape == r.in_sum2.shape, name
        np.testing.assert_array_equal(m.counts, r.counts, err_msg=name)
        np.testing.assert_allclose(m.in_sum2, r.in_sum2, rtol=1e-3, atol=0, err_msg=name)


def expert_used_count(model) -> int:
    f = gguf.GGUFReader(model).fields
    return int(f[[k for k in f if k.endswith(".expert_used_count")][0]].contents())


def test_cli_on_nvfp4_bf16_gguf_matches_llama_imatrix(nexlab_gguf, calib_text, tmp_path, capsys):
    """Default batching (2048 // 128 = 16 chunks per decode, ubatches of 512), with --process-output."""
    model = nexlab_gguf("nvfp4")
    ref = llama_imatrix(model, calib_text, tmp_path / "ref.imatrix.gguf", 128, 4, "--process-output")
    out = tmp_path / "mine.imatrix.gguf"
    assert main(["imatrix", str(model), "--text", str(calib_text), "--ctx", "128", "--chunks", "4", "--threads", "2",
                 "--process-output", "-o", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    mine = imatrix_file.read_imatrix(out)
    assert_same_imatrix(mine, ref)
    assert mine.chunk_count == 4 and mine.chunk_size == 128
    assert mine.entries["output.weight"].counts[0] == 4 * 128
    k = expert_used_count(model)
    assert mine.entries["blk.0.ffn_down_exps.weight"].counts.sum() == 4 * 128 * k
    assert "token_embd.weight" not in mine.entries
    assert line.startswith(f"wrote {out}: {len(ref.entries)} entries, 4 chunks of 128 tokens")
    for layer, experts in IM.unrouted_experts(ref).items():  # llama-imatrix's zero counts, named in the summary
        assert f"of layer {layer} never routed ({', '.join(map(str, experts))})" in line


def test_api_on_q8_0_gguf_matches_llama_imatrix_across_small_batches(q8_gguf, calib_text, tmp_path):
    """-b 64 -ub 64 with 136-token chunks: every chunk is decoded as 64 + 64 + 8 tokens; the 8-token
    graphs are skipped for dense weights (fewer than 16 rows) but not for the experts."""
    ref = llama_imatrix(q8_gguf, calib_text, tmp_path / "ref.imatrix.gguf", 136, 3, "-b", 64, "-ub", 64)
    mine = IM.collect_imatrix_gguf(q8_gguf, IM.read_calibration_text(calib_text), n_ctx=136, n_chunks=3, n_threads=2,
                                   n_batch=64, n_ubatch=64, dataset=str(calib_text), show_progress=False)
    assert_same_imatrix(mine, ref)
    assert mine.entries["blk.0.attn_qkv.weight"].counts[0] == 3 * 128
    assert mine.entries["blk.0.ffn_gate_exps.weight"].counts.sum() == 3 * 136 * expert_used_count(q8_gguf)
    assert "output.weight" not in mine.entries


def test_bos_replaces_each_chunks_first_token_like_llama_imatrix(nexlab_gguf, calib_text, tmp_path):
    """A copy of the GGUF whose vocabulary adds BOS: both tools put BOS first in every chunk."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    src = nexlab_gguf("nvfp4")
    model = tmp_path / "add-bos.gguf"
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(model, arch=arch, endianess=reader.endianess)
    add_bos = {gguf.Keys.Tokenizer.ADD_BOS: MetadataDetails(gguf.GGUFValueType.BOOL, True)}
    copy_with_new_metadata(reader, writer, add_bos, [])
    ref = llama_imatrix(model, calib_text, tmp_path / "ref.imatrix.gguf", 64, 3)
    kw = dict(n_ctx=64, n_chunks=3, n_threads=2, dataset=str(calib_text), show_progress=False)
    text = IM.read_calibration_text(calib_text)
    mine = IM.collect_imatrix_gguf(model, text, **kw)
    assert_same_imatrix(mine, ref)
    plain = IM.collect_imatrix_gguf(src, text, **kw)  # without BOS the first layer sees other inputs
    name = "blk.0.attn_qkv.weight"
    assert not np.allclose(plain.entries[name].in_sum2, mine.entries[name].in_sum2, rtol=1e-3)


# --------------------------------------------------------------------------- the callback on libggml's own tensors


class _Graph:
    """Tensors in a plain ggml_context (host memory) built by libggml, filled from numpy."""

    def __init__(self):
        self.L = libggml.ggml_collector_lib()
        vp, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
        self.L.ggml_view_2d.argtypes = [vp, vp, i64, i64, sz, sz]
        self.L.ggml_view_2d.restype = vp
        self.L.ggml_view_3d.argtypes = [vp, vp, i64, i64, i64, sz, sz, sz]
        self.L.ggml_view_3d.restype = vp
        self.ctx = self.L.ggml_init(libggml._GgmlInitParams(1 << 20, None, False))

    def tensor(self, arr: np.ndarray | None, shape_ne, gtype=libggml.GGML_TYPE_F32, name=b""):
        f = self.L.ggml_new_tensor_2d if len(shape_ne) == 2 else self.L.ggml_new_tensor_3d
        t = f(self.ctx, gtype, *shape_ne)
        if name:
            self.L.ggml_set_name(t, name)
        if arr is not None:
            n = int(np.prod(shape_ne))
            dst = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(self.L.ggml_get_data(t)))
            dst[:] = np.ascontiguousarray(arr).view(np.int32).reshape(-1)
        return t

    def close(self):
        self.L.ggml_free(self.ctx)


def test_callback_honours_strides_counts_unrouted_experts_and_skips_like_llama_imatrix():
    rng = np.random.default_rng(0)
    g = _Graph()
    try:
        L = g.L
        base = rng.standard_normal((20, 16)).astype(np.float32)  # 20 rows of 16; the view takes columns 2..13
        xb = g.tensor(base, (16, 20))
        xv = L.ggml_view_2d(g.ctx, xb, 12, 20, 64, 8)
        w = g.tensor(None, (12, 6), name=b"CPU#blk.0.attn_q.weight#0")
        out_w = g.tensor(None, (12, 6), name=b"output.weight")
        dense, head = L.ggml_mul_mat(g.ctx, w, xv), L.ggml_mul_mat(g.ctx, out_w, xv)
        short = L.ggml_mul_mat(g.ctx, w, L.ggml_view_2d(g.ctx, xb, 12, 10, 64, 8))  # 10 rows < 16

        ids_base = np.full((20, 3), 3, np.int32)  # column 0 (outside the view) names expert 3: never read
        ids_base[:, 1:] = rng.integers(0, 3, (20, 2))
        ids = L.ggml_view_2d(g.ctx, g.tensor(ids_base, (3, 20), libggml.GGML_TYPE_I32), 2, 20, 12, 4)
        up = g.tensor(None, (12, 6, 4), name=b"blk.0.ffn_up_exps.weight")
        down = g.tensor(None, (12, 6, 4), name=b"blk.0.ffn_down_exps.weight")
        shared_x = L.ggml_view_3d(g.ctx, xb, 12, 1, 20, 64, 64, 8)  # one row per token, shared by both slots
        base2 = rng.standard_normal((20, 2, 16)).astype(np.float32)
        slot_x = L.ggml_view_3d(g.ctx, g.tensor(base2, (16, 40)), 12, 2, 20, 64, 128, 8)  # one row per (token, slot)
        up_node, down_node = L.ggml_mul_mat_id(g.ctx, up, shared_x, ids), L.ggml_mul_mat_id(g.ctx, down, slot_x, ids)

        c = IM._EvalCollector(process_output=False)
        assert [c._callback(n, True, None) for n in (dense, head, short, up_node, down_node)] == [
            True, False, False, True, True]
        assert IM._EvalCollector(process_output=True)._callback(head, True, None)
        for n in (dense, up_node, down_node):
            assert c._callback(n, False, None) and c.error is None
        im = c.imatrix("synthetic", chunk_size=10)
    finally:
        g.close()

    x = base[:, 2:14].astype(np.float64)
    e = im.entries["blk.0.attn_q.weight"]
    np.testing.assert_allclose(e.in_sum2[0], (x * x).sum(0).astype(np.float32), rtol=1e-6)
    assert e.counts.tolist() == [20.0]
    sel = ids_base[:, 1:]
    x2 = base2[:, :, 2:14].astype(np.float64)
    for ex in range(4):
        tok, slot = np.nonzero(sel == ex)
        up_e, down_e = im.entries["blk.0.ffn_up_exps.weight"], im.entries["blk.0.ffn_down_exps.weight"]
        assert up_e.counts[ex] == down_e.counts[ex] == tok.size
        np.testing.assert_allclose(up_e.in_sum2[ex], (x[tok] ** 2).sum(0).astype(np.float32), rtol=1e-6)
        np.testing.assert_allclose(down_e.in_sum2[ex], (x2[tok, slot] ** 2).sum(0).astype(np.float32), rtol=1e-6)
    assert up_e.counts[3] == 0 and not up_e.in_sum2[3].any()  # never routed: zero sums, count 0
    assert im.chunk_count == 2  # largest count (20 tokens of the dense weight) // chunk_size 10
    assert IM.unrouted_experts(im) == {0: [3]}
    assert "1 expert of layer 0 never routed (3)" in IM.summary_line("x.gguf", im)
    assert (imatrix_file.column_weights(up_e).reshape(4, 12)[3] == 1).all()  # what llama-quantize then uses


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case,args,message", [
    ("missing model", ["MISSING", "--text", "TEXT"], "does not exist"),
    ("empty model", ["EMPTY", "--text", "TEXT"], "empty.gguf is empty"),
    ("truncated model", ["TRUNCATED", "--text", "TEXT"], "truncated.gguf: truncated: tensor"),
    ("text too short", ["MODEL", "--text", "SHORT", "--ctx", "128"], "needs at least 2 * ctx = 256"),
    ("missing text", ["MODEL", "--text", "NOTEXT"], "calibration text file"),
    ("empty text", ["MODEL", "--text", "EMPTYTEXT"], "is empty"),
    ("zero ctx", ["MODEL", "--text", "TEXT", "--ctx", "0"], "n_ctx (--ctx) must be a positive integer"),
    ("negative chunks", ["MODEL", "--text", "TEXT", "--chunks", "-1"], "n_chunks (--chunks) must be a positive"),
    ("zero threads", ["MODEL", "--text", "TEXT", "--threads", "0"], "n_threads (--threads) must be a positive"),
    ("too many chunks per batch", ["MODEL", "--text", "TEXT", "--ctx", "4"], "means 512 parallel chunks"),
    ("tokenizer with gguf", ["MODEL", "--text", "TEXT", "--tokenizer", "x"], "carries its own tokenizer"),
])  # fmt: skip
def test_bad_input_is_one_clear_line_and_writes_nothing(case, args, message, nexlab_gguf,
                                                        calib_text, tmp_path, capsys):
    model = nexlab_gguf("nvfp4")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "truncated.gguf").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (tmp_path / "short.txt").write_text(calib_text.read_text(encoding="utf-8")[:200], encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    paths = {"MODEL": model, "MISSING": tmp_path / "nope.gguf", "EMPTY": tmp_path / "empty.gguf",
             "TRUNCATED": tmp_path / "truncated.gguf", "TEXT": calib_text, "SHORT": tmp_path / "short.txt",
             "NOTEXT": tmp_path / "nope.txt", "EMPTYTEXT": tmp_path / "empty.txt"}
    out = tmp_path / "out.imatrix.gguf"
    argv = ["imatrix", *[str(paths.get(a, a)) for a in args], "-o", str(out)]
    if "--threads" not in args:
        argv += ["--threads", "2"]
    assert main(argv) == 1, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("nexlab imatrix: error: ") and "\n" not in err, err
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob("out.imatrix.gguf*"))
