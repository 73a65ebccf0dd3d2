"""Child processes (llama.cpp's tools, converters) that never outlive an interrupt.

- :func:`child_process`: ``subprocess.Popen`` in its own process group, stopped with everything it
  started (:func:`stop_process_group`: SIGINT, then SIGKILL) when the block raises, Ctrl-C
  included; Jupyter's interrupt or a SIGTERM reach nexlab alone, so without it a tool would run on.
- :func:`terminate`: SIGTERM, then SIGKILL after a grace period, for server-like children.
- ``run_measured``: run a command, return wall seconds and the child's peak RSS (GNU ``/usr/bin/time``,
  else ``os.wait4``), for the conversion benchmark.
- :func:`free_port`: a free TCP port on 127.0.0.1 for ``llama-server``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from nexlab.core.errors import ToolError


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


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> dict:
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
            raise ToolError(f"{' '.join(cmd[:3])} ... failed with {code}:\n{err[-3000:]}")
        if full is not cmd:
            kb = float(rss_file.read_text().split()[-1])
        else:
            kb = float(usage.ru_maxrss)
    return {"seconds": wall, "peak_rss_mib": kb / 1024.0}


# ----------------------------------------------------------------------------- llama-server
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
