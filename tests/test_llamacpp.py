"""nexlab.llamacpp.source: the llama.cpp tree of llama-cpp-python 0.3.36, its patched converter, its tools, its server.

Nothing here skips: the tree and the tools come from ``nexlab setup`` (run by ``make install``);
a missing piece is a failure whose message says how to get it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import llama_cpp
import pytest

from nexlab.cli import main as nexlab_main
from nexlab.llamacpp import build as llamacpp_build
from nexlab.llamacpp import server
from nexlab.llamacpp import source as LL

ROOT = Path(__file__).resolve().parent.parent


def test_pin_is_the_installed_llama_cpp_python_and_the_declared_one():
    assert LL.check_llama_cpp_python_version() == LL.LLAMA_CPP_PYTHON_VERSION == llama_cpp.__version__
    assert f'"llama-cpp-python=={LL.LLAMA_CPP_PYTHON_VERSION}"' in (ROOT / "pyproject.toml").read_text()


def test_cache_folder_follows_nexlab_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("NEXLAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert LL.cache_dir() == tmp_path / "xdg" / "nexlab"
    monkeypatch.setenv("NEXLAB_CACHE", str(tmp_path / "mine"))
    assert LL.llamacpp_home() == tmp_path / "mine" / f"llama.cpp-{LL.LLAMA_CPP_PYTHON_VERSION}"


def test_source_tree_is_the_vendored_tree_with_one_patched_line():
    src = LL.llamacpp_source()
    info = json.loads((src / "SOURCE.json").read_text())
    assert info["sdist"] == f"llama_cpp_python-{LL.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    assert re.fullmatch(r"[0-9a-f]{64}", info["sdist_sha256"])
    for rel in ("convert_hf_to_gguf.py", "gguf-py/gguf/constants.py", "src/llama-vocab.cpp",
                "tools/server/server.cpp", "ggml/src/ggml-quants.c", "CMakeLists.txt"):
        assert (src / rel).is_file(), rel
    base = (src / "conversion" / "base.py").read_text()
    assert base.count(LL._PRETOKENIZER_FALLBACK) == 1 and LL._PRETOKENIZER_RAISE not in base
    assert LL.reference_converter() == src / "convert_hf_to_gguf.py"


def test_converter_patch_replaces_exactly_the_raise_and_fails_loudly_otherwise(tmp_path):
    conv = tmp_path / "conversion"
    conv.mkdir()
    before = ("        if res is None:\n            log()\n            " + LL._PRETOKENIZER_RAISE
              + "\n        return res\n")
    (conv / "base.py").write_text(before)
    LL._patch_converter(tmp_path)
    after = (conv / "base.py").read_text()
    assert after == before.replace(LL._PRETOKENIZER_RAISE, LL._PRETOKENIZER_FALLBACK)
    with pytest.raises(RuntimeError, match="cannot patch .*found 0"):
        LL._patch_converter(tmp_path)  # the line is gone now: the converter "changed"


def test_a_tree_with_an_older_patch_is_repatched_in_place_without_touching_the_tools(monkeypatch, tmp_path):
    """An existing cache patched by an earlier nexlab gets today's patch (what a fresh fetch would
    give) on the next use, without a download and without rebuilding the tools."""
    monkeypatch.setenv("NEXLAB_CACHE", str(tmp_path))
    src, bin_dir = LL.source_dir(), LL.tools_dir()
    (src / "conversion").mkdir(parents=True)
    bin_dir.mkdir()
    fresh = ("        if res is None:\n            log()\n            " + LL._PRETOKENIZER_RAISE
             + "\n        return res\n")
    old_patch = LL._FORMER_PRETOKENIZER_FALLBACKS[0]
    (src / "conversion" / "base.py").write_text(fresh.replace(LL._PRETOKENIZER_RAISE, old_patch))
    (src / "SOURCE.json").write_text(json.dumps({"sdist": "x", "patched": ["conversion/base.py: " + old_patch]}))
    (bin_dir / "BUILD.json").write_text("{}")
    bin_before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in bin_dir.iterdir()}

    assert LL.llamacpp_source(fetch=False, log=lambda msg: None) == src
    assert (src / "conversion" / "base.py").read_text() == fresh.replace(LL._PRETOKENIZER_RAISE,
                                                                         LL._PRETOKENIZER_FALLBACK)
    info = json.loads((src / "SOURCE.json").read_text())
    assert info["patched"] == ["conversion/base.py: " + LL._PRETOKENIZER_FALLBACK] and info["sdist"] == "x"
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in bin_dir.iterdir()} == bin_before
    stamp = (src / "conversion" / "base.py").stat().st_mtime_ns
    assert LL.llamacpp_source(fetch=False) == src  # current now: left alone
    assert (src / "conversion" / "base.py").stat().st_mtime_ns == stamp


def test_reference_command_passes_the_pretokenizer_name_and_drops_an_inherited_one(monkeypatch, tmp_path):
    monkeypatch.setenv(LL.PRETOKENIZER_ENV, "inherited")
    _, env = LL.reference_command(tmp_path / "ckpt", tmp_path / "out.gguf")
    assert LL.PRETOKENIZER_ENV not in env
    _, env = LL.reference_command(tmp_path / "ckpt", tmp_path / "out.gguf", tokenizer_pre="qwen35")
    assert env[LL.PRETOKENIZER_ENV] == "qwen35"
    assert f'os.environ.get("{LL.PRETOKENIZER_ENV}", "qwen2")' in LL._PRETOKENIZER_FALLBACK


def test_missing_tree_and_tools_are_errors_that_name_nexlab_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("NEXLAB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nexlab setup"):
        LL.llamacpp_source(fetch=False)
    with pytest.raises(FileNotFoundError, match=r"llama-server is not built .*nexlab setup"):
        llamacpp_build.tool_path("llama-server")
    with pytest.raises(ValueError, match="unknown llama.cpp tool"):
        llamacpp_build.tool_path("llama-cli")
    assert llamacpp_build.missing_tools() == list(llamacpp_build.TOOLS)
    assert nexlab_main(["setup", "--check"]) == 1
    assert not any(tmp_path.iterdir()), "a check must not fetch or build anything"


def test_setup_check_lists_every_tool(capsys):
    assert nexlab_main(["setup", "--check"]) == 0
    out = capsys.readouterr().out
    for t in llamacpp_build.TOOLS:
        assert re.search(rf"^ok +\S+/{t}$", out, re.M), t


def test_build_steps_report_progress_and_fail_with_the_end_of_their_output(tmp_path):
    lines = []
    with open(tmp_path / "log", "w") as f:
        llamacpp_build._stream(["bash", "-c", "echo '[  4%] Building a.c'; echo '[100%] Built target llama-bench'"], f,
                   label="build", log=lines.append, t0=0.0)
        with pytest.raises(RuntimeError, match=r"failed \(3\):\ncompiler says no"):
            llamacpp_build._stream(["bash", "-c", "echo 'compiler says no'; exit 3"], f, label="build",
                                   log=lines.append, t0=0.0)
    assert any("Building a.c" in x for x in lines) and any("llama-bench done" in x for x in lines)
    assert "compiler says no" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("name", llamacpp_build.TOOLS)
def test_tool_is_static_and_runs(name):
    exe = llamacpp_build.tool_path(name)
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "libllama" not in ldd and "libggml" not in ldd and "not found" not in ldd, ldd
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr[-2000:]  # llama-quantize answers --help with its usage and 1
    assert "usage" in (r.stdout + r.stderr).lower()


def test_tools_come_from_the_same_tree_as_the_bindings():
    build = json.loads((LL.tools_dir() / "BUILD.json").read_text())
    assert build["llama_cpp_python"] == LL.LLAMA_CPP_PYTHON_VERSION
    assert build["source"] == str(LL.llamacpp_source())
    assert build["cmake_options"]["BUILD_SHARED_LIBS"] == "OFF"


def test_llama_server_serves_the_model_and_stops(nexlab_gguf):
    gguf = nexlab_gguf("nvfp4")
    with server.llama_server(gguf, n_ctx=256) as srv:
        assert srv.request("/health")["status"] == "ok"
        props = srv.request("/props")
        assert Path(props["model_path"]).resolve() == gguf.resolve()
        r = srv.request("/completion", {"prompt": "def", "n_predict": 4, "temperature": 0.0, "seed": 0})
        assert r["tokens_predicted"] == 4
        port = int(srv.url.rsplit(":", 1)[1])
        proc = srv.process
    assert proc.poll() is not None, "llama-server still running after the block"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "port still served"


def test_llama_server_that_cannot_load_raises_with_its_log(tmp_path):
    import gguf  # noqa: PLC0415

    bad = tmp_path / "bad.gguf"  # a whole GGUF file, of an architecture llama.cpp does not know
    w = gguf.GGUFWriter(bad, arch="no-such-arch")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(RuntimeError, match="llama-server exited"):
        with server.llama_server(bad, startup_timeout=60):
            pass
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF"):
        with server.llama_server(text):
            pass


def test_reference_converter_runs_with_the_trees_own_gguf_py(tmp_path):
    cmd, env = LL.reference_command(tmp_path / "ckpt", tmp_path / "out.gguf")
    assert cmd[1] == str(LL.reference_converter())
    assert cmd[-3:] == ["--outtype", "bf16", "--no-mtp"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(LL.llamacpp_source() / "gguf-py")
