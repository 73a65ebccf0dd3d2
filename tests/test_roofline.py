"""nexlab.analysis.roofline against independent counts.

- Weight bytes per decode step against a count written here from the tensor table alone: gguf-py's
  GGUFReader on the tiny model's NVFP4 GGUF, and the full-size q4_k_m plan with sizes from
  gguf-py's GGML_QUANT_SIZES.
- E(b) against a seeded Monte Carlo of uniform top-k routing.
- Flops against nexlab.model.config's active parameter count (itself checked against transformers'
  numel); KV and recurrent bytes against FACTS.md's figures for Nex-N2-mini.
- Measured routing: the recorded routes against transformers' own router logits
  (``output_router_logits=True``), and the distinct counts against counts over those routes.
- Bad inputs: one clear error each (API and CLI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from nexlab.analysis import roofline as R
from nexlab.cli import main
from nexlab.model import hparams as Q
from nexlab.model import qwen35moe

BATCHES = (1, 4, 16)


def _uniform_distinct(b: int, k: int, n: int) -> float:
    return n * (1 - (1 - k / n) ** b)


def _is_routed(name: str) -> bool:
    return name.startswith("blk.") and "_exps." in name


def _independent_weight_bytes(rows, n: int, k: int, b: int) -> float:
    """rows: (name, ne, nbytes). Every tensor once; token_embd b rows; routed experts and their
    [n_expert] sidecars times E(b)/n; .input_scale not at all (llama.cpp never reads it)."""
    e = _uniform_distinct(b, k, n)
    total = 0.0
    for name, ne, nbytes in rows:
        if name.endswith(".input_scale"):
            continue
        if name == "token_embd.weight":
            total += b * nbytes / ne[1]  # ne = [n_embd, n_vocab]: one row per token
        elif _is_routed(name):
            total += nbytes * e / n
        else:
            total += nbytes
    return total


# ------------------------------------------------------------------ weight bytes


def test_weight_bytes_read_match_gguf_tensor_table(nexlab_gguf):
    path = nexlab_gguf("nvfp4")
    r = gguf.GGUFReader(str(path))
    n = int(r.get_field("qwen35moe.expert_count").contents())
    k = int(r.get_field("qwen35moe.expert_used_count").contents())
    rows = [(t.name, [int(x) for x in t.shape], int(t.n_bytes)) for t in r.tensors]
    sidecars = [name for name, ne, _ in rows if _is_routed(name) and name.endswith(".scale")]
    assert sidecars and all(ne == [n] for name, ne, _ in rows if name in sidecars)  # the rule is exercised
    res = R.roofline(path, BATCHES)
    assert res["file"] == str(path) and res["variant"] is None
    got = [s["weight_bytes_read"] for s in res["batches"]]
    want = [_independent_weight_bytes(rows, n, k, b) for b in BATCHES]
    assert got == pytest.approx(want, rel=1e-9)
    assert got[0] < got[1] < got[2] < sum(nb for _, _, nb in rows)


def test_weight_bytes_read_match_full_size_plan():
    hp = Q.nex_n2_mini()
    plan = qwen35moe.tensor_plan(hp, "q4_k_m")

    def nbytes(t):  # from gguf-py's block table, not TensorSpec.nbytes
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t.ggml_type))]
        return int(np.prod(t.shape[:-1], dtype=np.int64)) * (t.shape[-1] // bs) * ts

    rows = [(t.name, list(reversed(t.shape)), nbytes(t)) for t in plan]
    res = R.roofline(hp, BATCHES, variant="q4_k_m")
    want = [_independent_weight_bytes(rows, 256, 8, b) for b in BATCHES]
    assert [s["weight_bytes_read"] for s in res["batches"]] == pytest.approx(want, rel=1e-9)
    assert res["weight_bytes_total"] == sum(nb for _, _, nb in rows)
    # the name path gives the same plan
    by_name = R.roofline("nex-n2-mini", BATCHES, variant="q4_k_m")
    assert [s["weight_bytes_read"] for s in by_name["batches"]] == [s["weight_bytes_read"] for s in res["batches"]]


# ------------------------------------------------------------------ E(b)


@pytest.mark.parametrize("n,k", [(256, 8), (16, 4)])
def test_expected_experts_matches_monte_carlo(n, k):
    rng = np.random.default_rng(1234)
    trials = 400
    for b in (1, 2, 4, 16, 64):
        picks = rng.random((trials, b, n), dtype=np.float32).argpartition(k, axis=-1)[..., :k]  # uniform k-subsets
        seen = np.zeros((trials, n), dtype=bool)
        seen[np.arange(trials)[:, None], picks.reshape(trials, -1)] = True
        mc = seen.sum(axis=1).mean()
        assert R.expected_experts(b, k, n) == pytest.approx(mc, rel=0.02), (n, k, b)
    assert R.expected_experts(1, k, n) == pytest.approx(k)


# ------------------------------------------------------------------ cache bytes and flops


def test_cache_bytes_and_flops_for_nex_n2_mini():
    from nexlab.model.config import parameter_counts, real_config

    hp = Q.nex_n2_mini()
    N, b = 4096, 4
    res = R.roofline(hp, [b], N, variant="bf16")["batches"][0]
    zero = R.roofline(hp, [b], 0, variant="bf16")["batches"][0]
    # FACTS.md: 10 full-attention layers, 2 KV heads of dim 256, f16 K and V
    assert res["kv_bytes_read"] == b * N * 10 * 2 * (2 * 256) * 2
    # 30 linear-attention layers: conv (4-1) * (4096 + 2*16*128) and state 128 * 4096 floats, read and written
    assert res["recurrent_bytes"] == 2 * b * 30 * 4 * (3 * (32 * 128 + 2 * 16 * 128) + 128 * 32 * 128)
    assert res["cache_bytes_read"] == res["kv_bytes_read"] + res["recurrent_bytes"]
    # matmul multiply-adds per token = active parameters (lm_head in, token_embd out) less the
    # 1-D tensors (norms, A_log, dt_bias), which are element-wise
    active = parameter_counts(real_config())["active_per_token"]
    assert res["macs_per_token"] == pytest.approx(active, rel=1e-3)
    assert res["flops_breakdown"]["matmul"] == pytest.approx(2 * b * res["macs_per_token"])
    # attention: QK and PV over N positions, 16 heads of dim 256, 10 layers
    assert res["flops"] - zero["flops"] == pytest.approx(b * 2 * 10 * 16 * (256 + 256) * N)
    # cache type q8_0: 34 bytes per 32 values
    q8 = R.roofline(hp, [b], N, variant="bf16", cache_type="q8_0")["batches"][0]
    assert q8["kv_bytes_read"] == b * N * 10 * 2 * (2 * 256 // 32 * 34)


def test_bound_is_batch_over_slowest_roof():
    res = R.roofline("nex-n2-mini", [1, 16], 1024, variant="q4_k_m", devices=["rtx5090", "H200"],
                     measured_bandwidth=20e9)
    assert [d["name"] for d in res["devices"]] == ["RTX 5090", "H200", R.THIS_MACHINE]
    for s in res["batches"]:
        b, nbytes, flops = s["batch"], s["weight_bytes_read"] + s["cache_bytes_read"], s["flops"]
        assert s["bound_tokens_per_s"]["RTX 5090"] == pytest.approx(b / max(nbytes / 1792e9, flops / 209.5e12))
        assert s["bounds"]["H200"]["compute_fp4"] is None  # Hopper: no FP4 tensor cores
        assert s["bounds"]["RTX 5090"]["compute_fp4"] == pytest.approx(b * 1676e12 / flops)
        assert s["bound_tokens_per_s"][R.THIS_MACHINE] == pytest.approx(b * 20e9 / nbytes)
    assert all(d.source and d.bandwidth_GBps > 0 for d in R.DEVICES)


def test_compute_roof_takes_over_at_high_arithmetic_intensity():
    # all full attention at n_ctx 0: no recurrent state; at b = 1024 every expert is read, and
    # 1024 tokens' flops outweigh ~20 GB of weights on an RTX 4090 (165 TFLOPS / 1008 GB/s)
    hp = Q.nex_n2_mini().with_full_attention()
    slow = R.Device("slow", 1000.0, 0.5, None, None, "test row")
    res = R.roofline(hp, [1, 1024], 0, variant="q4_k_m", devices=["RTX 4090", slow])
    small, big = res["batches"]
    assert small["recurrent_bytes"] == 0 and small["bounds"]["RTX 4090"]["limited_by"] == "memory"
    b4090 = big["bounds"]["RTX 4090"]
    assert b4090["limited_by"] == "compute" and b4090["bound"] == pytest.approx(1024 * 165.2e12 / big["flops"])
    assert b4090["bound"] < b4090["memory"]
    assert small["bound_tokens_per_s"]["slow"] == pytest.approx(0.5e12 / small["flops"])
    # the hybrid model never gets there: ~130 MB of recurrent state per sequence and step
    hybrid = R.roofline("nex-n2-mini", [1024], 0, variant="q4_k_m", devices=["RTX 4090"])["batches"][0]
    assert hybrid["bounds"]["RTX 4090"]["limited_by"] == "memory"
    assert {d.name for d in R.DEVICES} == {"RTX 5090", "RTX 4090", "H100 SXM", "H200", "B200"}


# ------------------------------------------------------------------ CLI and bad inputs


def test_cli_json_matches_api(capsys, nexlab_gguf):
    path = nexlab_gguf("nvfp4")
    assert main(["roofline", str(path), "--batch", "1,4,16", "--ctx", "512", "--json", "--device", "B200",
                 "--bandwidth", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    api = R.roofline(path, BATCHES, 512, devices=["B200"], measured_bandwidth=20e9)
    assert out == json.loads(json.dumps(api))
    assert [s["batch"] for s in out["batches"]] == list(BATCHES)
    assert set(out["batches"][0]["bound_tokens_per_s"]) == {"B200", R.THIS_MACHINE}
    assert main(["roofline", "nex-n2-mini", "--variant", "q4_k_m", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert "Nex-N2-mini (q4_k_m)" in text and "RTX 5090 t/s" in text


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("nexlab roofline: error:")
    return err


def test_bad_inputs(capsys, tmp_path, nexlab_gguf):
    path = nexlab_gguf("nvfp4")
    with pytest.raises(ValueError, match="batch"):
        R.roofline(path, [0])
    assert "--batch" in _cli_error(capsys, ["roofline", str(path), "--batch", "1,0"])
    assert "--batch" in _cli_error(capsys, ["roofline", str(path), "--batch", "one"])
    with pytest.raises(ValueError, match="unknown device 'TPU v9'"):
        R.roofline(path, devices=["TPU v9"])
    assert "unknown device 'A100'" in _cli_error(capsys, ["roofline", str(path), "--device", "A100"])
    assert "needs a measured bandwidth" in _cli_error(capsys, ["roofline", str(path), "--device", "this machine"])
    assert "--bandwidth" in _cli_error(capsys, ["roofline", str(path), "--bandwidth", "0"])
    assert "--ctx" in _cli_error(capsys, ["roofline", str(path), "--ctx", "-1"])
    assert "cache type" in _cli_error(capsys, ["roofline", str(path), "--cache-type", "q9_9"])
    assert "variant" in _cli_error(capsys, ["roofline", str(path), "--variant", "q8_0"])
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        R.roofline(missing)
    assert "missing.gguf" in _cli_error(capsys, ["roofline", str(missing)])
    cut = tmp_path / "cut.gguf"
    data = Path(path).read_bytes()
    for size in (len(data) // 2, len(data) - 64):
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match="cut.gguf.*truncated"):
            R.roofline(cut)
    assert "cut.gguf" in _cli_error(capsys, ["roofline", str(cut)])


# ------------------------------------------------------------------ measured routing


ROUTING_BATCHES = [1, 8, 64, 128]


@pytest.fixture(scope="module")
def routing(tiny):
    """128 positions (4 chunks of 32, each after 32 tokens of context): the pure-torch linear
    attention makes the reference forward the slow part; one model serves both tests."""
    from nexlab.analysis.reference import build_hf_model
    from nexlab.model.tokenizer import encode_text

    ids = encode_text(Path(tiny["heldout_text"]), tiny["tokenizer"])
    model = build_hf_model(tiny["nvfp4"])
    res = R.distinct_experts_per_layer(tiny["nvfp4"], ids, batch_sizes=ROUTING_BATCHES, draws=8, seed=0,
                                       n_positions=128, chunk=32, context=32, model=model)
    return ids, res, model


def test_routes_are_transformers_router_top_k(routing):
    import torch

    ids, res, model = routing
    span, n_chunks, k = 64, 4, res["n_expert_used"]
    starts = np.linspace(0, len(ids) - span, n_chunks).astype(np.int64)
    x = torch.as_tensor(np.stack([ids[s:s + span] for s in starts]).astype(np.int64))
    with torch.no_grad():
        logits = model(x, output_router_logits=True, use_cache=False).router_logits  # per layer [tokens, n]
    want = np.stack([torch.topk(torch.softmax(lg.float(), -1), k, dim=-1).indices.view(n_chunks, span, k)[:, 32:]
                     .reshape(-1, k).numpy() for lg in logits], axis=1)
    assert res["routes"].shape == want.shape == (128, len(logits), k)
    assert np.array_equal(np.sort(res["routes"], -1), np.sort(want, -1))


def test_distinct_experts_counts(routing):
    _, res, _ = routing
    routes, k, n = res["routes"], res["n_expert_used"], res["n_expert"]
    per_layer = res["per_layer"]
    assert per_layer.shape == (4, routes.shape[1])
    assert np.all(per_layer[0] == k)  # one token: exactly its k experts
    # all positions drawn: every expert any position used, per layer
    assert np.array_equal(per_layer[3], [len(np.unique(routes[:, layer])) for layer in range(routes.shape[1])])
    assert np.all((per_layer >= k) & (per_layer <= np.minimum(n, np.array(ROUTING_BATCHES)[:, None] * k)))
    assert np.allclose(res["mean"], per_layer.mean(axis=1))
    assert np.allclose(res["uniform"], [_uniform_distinct(b, k, n) for b in ROUTING_BATCHES])
    assert np.allclose(res["expert_load"].sum(axis=1), k)


def test_distinct_experts_bad_inputs(tiny):
    ids = np.arange(1000, dtype=np.int64) % 100
    with pytest.raises(ValueError, match="batch"):
        R.distinct_experts_per_layer(tiny["nvfp4"], ids, batch_sizes=[0])
    with pytest.raises(ValueError, match="exceeds"):
        R.distinct_experts_per_layer(tiny["nvfp4"], ids, batch_sizes=[300], n_positions=256)
    with pytest.raises(ValueError, match="tokens has 100 ids"):
        R.distinct_experts_per_layer(tiny["nvfp4"], ids[:100], batch_sizes=[1])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        R.distinct_experts_per_layer(Path(os.devnull).parent / "nowhere", ids, batch_sizes=[1])
