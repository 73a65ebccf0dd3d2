"""The embedded chat template: the seed's forced-open-thinking bug, its fix, and rendering parity."""

from __future__ import annotations

import pytest

from nexlab import chat_template as ct

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Paris", "days": [1, 2]}}}]},
    {"role": "tool", "content": "sunny, 21C"},
    {"role": "assistant", "content": "Sunny, 21 C.", "reasoning_content": "Tool said sunny."},
    {"role": "user", "content": "Thanks!"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_fixed_template_generation_prompt_matches_history_thinking_marker():
    r = ct.check_template(ct.fixed_template())
    assert r["prompt_is_prefix"] and r["forced_open"]
    assert r["ok"], r
    assert r["prompt"].endswith("<|im_start|>assistant\n<think>\n")


def test_seed_template_sends_whole_chain_of_thought_to_content():
    r = ct.check_template(ct.seed_template())
    assert r["prompt"].endswith("<|im_start|>assistant\n<think>")
    assert r["prompt_is_prefix"]          # the model still continues it ...
    assert not r["forced_open"]           # ... but the parser sees no forced-open block
    assert r["reasoning"] == ""
    assert "</think>" in r["content"] and "That is 4." in r["content"]
    assert not r["ok"]


def test_fix_forced_open_think_repairs_seed_and_leaves_fixed_alone():
    fixed, changed = ct.fix_forced_open_think(ct.seed_template())
    assert changed and fixed == ct.fixed_template()
    same, changed2 = ct.fix_forced_open_think(ct.fixed_template())
    assert not changed2 and same == ct.fixed_template()


def test_thinking_disabled_prompt_is_prefix_of_history_with_empty_reasoning():
    t = ct.fixed_template()
    conv = CONV[-1:]
    prompt = ct.render(t, conv, add_generation_prompt=True, enable_thinking=False)
    history = ct.render(t, conv + [{"role": "assistant", "content": "ok", "reasoning_content": ""}])
    assert history.startswith(prompt)
    assert prompt.endswith("<think>\n\n</think>\n\n")


def test_tool_calls_and_responses_render_in_qwen35_xml_form():
    out = ct.render(ct.fixed_template(), CONV, tools=TOOLS, add_generation_prompt=True)
    assert out.startswith("<|im_start|>system\n# Tools")
    assert '"name": "get_weather"' in out and out.count("<|im_start|>system") == 1
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in out
    assert "<parameter=days>\n[1, 2]\n</parameter>" in out
    assert "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n" in out
    # reasoning is only kept for turns after the last user query: none here
    assert "Tool said sunny" not in out and "Need the tool" not in out


def test_render_matches_transformers_apply_chat_template():
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    for tmpl in (ct.fixed_template(), ct.seed_template()):
        for gen in (False, True):
            conv = CONV if not gen else CONV
            ours = ct.render(tmpl, conv, tools=TOOLS, add_generation_prompt=gen)
            theirs, _ = render_jinja_template(conversations=[conv], tools=TOOLS, chat_template=tmpl,
                                              add_generation_prompt=gen)
            assert ours == theirs[0]


def test_template_raises_on_bad_conversation():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="No user query"):
        ct.render(ct.fixed_template(), [{"role": "system", "content": "x"}])


def test_resolve_chat_template_choices(tmp_path):
    assert ct.resolve_chat_template("fixed") == ct.fixed_template()
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0].content }}")
    assert ct.resolve_chat_template(str(f)) == "{{ messages[0].content }}"
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "ORIG"}')
    assert ct.resolve_chat_template("original", tmp_path) == "ORIG"
    with pytest.raises(ValueError, match="neither fixed"):
        ct.resolve_chat_template(str(tmp_path / "nope.jinja"))
