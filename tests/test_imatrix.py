"""nexlab.analysis.imatrix: llama.cpp's GGUF imatrix format and llama-quantize's column weights.

There is no callable llama.cpp imatrix reader in llama-cpp-python (common_imatrix_load lives in
libcommon), so files are checked with gguf-py's independent GGUFReader against the layout
tools/imatrix/imatrix.cpp writes and common/imatrix-loader.cpp requires (key names and types,
tensor names, order, types and ggml shapes). The column weights are then used through
llama_model_quantize in tests/test_quantize.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from nexlab.analysis import imatrix_torch
from nexlab.ggufio import imatrix_file as IM
from nexlab.model import qwen35moe


def _sample(rng) -> IM.Imatrix:
    return IM.Imatrix(
        entries={
            "blk.1.attn_qkv.weight": IM.ImatrixEntry(rng.random((1, 256)).astype(np.float32) * 50, np.array([512.0])),
            "blk.0.ffn_down_exps.weight": IM.ImatrixEntry(
                rng.random((4, 128)).astype(np.float32), np.array([10.0, 0.0, 3.0, 7.0], np.float32)
            ),
            "output.weight": IM.ImatrixEntry(rng.random(256).astype(np.float32), np.array([512.0])),
        },
        datasets=["calib.txt"],
        chunk_count=2,
        chunk_size=256,
    )


def test_file_layout_is_llama_imatrix_gguf(tmp_path):
    im = _sample(np.random.default_rng(0))
    p = IM.write_imatrix(tmp_path / "x.imatrix.gguf", im)
    r = gguf.GGUFReader(p)
    f = r.fields
    assert "general.architecture" not in f
    assert bytes(f["general.type"].parts[-1]).decode() == "imatrix"
    assert f["imatrix.datasets"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert f["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert f["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    assert int(f["imatrix.chunk_count"].parts[-1][0]) == 2 and int(f["imatrix.chunk_size"].parts[-1][0]) == 256
    names = [t.name for t in r.tensors]
    assert names == [n + s for n in sorted(im.entries) for s in (".in_sum2", ".counts")]
    shapes = {t.name: [int(v) for v in t.shape] for t in r.tensors}  # ggml ne order
    assert shapes["blk.0.ffn_down_exps.weight.in_sum2"] == [128, 4]
    assert shapes["blk.0.ffn_down_exps.weight.counts"] == [1, 4]
    assert shapes["blk.1.attn_qkv.weight.in_sum2"] == [256]  # ggml_n_dims drops the trailing 1
    assert shapes["blk.1.attn_qkv.weight.counts"] == [1]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    # expert-major data: row j of in_sum2 is expert j
    d = {t.name: np.asarray(t.data) for t in r.tensors}
    e = im.entries["blk.0.ffn_down_exps.weight"]
    assert np.array_equal(d["blk.0.ffn_down_exps.weight.in_sum2"].reshape(4, 128), e.in_sum2)


def test_round_trip(tmp_path):
    im = _sample(np.random.default_rng(1))
    back = IM.read_imatrix(IM.write_imatrix(tmp_path / "a.gguf", im))
    assert back.datasets == im.datasets and back.chunk_count == 2 and back.chunk_size == 256
    assert sorted(back.entries) == sorted(im.entries)
    for n, e in im.entries.items():
        assert np.array_equal(back.entries[n].in_sum2, e.in_sum2)
        assert np.array_equal(back.entries[n].counts, e.counts)
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # no temp file left


def test_column_weights_as_load_imatrix():
    s = np.arange(12, dtype=np.float32).reshape(3, 4) * np.float32(0.7)
    e = IM.ImatrixEntry(s, np.array([2.5, 0.0, 3.0], np.float32))
    w = IM.column_weights(e).reshape(3, 4)
    assert np.array_equal(w[0], s[0] / np.float32(3.0))  # lround(2.5) == 3 (half away from zero)
    assert np.array_equal(w[1], np.ones(4, np.float32))  # expert never routed to: weights 1
    assert np.array_equal(w[2], s[2] / np.float32(3.0))
    assert w.dtype == np.float32


def test_imatrix_for_tensor_fallbacks():
    msgs = []
    w = {"blk.0.attn_qkv.weight": np.ones(256, np.float32), "token_embd.weight": np.ones(3, np.float32)}
    assert qwen35moe.imatrix_for_tensor(None, "blk.0.attn_qkv.weight", 256) is None
    assert qwen35moe.imatrix_for_tensor(w, "blk.0.attn_gate.weight", 256, log=msgs.append) is None
    assert "did not find weights for blk.0.attn_gate.weight" in msgs[-1]
    assert qwen35moe.imatrix_for_tensor(w, "token_embd.weight", 256, log=msgs.append) is None
    assert qwen35moe.imatrix_for_tensor(w, "blk.0.attn_qkv.weight", 256).shape == (1, 256)
    with pytest.raises(ValueError, match="imatrix size 256 is different from tensor size 512 for blk.0.attn_qkv"):
        qwen35moe.imatrix_for_tensor(w, "blk.0.attn_qkv.weight", 256, n_expert=2)


def test_missing_metadata_is_refused(tmp_path):
    p = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(p), "imatrix")
    w.add_tensor("a.weight.in_sum2", np.ones(8, np.float32))
    w.add_tensor("a.weight.counts", np.ones(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="missing imatrix metadata"):
        IM.read_imatrix(p)


def _write_raw(p, tensors):
    w = gguf.GGUFWriter(str(p), "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["x"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    for n, a in tensors.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_files_get_clear_messages(tmp_path):
    _write_raw(tmp_path / "m.gguf", {"a.weight.in_sum2": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="mismatched sums and counts for a.weight"):
        IM.read_imatrix(tmp_path / "m.gguf")
    bad = np.ones(8, np.float32)
    bad[2] = np.nan
    _write_raw(tmp_path / "n.gguf", {"a.weight.in_sum2": bad, "a.weight.counts": np.ones(1, np.float32)})
    with pytest.raises(ValueError, match="a.weight: in_sum2 has non-finite"):
        IM.read_imatrix(tmp_path / "n.gguf")
    _write_raw(tmp_path / "t.gguf", {"a.weight.in_sum2": np.ones(8, np.float16),
                                     "a.weight.counts": np.ones(1, np.float32)})
    with pytest.raises(ValueError, match="must be F32"):
        IM.read_imatrix(tmp_path / "t.gguf")
    _write_raw(tmp_path / "s.gguf", {"a.weight.in_sum2": np.ones(9, np.float32),
                                     "a.weight.counts": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="not a whole number of rows"):
        IM.read_imatrix(tmp_path / "s.gguf")
    with pytest.raises(FileNotFoundError):
        IM.read_imatrix(tmp_path / "nope.gguf")


def test_writer_needs_a_dataset_name(tmp_path):
    im = _sample(np.random.default_rng(3))
    im.datasets = []
    with pytest.raises(ValueError, match="imatrix.datasets must name at least one dataset"):
        IM.write_imatrix(tmp_path / "x.gguf", im)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_non_finite(tmp_path):
    im = _sample(np.random.default_rng(2))
    im.entries["output.weight"].in_sum2[0, 3] = np.inf
    with pytest.raises(ValueError, match="output.weight: in_sum2 has non-finite"):
        IM.write_imatrix(tmp_path / "bad.gguf", im)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- collection


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen3_5MoeForCausalLM

    from nexlab.model import config as C

    torch.manual_seed(0)
    cfg = C.to_transformers(C.tiny_config(vocab_size=512))
    cfg._attn_implementation = "eager"
    return Qwen3_5MoeForCausalLM(cfg).eval()


def test_collect_imatrix_entries_counts_and_sums(tiny_model, tmp_path):
    from nexlab.model.qwen35moe import v_head_permutation

    model = tiny_model
    cfg = model.config
    C_SIZE, N_CHUNKS = 16, 2
    tokens = list(np.random.default_rng(0).integers(5, 500, N_CHUNKS * C_SIZE + 7))
    # independent observers on the same forward passes: the final norm's output (= lm_head input)
    # and out_proj's input in HF column order
    seen = {"norm": 0, "out": 0}

    def on_norm(m, a, out):
        seen["norm"] = seen["norm"] + (out.double() ** 2).reshape(-1, out.shape[-1]).sum(0)

    def on_out(m, a):
        seen["out"] = seen["out"] + (a[0].double() ** 2).reshape(-1, a[0].shape[-1]).sum(0)

    hooks = [model.model.norm.register_forward_hook(on_norm),
             model.model.layers[0].linear_attn.out_proj.register_forward_pre_hook(on_out)]
    try:
        im = imatrix_torch.collect_imatrix(model, tokens, chunk_size=C_SIZE, dataset="calib.txt", process_output=True,
                                show_progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert im.chunk_count == N_CHUNKS and im.chunk_size == C_SIZE and im.datasets == ["calib.txt"]
    n_tok = N_CHUNKS * C_SIZE
    E, k, L = cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    for i in range(L):
        full = (i + 1) % 4 == 0
        dense = (["attn_q", "attn_k", "attn_v", "attn_output"] if full
                 else ["attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha", "ssm_out"])
        dense += ["ffn_gate_inp", "ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
        for d in dense:
            e = im.entries[f"blk.{i}.{d}.weight"]
            assert e.n_mat == 1 and e.counts[0] == n_tok
        for d in ("gate", "up", "down"):
            e = im.entries[f"blk.{i}.ffn_{d}_exps.weight"]
            assert e.n_mat == E and e.counts.sum() == n_tok * k  # every token picks k experts
        assert np.array_equal(im.entries[f"blk.{i}.ffn_gate_exps.weight"].in_sum2,
                              im.entries[f"blk.{i}.ffn_up_exps.weight"].in_sum2)
    assert im.entries["output.weight"].counts[0] == n_tok
    assert "token_embd.weight" not in im.entries  # a lookup, not a matmul
    np.testing.assert_allclose(im.entries["output.weight"].in_sum2[0], seen["norm"].numpy().astype(np.float32),
                               rtol=1e-6)
    # ssm_out columns follow the converter's value-head permutation
    p = v_head_permutation(cfg.linear_num_key_heads, cfg.linear_num_value_heads // cfg.linear_num_key_heads,
                           cfg.linear_value_head_dim)
    assert not np.array_equal(p, np.arange(p.size))
    np.testing.assert_allclose(im.entries["blk.0.ssm_out.weight"].in_sum2[0], seen["out"].numpy()[p].astype(np.float32),
                               rtol=1e-6)
    # the result is a writable, readable imatrix
    back = IM.read_imatrix(IM.write_imatrix(tmp_path / "tiny.imatrix.gguf", im))
    assert sorted(back.entries) == sorted(im.entries)


def test_collect_imatrix_skips_output_by_default_like_llama_imatrix(tiny_model):
    im = imatrix_torch.collect_imatrix(tiny_model, list(range(5, 21)), chunk_size=16, show_progress=False)
    assert "output.weight" not in im.entries and all(n.startswith("blk.") for n in im.entries)


def test_collect_imatrix_needs_one_chunk(tiny_model):
    with pytest.raises(ValueError, match="at least one chunk of 64 tokens"):
        imatrix_torch.collect_imatrix(tiny_model, [1, 2, 3], chunk_size=64, show_progress=False)
