"""Reading and validating checkpoints: prefixes, shards, and malformed inputs that must be refused
with a clear error naming the tensor, leaving no output file behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nexlab.convert.text import convert_checkpoint
from nexlab.model.checkpoint import Checkpoint, canonical_name, read_safetensors_header, validate_checkpoint


def _shard_of(ckpt: Path, key: str) -> Path:
    wm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / wm[key]


def _rewrite(ckpt: Path, shard: Path, fn) -> None:
    """Load one shard, let ``fn`` edit its dict, save it back and fix the index."""
    tensors = load_file(str(shard))
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    idx_path = ckpt / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != shard.name or k in tensors}
    for k in tensors:
        idx["weight_map"][k] = shard.name
    idx_path.write_text(json.dumps(idx))


def _key(ckpt: Path, suffix: str) -> str:
    wm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    hits = [k for k in wm if k.endswith(suffix)]
    assert hits, suffix
    return hits[0]


def _assert_refused(ckpt: Path, tmp_path: Path, match: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "model.gguf"
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(ckpt, out, show_progress=False)
    assert not out.exists()
    assert list(out_dir.iterdir()) == []  # no temporary file left either


def test_canonical_names_strip_multimodal_prefixes_and_skip_vision():
    assert canonical_name("model.language_model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate.weight"
    assert canonical_name("language_model.model.norm.weight") == "model.norm.weight"
    assert canonical_name("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical_name("model.layers.1.input_layernorm.weight") == "model.layers.1.input_layernorm.weight"
    assert canonical_name("lm_head.weight") == "lm_head.weight"
    assert canonical_name("model.visual.blocks.0.attn.qkv.weight") is None
    assert canonical_name("mtp.layers.0.input_layernorm.weight") is None


def test_sharded_checkpoint_index_matches_headers(tiny):
    ck = Checkpoint(tiny["nvfp4"])
    wm = json.loads((tiny["nvfp4"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(ck.entries) + len(ck.skipped) == len(wm)
    assert any(k.startswith("model.visual.") for k in ck.skipped)
    e = ck.info("model.layers.0.mlp.experts.0.gate_proj.weight_scale")
    assert e.dtype == "F8_E4M3" and ck.load(e.name).dtype == torch.float8_e4m3fn
    rep = validate_checkpoint(ck)
    assert rep.problems == [] and rep.nvfp4_modules


def test_every_stored_tensor_reads_bit_exact_like_safetensors_set_aside_ones_included(tiny):
    """Checkpoint is the workbook's one safetensors reader: ``stored`` lists every key where the index
    puts it, and ``load_stored`` / ``load`` give what safetensors' own load_file gives, byte for byte."""
    d = tiny["nvfp4"]
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    with Checkpoint(d) as ck:
        assert {k: e.shard.name for k, e in ck.stored.items()} == wm
        assert set(ck.skipped) < set(ck.stored) and ck.skipped
        assert all(ck.stored[e.key] is e for e in ck.entries.values())
        n = 0
        for shard in sorted(set(wm.values())):
            for key, want in load_file(str(d / shard)).items():
                got = ck.load_stored(key)
                assert got.dtype == want.dtype and got.shape == want.shape, key
                assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key
                name = canonical_name(key)
                if name is not None:
                    assert torch.equal(ck.load(name).reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8))
                n += 1
        assert n == len(wm)
        with pytest.raises(ValueError, match="'nope' is not stored"):
            ck.load_stored("nope")


@pytest.mark.parametrize("kind", ["bf16", "nvfp4", "nvfp4_all"])
def test_tiny_checkpoints_validate(tiny, kind):
    assert validate_checkpoint(Checkpoint(tiny[kind])).problems == []


def test_missing_expert_is_refused_naming_layer_and_expert(ckpt_copy, tmp_path):
    k = _key(ckpt_copy, "layers.1.mlp.experts.3.up_proj.weight")
    prefix = k[: -len("up_proj.weight")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        key = f"{prefix}{proj}.weight"
        _rewrite(ckpt_copy, _shard_of(ckpt_copy, key),
                 lambda t, key=key: [t.pop(n) for n in list(t) if n.startswith(key[: -len("weight")])])
    _assert_refused(ckpt_copy, tmp_path, r"layer 1: 3 expert tensors missing \(experts \[3\]\)")


def test_truncated_shard_is_refused(ckpt_copy, tmp_path):
    shard = sorted(ckpt_copy.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors_header(shard)
    _assert_refused(ckpt_copy, tmp_path, rf"{shard.name}: truncated shard")


def test_wrong_scale_dtype_is_refused(ckpt_copy, tmp_path):
    key = _key(ckpt_copy, "layers.2.mlp.shared_expert.down_proj.weight_scale")
    _rewrite(ckpt_copy, _shard_of(ckpt_copy, key), lambda t: t.__setitem__(key, t[key].float()))
    _assert_refused(ckpt_copy, tmp_path, r"model\.layers\.2\.mlp\.shared_expert\.down_proj\.weight_scale: dtype F32, "
                                         r"expected F8_E4M3")


def test_group_size_32_is_refused(ckpt_copy, tmp_path):
    hq = ckpt_copy / "hf_quant_config.json"
    cfg = json.loads(hq.read_text())
    cfg["quantization"]["group_size"] = 32
    hq.write_text(json.dumps(cfg))
    key = _key(ckpt_copy, "layers.0.mlp.experts.0.gate_proj.weight_scale")
    _rewrite(ckpt_copy, _shard_of(ckpt_copy, key), lambda t: t.__setitem__(key, t[key][:, ::2].contiguous()))
    _assert_refused(ckpt_copy, tmp_path, r"group_size 32, NVFP4 needs 16")
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight_scale: .* group size 32"):
        convert_checkpoint(ckpt_copy, tmp_path / "x.gguf", show_progress=False)


def test_nan_weight_scale_2_is_refused(ckpt_copy, tmp_path):
    key = _key(ckpt_copy, "layers.3.mlp.experts.5.down_proj.weight_scale_2")
    _rewrite(ckpt_copy, _shard_of(ckpt_copy, key), lambda t: t.__setitem__(key, torch.full_like(t[key], float("nan"))))
    _assert_refused(ckpt_copy, tmp_path, r"model\.layers\.3\.mlp\.experts\.5\.down_proj\.weight_scale_2: value nan")


def test_nan_block_scale_is_refused_during_streaming(ckpt_copy, tmp_path):
    key = _key(ckpt_copy, "layers.4.mlp.experts.1.up_proj.weight_scale")

    def poison(t):
        b = t[key].view(torch.uint8).clone()
        b[2, 1] = 0x7F  # E4M3 NaN
        t[key] = b.view(torch.float8_e4m3fn)

    _rewrite(ckpt_copy, _shard_of(ckpt_copy, key), poison)
    _assert_refused(ckpt_copy, tmp_path, r"experts\.1\.up_proj\.weight_scale: NaN block scale at row 2, block 1")


def test_missing_non_expert_tensor_is_refused(ckpt_copy, tmp_path):
    key = _key(ckpt_copy, "layers.0.linear_attn.A_log")
    _rewrite(ckpt_copy, _shard_of(ckpt_copy, key), lambda t: t.pop(key))
    _assert_refused(ckpt_copy, tmp_path, r"model\.layers\.0\.linear_attn\.A_log is missing")


def test_e4m3_nan_mask_covers_both_signs():
    from nexlab.model.checkpoint import e4m3_bytes_nan_mask

    b = np.arange(256, dtype=np.uint8)
    f = torch.from_numpy(b.copy()).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(e4m3_bytes_nan_mask(b), np.isnan(f))


def _single_file_copy(src: Path, dst: Path, tensors: dict) -> Path:
    """``tensors`` saved as one model.safetensors in ``dst``, with ``src``'s config, tokenizer and template files."""
    import shutil

    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst



def _same_gguf(src, dst, a, b) -> None:
    """Both checkpoints convert to the same GGUF: as they are, and with the experts quantized to NVFP4 by
    nexlab (--experts nvfp4 --nvfp4-scales search)."""
    from nexlab.ggufio.inspector import diff_gguf

    for kw in ({}, {"experts": "nvfp4", "nvfp4_scales": "search"}):
        convert_checkpoint(src, a, show_progress=False, **kw)
        convert_checkpoint(dst, b, show_progress=False, **kw)
        assert diff_gguf(a, b) == [], kw


def test_single_file_checkpoint_converts_like_sharded(tiny, tmp_path):
    """One model.safetensors with ``language_model.model.`` keys == the sharded original, byte for byte."""
    src = tiny["bf16"]
    merged = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        for k, v in load_file(str(shard)).items():
            if k.startswith("model.language_model."):
                k = "language_model.model." + k[len("model.language_model."):]
            merged[k] = v
    dst = _single_file_copy(src, tmp_path / "single", merged)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    _same_gguf(src, dst, a, b)


def test_fused_expert_checkpoint_converts_like_per_expert(tiny, tmp_path):
    """transformers 5 stores BF16 experts fused (gate_up_proj [E, 2I, H], gate rows first; down_proj
    [E, H, I]); the GGUF must equal the one from the per-expert (ModelOpt export) layout."""
    import re

    src = tiny["bf16"]
    tensors = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
    pat = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    per_expert: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    fused = {}
    for k, v in tensors.items():
        m = pat.match(k)
        if m:
            per_expert.setdefault(m.group(1), {})[(m.group(3), int(m.group(2)))] = v
        else:
            fused[k] = v
    assert per_expert, "the tiny checkpoint should store experts per expert"
    for prefix, parts in per_expert.items():
        n = 1 + max(e for _, e in parts)
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts["gate", e], parts["up", e]]) for e in range(n)])
        fused[f"{prefix}.down_proj"] = torch.stack([parts["down", e] for e in range(n)])
    dst = _single_file_copy(src, tmp_path / "fused", fused)
    a, b = tmp_path / "per_expert.gguf", tmp_path / "fused.gguf"
    _same_gguf(src, dst, a, b)
