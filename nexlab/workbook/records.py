"""Committed benchmark records (``data/results/*.json``): one writer that says what made each record, and
the line a chapter prints when it shows one.

A benchmark too long for a notebook (a 35B conversion, the full-size throughput runs) writes its figures
to ``data/results/NAME.json`` through :func:`write_record`, which adds a ``provenance`` block:

- ``git``: the commit of the working tree and whether it was dirty (uncommitted changes outside
  ``data/results/``), so a figure can be traced to the code that made it;
- ``command``: the exact command line; ``started`` (UTC) and ``wall_seconds``;
- ``machine``: CPU, cores, memory, kernel (:func:`nexlab.analysis.bench.device_info`);
- ``versions``: nexlab and the Python packages measured (:func:`nexlab.workbook.results.versions`) and
  the llama.cpp build its tools came from (:func:`nexlab.analysis.bench.llama_cpp_build`).

:func:`describe_record` is what a chapter prints beside a record's figures: the commit that made it
and how many commits have changed ``nexlab/`` since, or that the record predates provenance.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nexlab.analysis.bench import device_info, llama_cpp_build
from nexlab.core.fileio import atomic_write_text
from nexlab.core.text import plain
from nexlab.workbook.results import COMMITTED_RESULTS, versions

REPO_ROOT = COMMITTED_RESULTS.parents[1]


def _git(*args: str, root: Path = REPO_ROOT) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the checkout at ``root`` (``commit`` None outside a git checkout).
    Changes under ``data/results/`` (the records being written) do not count as dirty."""
    commit = _git("rev-parse", "HEAD", root=root)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--", ".", ":(exclude)data/results", root=root) or ""
    return {"commit": commit, "dirty": bool(status.strip())}


def provenance(started: float, argv: list[str] | None = None) -> dict[str, Any]:
    """The ``provenance`` block of a record whose run began at ``started`` (``time.time()``)."""
    dev = device_info()
    return {
        "git": git_state(),
        "command": shlex.join([Path(sys.executable).name] + list(sys.argv if argv is None else argv)),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "machine": {**dev, "kernel": platform.release()},
        "versions": {**versions(), "llama_cpp": llama_cpp_build()},
    }


def write_record(path: str | os.PathLike, figures: dict[str, Any], *, started: float,
                 argv: list[str] | None = None) -> Path:
    """Write ``figures`` and their :func:`provenance` to ``path`` (JSON, atomically); return the path."""
    out = Path(path)
    data = {**plain(figures), "provenance": plain(provenance(started, argv))}
    atomic_write_text(out, json.dumps(data, indent=1) + "\n")
    return out


def describe_record(name: str, record: dict[str, Any] | None = None, root: Path = REPO_ROOT) -> str:
    """One line on where the committed record ``data/results/{name}.json`` came from: its command, the
    commit it ran at and how many commits have changed ``nexlab/`` since (or that it carries no
    provenance, having been made before records named their commit)."""
    rec = record if record is not None else json.loads((COMMITTED_RESULTS / f"{name}.json").read_text())
    prov = rec.get("provenance")
    if not prov:
        return (f"data/results/{name}.json carries no provenance: it was made before records named their commit "
                f"and command; `python benchmarks/{name}.py` remakes it")
    commit = prov.get("git", {}).get("commit")
    dirty = " (with uncommitted changes)" if prov.get("git", {}).get("dirty") else ""
    if commit is None:
        return f"data/results/{name}.json: `{prov.get('command')}` outside a git checkout, {prov.get('started')}"
    behind = _git("rev-list", "--count", f"{commit}..HEAD", "--", "nexlab", root=root)
    since = (f"nexlab/ has changed in {behind} commit(s) since" if behind not in (None, "0")
             else "nexlab/ is unchanged since" if behind == "0" else "that commit is not in this checkout's history")
    return (f"data/results/{name}.json: `{prov.get('command')}` at commit {commit[:10]}{dirty}, "
            f"{prov.get('started')}, {prov.get('wall_seconds')} s; {since}")
