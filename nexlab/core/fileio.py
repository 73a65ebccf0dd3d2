"""Writing files and folders so that nothing half-written is ever left behind.

Every file nexlab produces (GGUF, imatrix, safetensors shards, JSON) goes through
:func:`atomic_output`, every folder (a checkpoint, a tokenizer) through
:func:`atomic_directory`: the data is written under a hidden temporary name in the
target folder and renamed onto the final name only when writing finished; on any
error (an exception, Ctrl-C) the temporary file or folder is removed and the target
is untouched.

Temporary names say whose they are: ``.<final name>.nexlab-tmp-<pid>-<random>[.tmp]``. A
process killed outright (SIGKILL, the out-of-memory killer, a power cut) cannot clean up, so
every later write into the same folder first removes the temporary files and folders of nexlab
processes that are no longer running (:func:`clean_stale_temps`, logged as a warning); a live
process's file is never touched (its pid runs, and a file's writer holds a lock on it). Data is
flushed to disk (fsync) before the rename, so a crash cannot leave a complete-looking name on an
empty file, and :func:`replace_directory` swaps folders with one atomic exchange.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import resource
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


#: marks nexlab's temporary files and folders; the pid after it says which process owns one
TEMP_MARKER = ".nexlab-tmp-"


_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.nexlab-tmp-(?P<pid>\d+)-[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?$")


def temp_prefix(final: str | os.PathLike) -> str:
    """The prefix of this process's temporary names for ``final``: ``.<name>.nexlab-tmp-<pid>-``."""
    return f".{Path(final).name}{TEMP_MARKER}{os.getpid()}-"


def _pid_running(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie (a killed child its parent has not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _locked_by_other(path: Path) -> bool:
    """True when another process holds the lock :func:`atomic_output` keeps on a file it writes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _tree_nbytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` left by nexlab processes no longer running.

    Only names nexlab makes (``.<name>.nexlab-tmp-<pid>-...``) are considered; one is removed when
    its pid is not running (or is a zombie) and no process holds its lock, never this process's own.
    Each removal is logged (warning: the name, its size, the dead pid). Returns the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if not m:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_running(pid) or (p.is_file() and _locked_by_other(p)):
            continue
        is_dir = p.is_dir() and not p.is_symlink()
        try:
            size = _tree_nbytes(p)
            if is_dir:
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it first
        except OSError as exc:
            log.warning("could not remove stale temporary %s: %s", p, exc)
            continue
        log.warning("removed %s (%.1f MiB), a temporary %s of nexlab process %d, which is no longer running",
                    p, size / 2**20, "folder" if is_dir else "file", pid)
        removed.append(p)
    return removed


def ensure_free_space(path: str | os.PathLike, nbytes: int) -> None:
    """Refuse (OSError ENOSPC) before writing ``nbytes`` to ``path`` when its folder has less free space,
    with the numbers: needed, free, where. A file ``path`` replaces is counted as freed only after the
    rename, so it does not help."""
    path = Path(path)
    folder = path.parent
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise _oserror(errno.ENOSPC, f"not enough disk space for {path}: it needs {nbytes:,} bytes "
                       f"({nbytes / 2**30:.2f} GiB), {folder} has {free:,} bytes ({free / 2**30:.2f} GiB) free")


def _oserror(code: int, message: str) -> OSError:
    """An OSError with ``errno`` set whose text is ``message`` alone (no ``[Errno N]`` prefix)."""
    exc = OSError(message)
    exc.errno = code
    return exc


def _file_size_limit() -> int | None:

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def disk_full_error(exc: BaseException, path: str | os.PathLike, nbytes: int | None = None) -> OSError | None:
    """An OSError naming ``path`` and the cause when ``exc`` means the disk (or a file-size limit) is full,
    else None. numpy's ``tofile`` reports a short write as ``OSError: N requested and M written`` without
    an errno; that is a full disk too."""
    code = getattr(exc, "errno", None)
    short_write = isinstance(exc, OSError) and code is None and "requested and" in str(exc)
    if not (code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or short_write):
        return None
    path = Path(path)
    limit = _file_size_limit()
    if code == errno.EFBIG or (code is None and limit is not None and (nbytes is None or nbytes > limit)):
        code = errno.EFBIG
        cause = ("the file is larger than this process may write (file-size limit"
                 + (f" {limit:,} bytes, ulimit -f)" if limit is not None else ")"))
    else:
        cause = f"the disk of {path.parent} is full ({shutil.disk_usage(path.parent).free:,} bytes free)"
    need = f"; the file needs {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB)" if nbytes else ""
    return _oserror(code or errno.ENOSPC, f"writing {path} failed: {cause}{need}; nothing was left behind")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The rename is atomic on one filesystem (``os.replace``), so readers see either the
    old file or the complete new one. The file gets ordinary permissions (0666 less the
    umask), not mkstemp's private 0600. Stale temporary files of dead nexlab processes in the
    folder are removed first (:func:`clean_stale_temps`); this one is locked while it is
    written (writers may reopen it by name) and fsynced before the rename.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=temp_prefix(final), suffix=suffix)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_path(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse fsync on a folder)."""
    try:
        _fsync_path(folder)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def replace_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` at ``final``; an existing ``final`` is swapped with it in one
    atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``) and then deleted from ``tmp``'s name, so
    at every moment ``final`` is the whole old folder or the whole new one, never missing or mixed.
    Where the exchange is unavailable the old folder is moved aside first (a moment without
    ``final``, as before)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        if _rename_exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = final.parent / f"{temp_prefix(final)}old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


_RENAME_EXCHANGE = 2


_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b``; False when the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    An existing ``path`` is moved aside first and deleted after the swap, so a crash
    leaves either the old folder or the new one, never a mix.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(final)))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
                _fsync_path(f)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if needed) for the block:
    several processes (pytest workers, clones sharing a cache) build the same thing once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def evict_from_page_cache(*paths: str | os.PathLike) -> int:
    """Ask the kernel to drop the cached pages of ``paths`` (files, or every file under a folder): each
    file is fsynced (so no dirty page stays) then ``posix_fadvise(POSIX_FADV_DONTNEED)``, so that the
    next read of it comes from the disk. Fair timing: a benchmark evicts its inputs before every timed
    run, so a converter that runs right after the checkpoint was written gets no warm cache the other
    lacks. Needs no root (unlike ``drop_caches``). Returns the bytes asked for; missing paths are skipped."""
    total = 0
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file()]
        elif p.is_file():
            files.append(p)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total
