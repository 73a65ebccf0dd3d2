"""nexlab.model.tokenizer / nexlab.artifacts.train / nexlab.artifacts.tiny: the tiny build, its ModelOpt checkpoints
and the slice writer.

The tiny artifacts are built once per session (smoke mode) in a temporary folder, or reused from
``$NEXLAB_ARTIFACTS`` when set. Oracles: nvidia-modelopt's own export (byte identity of the
nexlab writer), llama.cpp's reference converter (accepts the checkpoints), transformers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from nexlab.artifacts import checkpoints as M
from nexlab.artifacts import modelopt, slice
from nexlab.artifacts import tiny as artifacts_tiny
from nexlab.llamacpp.source import run_reference_converter
from nexlab.model.config import SPECIAL_TOKENS, tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    art = os.environ.get("NEXLAB_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")
    return artifacts_tiny.ensure_tiny(art, smoke=True)


# --------------------------------------------------------------------------- tokenizer and text


def test_tokenizer_specials_are_single_tokens_with_ids_0_to_4(tiny):
    from nexlab.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny["tokenizer"])
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    text = "<|im_start|>user\nhi<|im_end|>\n<think>\nok</think>done<|endoftext|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for i, s in enumerate(SPECIAL_TOKENS):
        assert ids.count(i) == text.count(s)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == tiny_config()["text_config"]["vocab_size"]
    assert (tiny["tokenizer"] / "tokenizer_config.json").is_file()


def test_tokenizer_round_trips_heldout_text_bytes(tiny):
    from nexlab.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny["tokenizer"])
    text = tiny["heldout_text"].read_text(encoding="utf-8")[:20000] + "\n héllo wörld ∑ 😀\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # BPE actually compresses code


def test_tokenizer_training_is_deterministic(tiny, tmp_path):
    from nexlab.model.tokenizer import build_tokenizer_object

    a = build_tokenizer_object([tiny["calib_text"]], vocab_size=600).to_str()
    b = build_tokenizer_object([tiny["calib_text"]], vocab_size=600).to_str()
    assert a == b


def test_tokenizer_pretokenizer_is_qwen35s_as_nex_n2_minis_so_llamacpp_splits_the_same(tiny):
    spec = json.loads((tiny["tokenizer"] / "tokenizer.json").read_text())
    pre = spec["pre_tokenizer"]["pretokenizers"]
    from nexlab.model.tokenizer import QWEN35_SPLIT_PATTERN, pretokenizer_name

    assert pre[0]["type"] == "Split" and pre[0]["pattern"]["Regex"] == QWEN35_SPLIT_PATTERN
    assert pre[1]["type"] == "ByteLevel" and pre[1]["use_regex"] is False
    assert spec["normalizer"] is None
    assert pretokenizer_name(tiny["tokenizer"]) == "qwen35"


def test_text_splits_come_from_disjoint_files(tiny):
    files = json.loads((tiny["text"] / "files.json").read_text())
    sets = [set(files[k]) for k in ("train", "calib", "heldout")]
    assert all(sets) and not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for k in ("train", "calib", "heldout"):
        assert tiny[f"{k}_text"].stat().st_size > 100_000


# --------------------------------------------------------------------------- training record


def test_training_record_has_loss_curve_and_heldout_perplexity(tiny):
    info = artifacts_tiny.load_train_info(tiny["artifacts"])
    assert info["steps_done"] == len(info["losses"]) >= 1
    assert all(math.isfinite(l) for _, l in info["losses"])
    assert math.isclose(info["heldout_perplexity"], math.exp(info["heldout_loss"]), rel_tol=1e-9)
    assert info["heldout_perplexity"] < info["vocab_size"]  # better than uniform even after a few steps
    if info["mode"] == "full":
        assert info["heldout_perplexity"] < info["vocab_size"] / 10


def test_ensure_tiny_reuses_a_complete_build(tiny):
    stamp = tiny["build_json"].stat().st_mtime_ns
    t = time.perf_counter()
    again = artifacts_tiny.ensure_tiny(tiny["artifacts"], smoke=True)
    assert time.perf_counter() - t < 5 and again == tiny
    assert tiny["build_json"].stat().st_mtime_ns == stamp


def _with_qwen2_split(tokenizer_json: Path) -> None:
    """Turn a tiny tokenizer.json into what an earlier nexlab wrote (Qwen2's split regex)."""
    from nexlab.model.tokenizer import QWEN2_SPLIT_PATTERN

    spec = json.loads(tokenizer_json.read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_SPLIT_PATTERN
    tokenizer_json.write_text(json.dumps(spec))


def test_ensure_tiny_rebuilds_a_build_made_with_an_older_tokenizer(tiny, tmp_path):
    """A complete build from before the tiny tokenizer took Qwen3.5's pre-tokenizer (Qwen2's regex
    in tokenizer/ and in every checkpoint) is not reused: tokenizer and checkpoints are made again."""
    from nexlab.model.tokenizer import pretokenizer_name

    art = tmp_path / "art"
    shutil.copytree(tiny["artifacts"] / "text", art / "text")
    shutil.copytree(tiny["build_json"].parent, art / "tiny")
    p = artifacts_tiny.tiny_paths(art)
    for k in ("tokenizer", "bf16", "nvfp4", "nvfp4_all"):
        _with_qwen2_split(p[k] / "tokenizer.json")
        assert pretokenizer_name(p[k]) == "qwen2"
    assert (not artifacts_tiny.tokenizer_is_current(p["tokenizer"])
            and not artifacts_tiny._built_with_current_tokenizer(p))
    stamp = p["build_json"].stat().st_mtime_ns

    assert artifacts_tiny.ensure_tiny(art, smoke=True) == p
    assert p["build_json"].stat().st_mtime_ns != stamp
    want = (tiny["tokenizer"] / "tokenizer.json").read_bytes()  # training is deterministic
    for k in ("tokenizer", "bf16", "nvfp4", "nvfp4_all"):
        assert (p[k] / "tokenizer.json").read_bytes() == want, k
    assert artifacts_tiny.tokenizer_is_current(p["tokenizer"]) and artifacts_tiny._built_with_current_tokenizer(p)
    # a tokenizer trained again after the build (ensure_text_and_tokenizer alone) makes it stale too
    _with_qwen2_split(p["bf16"] / "tokenizer.json")
    assert artifacts_tiny.tokenizer_is_current(p["tokenizer"]) and not artifacts_tiny._built_with_current_tokenizer(p)


def test_ensure_slice_keeps_a_slice_but_gives_it_the_current_tiny_tokenizer(tiny, tmp_path):
    from nexlab.model.config import SLICE_DEFAULT_VOCAB

    art = tmp_path / "art"
    tok = artifacts_tiny.tiny_paths(art)["tokenizer"]
    shutil.copytree(tiny["tokenizer"], tok)
    out = art / "slice" / "nvfp4"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"text_config": {"vocab_size": SLICE_DEFAULT_VOCAB}}))
    (out / "model.safetensors.index.json").write_text("{}")  # a kept slice: write_slice is not called
    (out / "tokenizer.json").write_text("{}")  # an older tokenizer
    assert slice.ensure_slice(art, show_progress=False) == out
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tok / name).read_bytes(), name
    assert (out / "model.safetensors.index.json").read_text() == "{}"


# --------------------------------------------------------------------------- checkpoint layout


SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


@pytest.mark.parametrize("variant", ["bf16", "nvfp4", "nvfp4_all"])
def test_checkpoint_is_laid_out_as_published(tiny, variant):
    d = tiny[variant]
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    m = [SHARD.match(s) for s in shards]
    assert len(shards) >= 2 and all(m)
    assert [int(x.group(1)) for x in m] == list(range(1, len(shards) + 1))
    assert {int(x.group(2)) for x in m} == {len(shards)}
    index = json.loads((d / "model.safetensors.index.json").read_text())
    rows = M.tensor_table(d)
    assert {r["name"]: r["shard"] for r in rows} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(r["bytes"] for r in rows)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"] and cfg["model_type"] == "qwen3_5_moe"
    assert cfg["text_config"]["model_type"] == "qwen3_5_moe_text" and "vision_config" in cfg
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (d / f).is_file()
    names = set(index["weight_map"])
    assert "lm_head.weight" in names and "model.language_model.embed_tokens.weight" in names
    assert any(n.startswith("model.visual.") for n in names)
    assert "model.language_model.layers.0.mlp.experts.15.down_proj.weight" in names  # per-expert keys
    if variant != "bf16":
        hq = json.loads((d / "hf_quant_config.json").read_text())
        assert hq["producer"]["name"] == "modelopt"
        assert hq["quantization"]["quant_algo"] == "NVFP4" and hq["quantization"]["group_size"] == 16
        assert cfg["quantization_config"]["quant_method"] == "modelopt"


def test_checkpoint_index_and_read_tensors_go_by_stored_key(tiny, tmp_path):
    """models.checkpoint_index / read_tensors (through nexlab.model.checkpoint) keep the stored keys, the
    multimodal prefix and the vision tower included, for a sharded folder and for one model.safetensors."""
    from safetensors.torch import load_file, save_file

    d = tiny["nvfp4"]
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert M.checkpoint_index(d) == wm
    expert = "model.language_model.layers.0.mlp.experts.0.up_proj."
    keys = [next(k for k in sorted(wm) if k.startswith("model.visual.")), "lm_head.weight",
            expert + "weight", expert + "weight_scale", expert + "weight_scale_2"]
    got = M.read_tensors(d, keys)
    assert list(got) == keys

    def raw(t):
        return t.reshape(-1).view(torch.uint8)  # float8 has no ==; compare bytes

    for k in keys:
        want = load_file(str(d / wm[k]))[k]
        assert got[k].dtype == want.dtype and torch.equal(raw(got[k]), raw(want)), k
    with pytest.raises(KeyError, match="not_a_tensor"):
        M.read_tensors(d, [keys[0], "not_a_tensor"])

    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text((d / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in got.items()}, str(single / "model.safetensors"))
    assert M.checkpoint_index(single) == dict.fromkeys(keys, "model.safetensors")
    again = M.read_tensors(single)
    assert set(again) == set(keys) and all(torch.equal(raw(again[k]), raw(got[k])) for k in keys)


def _quantized_modules(d: Path) -> set[str]:
    return {r["name"][: -len(".weight_scale")] for r in M.tensor_table(d) if r["name"].endswith(".weight_scale")}


def test_nvfp4_scope_is_routed_and_shared_experts_only(tiny):
    q = _quantized_modules(tiny["nvfp4"])
    t = tiny_config()["text_config"]
    expected = set()
    for layer in range(t["num_hidden_layers"]):
        p = f"model.language_model.layers.{layer}.mlp."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            expected.add(p + f"shared_expert.{proj}")
            expected.update(p + f"experts.{e}.{proj}" for e in range(t["num_experts"]))
    assert q == expected
    rows = {r["name"]: r for r in M.tensor_table(tiny["nvfp4"])}
    w = rows["model.language_model.layers.0.mlp.experts.0.gate_proj.weight"]
    s = rows["model.language_model.layers.0.mlp.experts.0.gate_proj.weight_scale"]
    assert (w["dtype"], w["shape"]) == ("U8", [256, 128]) and (s["dtype"], s["shape"]) == ("F8_E4M3", [256, 16])
    assert rows["model.language_model.layers.0.mlp.experts.0.gate_proj.weight_scale_2"]["shape"] == []
    assert rows["model.language_model.layers.0.mlp.shared_expert_gate.weight"]["dtype"] == "BF16"
    assert rows["model.language_model.layers.0.mlp.gate.weight"]["dtype"] == "BF16"


def test_nvfp4_all_also_quantizes_attention_and_linear_attention(tiny):
    q = _quantized_modules(tiny["nvfp4_all"])
    mlp = _quantized_modules(tiny["nvfp4"])
    extra = q - mlp
    lm = "model.language_model.layers."
    assert {f"{lm}3.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} <= extra
    assert {f"{lm}0.linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "out_proj")} <= extra
    assert mlp <= q
    assert not any(re.search(r"lm_head|embed|visual|mlp\.gate$|shared_expert_gate|in_proj_[ab]$", n) for n in q)


# --------------------------------------------------------------------------- nexlab writer == ModelOpt


def test_nexlab_writer_gives_modelopt_bytes_for_the_tiny_model(tiny):
    """Same BF16 weights -> nexlab.artifacts.modelopt.quantize_layer_modelopt gives weight, weight_scale and
    weight_scale_2 byte-identical to nvidia-modelopt's export, for every quantized tensor.
    input_scale needs activations (calibration), which the writer does not see: it is passed in
    (one value per projection kind, which is all ModelOpt's export holds, checked here) and
    therefore only its placement and dtype are compared."""
    cfg = json.loads((tiny["bf16"] / "config.json").read_text())
    bf16 = M.read_tensors(tiny["bf16"])
    ref = M.read_tensors(tiny["nvfp4"])
    n_layers = cfg["text_config"]["num_hidden_layers"]
    compared = 0
    for layer in range(n_layers):
        prefix = f"model.language_model.layers.{layer}."
        rel = {k[len(prefix):]: v for k, v in bf16.items() if k.startswith(prefix)}
        ins = {}
        for kind, pat in (("experts", "mlp.experts.{}."), ("shared_expert", "mlp.shared_expert.")):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                vals = {float(v) for k, v in ref.items()
                        if k.startswith(prefix) and k.endswith(f".{proj}.input_scale")
                        and (".experts." in k) == (kind == "experts")}
                assert len(vals) == 1, f"layer {layer} {kind}.{proj}: ModelOpt input_scale not shared: {vals}"
                ins[f"{kind}.{proj}"] = vals.pop()
        mine = modelopt.quantize_layer_modelopt(prefix, rel, cfg, input_scales=ins)
        theirs = {k: v for k, v in ref.items() if k.startswith(prefix)}
        assert set(mine) == set(theirs), f"layer {layer}: tensor names differ"
        for k, v in theirs.items():
            assert mine[k].dtype == v.dtype and tuple(mine[k].shape) == tuple(v.shape), k
            if v.dtype == torch.float8_e4m3fn:
                assert torch.equal(mine[k].view(torch.uint8), v.view(torch.uint8)), k
            else:
                assert torch.equal(mine[k], v), k
            compared += k.endswith(".weight_scale_2")
    assert compared == n_layers * (cfg["text_config"]["num_experts"] + 1) * 3


def test_slice_writer_writes_modelopts_layout(tiny, tmp_path):
    """The streaming writer on a tiny-shaped config gives the tensor names, dtypes and shapes,
    hf_quant_config.json and quantization_config that ModelOpt's export wrote for the tiny
    model (vision tower aside: the slice carries none)."""
    cfg = json.loads((tiny["bf16"] / "config.json").read_text())
    out = slice.write_slice(tmp_path / "slice", cfg=cfg, tokenizer_dir=tiny["tokenizer"], show_progress=False)
    mine = {r["name"]: (r["dtype"], r["shape"]) for r in M.tensor_table(out)}
    ref = {r["name"]: (r["dtype"], r["shape"]) for r in M.tensor_table(tiny["nvfp4"]) if ".visual." not in r["name"]}
    assert mine == ref
    assert len(set(M.checkpoint_index(out).values())) == cfg["text_config"]["num_hidden_layers"] + 2
    hq = json.loads((out / "hf_quant_config.json").read_text())
    hq_ref = json.loads((tiny["nvfp4"] / "hf_quant_config.json").read_text())
    assert hq["quantization"] == hq_ref["quantization"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    qc_ref = json.loads((tiny["nvfp4"] / "config.json").read_text())["quantization_config"]
    assert qc == qc_ref
    assert not list(tmp_path.glob(".slice.*"))  # no staging folder left behind


def test_sharded_writer_refuses_a_tensor_written_twice(tmp_path):
    w = M.ShardedWriter(tmp_path, shard_bytes=1 << 20)
    w.add({"a": torch.zeros(4)})
    with pytest.raises(ValueError, match="'a' written twice"):
        w.add({"a": torch.ones(4)})


# --------------------------------------------------------------------------- llama.cpp's converter accepts them


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["nvfp4", "bf16"])
def test_llamacpp_reference_converter_accepts_the_checkpoint(tiny, variant, tmp_path):
    out = run_reference_converter(tiny[variant], tmp_path / f"{variant}.gguf", timeout=600)
    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "qwen35moe"
    types = {t.name: int(t.tensor_type) for t in reader.tensors}
    assert "blk.0.ffn_gate_exps.weight" in types and "blk.3.attn_q.weight" in types
    if variant == "nvfp4":
        assert types["blk.0.ffn_gate_exps.weight"] == 40 and types["blk.0.ffn_down_shexp.weight"] == 40
        assert types["blk.3.attn_q.weight"] != 40


def test_training_is_deterministic_given_the_seed(tiny):
    from transformers import Qwen3_5MoeForCausalLM

    from nexlab.artifacts.train import TrainSettings, tokenize_file, train_tiny
    from nexlab.model.config import to_transformers
    from nexlab.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny["tokenizer"])
    ids = tokenize_file(tok, tiny["calib_text"])
    s = TrainSettings(steps=2, seq_len=64, batch_size=2, warmup=1, seed=3, eval_windows=2)
    runs = []
    for _ in range(2):
        torch.manual_seed(s.seed)
        model = Qwen3_5MoeForCausalLM(to_transformers(tiny_config(len(tok))))
        res = train_tiny(model, ids, ids[:1000], s)
        runs.append((res.losses, res.heldout_loss, model.lm_head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])
