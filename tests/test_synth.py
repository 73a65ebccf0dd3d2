"""Synthetic checkpoints (nexlab.artifacts.synth): the published ModelOpt NVFP4 layout, valid values.

References: transformers' Qwen3_5MoeForConditionalGeneration (names and shapes, on the meta
device), nexlab.model.config.parameter_counts (34.66 B text parameters, itself tested against
transformers), nexlab's converter and checkpoint validator (every tensor the qwen35moe GGUF needs,
nothing left over), and llama.cpp (loads the converted file, finite logits).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nexlab.artifacts import synth
from nexlab.artifacts.tiny import ensure_text_and_tokenizer
from nexlab.convert.text import convert_checkpoint, predict_file_size
from nexlab.model.checkpoint import Checkpoint, e4m3_bytes_nan_mask, validate_checkpoint
from nexlab.model.config import parameter_counts, real_config, slice_config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return ensure_text_and_tokenizer(tmp_path_factory.mktemp("synth-art"))["tokenizer"]


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return synth.write_synth("tiny", out, seed=3, shard_bytes=4 * 2**20, tokenizer_dir=tokenizer_dir,
                             show_progress=False)


def test_real_plan_has_the_published_parameter_count():
    """Text parameters of the nex-n2-mini plan (NVFP4 weights count two values per byte) equal
    parameter_counts(real_config()) = 34.66 B; the vision tower is model.visual.* in BF16."""
    cfg = real_config()
    params, vision = 0, 0
    for group in synth.synth_plan(cfg):
        for s in group:
            n = int(np.prod(s.shape, dtype=np.int64))
            if s.key.startswith("model.visual."):
                assert s.dtype == "BF16"
                vision += n
            elif s.kind == "codes":
                params += 2 * n
            elif s.dtype == "BF16":
                params += n
    assert params == parameter_counts(cfg)["total"]
    assert round(params / 1e9, 2) == 34.66
    assert vision > 0


def test_real_plan_names_and_types():
    plan = [s for g in synth.synth_plan(real_config()) for s in g]
    keys = {s.key: s for s in plan}
    lm = synth.TEXT_PREFIX
    w = keys[lm + "layers.0.mlp.experts.255.down_proj.weight"]
    assert (w.dtype, w.shape) == ("U8", (2048, 256))
    assert keys[lm + "layers.0.mlp.experts.255.down_proj.weight_scale"].dtype == "F8_E4M3"
    assert keys[lm + "layers.39.mlp.shared_expert.gate_proj.input_scale"].shape == ()
    assert keys[lm + "layers.3.self_attn.q_proj.weight"].shape == (8192, 2048)
    assert keys["lm_head.weight"].shape == (248320, 2048)
    assert not any(".mlp.experts.gate_up_proj" in k for k in keys)  # ModelOpt's per-expert export
    n_nvfp4 = sum(s.kind == "codes" for s in plan)
    assert n_nvfp4 == 40 * (256 * 3 + 3)


def test_tiny_synth_converts_and_llama_cpp_runs_it(tiny_synth, tmp_path):
    from nexlab.llamacpp.runtime import open_model

    with Checkpoint(tiny_synth.path) as ck:
        validate_checkpoint(ck)  # raises on any missing / malformed tensor
        assert ck.quant_algo == "NVFP4"
    out = convert_checkpoint(tiny_synth.path, tmp_path / "synth.gguf", show_progress=False)
    assert out.path.stat().st_size == predict_file_size(tiny_synth.path)
    llm = open_model(out.path, 32)
    try:
        llm.eval([5, 6, 7, 8, 9, 10])
        logits = np.asarray(llm.scores[:6])
    finally:
        llm.close()
    assert np.isfinite(logits).all() and logits.std() > 0


def test_slice_synth_converts(tmp_path, tokenizer_dir):
    """The slice (real per-layer shapes, 4 layers) with a small vocabulary: every NVFP4 expert of
    the real width, converted without a complaint from the plan."""
    cfg = slice_config(vocab_size=4096)
    r = synth.write_synth(cfg, tmp_path / "slice", tokenizer_dir=tokenizer_dir, shard_bytes=512 * 2**20,
                          show_progress=False)
    assert r.n_shards >= 2
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == r.n_shards
    out = convert_checkpoint(r.path, tmp_path / "slice.gguf", show_progress=False)
    assert out.path.stat().st_size == predict_file_size(r.path)


def test_values_are_valid_and_shared_as_modelopt_writes_them(tiny_synth):
    with Checkpoint(tiny_synth.path) as ck:
        layer = "model.layers.1.mlp."
        for e in range(ck.n_experts):
            g = ck.load(f"{layer}experts.{e}.gate_proj.weight_scale_2")
            u = ck.load(f"{layer}experts.{e}.up_proj.weight_scale_2")
            assert g.dtype == torch.float32 and float(g) == float(u) and float(g) > 0
            s = ck.load(f"{layer}experts.{e}.down_proj.weight_scale").view(torch.uint8).numpy()
            assert not e4m3_bytes_nan_mask(s).any() and (s < 0x80).all()
        ins = {float(ck.load(f"{layer}experts.{e}.down_proj.input_scale")) for e in range(ck.n_experts)}
        assert len(ins) == 1  # one input_scale per projection kind
        emb = ck.load("model.embed_tokens.weight").float()
        assert torch.isfinite(emb).all() and 0.015 < float(emb.std()) < 0.025


def test_same_seed_same_bytes(tiny_synth, tmp_path, tokenizer_dir):
    again = synth.write_synth("tiny", tmp_path / "again", seed=3, shard_bytes=4 * 2**20,
                              tokenizer_dir=tokenizer_dir, show_progress=False)

    def digest(p: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(p.glob("*.safetensors")):
            h.update(f.read_bytes())
        return h.hexdigest()

    assert digest(again.path) == digest(tiny_synth.path)


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch, tokenizer_dir):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(ValueError, match=r"not enough free disk space in .*needs .* GB .* GB free"):
        synth.write_synth("tiny", tmp_path / "full", tokenizer_dir=tokenizer_dir, show_progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, match", [({"config": "nex-n2-maxi"}, "unknown configuration"),
                                        ({"seed": -1}, "seed"), ({"shard_bytes": 10}, "shard_bytes")])
def test_bad_parameters(tmp_path, bad, match):
    kw = {"config": "tiny", "out_dir": tmp_path / "x", "show_progress": False, **bad}
    with pytest.raises(ValueError, match=match):
        synth.write_synth(**kw)


def test_cli(tmp_path, tokenizer_dir, capsys):
    from nexlab.cli import main

    assert main(["synth", "tiny", "-o", str(tmp_path / "c"), "--tokenizer", str(tokenizer_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "c" / "hf_quant_config.json").is_file()
