"""llama-server, and where llama.cpp's real chat parser routes generated text.

:func:`llama_server` starts the built ``llama-server`` on a free port of 127.0.0.1, waits for
``/health`` and stops it when the block ends (Ctrl-C and errors included); :class:`LlamaServer`
sends JSON requests to it (``request``, OpenAI-style ``chat``).

:func:`llama_server_routing` is the chat-template experiment of chapter 03 run through the real
server: ``--jinja --reasoning-format deepseek`` (common/chat's auto-parser of llama-cpp-python
0.3.36's tree) on the template embedded in a GGUF, asking ``/apply-template`` for the generation
prompt and two greedy completions (one forced by a GBNF grammar, :func:`gbnf_literal`, to the turn
the template's history implies) to see whether reasoning lands in ``reasoning_content`` or in
``content``. The template itself, its fix and the jinja2 check are :mod:`nexlab.model.chat_template`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from nexlab.core.errors import ToolError
from nexlab.llamacpp.build import tool_path
from nexlab.llamacpp.process import free_port, terminate
from nexlab.llamacpp.runtime import check_gguf_path
from nexlab.model.chat_template import CHECK_CONVERSATION, check_template


def gbnf_literal(text: str) -> str:
    """A GBNF grammar whose only sentence is ``text`` (llama.cpp grammar string escapes)."""
    esc = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'root ::= "{esc}"'


def _landing(answer: dict) -> dict[str, Any]:
    choice = answer["choices"][0]
    msg = choice["message"]
    reasoning, content = msg.get("reasoning_content") or "", msg.get("content") or ""
    routed = {(True, False): "reasoning_content", (False, True): "content",
              (True, True): "both", (False, False): "none"}[(bool(reasoning), bool(content))]
    return {"routed_to": routed, "reasoning_content": reasoning, "content": content,
            "finish_reason": choice.get("finish_reason"),
            "completion_tokens": answer.get("usage", {}).get("completion_tokens")}


def llama_server_routing(gguf_path: str | Path, *, free_tokens: int = 16, threads: int = 2) -> dict[str, Any]:
    """Where llama.cpp's chat parser puts generated text, for the template embedded in ``gguf_path``.

    Starts ``llama-server --jinja --reasoning-format deepseek`` (the tree's default format, named so
    the experiment does not drift with it) and asks, for :data:`CHECK_CONVERSATION`:

    - ``/apply-template``: llama.cpp's own render of the generation prompt (``prompt``; compare
      with nexlab's, ``check["prompt"]``);
    - ``forced``: one chat completion constrained by a grammar (:func:`gbnf_literal`) to the turn a
      model trained on the template's history writes after that prompt (``check["generated"]``:
      reasoning, ``</think>``, answer), so the parser sees a realistic chain of thought;
    - ``free``: one unconstrained greedy completion (``free_tokens``; the tiny model's text is
      gibberish without ``</think>``: it shows where text goes while thinking is open).

    Both answers use ``temperature`` 0 and ``seed`` 0. Each reports ``routed_to``
    (``reasoning_content``, ``content``, ``both`` or ``none``), the two strings, the finish reason
    and the token count. ``check`` is :func:`check_template` of the server's template, ``build_info``
    the server's. Where the text lands is decided by the template and the parser alone.
    """

    msgs = CHECK_CONVERSATION
    with llama_server(gguf_path, "--jinja", "--reasoning-format", "deepseek", threads=threads) as srv:
        props = srv.request("/props")
        check = check_template(props["chat_template"])
        prompt = srv.request("/apply-template", {"messages": msgs})["prompt"]
        forced = srv.chat(msgs, max_tokens=256, temperature=0.0, seed=0, grammar=gbnf_literal(check["generated"]))
        free = srv.chat(msgs, max_tokens=free_tokens, temperature=0.0, seed=0)
    return {"prompt": prompt, "check": check, "forced": _landing(forced), "free": _landing(free),
            "build_info": props.get("build_info")}


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 through a proxy


class LlamaServer:
    """A running ``llama-server`` (see :func:`llama_server`): its URL, process and log."""

    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        self.url, self.process, self.log_path = url, process, log_path

    def request(self, path: str, payload: dict | None = None, timeout: float = 300) -> dict:
        """GET ``path`` (or POST ``payload`` as JSON) and return the JSON answer; HTTP errors carry the body."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with _NO_PROXY.open(req, timeout=timeout) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as exc:
            raise ToolError(f"llama-server {path}: HTTP {exc.code}: "
                            f"{exc.read().decode(errors='replace')[:2000]}") from None

    def chat(self, messages: list[dict], **params: Any) -> dict:
        """One OpenAI-style ``/v1/chat/completions`` request (not streamed)."""
        return self.request("/v1/chat/completions", {"messages": messages, "stream": False, **params})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def llama_server(model: str | os.PathLike, *args: str, n_ctx: int = 512, threads: int = 2, port: int | None = None,
                 startup_timeout: float = 120.0) -> Iterator[LlamaServer]:
    """Start ``llama-server -m MODEL`` on 127.0.0.1 (a free port), wait for ``/health``, stop it on exit.

    ``args`` are passed on (e.g. ``"--jinja"``). The server is terminated (killed after 10 s) when
    the block ends, also on an exception or Ctrl-C; a server that exits or never becomes healthy
    raises with the end of its log.
    """
    exe = tool_path("llama-server")
    model = check_gguf_path(model)
    port = port or free_port()
    cmd = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx),
           "-t", str(threads), *args]
    fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
    log_path = Path(log_name)
    proc = None
    try:
        with os.fdopen(fd, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = LlamaServer(f"http://127.0.0.1:{port}", proc, log_path)
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ToolError(f"llama-server exited ({proc.returncode}) before it was ready:\n"
                                   f"{' '.join(cmd)}\n{server.log()[-3000:]}")
            try:
                with _NO_PROXY.open(server.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass  # not listening yet, or 503 while the model loads
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server not healthy after {startup_timeout:.0f} s:\n{server.log()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if proc is not None:
            terminate(proc)
        log_path.unlink(missing_ok=True)
