"""llama.cpp's command-line tools, built with cmake from the vendored tree: ``nexlab setup``.

:func:`build_tools` configures the tree :func:`nexlab.llamacpp.source.llamacpp_source` fetched with
:data:`CMAKE_OPTIONS` (Release, static, CPU for this machine, no HTTPS, no web UI) and builds only
:data:`TOOLS` (``llama-bench``, ``llama-batched-bench``, ``llama-imatrix``, ``llama-perplexity``,
``llama-quantize``, ``llama-server``, ``llama-mtmd-cli``) in a temporary folder; the ``bin`` folder
(with BUILD.json: options, compiler, seconds) is renamed into the cache in one step under the cache
lock, so a folder that exists is whole. :func:`tool_path` finds one tool and never builds (a missing
one is an error saying how). :func:`setup` does the fetch and the build (``nexlab setup``, run by
``make install``); :func:`setup_report` is ``nexlab setup --check``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from nexlab.core.errors import NexlabError, ToolError
from nexlab.core.fileio import locked
from nexlab.llamacpp.source import (
    LLAMA_CPP_PYTHON_VERSION,
    SETUP_HINT,
    check_llama_cpp_python_version,
    llamacpp_home,
    llamacpp_source,
    publish_folder,
    source_dir,
    tools_dir,
)

TOOLS = ("llama-bench", "llama-batched-bench", "llama-imatrix", "llama-perplexity", "llama-quantize", "llama-server",
         "llama-mtmd-cli")


# cmake options of the tool build; anything not named keeps the tree's default, as in llama-cpp-python's
# own build (so GGML_NATIVE stays ON: the CPU backend is compiled for this machine)
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",       # static libllama/libggml: the binaries run without LD_LIBRARY_PATH
    "LLAMA_OPENSSL": "OFF",           # no HTTPS model downloads (this tree has no LLAMA_CURL any more)
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_UI": "OFF",          # the server's web UI needs npm ...
    "LLAMA_USE_PREBUILT_UI": "OFF",   # ... or a download from Hugging Face: the server runs without it
}


# ----------------------------------------------------------------------------- llama.cpp's tools
def tool_path(name: str) -> Path:
    """Path of one of llama.cpp's tools (:data:`TOOLS`), built by ``nexlab setup``.

    Never builds: a missing tool is an error that says how to build it.
    """
    if name not in TOOLS:
        raise NexlabError(f"unknown llama.cpp tool {name!r}; nexlab builds {', '.join(TOOLS)}")
    p = tools_dir() / name
    if not os.access(p, os.X_OK):
        raise FileNotFoundError(f"llama.cpp's {name} is not built (looked for {p}): {SETUP_HINT}")
    return p


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not os.access(tools_dir() / t, os.X_OK)]


_PROGRESS_RE = re.compile(r"^\[\s*(\d+)%\]|^\[(\d+)/(\d+)\]")  # make: "[ 37%] ...", ninja: "[12/345] ..."


_BUILT_RE = re.compile(r"^\[\s*\d+%\] Built target (\S+)")


def _stream(cmd: list[str], log_file, *, label: str, log: Callable[[str], None], t0: float, env=None) -> None:
    """Run ``cmd``, copy its output to ``log_file``, report each new percentage; raise with the tail on failure."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
    tail: list[str] = []
    last = -100  # report the first percentage
    assert proc.stdout is not None
    for line in proc.stdout:
        log_file.write(line)
        tail = (tail + [line])[-60:]
        if (m := _BUILT_RE.match(line)) and m[1] in TOOLS:
            log(f"  {label} {time.perf_counter() - t0:6.0f} s  {m[1]} done")
        elif m := _PROGRESS_RE.match(line):  # make restarts the percentage for each target: report jumps
            pct = int(m[1]) if m[1] else 100 * int(m[2]) // int(m[3])
            if abs(pct - last) >= 10:
                last = pct
                log(f"  {label} {time.perf_counter() - t0:6.0f} s  [{pct:3d}%] {line.split('] ', 1)[-1].strip()[:70]}")
    if proc.wait() != 0:
        raise ToolError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{''.join(tail)[-4000:]}")


def build_tools(*, jobs: int | None = None, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build :data:`TOOLS` from :func:`llamacpp_source` with cmake; return BUILD.json's content.

    Configured with :data:`CMAKE_OPTIONS` (Release, static, CPU, no HTTPS, no web UI), only those
    targets built (``cmake --build --target ...``), ``jobs`` parallel jobs (default: every CPU).
    The build runs in a temporary folder; its ``bin`` is renamed into place when every tool is
    there, under the cache lock. An existing complete build is kept unless ``force``.
    """
    home = llamacpp_home()
    bin_dir = tools_dir()
    if not force and not missing_tools():
        return json.loads((bin_dir / "BUILD.json").read_text())
    src = llamacpp_source(log=log)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise FileNotFoundError("cmake not found: llama.cpp's tools are built with cmake (and a C/C++ compiler); "
                                "install it (e.g. `apt-get install cmake build-essential`, "
                                "or conda's cmake and compilers)")
    jobs = int(jobs or os.cpu_count() or 2)
    with locked(home / ".lock"):
        if not force and not missing_tools():
            return json.loads((bin_dir / "BUILD.json").read_text())
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=home, prefix=".build-"))
        log_path = tmp / "build.log"
        try:
            with open(log_path, "w") as lf:
                configure = [cmake, "-S", str(src), "-B", str(tmp / "build"),
                             *[f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()]]
                log(f"configuring llama.cpp ({src}) ...")
                _stream(configure, lf, label="configure", log=log, t0=t0)
                t_conf = time.perf_counter() - t0
                build = [cmake, "--build", str(tmp / "build"), "--config", "Release", "-j", str(jobs),
                         "--target", *TOOLS]
                log(f"configured in {t_conf:.0f} s; building {', '.join(TOOLS)} with {jobs} jobs ...")
                _stream(build, lf, label="build", log=log, t0=t0)
            built = tmp / "build" / "bin"
            missing = [t for t in TOOLS if not os.access(built / t, os.X_OK)]
            if missing:
                raise ToolError(f"the build finished without {missing} in {built}")
            stage = Path(tempfile.mkdtemp(dir=home, prefix=".bin-"))
            for t in TOOLS:
                shutil.copy2(built / t, stage / t)
            shutil.copy2(log_path, stage / "build.log")
            cxx = re.search(r"The CXX compiler identification is (.+)", log_path.read_text())
            info = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "source": str(src), "tools": list(TOOLS),
                    "cmake_options": CMAKE_OPTIONS, "jobs": jobs, "cxx": cxx[1].strip() if cxx else None,
                    "configure_seconds": round(t_conf, 1), "seconds": round(time.perf_counter() - t0, 1),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (stage / "BUILD.json").write_text(json.dumps(info, indent=2) + "\n")
            publish_folder(stage, bin_dir)
            log(f"built {len(TOOLS)} tools in {info['seconds']:.0f} s -> {bin_dir}")
            return info
        except BaseException:
            if log_path.exists():
                shutil.copy2(log_path, home / "build-failed.log")
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def setup(*, jobs: int | None = None, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Everything nexlab needs from llama.cpp: the source tree (converter) and the tools."""
    check_llama_cpp_python_version()
    t0 = time.perf_counter()
    src = llamacpp_source(log=log)
    log(f"llama.cpp source: {src}")
    present = not force and not missing_tools()
    info = build_tools(jobs=jobs, force=force, log=log)
    state = f"already built {info['built_at']}" if present else f"built in {info['seconds']:.0f} s"
    log(f"llama.cpp tools: {tools_dir()} ({state}); setup took {time.perf_counter() - t0:.0f} s")
    return info


def setup_report() -> tuple[list[str], bool]:
    """Lines describing what ``nexlab setup`` provides and whether it is all there."""
    lines, ok = [], True
    try:
        lines.append(f"llama-cpp-python {check_llama_cpp_python_version()} (pinned {LLAMA_CPP_PYTHON_VERSION})")
    except RuntimeError as exc:
        lines.append(f"MISSING  {exc}")
        ok = False
    lines.append(f"cache: {llamacpp_home()}")
    src = source_dir()
    if (src / "SOURCE.json").is_file():
        s = json.loads((src / "SOURCE.json").read_text())
        lines.append(f"ok       source tree {src} ({s['sdist']}, sha256 {s['sdist_sha256'][:12]}...)")
    else:
        lines.append(f"MISSING  source tree {src}")
        ok = False
    for t in TOOLS:
        p = tools_dir() / t
        present = os.access(p, os.X_OK)
        ok &= present
        lines.append(f"{'ok' if present else 'MISSING':8s} {p}")
    if (tools_dir() / "BUILD.json").is_file():
        b = json.loads((tools_dir() / "BUILD.json").read_text())
        lines.append(f"tools built {b['built_at']} in {b['seconds']:.0f} s with {b['jobs']} jobs ({b['cxx']})")
    return lines, ok


def _cli_setup(args: argparse.Namespace) -> int:
    if args.check:
        lines, ok = setup_report()
        print("\n".join(lines))
        if not ok:
            print(f"incomplete: {SETUP_HINT}")
        return 0 if ok else 1
    try:
        setup(jobs=args.jobs, force=args.force, log=lambda msg: print(f"nexlab setup: {msg}", flush=True))
    except RuntimeError as exc:  # pip, cmake or the compiler failed: their output is in the message
        print(f"nexlab setup: error: {exc}", file=sys.stderr)
        if (llamacpp_home() / "build-failed.log").is_file():
            print(f"nexlab setup: full build log: {llamacpp_home() / 'build-failed.log'}", file=sys.stderr)
        return 1
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("setup", help="fetch llama.cpp's source (converter) and build its tools into the user cache",
                       description="Fetch the llama.cpp tree that llama-cpp-python "
                                   f"{LLAMA_CPP_PYTHON_VERSION} vendors and build {', '.join(TOOLS)} "
                                   f"(CPU, static) into {llamacpp_home()}.")
    p.add_argument("--check", action="store_true", help="only list what is there (exit 1 when something is missing)")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: every CPU)")
    p.add_argument("--force", action="store_true", help="rebuild the tools even when they are there")
    p.set_defaults(func=_cli_setup)
