"""nexlab.formats.scales and ``nexlab convert --experts nvfp4``: NVFP4 scale rules on a BF16 checkpoint.

References: nvidia-modelopt 0.47.0 for ``max`` (the tiny model's NVFP4 checkpoint is ModelOpt's own
export of the tiny BF16 weights: ``max`` must reproduce its weight / weight_scale / weight_scale_2 byte
for byte, and the GGUF made from the BF16 checkpoint must equal the GGUF of that export, tensor for
tensor); the exact float64 error of ModelOpt's encoding (:func:`nexlab.formats.scales.block_errors`) for the
choices ``4over6`` and ``search`` make; llama.cpp (llama-cpp-python) loads and runs every file.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from nexlab.cli import main
from nexlab.convert.text import convert_checkpoint
from nexlab.formats import scales as S
from nexlab.formats.minifloat import E4M3_VALUES
from nexlab.model.checkpoint import Checkpoint

LAYER = 1


def _bf16(ck: Checkpoint, module: str) -> np.ndarray:
    return ck.load(module + ".weight").float().numpy()


@pytest.fixture(scope="module")
def cks(tiny):
    with Checkpoint(tiny["bf16"]) as bf, Checkpoint(tiny["nvfp4"]) as mo:
        yield bf, mo


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("scales")
    out = {}
    for m in S.METHODS:
        out[m] = root / f"tiny-{m}.gguf"
        convert_checkpoint(tiny["bf16"], out[m], experts="nvfp4", nvfp4_scales=m, show_progress=False)
    return out


def _modelopt(mo: Checkpoint, module: str) -> tuple[np.ndarray, np.ndarray, float]:
    return (mo.load(module + ".weight").numpy(), mo.load(module + ".weight_scale").view(torch.uint8).numpy(),
            float(mo.load(module + ".weight_scale_2")))


def test_max_is_modelopts_export_for_every_expert_module(cks, tiny):
    """Gate and up of each expert share ModelOpt's tensor scale (amax over both / 2688); down has its own."""
    bf, mo = cks
    n_layers = bf.config["num_hidden_layers"]
    n_expert = bf.config["num_experts"]
    for layer in range(n_layers):
        p = f"model.layers.{layer}.mlp."
        for base in [f"{p}experts.{e}." for e in range(n_expert)] + [f"{p}shared_expert."]:
            gate_up = S.quantize_nvfp4_group([_bf16(bf, base + "gate_proj"), _bf16(bf, base + "up_proj")], "max")
            down = S.quantize_nvfp4(_bf16(bf, base + "down_proj"), "max")
            for proj, q in zip(("gate_proj", "up_proj", "down_proj"), gate_up + [down]):
                w, s, s2 = _modelopt(mo, base + proj)
                assert np.array_equal(q.weight, w) and np.array_equal(q.weight_scale, s), base + proj
                assert float(q.weight_scale_2) == s2, base + proj


def test_max_file_equals_the_gguf_of_modelopts_export(files, nexlab_gguf):
    """Every tensor of the --experts nvfp4 --nvfp4-scales max file equals the one converted from ModelOpt's
    checkpoint; that file has the .input_scale sidecars of ModelOpt's activation calibration in addition."""
    ours = {t.name: t for t in gguf.GGUFReader(files["max"]).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(nexlab_gguf("nvfp4")).tensors}
    assert set(ours) <= set(theirs)
    extra = sorted(set(theirs) - set(ours))
    assert extra and all(n.endswith(".input_scale") for n in extra)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[name].data)), name


def test_every_rule_writes_the_same_layout(files):
    """Same tensors, types, shapes and file size: the rules only choose different scale bytes."""
    layouts = {m: [(t.name, t.tensor_type, tuple(t.shape)) for t in gguf.GGUFReader(f).tensors]
               for m, f in files.items()}
    assert layouts["max"] == layouts["4over6"] == layouts["search"]
    assert len({f.stat().st_size for f in files.values()}) == 1
    assert any(t == gguf.GGMLQuantizationType.NVFP4 for _, t, _ in layouts["max"])


def test_llama_cpp_runs_every_rule(files):
    from nexlab.llamacpp.runtime import open_model

    for m, f in files.items():
        llm = open_model(f, n_ctx=64)
        llm.eval([1, 2, 3, 4])
        assert np.isfinite(np.asarray(llm.scores[: llm.n_tokens])).all(), m
        llm.close()


def _stack(cks, proj="gate_proj"):
    bf, _ = cks
    n = bf.config["num_experts"]
    return np.stack([_bf16(bf, f"model.layers.{LAYER}.mlp.experts.{e}.{proj}") for e in range(n)])


def test_four_over_six_keeps_the_better_of_map_to_6_and_map_to_4(cks):
    x = _stack(cks)[:4]
    g = S.tensor_scale([x], "4over6")
    assert np.array_equal(g, (np.abs(x).max(axis=(1, 2)) / np.float32(1536)).astype(np.float32))
    codes, _ = S.choose_block_scales(x, g, "4over6")
    for e in range(x.shape[0]):
        xb = x[e].reshape(-1, 16)
        bmax = np.abs(xb).max(-1)
        b6 = torch.tensor(np.clip(bmax / (np.float32(6) * g[e]), 2**-9, 448)).to(torch.float8_e4m3fn).view(
            torch.uint8).numpy()
        b4 = torch.tensor(np.clip(bmax / (np.float32(4) * g[e]), 2**-9, 448)).to(torch.float8_e4m3fn).view(
            torch.uint8).numpy()
        e6, e4 = S.block_errors(xb, b6, g[e]), S.block_errors(xb, b4, g[e])
        got = codes[e].reshape(-1)
        assert np.all((got == b6) | (got == b4))
        chosen = S.block_errors(xb, got, g[e])
        # the kernel's float32 error decides; exact float64 errors agree up to its rounding
        assert np.all(chosen <= np.minimum(e6, e4) * (1 + 1e-5) + 1e-30)
        assert (got == b4).any() and (got == b6).any()


def test_search_is_never_worse_than_max_or_four_over_six_at_the_same_tensor_scale(cks):
    x = _stack(cks, "down_proj")[:4]
    imp = np.random.default_rng(0).gamma(0.5, 1.0, size=(x.shape[0], x.shape[-1])).astype(np.float32)
    g = S.tensor_scale([x], "max")
    for c in (None, imp):
        best, _ = S.choose_block_scales(x, g, "search", c)
        mx, _ = S.choose_block_scales(x, g, "max")
        f6, _ = S.choose_block_scales(x, g, "4over6")
        for e in range(x.shape[0]):
            cb = None if c is None else np.broadcast_to(c[e], x[e].shape).reshape(-1, 16)
            xb = x[e].reshape(-1, 16)
            eb = S.block_errors(xb, best[e].reshape(-1), g[e], cb)
            for other in (mx, f6):
                eo = S.block_errors(xb, other[e].reshape(-1), g[e], cb)
                assert np.all(eb <= eo * (1 + 1e-5) + 1e-30)
            # and strictly better in total: max scaling wastes the grid
            assert eb.sum() < 0.95 * S.block_errors(xb, mx[e].reshape(-1), g[e], cb).sum()


def test_search_tensor_scale_is_one_of_its_candidates_and_beats_modelopts(cks):
    x = _stack(cks)[:4]
    g = S.tensor_scale([x], "search")
    amax = np.abs(x).max(axis=(1, 2))
    cands = np.array([[np.float32(a / np.float32(6.0 * m)) for m in S.TENSOR_SCALE_DIVISORS] for a in amax])
    assert all(g[e] in cands[e] for e in range(len(g)))
    q_s, q_m = S.quantize_nvfp4(x, "search"), S.quantize_nvfp4(x, "max")
    assert S.weighted_error(x, q_s) < 0.85 * S.weighted_error(x, q_m)


def test_codes_follow_modelopts_encoding_of_the_chosen_scales(cks):
    """The weight bytes are ModelOpt's step 3 under the chosen scales: decoding gives the nearest E2M1
    multiple of each block's scale (checked against an independent nearest-value search)."""
    x = _stack(cks)[:2]
    q = S.quantize_nvfp4(x, "search")
    deq = q.dequantize()
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)
    for e in range(2):
        s = (E4M3_VALUES[q.weight_scale[e]].astype(np.float64) * float(q.weight_scale_2[e]))[..., None]
        xb = x[e].reshape(x.shape[1], -1, 16).astype(np.float64)
        nearest = np.abs(np.abs(xb)[..., None] - s[..., None] * grid).min(-1)  # [rows, blocks, 16]
        got = deq[e].reshape(xb.shape).astype(np.float64)
        assert np.all(np.abs(np.abs(xb) - np.abs(got)) <= nearest + 1e-6 * s)
        assert np.all((got == 0) | (np.sign(got) == np.sign(xb)))


def test_an_expert_without_importance_is_searched_unweighted(cks):
    """llama-quantize's column weights are 1 for an expert no token reached (count 0): the search treats
    it as unweighted, the same codes as with no imatrix; an informed expert's codes change."""
    x = _stack(cks)[:2]
    imp = np.stack([np.ones(x.shape[-1], np.float32),
                    np.random.default_rng(1).gamma(0.3, 1.0, x.shape[-1]).astype(np.float32)])
    weighted, plain = S.quantize_nvfp4(x, "search", importance=imp), S.quantize_nvfp4(x, "search")
    assert np.array_equal(weighted.weight_scale[0], plain.weight_scale[0])
    assert not np.array_equal(weighted.weight_scale[1], plain.weight_scale[1])
    assert S.element_weights(np.zeros(16), 16) is None and S.element_weights(np.full(16, 3.0), 16) is None
    w = S.element_weights(np.r_[np.zeros(8), np.ones(8)], 16)
    assert w.min() == pytest.approx(S.WEIGHT_FLOOR * 0.5) and w.max() == 1


@pytest.mark.parametrize("bad, words", [
    (dict(method="median"), "unknown NVFP4 scale method"),
    (dict(x=np.zeros((4, 32), np.float32)), "all-zero"),
    (dict(x=np.full((4, 32), np.nan, np.float32)), "NaN"),
    (dict(x=np.ones((4, 24), np.float32)), "multiple of 16"),
    (dict(importance=-np.ones(32, np.float32)), "finite and >= 0"),
])
def test_bad_input_is_refused_with_the_tensor_named(bad, words):
    args = dict(x=np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32), method="search",
                importance=None) | bad
    with pytest.raises(ValueError, match=words) as e:
        S.quantize_nvfp4(args["x"], args["method"], importance=args["importance"], name="blk.0.ffn_up_exps")
    assert "blk.0.ffn_up_exps" in str(e.value) or "method" in words


def test_cli_refuses_scales_without_experts_and_an_nvfp4_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["convert", str(tiny["bf16"]), "-o", str(out), "--nvfp4-scales", "search"]) == 1
    assert "needs --experts nvfp4" in capsys.readouterr().err
    assert main(["convert", str(tiny["nvfp4"]), "-o", str(out), "--experts", "nvfp4"]) == 1
    assert "NVFP4 already" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
