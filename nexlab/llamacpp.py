"""llama.cpp itself, from one tree: its converter as a reference, its tools, its server, its runtime.

Everything here comes from the llama.cpp tree that llama-cpp-python 0.3.36 vendors and runs
(``vendor/llama.cpp`` in its sdist), so the reference converter, the command-line tools and the
Python bindings agree on every format detail.

- :func:`llamacpp_source` fetches that sdist with ``pip download`` (this interpreter's pip),
  unpacks the whole ``vendor/llama.cpp`` tree into the user cache and patches one line of the
  converter: llama.cpp names a BPE pre-tokenizer from a hash of the tokens of a test string, which
  a self-made vocabulary never matches, so instead of raising, an unknown one takes the name in
  ``$NEXLAB_TOKENIZER_PRE`` (default ``qwen2``). A tree patched by an older nexlab is re-patched in
  place (SOURCE.json records the patch); the tools are not rebuilt for it (they never use the
  converter).
- :func:`reference_converter` / :func:`run_reference_converter`: ``convert_hf_to_gguf.py`` with
  ``--outtype bf16 --no-mtp``, run by this interpreter with the tree's own ``gguf-py``;
  ``tokenizer_pre=`` sets ``$NEXLAB_TOKENIZER_PRE`` for it.
- :func:`build_tools` builds ``llama-bench``, ``llama-batched-bench``, ``llama-imatrix``,
  ``llama-perplexity``, ``llama-quantize``, ``llama-server`` and ``llama-mtmd-cli`` (the multimodal
  tool that loads an mmproj; CPU, static, Release) with cmake;
  :func:`tool_path` finds one. ``nexlab setup`` (run by ``make install``) does both steps.
- :func:`llama_server` starts ``llama-server`` on a free port and stops it again.
- ``benchmark_conversion`` times nexlab against the reference converter; ``open_model`` and
  :class:`LlamaCppProbe` use llama.cpp through llama-cpp-python.

Cache (``cache_dir()``: ``$NEXLAB_CACHE``, else ``$XDG_CACHE_HOME/nexlab``, else
``~/.cache/nexlab``), keyed by the llama-cpp-python version so every clone on a machine shares it::

    llama.cpp-0.3.36/src/   the vendored tree (SOURCE.json: what was fetched and patched)
    llama.cpp-0.3.36/bin/   the tools of TOOLS (BUILD.json: cmake options, compiler, seconds)
    llama.cpp-0.3.36/.lock  serialises fetching and building between processes

Both folders appear by one rename when complete, so a folder that exists is whole.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from nexlab.fileio import atomic_write_text, locked, replace_directory

REPO_ROOT = Path(__file__).resolve().parent.parent

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the one pin: sdist fetched, tools built, bindings checked against it
TOOLS = ("llama-bench", "llama-batched-bench", "llama-imatrix", "llama-perplexity", "llama-quantize", "llama-server",
         "llama-mtmd-cli")
# A cache built before a tool joined TOOLS lacks it: missing_tools() is then non-empty and the next
# `nexlab setup` (run by `make install` / `make test`) rebuilds the whole set once, under the cache lock

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

# the converter's refusal of unknown BPE pre-tokenizers (conversion/base.py, get_vocab_base_pre) and
# what replaces it: the name the caller puts in PRETOKENIZER_ENV (base.py imports os)
PRETOKENIZER_ENV = "NEXLAB_TOKENIZER_PRE"
_PRETOKENIZER_RAISE = 'raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")'
_PRETOKENIZER_FALLBACK = (f'res = os.environ.get("{PRETOKENIZER_ENV}", "qwen2")  '
                          f'# nexlab: an unknown (self-made) BPE pre-tokenizer is named by ${PRETOKENIZER_ENV}')
# the lines earlier nexlab versions put in its place: an existing tree carrying one is re-patched
_FORMER_PRETOKENIZER_FALLBACKS = (
    'res = "qwen2"  # nexlab: an unknown (self-made) BPE pre-tokenizer falls back to qwen2',
)
_PATCHED = ["conversion/base.py: " + _PRETOKENIZER_FALLBACK]  # SOURCE.json "patched" of a current tree

SETUP_HINT = "run `nexlab setup` (or `make install`, which runs it)"


# ----------------------------------------------------------------------------- the cache and the source tree
def cache_dir() -> Path:
    """nexlab's user cache: ``$NEXLAB_CACHE``, else ``$XDG_CACHE_HOME/nexlab``, else ``~/.cache/nexlab``."""
    if env := os.environ.get("NEXLAB_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nexlab"


def llamacpp_home() -> Path:
    """The cache folder of this llama.cpp tree: ``cache_dir()/llama.cpp-<llama-cpp-python version>``."""
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def source_dir() -> Path:
    return llamacpp_home() / "src"


def tools_dir() -> Path:
    return llamacpp_home() / "bin"


def check_llama_cpp_python_version() -> str:
    """The installed llama-cpp-python version; raise unless it is :data:`LLAMA_CPP_PYTHON_VERSION`.

    The tools and the converter must come from the tree the bindings run, or a proof compares two
    different llama.cpp commits.
    """
    try:
        installed = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"llama-cpp-python is not installed (nexlab needs =={LLAMA_CPP_PYTHON_VERSION}): "
                           "run `make install`") from None
    if installed != LLAMA_CPP_PYTHON_VERSION:
        raise RuntimeError(f"llama-cpp-python {installed} is installed but nexlab.llamacpp pins "
                           f"{LLAMA_CPP_PYTHON_VERSION} (LLAMA_CPP_PYTHON_VERSION and pyproject.toml must agree)")
    return installed


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``final`` (:func:`nexlab.fileio.replace_directory`),
    readable by all; file modes inside are kept (the tools stay executable)."""
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    replace_directory(tmp, final)


def _patch_converter(src: Path) -> None:
    """Replace the converter's one ``raise`` for unknown BPE pre-tokenizers (or the line an earlier
    nexlab put there) by :data:`_PRETOKENIZER_FALLBACK`; base.py is replaced atomically."""
    base = src / "conversion" / "base.py"
    lines = base.read_text(encoding="utf-8").splitlines(keepends=True)
    replaceable = (_PRETOKENIZER_RAISE, *_FORMER_PRETOKENIZER_FALLBACKS)
    hits = [i for i, line in enumerate(lines) if line.strip() in replaceable]
    if len(hits) != 1:
        raise RuntimeError(f"cannot patch {base}: expected exactly one line `{_PRETOKENIZER_RAISE}`, found "
                           f"{len(hits)}; the converter changed, update nexlab.llamacpp._patch_converter")
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = f"{indent}{_PRETOKENIZER_FALLBACK}\n"
    atomic_write_text(base, "".join(lines))


def _patch_is_current(src: Path) -> bool:
    try:
        return json.loads((src / "SOURCE.json").read_text()).get("patched") == _PATCHED
    except (OSError, ValueError):
        return False


def _repatch(src: Path, log: Callable[[str], None]) -> None:
    """Bring the converter patch of an existing tree up to date, in place (no download): the tree
    is then what a fresh fetch gives. The tools are not rebuilt: the patch touches the converter only."""
    info = json.loads((src / "SOURCE.json").read_text())
    _patch_converter(src)
    info["patched"] = _PATCHED
    info["repatched_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(src / "SOURCE.json", json.dumps(info, indent=2) + "\n")
    log(f"updated the converter patch in {src / 'conversion' / 'base.py'}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_source(home: Path, log: Callable[[str], None]) -> Path:
    """Download the sdist, unpack ``vendor/llama.cpp`` into a temporary folder, patch, publish as ``src``."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=home, prefix=".src-"))
    try:
        dl = tmp / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dl)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pip could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
                               f"({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
        sdists = sorted(dl.glob("*.tar.gz"))
        if len(sdists) != 1:
            raise RuntimeError(f"pip download left {[p.name for p in dl.iterdir()]}, expected one .tar.gz sdist")
        t_download = time.perf_counter() - t0
        log(f"downloaded {sdists[0].name} ({sdists[0].stat().st_size / 2**20:.0f} MiB) in {t_download:.0f} s")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        unpack = tmp / "unpack"
        with tarfile.open(sdists[0]) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            if not any(m.name == prefix + "convert_hf_to_gguf.py" for m in members):
                raise RuntimeError(f"{sdists[0].name} has no {prefix}convert_hf_to_gguf.py")
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(unpack, members=members, **kw)
        tree = unpack / prefix
        _patch_converter(tree)
        info = {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "sdist": sdists[0].name,
                "sdist_sha256": _sha256(sdists[0]), "patched": _PATCHED,
                "download_seconds": round(t_download, 1), "seconds": round(time.perf_counter() - t0, 1)}
        (tree / "SOURCE.json").write_text(json.dumps(info, indent=2) + "\n")
        staged = Path(tempfile.mkdtemp(dir=home, prefix=".src-ready-"))
        staged.rmdir()
        os.replace(tree, staged)
        _publish(staged, home / "src")
        log(f"unpacked and patched llama.cpp in {time.perf_counter() - t0:.0f} s -> {home / 'src'}")
        return home / "src"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def llamacpp_source(*, fetch: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """The patched ``vendor/llama.cpp`` tree of the llama-cpp-python sdist; fetched on first use.

    A tree whose converter patch (SOURCE.json ``patched``) is not the current one is re-patched in
    place. ``fetch=False`` raises instead of downloading. Safe to call from several processes at once.
    """
    src = source_dir()
    log = log or (lambda msg: print(f"nexlab: {msg}", file=sys.stderr))
    if (src / "SOURCE.json").is_file():
        if _patch_is_current(src):
            return src
        with locked(llamacpp_home() / ".lock"):
            if not _patch_is_current(src):  # another process may have done it while we waited
                _repatch(src, log)
        return src
    check_llama_cpp_python_version()
    if not fetch:
        raise FileNotFoundError(f"llama.cpp source tree missing at {src}: {SETUP_HINT}")
    home = llamacpp_home()
    home.mkdir(parents=True, exist_ok=True)
    with locked(home / ".lock"):
        if (src / "SOURCE.json").is_file():  # another process fetched it while we waited
            if not _patch_is_current(src):
                _repatch(src, log)
            return src
        return _fetch_source(home, log)


# ----------------------------------------------------------------------------- the reference converter
def reference_converter() -> Path:
    """Path of llama.cpp's ``convert_hf_to_gguf.py`` (patched copy), fetching the tree when needed."""
    return llamacpp_source() / "convert_hf_to_gguf.py"


def reference_command(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, *, python: str = sys.executable,
                      extra_args: tuple[str, ...] = (), tokenizer_pre: str | None = None,
                      mmproj: str | None = None) -> tuple[list[str], dict]:
    """Command line and environment that run the reference converter (BF16 outtype, no MTP).

    ``mmproj`` (``f16``, ``bf16``, ``f32``): convert the vision tower instead, ``--mmproj --outtype
    MMPROJ`` (the mmproj converter takes no ``--no-mtp``; it never writes MTP tensors).

    ``PYTHONPATH`` puts the tree's own ``gguf-py`` first, so the converter writes with the gguf
    code of its commit, not the installed ``gguf`` package. ``tokenizer_pre`` goes to
    ``$NEXLAB_TOKENIZER_PRE``: the ``tokenizer.ggml.pre`` the patched converter writes for a BPE
    tokenizer it does not recognise by hash (without it: ``qwen2``; an inherited value is dropped).
    """
    conv = reference_converter()
    gguf_py = str(conv.parent / "gguf-py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (gguf_py, os.environ.get("PYTHONPATH")) if p))
    env.pop(PRETOKENIZER_ENV, None)
    if tokenizer_pre is not None:
        env[PRETOKENIZER_ENV] = str(tokenizer_pre)
    mode = ["--outtype", "bf16", "--no-mtp"] if mmproj is None else ["--outtype", str(mmproj), "--mmproj"]
    cmd = [python, str(conv), str(Path(ckpt_dir).resolve()), "--outfile", str(Path(out_path).resolve()),
           *mode, *extra_args]
    return cmd, env


def run_reference_converter(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                            python: str = sys.executable, timeout: float = 1800,
                            extra_args: tuple[str, ...] = (), tokenizer_pre: str | None = None,
                            mmproj: str | None = None) -> Path:
    """Convert ``ckpt_dir`` with llama.cpp's converter to ``out_path``; raise with its stderr on failure.

    ``mmproj``: write the vision tower's mmproj with that outtype instead (:func:`reference_command`).

    ``tokenizer_pre``: the pre-tokenizer name for a self-made BPE tokenizer (:func:`reference_command`);
    a caller comparing with nexlab's file states the name it expects, e.g. ``qwen35`` for the tiny model.
    """
    cmd, env = reference_command(ckpt_dir, out_path, python=python, extra_args=extra_args,
                                 tokenizer_pre=tokenizer_pre, mmproj=mmproj)
    r = subprocess.run(cmd, env=env, cwd=Path(cmd[1]).parent, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {ckpt_dir} ({r.returncode}):\n{r.stderr[-3000:]}")
    return Path(out_path)


def terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a server-like child: SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_process_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a child started by :func:`child_process` and everything it started: SIGINT to its process
    group (a nexlab child removes its temporary files, as on Ctrl-C), SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader has exited; grandchildren that ignored SIGINT are killed too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def child_process(cmd: list[str], **popen_kwargs: Any) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(cmd)`` in its own process group, stopped with all its children
    (:func:`stop_process_group`) when the block raises, Ctrl-C (KeyboardInterrupt) included.

    A terminal's Ctrl-C reaches every process of the foreground group, but Jupyter's interrupt,
    ``kill -INT`` or a SIGTERM reach nexlab alone: without this a llama.cpp tool (or ``/usr/bin/time``'s
    child) would run on, writing its file."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    except BaseException:
        stop_process_group(proc)
        raise
    finally:
        for f in (proc.stdout, proc.stderr, proc.stdin):
            if f is not None:
                f.close()


def _run(cmd: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> dict:
    """Run ``cmd``; return wall seconds and the child's peak RSS (MiB).

    Peak RSS comes from GNU ``/usr/bin/time -f %M`` (kB): ``time`` is a small process, so the RSS
    that Linux carries over fork+exec into the child's high-water mark is tiny, unlike a fork of
    this (possibly large, e.g. Jupyter with torch loaded) interpreter. Without ``/usr/bin/time``
    ``os.wait4`` is used (then the figure includes this process's RSS at fork time).
    """
    with tempfile.TemporaryDirectory() as td:
        rss_file, err_file = Path(td) / "rss", Path(td) / "err"
        full = ["/usr/bin/time", "-o", str(rss_file), "-f", "%M", *cmd] if Path("/usr/bin/time").exists() else cmd
        with open(err_file, "wb") as errf:
            t0 = time.perf_counter()
            with child_process(full, stdout=subprocess.DEVNULL, stderr=errf, env=env, cwd=cwd) as proc:
                _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code != 0:
            err = err_file.read_text(errors="replace")
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed with {code}:\n{err[-3000:]}")
        if full is not cmd:
            kb = float(rss_file.read_text().split()[-1])
        else:
            kb = float(usage.ru_maxrss)
    return {"seconds": wall, "peak_rss_mib": kb / 1024.0}


def benchmark_conversion(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, repeats: int = 1,
                         python: str = sys.executable, keep: bool = False) -> dict:
    """Convert ``ckpt_dir`` with nexlab and with the reference converter; return times, RSS, ratios.

    Both run as child processes of the same interpreter (``python -m nexlab.cli convert`` and
    ``python convert_hf_to_gguf.py``), so wall time and peak RSS are the converters' own. Each
    runs ``repeats`` times (alternating); the best wall time and the largest peak RSS are
    reported. Output files are deleted unless ``keep``; on an error or Ctrl-C both converters are
    stopped (:func:`child_process`) and their files deleted.
    """
    ckpt_dir = Path(ckpt_dir)
    made = out_dir is None
    tmp = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        return _benchmark_conversion(ckpt_dir, tmp, repeats, python, keep)
    except BaseException:
        for name in ("nexlab.gguf", "llamacpp.gguf"):
            (tmp / name).unlink(missing_ok=True)
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _benchmark_conversion(ckpt_dir: Path, tmp: Path, repeats: int, python: str, keep: bool) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    outs = {"nexlab": tmp / "nexlab.gguf", "llamacpp": tmp / "llamacpp.gguf"}
    ref_cmd, ref_env = reference_command(ckpt_dir, outs["llamacpp"], python=python)
    ref_env["NEXLAB_NO_PROGRESS"] = "1"
    env = dict(os.environ, NEXLAB_NO_PROGRESS="1", PYTHONPATH=str(REPO_ROOT))
    runs: dict[str, list[dict]] = {"nexlab": [], "llamacpp": []}
    for _ in range(repeats):
        runs["nexlab"].append(_run([python, "-m", "nexlab.cli", "convert", str(ckpt_dir), "-o", str(outs["nexlab"]), "-q"], env))
        runs["llamacpp"].append(_run(ref_cmd, ref_env, cwd=Path(ref_cmd[1]).parent))
    res = {k: {"seconds": min(r["seconds"] for r in v), "peak_rss_mib": max(r["peak_rss_mib"] for r in v),
               "file_mib": outs[k].stat().st_size / 2**20} for k, v in runs.items()}
    res["ratio_time"] = res["nexlab"]["seconds"] / res["llamacpp"]["seconds"]
    res["ratio_rss"] = res["nexlab"]["peak_rss_mib"] / res["llamacpp"]["peak_rss_mib"]
    res["checkpoint"] = str(ckpt_dir)
    res["checkpoint_mib"] = sum(p.stat().st_size for p in ckpt_dir.glob("*.safetensors")) / 2**20
    res["repeats"] = repeats
    if not keep:
        for p in outs.values():
            p.unlink(missing_ok=True)
    return res


# ----------------------------------------------------------------------------- llama.cpp's tools
def tool_path(name: str) -> Path:
    """Path of one of llama.cpp's tools (:data:`TOOLS`), built by ``nexlab setup``.

    Never builds: a missing tool is an error that says how to build it.
    """
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; nexlab builds {', '.join(TOOLS)}")
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
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{''.join(tail)[-4000:]}")


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
                                "install it (e.g. `apt-get install cmake build-essential`, or conda's cmake and compilers)")
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
                raise RuntimeError(f"the build finished without {missing} in {built}")
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
            _publish(stage, bin_dir)
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


# ----------------------------------------------------------------------------- llama-server
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
            raise RuntimeError(f"llama-server {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:2000]}") from None

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
                raise RuntimeError(f"llama-server exited ({proc.returncode}) before it was ready:\n"
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


# ----------------------------------------------------------------------------- llama.cpp through llama-cpp-python
def check_gguf_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path after :func:`nexlab.gguf_check.check_gguf` (a whole, consistent GGUF file;
    otherwise one error line naming the file and the fault), before llama.cpp opens it."""
    from nexlab.gguf_check import check_gguf  # noqa: PLC0415

    return check_gguf(path).path


def open_model(path: str | os.PathLike, n_ctx: int = 256, *, n_threads: int = 2, n_batch: int | None = None):
    """llama-cpp-python ``Llama`` on CPU with per-position logits (``logits_all``), seed 0, quiet.

    The one llama.cpp model wrapper of nexlab: the reference proofs, the quality chapter and the
    tests all open GGUF files through it. ``n_batch`` (default 512, llama-cpp-python's) also sets
    ``n_ubatch``; pass ``n_batch=n_ctx`` to evaluate a whole window as one batch.
    """
    from llama_cpp import Llama  # noqa: PLC0415

    p = check_gguf_path(path)
    kw = {} if n_batch is None else {"n_batch": int(n_batch), "n_ubatch": int(n_batch)}
    try:
        return Llama(model_path=str(p), n_ctx=int(n_ctx), n_threads=n_threads, n_threads_batch=n_threads,
                     logits_all=True, n_gpu_layers=0, seed=0, verbose=False, **kw)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        raise ValueError(f"llama.cpp could not load {p}: {exc}") from None


def _ggml_type_id(name: str) -> int:
    import gguf  # noqa: PLC0415

    try:
        return int(gguf.GGMLQuantizationType[str(name).upper()])
    except KeyError:
        raise ValueError(f"unknown cache type {name!r}") from None


# ----------------------------------------------------------------------------- what llama.cpp allocates

_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\), "
                       r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")
_RS_LINE = re.compile(r"llama_memory_recurrent: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+) seqs +(\d+) rs_seq\), "
                       r"R \((\w+)\): +([\d.]+) MiB, S \((\w+)\): +([\d.]+) MiB")
_CTX_LINE = re.compile(r"llama_context: n_ctx += (\d+)")
_CTX_SEQ_LINE = re.compile(r"llama_context: n_ctx_seq += (\d+)")
_OVERFLOW_LINE = re.compile(r"n_ctx_seq \(\d+\) > n_ctx_train \(\d+\) -- possible training context overflow")


def llama_mib(nbytes: int) -> str:
    """A byte count as llama.cpp prints it in its cache lines: ``(float)bytes / (1024.0f*1024.0f)``, ``%.2f``."""
    import numpy as np  # noqa: PLC0415
    return "%.2f" % float(np.float32(nbytes) / np.float32(1024.0 * 1024.0))


@contextlib.contextmanager
def capture_llama_log(keep: int | None = None):
    """Collect llama.cpp's log lines (the last ``keep``, or all) instead of printing them; yields the
    list (a deque when ``keep``). llama-cpp-python's own log callback is put back afterwards."""
    import collections  # noqa: PLC0415
    import ctypes  # noqa: PLC0415

    import llama_cpp as ll  # noqa: PLC0415

    lines = collections.deque(maxlen=keep) if keep else []

    @ll.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        lines.append(text.decode("utf-8", "replace"))

    ll.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        try:
            from llama_cpp import _logger  # noqa: PLC0415

            ll.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except (ImportError, AttributeError):
            ll.llama_log_set(None, ctypes.c_void_p(0))


class LlamaCppProbe:
    """Load a GGUF in llama.cpp (CPU, mmap) and read what a context allocates, from llama.cpp's log.

    ``allocate()`` creates and frees one context and returns llama.cpp's own numbers: the padded
    ``n_ctx`` / ``n_ctx_seq``, the ``llama_kv_cache`` line (cells, layers, seqs/streams, K/V types
    and MiB) and the ``llama_memory_recurrent`` line (cells, layers, seqs, rs_seq, R/S MiB), plus
    the overflow warning if printed. ``model_size()`` is ``llama_model_size()`` (exact bytes).
    """

    def __init__(self, gguf_path: str | Path):
        import llama_cpp  # noqa: PLC0415
        self._ll = llama_cpp
        self.path = str(gguf_path)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        with self._capture() as log:
            self.model = llama_cpp.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}:\n{''.join(log)[-2000:]}")

    def _capture(self):
        return capture_llama_log()

    def model_size(self) -> int:
        return int(self._ll.llama_model_size(self.model))

    def allocate(self, n_ctx: int, type_k: str = "f16", type_v: str = "f16", n_seq: int = 1,
                 kv_unified: bool = False, flash_attn: bool = True, n_rs_seq: int = 0) -> dict:
        ll = self._ll
        if min(n_ctx, 64) < n_seq:
            # llama_context clamps n_batch to the *unpadded* n_ctx, then asserts n_seq <= n_batch: abort()
            raise ValueError(f"llama.cpp aborts for n_ctx ({n_ctx}) < n_seq ({n_seq}); not probing")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = 64
        cp.n_ubatch = 64
        cp.n_seq_max = n_seq
        cp.n_rs_seq = n_rs_seq
        cp.n_threads = cp.n_threads_batch = 1
        cp.type_k = _ggml_type_id(type_k)
        cp.type_v = _ggml_type_id(type_v)
        cp.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        cp.kv_unified = kv_unified
        with self._capture() as log:
            ctx = ll.llama_init_from_model(self.model, cp)
            if ctx:
                ll.llama_free(ctx)
        text = "".join(log)
        if not ctx:
            raise RuntimeError(f"llama.cpp refused the context:\n{text[-2000:]}")
        out: dict[str, Any] = {"log": text, "overflow_warning": bool(_OVERFLOW_LINE.search(text))}
        if m := _CTX_LINE.search(text):
            out["n_ctx"] = int(m[1])
        if m := _CTX_SEQ_LINE.search(text):
            out["n_ctx_seq"] = int(m[1])
        if m := _KV_LINE.search(text):
            out["kv"] = {"mib": m[1], "cells": int(m[2]), "layers": int(m[3]), "n_seq": int(m[4]),
                         "n_stream": int(m[5]), "type_k": m[6], "k_mib": m[7], "type_v": m[8], "v_mib": m[9]}
        if m := _RS_LINE.search(text):
            out["rs"] = {"mib": m[1], "cells": int(m[2]), "layers": int(m[3]), "n_seq": int(m[4]),
                         "n_rs_seq": int(m[5]), "type_r": m[6], "r_mib": m[7], "type_s": m[8], "s_mib": m[9]}
        return out

    def close(self) -> None:
        if self.model:
            self._ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
