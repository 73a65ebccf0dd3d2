"""The chat template nexlab embeds in its GGUF files, the seed's thinking bug, and its fix.

nexlab carries a Qwen3.5-style ChatML template (``templates/qwen35_chatml.jinja``) with tool calls
and thinking. In history, an assistant turn after the last user query is rendered as::

    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{content}

The seed's template opened thinking in the *generation prompt* with a bare ``<think>`` (no
newline). The prompt is then still a prefix of the history render, so the model happily writes
``\\n{reasoning}\\n</think>\\n\\n{content}``; but a tag-based reasoning extraction that derives the
start marker ``<think>\\n`` from how history renders and treats thinking as *forced open* only when
the generation prompt ends with that marker (:func:`extract_reasoning` models it; the seed's model
card reports this leak in llama.cpp) does not see a forced-open block. The output does not start
with ``<think>\\n`` either, so the whole chain of thought, with a stray ``</think>``, lands in
``content``. The fix prefills ``<think>\\n`` (exactly the history's marker), and
:func:`check_template` shows with jinja2 renders that prompt and history now agree.
:func:`nexlab.llamacpp.server.llama_server_routing` asks the real parser instead: llama-server of
llama-cpp-python 0.3.36's tree (common/chat's auto-parser, which analyses the template) splits
reasoning and answer correctly for both templates (tests/test_chat_template.py).

``render`` uses jinja2's sandbox with the conventions of transformers' ``apply_chat_template``
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson`` without ASCII escaping).

The seed's template is rebuilt from upstream text (:func:`nexlab.llamacpp.source.seed_template`, a
layer above this one): Qwen3.5's template as llama.cpp ships it (``models/templates/Qwen3.5-4B.jinja``
in the tree llama-cpp-python 0.3.36 vendors, :func:`nexlab.llamacpp.source.upstream_template`) with
the one difference the seed's model card names: its generation prompt opens thinking with
``'<think>'`` instead of ``'<think>\\n'`` (nex-agi's own template file is not reachable from here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nexlab.core.errors import NexlabError

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"


FIXED_TEMPLATE_PATH = TEMPLATE_DIR / "qwen35_chatml.jinja"


THINK_START = "<think>\n"  # reasoning start marker as history renders it


THINK_END = "</think>"


GEN_BLOCK_RE = re.compile(r"(\{%-?\s*if\s+add_generation_prompt\s*-?%\})(.*?)(\{%-?\s*endif\s*-?%\}\s*)$", re.S)


def fixed_template() -> str:
    """nexlab's template (generation prompt prefills ``<think>\\n``): the default for ``convert``."""
    return FIXED_TEMPLATE_PATH.read_text()


def fix_forced_open_think(template: str) -> tuple[str, bool]:
    """Replace a bare ``'<think>'`` literal in the generation-prompt block by ``'<think>\\n'``.

    Only the trailing ``{% if add_generation_prompt %}`` block is touched, so history rendering is
    unchanged. Returns ``(template, changed)``.
    """
    m = GEN_BLOCK_RE.search(template)
    if m is None:
        return template, False
    block = re.sub(r"(['\"])<think>\1", lambda q: f"{q.group(1)}<think>\\n{q.group(1)}", m.group(2))
    if block == m.group(2):
        return template, False
    return template[: m.start(2)] + block + template[m.end(2):], True


def _environment():

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
           tools: list[dict] | None = None, **kwargs: Any) -> str:
    """Render ``messages`` with a chat template the way transformers' apply_chat_template does."""
    return _environment().from_string(template).render(messages=messages, tools=tools,
                                                       add_generation_prompt=add_generation_prompt, **kwargs)


def extract_reasoning(prompt: str, generated: str, start: str = THINK_START, end: str = THINK_END) -> tuple[str, str]:
    """Split model output into (reasoning, content) like llama.cpp's tag-based reasoning parser.

    Model of common/chat's behaviour: thinking is *forced open* when the rendered generation
    prompt ends with the start marker; then everything up to ``end`` is reasoning. Otherwise the
    output must itself start with the marker, else it is all content (stray ``</think>`` included).
    """
    if prompt.endswith(start):
        body = generated
    elif generated.startswith(start):
        body = generated[len(start):]
    else:
        return "", generated
    if end not in body:
        return body.strip(), ""
    r, c = body.split(end, 1)
    return r.strip(), c.lstrip("\n")


# the conversation of check_template and llama_server_routing, and the turn a model trained on it writes
CHECK_CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is 2+2?"}]


CHECK_REASONING, CHECK_ANSWER = "The user asks for 2+2. That is 4.", "2 + 2 = 4."


def check_template(template: str) -> dict[str, Any]:
    """Render one conversation as history and as prompt + continuation; report whether they agree.

    The continuation is what a model trained on history renders writes after the prompt
    (``history[len(prompt):]``). Returns ``prompt_is_prefix``, ``forced_open`` (prompt ends with
    ``<think>\\n``), the extracted ``reasoning`` / ``content`` and ``ok`` (reasoning and content
    recovered exactly). The strings are included for display.
    """
    reasoning, answer, conv = CHECK_REASONING, CHECK_ANSWER, CHECK_CONVERSATION
    history = render(template, conv + [{"role": "assistant", "content": answer, "reasoning_content": reasoning}])
    prompt = render(template, conv, add_generation_prompt=True)
    prefix = history.startswith(prompt)
    generated = history[len(prompt):].removesuffix("<|im_end|>\n") if prefix else ""
    got_r, got_c = extract_reasoning(prompt, generated)
    return {
        "prompt": prompt, "history": history, "generated": generated,
        "prompt_is_prefix": prefix, "forced_open": prompt.endswith(THINK_START),
        "reasoning": got_r, "content": got_c,
        "ok": prefix and got_r == reasoning and got_c == answer,
    }


def resolve_chat_template(choice: str, ckpt_dir: str | Path | None = None) -> str | None:
    """Template text for ``--chat-template``: ``fixed`` (default), ``original`` (the checkpoint's own,
    unchanged; None when it has none), or a path to a template file."""
    if choice in (None, "", "fixed"):
        return fixed_template()
    if choice == "original":
        return original_template(ckpt_dir) if ckpt_dir is not None else None
    p = Path(choice)
    if not p.is_file():
        raise NexlabError(f"--chat-template: {choice!r} is neither fixed, original nor a readable file")
    return p.read_text()


def original_template(ckpt_dir: str | Path) -> str | None:
    """The checkpoint's template: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``."""
    d = Path(ckpt_dir)
    for sub in (d, d / "tokenizer"):
        j = sub / "chat_template.jinja"
        if j.is_file():
            return j.read_text()
        tc = sub / "tokenizer_config.json"
        if tc.is_file():
            t = json.loads(tc.read_text()).get("chat_template")
            if isinstance(t, list):  # named templates: take "default"
                t = next((x["template"] for x in t if x.get("name") == "default"), None)
            if t:
                return t
    return None
