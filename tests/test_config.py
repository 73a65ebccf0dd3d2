"""nexlab.model.config: the configurations load in transformers, structural rules refuse broken ones,
parameter counts equal transformers' own model and the published figures."""

from __future__ import annotations

import copy

import pytest
import torch

from nexlab.model import config as C


def _count_transformers_params(cfg: dict) -> int:
    """Instantiate transformers' Qwen3_5MoeForCausalLM on the meta device and count (no memory)."""
    from transformers import Qwen3_5MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(C.to_transformers(cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [C.real_config, C.tiny_config, C.slice_config])
def test_every_configuration_passes_validation_and_loads_in_transformers(make):
    cfg = make()
    assert C.validate_config(cfg) is cfg
    full = C.to_transformers(cfg, text_only=False)
    assert type(full).__name__ == "Qwen3_5MoeConfig"
    assert full.text_config.layer_types == cfg["text_config"]["layer_types"]
    assert full.text_config.num_experts == cfg["text_config"]["num_experts"]


def test_real_config_has_published_architecture_and_numbers():
    cfg = C.real_config()
    t = cfg["text_config"]
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    assert (t["hidden_size"], t["num_hidden_layers"], t["vocab_size"]) == (2048, 40, 248320)
    assert [i for i, k in enumerate(t["layer_types"]) if k == "full_attention"] == list(range(3, 40, 4))
    assert (t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]) == (16, 2, 256)
    assert (t["linear_num_key_heads"], t["linear_num_value_heads"], t["linear_key_head_dim"]) == (16, 32, 128)
    assert (t["num_experts"], t["num_experts_per_tok"], t["moe_intermediate_size"]) == (256, 8, 512)
    assert t["rope_parameters"]["mrope_section"] == [11, 11, 10]
    assert cfg["vision_config"]["depth"] == 27 and cfg["vision_config"]["hidden_size"] == 1152


def test_parameter_counts_of_real_model_match_published_budget():
    p = C.parameter_counts(C.real_config())
    # FACTS.md: 34.66 B text parameters, routed experts 32.21 B, about 2.95 B active per token.
    assert round(p["total"] / 1e9, 2) == 34.66
    assert round(p["routed_experts"] / 1e9, 2) == 32.21
    assert round(p["active_per_token"] / 1e9, 2) == 2.95
    assert sum(p["breakdown"].values()) == p["total"]


@pytest.mark.parametrize("make", [C.real_config, C.tiny_config, C.slice_config])
def test_parameter_counts_equal_transformers_model_numel(make):
    cfg = make()
    assert C.parameter_counts(cfg)["total"] == _count_transformers_params(cfg)


def test_layer_shapes_equal_transformers_parameters_for_tiny():
    from transformers import Qwen3_5MoeForCausalLM

    cfg = C.tiny_config()
    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(C.to_transformers(cfg))
    named = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes = C.layer_parameter_shapes(cfg)
    for layer, kind in ((0, "linear_attention"), (3, "full_attention")):
        got = {n.removeprefix(f"model.layers.{layer}."): s for n, s in named.items()
               if n.startswith(f"model.layers.{layer}.")}
        assert got == shapes[kind]
    assert named["lm_head.weight"] == shapes["other"]["lm_head.weight"]


def test_tiny_keeps_every_structural_feature_of_the_real_model():
    cfg = C.tiny_config()
    t = cfg["text_config"]
    lt = t["layer_types"]
    assert len(lt) >= 8 and lt[:4] == ["linear_attention"] * 3 + ["full_attention"] and lt == lt[:4] * (len(lt) // 4)
    assert t["linear_num_value_heads"] == 2 * t["linear_num_key_heads"]
    assert t["attn_output_gate"] is True and t["num_attention_heads"] > t["num_key_value_heads"]
    assert t["shared_expert_intermediate_size"] > 0
    assert t["num_experts"] >= 8 and t["num_experts_per_tok"] > 1
    assert 1000 <= t["vocab_size"] <= 4096
    C.validate_config(cfg, kquant=True)  # every matrix input dim % 256
    assert cfg["architectures"] == C.real_config()["architectures"]


def test_slice_has_real_per_layer_shapes_and_vocab_is_a_parameter():
    real = C.layer_parameter_shapes(C.real_config())
    for vocab in (C.SLICE_DEFAULT_VOCAB, 248320):
        cfg = C.slice_config(vocab_size=vocab)
        s = C.layer_parameter_shapes(cfg)
        assert s["linear_attention"] == real["linear_attention"] and s["full_attention"] == real["full_attention"]
        assert s["other"]["lm_head.weight"] == (vocab, 2048)
        assert cfg["text_config"]["num_hidden_layers"] == 4
    with pytest.raises(ValueError, match="vocab_size"):
        C.slice_config(vocab_size=0)


def _broken(path, value):
    cfg = C.tiny_config()
    d = cfg
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, rule",
    [
        (("architectures",), ["Qwen3_5MoeForCausalLM"], "architecture"),
        (("text_config", "model_type"), "qwen3_next", "architecture"),
        (("text_config", "hidden_size"), 0, "positive-int"),
        (("text_config", "num_hidden_layers"), 6, "layer-pattern"),
        (("text_config", "layer_types"), ["full_attention"] + ["linear_attention"] * 7, "layer-pattern"),
        (("text_config", "num_key_value_heads"), 3, "gqa"),
        (("text_config", "linear_num_value_heads"), 3, "value-heads-multiple"),
        (("text_config", "attn_output_gate"), False, "gated-attention"),
        (("text_config", "rope_parameters", "mrope_section"), [4, 4, 4], "rope"),
        (("text_config", "num_experts_per_tok"), 17, "moe"),
        (("text_config", "tie_word_embeddings"), True, "untied-embeddings"),
        (("text_config", "moe_intermediate_size"), 96, "nvfp4-multiple-64"),
        (("text_config", "shared_expert_intermediate_size"), 192, "kquant-multiple-256"),
    ],
)
def test_broken_configuration_is_refused_naming_the_rule(path, value, rule):
    cfg = _broken(path, value)
    with pytest.raises(ValueError, match=f"rule '{rule}'"):
        C.validate_config(cfg)


def test_kquant_rule_is_optional_but_nvfp4_rule_is_not():
    cfg = _broken(("text_config", "moe_intermediate_size"), 192)
    C.validate_config(cfg, kquant=False)
    cfg = _broken(("text_config", "moe_intermediate_size"), 160)
    with pytest.raises(ValueError, match="nvfp4-multiple-64"):
        C.validate_config(cfg, kquant=False)


def test_validate_refuses_non_dict():
    with pytest.raises(TypeError):
        C.validate_config([1, 2])


def test_validation_does_not_modify_the_config():
    cfg = C.tiny_config()
    before = copy.deepcopy(cfg)
    C.validate_config(cfg)
    C.parameter_counts(cfg)
    assert cfg == before
