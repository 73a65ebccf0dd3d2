"""llama.cpp's source tree: the cache, the fetch and patch, the reference converter, upstream's template.

Everything nexlab takes from llama.cpp comes from the tree that llama-cpp-python 0.3.36 vendors and
runs (``vendor/llama.cpp`` in its sdist, :data:`LLAMA_CPP_PYTHON_VERSION` the one pin), so the
reference converter, the command-line tools and the Python bindings agree on every format detail.

- :func:`llamacpp_source` fetches that sdist with ``pip download`` (this interpreter's pip),
  unpacks the whole ``vendor/llama.cpp`` tree into the user cache and patches one line of the
  converter: llama.cpp names a BPE pre-tokenizer from a hash of the tokens of a test string, which
  a self-made vocabulary never matches, so instead of raising, an unknown one takes the name in
  ``$NEXLAB_TOKENIZER_PRE`` (default ``qwen2``). A tree patched by an older nexlab is re-patched in
  place (SOURCE.json records the patch); the tools are not rebuilt for it (they never use the
  converter).
- :func:`reference_converter` / :func:`run_reference_converter`: ``convert_hf_to_gguf.py`` with
  ``--outtype bf16 --no-mtp``, run by this interpreter with the tree's own ``gguf-py``;
  ``tokenizer_pre=`` sets ``$NEXLAB_TOKENIZER_PRE`` for it; :func:`reference_command` is its command line.
- :func:`upstream_template`: Qwen3.5's chat template as the tree ships it; :func:`seed_template` the
  seed's variant rebuilt from it (see :mod:`nexlab.model.chat_template`).

The rest of the llama.cpp layer: the tools and ``nexlab setup`` in :mod:`nexlab.llamacpp.build`,
child processes in :mod:`nexlab.llamacpp.process`, llama-server in :mod:`nexlab.llamacpp.server`,
the llama-cpp-python model wrapper and allocation probe in :mod:`nexlab.llamacpp.runtime`, libggml's
C quantizers in :mod:`nexlab.llamacpp.libggml`; the conversion benchmark is
:func:`nexlab.analysis.speed.benchmark_conversion`.

Cache (``cache_dir()``: ``$NEXLAB_CACHE``, else ``$XDG_CACHE_HOME/nexlab``, else
``~/.cache/nexlab``), keyed by the llama-cpp-python version so every clone on a machine shares it::

    llama.cpp-0.3.36/src/   the vendored tree (SOURCE.json: what was fetched and patched)
    llama.cpp-0.3.36/bin/   the tools (nexlab.llamacpp.build.TOOLS; BUILD.json: cmake options, compiler, seconds)
    llama.cpp-0.3.36/.lock  serialises fetching and building between processes

Both folders appear by one rename when complete, so a folder that exists is whole.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from nexlab.core.errors import NexlabError, ToolError
from nexlab.core.fileio import atomic_write_text, locked, replace_directory
from nexlab.model.chat_template import GEN_BLOCK_RE

UPSTREAM_TEMPLATE = "models/templates/Qwen3.5-4B.jinja"  # in llama.cpp's tree


def upstream_template() -> str:
    """Qwen3.5's chat template as llama.cpp ships it (:data:`UPSTREAM_TEMPLATE` in the vendored tree)."""

    return (llamacpp_source() / UPSTREAM_TEMPLATE).read_text(encoding="utf-8")


def seed_template() -> str:
    """The seed's buggy template: :func:`upstream_template` whose generation prompt opens thinking
    with a bare ``'<think>'`` (the upstream nex-agi form), while history still renders ``<think>\\n``."""
    t = upstream_template()
    m = GEN_BLOCK_RE.search(t)
    if m is None:
        raise NexlabError(f"{UPSTREAM_TEMPLATE} has no trailing add_generation_prompt block")
    literal = "'<think>\\n'"
    if m.group(2).count(literal) != 1:
        raise NexlabError(f"{UPSTREAM_TEMPLATE}: expected one {literal} in the generation prompt, "
                         f"found {m.group(2).count(literal)}")
    return t[: m.start(2)] + m.group(2).replace(literal, "'<think>'") + t[m.end(2):]


REPO_ROOT = Path(__file__).resolve().parents[2]


LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the one pin: sdist fetched, tools built, bindings checked against it


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
        raise ToolError(f"llama-cpp-python is not installed (nexlab needs =={LLAMA_CPP_PYTHON_VERSION}): "
                           "run `make install`") from None
    if installed != LLAMA_CPP_PYTHON_VERSION:
        raise ToolError(f"llama-cpp-python {installed} is installed but nexlab.llamacpp pins "
                           f"{LLAMA_CPP_PYTHON_VERSION} (LLAMA_CPP_PYTHON_VERSION and pyproject.toml must agree)")
    return installed


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``final`` (:func:`nexlab.core.fileio.replace_directory`),
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
        raise ToolError(f"cannot patch {base}: expected exactly one line `{_PRETOKENIZER_RAISE}`, found "
                           f"{len(hits)}; the converter changed, update nexlab.llamacpp.source._patch_converter")
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
            raise ToolError(f"pip could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
                               f"({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
        sdists = sorted(dl.glob("*.tar.gz"))
        if len(sdists) != 1:
            raise ToolError(f"pip download left {[p.name for p in dl.iterdir()]}, expected one .tar.gz sdist")
        t_download = time.perf_counter() - t0
        log(f"downloaded {sdists[0].name} ({sdists[0].stat().st_size / 2**20:.0f} MiB) in {t_download:.0f} s")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        unpack = tmp / "unpack"
        with tarfile.open(sdists[0]) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            if not any(m.name == prefix + "convert_hf_to_gguf.py" for m in members):
                raise ToolError(f"{sdists[0].name} has no {prefix}convert_hf_to_gguf.py")
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
        publish_folder(staged, home / "src")
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
        raise ToolError(f"llama.cpp's converter failed on {ckpt_dir} ({r.returncode}):\n{r.stderr[-3000:]}")
    return Path(out_path)
