"""The converter against the real implementations: llama.cpp's convert_hf_to_gguf.py (tensors and
model metadata byte for byte), gguf-py (NVFP4 dequantization, BF16 rounding), llama.cpp through
llama-cpp-python vs transformers' Qwen3_5MoeForCausalLM (next-token distributions), and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nexlab.convert import plan as convert_plan
from nexlab.convert import text as cv
from nexlab.formats import minifloat
from nexlab.ggufio.inspector import diff_gguf, inspect_gguf
from nexlab.model import qwen35moe as Q
from nexlab.model.chat_template import fixed_template, original_template
from nexlab.model.checkpoint import Checkpoint

KINDS = ["bf16", "nvfp4", "nvfp4_all"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_tensors_and_model_metadata_equal_llamacpp_converter(converted, kind):
    ours, ref = converted(kind)
    assert diff_gguf(ours, ref) == []  # names, types, shapes, bytes; every non-vocab, non-general key
    a, b = inspect_gguf(ours)["metadata"], inspect_gguf(ref)["metadata"]
    for key in ("general.architecture", "general.file_type", "general.quantization_version",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id"):
        assert a[key] == b[key], key
    types = {t["type"] for t in inspect_gguf(ours)["tensors"]}
    assert ("NVFP4" in types) == (kind != "bf16")


def test_diff_gguf_can_fail(nexlab_gguf):
    ours = nexlab_gguf("nvfp4")
    other = nexlab_gguf("bf16")
    d = diff_gguf(ours, other)
    assert any("type NVFP4 vs BF16" in x for x in d) and any("general.file_type" not in x for x in d)


@pytest.mark.parametrize("kind", ["nvfp4", "nvfp4_all"])
def test_nvfp4_tensors_dequantize_to_modelopt_values(tiny, nexlab_gguf, kind):
    """gguf-py's NVFP4 dequantizer on our bytes == ModelOpt's e2m1*e4m3 values (weight_scale_2
    carried by the .scale sidecar), after the same value-head reorder applied to float tensors."""
    import gguf

    from nexlab.formats.nvfp4 import dequantize_nvfp4_modelopt

    ours = nexlab_gguf(kind)
    r = gguf.GGUFReader(ours)
    tensors = {t.name: t for t in r.tensors}
    ck = Checkpoint(tiny[kind])
    plan = {p.name: p for p in convert_plan.plan_tensors(ck)}
    checked = 0
    for name, t in tensors.items():
        if t.tensor_type != gguf.GGMLQuantizationType.NVFP4:
            continue
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # e2m1 * e4m3 (ggml doubles/halves)
        srcs = plan[name].sources
        want = []
        for s in srcs:
            m = s[: -len(".weight")]
            w = dequantize_nvfp4_modelopt(ck.load(s), ck.load(m + ".weight_scale"), np.float32(1.0))
            want.append(Q.transform_float(s, torch.from_numpy(np.asarray(w)), ck.config).numpy())
        want = np.stack(want) if len(srcs) > 1 else want[0]
        assert got.shape == want.shape, name
        assert np.array_equal(got, want), name
        s2 = np.array([float(ck.load(s[: -len(".weight")] + ".weight_scale_2")) for s in srcs], np.float32)
        if name.replace(".weight", ".scale") in tensors:
            assert np.array_equal(np.asarray(tensors[name.replace(".weight", ".scale")].data), s2)
        else:
            assert np.allclose(s2, 1.0, atol=1e-6)
        checked += 1
    assert checked >= (48 if kind == "nvfp4" else 60)


def test_bf16_rounding_matches_gguf_py():
    import gguf

    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096).astype(np.float32) * np.float32(3.0) ** rng.integers(-40, 40, 4096)
    bits = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)  # NaNs, infs, ties
    ties = (np.arange(1, 257, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    for v in (x, bits, ties, np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)):
        want = gguf.quants.quantize(v, gguf.GGMLQuantizationType.BF16).view(np.uint16)
        assert np.array_equal(minifloat.f32_to_bf16_bits(v), want)


def test_v_head_permutation_tiles_value_heads():
    p = Q.v_head_permutation(n_k=2, per_k=3, head_dim=2)
    # grouped [G0v0 G0v1 G0v2 G1v0 G1v1 G1v2] -> tiled [G0v0 G1v0 G0v1 G1v1 G0v2 G1v2]
    assert p.tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]


def test_nvfp4_reorder_commutes_with_dequantization():
    """Moving packed codes and block scales by head == dequantizing and moving floats."""
    from nexlab.formats.nvfp4 import dequantize_nvfp4_modelopt, quantize_nvfp4_modelopt

    cfg = {"linear_num_key_heads": 2, "linear_num_value_heads": 6, "linear_key_head_dim": 32,
           "linear_value_head_dim": 32}
    rng = np.random.default_rng(1)
    for suffix, shape in (("in_proj_qkv", (2 * 64 + 192, 128)), ("in_proj_z", (192, 128)),
                          ("in_proj_a", (6, 128)), ("out_proj", (64, 192))):
        name = f"model.layers.0.linear_attn.{suffix}.weight"
        w, s, s2 = quantize_nvfp4_modelopt(rng.standard_normal(shape).astype(np.float32))
        w2, sc2 = Q.transform_nvfp4(name, torch.from_numpy(w), torch.from_numpy(s).view(torch.float8_e4m3fn), cfg)
        got = dequantize_nvfp4_modelopt(w2.numpy(), sc2, s2)
        want = Q.transform_float(name, torch.from_numpy(dequantize_nvfp4_modelopt(w, s, s2)), cfg).numpy()
        assert np.array_equal(got, want), suffix
        assert not np.array_equal(got, dequantize_nvfp4_modelopt(w, s, s2)), suffix  # it did move something


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nvfp4", "nvfp4_all"])
def test_llamacpp_next_token_distributions_match_transformers(tiny, nexlab_gguf, kind):
    from nexlab.analysis.reference import compare_logits, heldout_tokens

    ours = nexlab_gguf(kind)
    ids = heldout_tokens(tiny["artifacts"], tiny["tokenizer"], n=256)
    r = compare_logits(tiny[kind], ours, ids, window=128, greedy_prompts=2, greedy_len=8)
    assert r["positions"] >= 128
    assert r["mean_kl"] < 1e-3, r["mean_kl"]
    assert r["greedy_all_equal"], r["greedy"]


def test_llamacpp_tokenizes_like_the_hf_tokenizer(tiny, nexlab_gguf):
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    ours = nexlab_gguf("nvfp4")
    llm = Llama(model_path=str(ours), vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(str(tiny["tokenizer"] / "tokenizer.json"))
    text = tiny["heldout_text"].read_text()[:4000]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text).ids
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == tok.token_to_id("<|im_start|>")
    assert llm.token_eos() == tok.token_to_id("<|endoftext|>")


def test_fixed_chat_template_by_default_original_on_request(tiny, nexlab_gguf, tmp_path):
    ours = nexlab_gguf("nvfp4")
    assert inspect_gguf(ours)["metadata"]["tokenizer.chat_template"] == fixed_template()
    out = tmp_path / "orig.gguf"
    cv.convert_checkpoint(tiny["nvfp4"], out, chat_template="original", show_progress=False)
    orig = original_template(tiny["nvfp4"])
    assert orig and orig != fixed_template()
    assert inspect_gguf(out)["metadata"]["tokenizer.chat_template"] == orig


def test_interrupted_conversion_leaves_no_file(tiny, tmp_path, monkeypatch):
    real = convert_plan.plan_tensors

    def broken(*a, **k):
        plan = real(*a, **k)

        def boom():
            raise KeyboardInterrupt("simulated interruption")

        plan[len(plan) // 2].produce = boom
        return plan

    monkeypatch.setattr(cv, "plan_tensors", broken)
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(KeyboardInterrupt):
        cv.convert_checkpoint(tiny["nvfp4"], out, show_progress=False)
    assert list(out.parent.iterdir()) == []


def test_cli_convert_and_inspect(tiny, tmp_path, capsys):
    from nexlab.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["convert", str(tiny["nvfp4"]), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["NVFP4"]["bits_per_weight"] == 4.5
    assert info["totals"]["BF16"]["bits_per_weight"] == 16.0
    assert sum(d["tensors"] for d in info["totals"].values()) == len(info["tensors"])
    assert info["metadata"]["general.architecture"] == "qwen35moe"
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blk.0.ffn_gate_exps.weight" in text and "totals per type" in text
    assert main(["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "n.gguf")]) == 1


@pytest.mark.slow
def test_quantized_variants_load_in_llamacpp_and_degrade_in_order(tiny, tmp_path):
    """q8_0 / q4_k_m through the kquants hooks: llama.cpp loads them, NVFP4 experts stay NVFP4,
    and the distance to the reference stays small, Q4_K_M's the largest. BF16 and Q8_0 are not
    ordered: on the smoke model their KL to the float32 reference differ by less than the noise
    (measured 2.7e-5 and 2.4e-5 nats on one build)."""
    from nexlab.analysis.reference import (
        build_hf_model,
        heldout_tokens,
        hf_logits,
        kl_per_position,
        llama_logits,
    )
    from nexlab.llamacpp.runtime import open_model

    ids = heldout_tokens(tiny["artifacts"], tiny["tokenizer"], n=128)
    ref = hf_logits(build_hf_model(tiny["nvfp4"]), ids)
    kl = {}
    for v in ("bf16", "q8_0", "q4_k_m"):
        out = tmp_path / f"{v}.gguf"
        r = cv.convert_checkpoint(tiny["nvfp4"], out, variant=v, show_progress=False)
        assert r.types["NVFP4"] == 48
        kl[v] = float(kl_per_position(ref, llama_logits(open_model(out), ids)).mean())
    assert max(kl["bf16"], kl["q8_0"]) < kl["q4_k_m"] < 1e-2, kl
    assert kl["q8_0"] < 1e-3, kl


# ----------------------------------------------------------------------------- the planner's parts
def test_planner_keeps_the_nontrivial_sidecars_of_a_modelopt_export(tiny):
    """ModelOpt's export carries a weight_scale_2 and an input_scale per NVFP4 module: the planner writes
    the .scale of every NVFP4 module and the .input_scale only where some value differs from 1.0."""
    with Checkpoint(tiny["nvfp4"]) as ck:
        tp = convert_plan.TensorPlanner(ck)
        modules = sorted({n[: -len(".weight_scale")] for n in ck.entries if n.endswith(".weight_scale")})
        assert modules and not any(tp.made_nvfp4(m) for m in modules)
        for m in modules[:6]:
            ws2 = float(ck.load(m + ".weight_scale_2").float())
            assert tp.sidecar_values(m, ".scale").tolist() == [np.float32(ws2)]
            assert tp.keep_sidecar(m, ".scale") == (abs(ws2 - 1.0) >= Q.SCALE_TRIVIAL_ATOL)
        names = {t.name for t in tp.specs()}
        assert any(n.endswith(".scale") for n in names)


def test_planner_refuses_a_source_of_the_wrong_shape_naming_it(tiny):
    with Checkpoint(tiny["bf16"]) as ck:
        tp = convert_plan.TensorPlanner(ck)
        name = "model.embed_tokens.weight" if "model.embed_tokens.weight" in ck else next(iter(ck.entries))
        shape = tuple(ck.info(name).shape)
        tp.check_shape(name, shape)
        with pytest.raises(ValueError, match=f"tensor '{name}' has shape"):
            tp.check_shape(name, (shape[0] + 1,) + shape[1:])


def test_planner_expert_loader_stacks_the_experts_of_a_layer(tiny):
    """A layer's routed experts come back as one [n_expert, out, in] tensor equal to loading each
    expert's weight (or slicing the fused gate_up_proj), with the sources it read."""
    with Checkpoint(tiny["bf16"]) as ck:
        tp = convert_plan.TensorPlanner(ck)
        hp = tp.hp
        for proj, shape in (("gate_proj", (hp.n_ff_exp, hp.n_embd)), ("up_proj", (hp.n_ff_exp, hp.n_embd)),
                            ("down_proj", (hp.n_embd, hp.n_ff_exp))):
            load, srcs = tp.expert_loader(0, proj)
            x = load()
            assert tuple(x.shape) == (hp.n_expert,) + shape and srcs and tp.used.issuperset(srcs)
            if ck.experts_fused(0):
                continue
            for e in (0, hp.n_expert - 1):
                assert torch.equal(x[e], ck.load(f"model.layers.0.mlp.experts.{e}.{proj}.weight"))


def test_planner_hands_each_made_part_out_once(tiny):
    """--experts nvfp4: a group (gate and up of the experts of a layer) is quantized on first use and
    dropped once its bytes and scales have been taken, so at most one group is held."""
    with Checkpoint(tiny["bf16"]) as ck:
        tp = convert_plan.TensorPlanner(ck, experts="nvfp4")
        plan = {p.name: p for p in tp.plan()}
        gate, up = "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"
        a = plan[gate].produce()
        assert a.nbytes == plan[gate].nbytes and tp._made  # up's parts and the scales are still held
        for n in (gate.replace(".weight", ".scale"), up, up.replace(".weight", ".scale")):
            assert np.asarray(plan[n].produce()).nbytes == plan[n].nbytes
        assert not tp._made
