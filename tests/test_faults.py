"""Faults a converter must survive: a full disk, a killed or interrupted run, damaged input files.

* A folder without room for the planned file is refused before anything is written, with the numbers;
  a disk that fills during the write (a small tmpfs; a file-size limit where mounting is refused) is one
  line naming the file, and nothing is left.
* A conversion killed with SIGKILL leaves its temporary file; the next run into the folder removes it
  and says so, but never touches a live process's temporary file.
* Ctrl-C (SIGINT to nexlab alone, as Jupyter's interrupt sends it) stops nexlab's child processes and
  leaves no temporary file.
* Every command that reads a GGUF or imatrix file refuses each kind of damaged file with one line naming
  the file and the fault, exit status 1.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nexlab.cli import main
from nexlab.convert import text as cv
from nexlab.core import fileio
from nexlab.ggufio import writer
from nexlab.ggufio.check import check_gguf
from nexlab.llamacpp.source import REPO_ROOT

PY = sys.executable


def _litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if fileio.TEMP_MARKER in p.name)


def _sigint_default() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored (no
    # KeyboardInterrupt): when the suite itself runs in the background (CI, nohup), the child would never
    # see the Ctrl-C these tests send. Give it the terminal's default, as a user's shell does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_py(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, NEXLAB_NO_PROGRESS="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([PY, "-c", textwrap.dedent(code), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default, **kw)


# a conversion slowed to 0.3 s per tensor written, so that it can be killed or interrupted mid-file
_SLOW_CONVERT = """
    import sys, time
    import nexlab.ggufio.writer as writer
    real = writer._write_tensor
    def slow(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)
    writer._write_tensor = slow
    from nexlab.cli import main
    sys.exit(main(["convert", sys.argv[1], "-o", sys.argv[2], "-q"]))
"""


def _wait_for_litter(folder: Path, proc: subprocess.Popen, timeout: float = 120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [n for n in _litter(folder) if (folder / n).stat().st_size > 0]
        if names:
            return names
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the conversion never started writing")


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (tests run as root); None where mounting is refused."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_folder_without_room_is_refused_up_front_with_the_numbers(tiny, small_disk, tmp_path,
                                                                 monkeypatch, capsys):
    need = cv.predict_file_size(tiny["nvfp4"])
    if small_disk is None:  # no mount here: the same refusal from a folder that reports 1 MiB free
        small_disk = tmp_path / "disk"
        real = fileio.shutil.disk_usage
        monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    assert need > 2**20
    out = small_disk / "x.gguf"
    assert main(["convert", str(tiny["nvfp4"]), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nexlab convert: error:") and "\n" not in err, err
    assert f"not enough disk space for {out}" in err and f"needs {need:,} bytes" in err and str(small_disk) in err
    assert list(small_disk.iterdir()) == []


def test_disk_filling_during_the_write_is_one_line_and_leaves_nothing(tiny, small_disk, tmp_path,
                                                                     monkeypatch, capsys):
    if small_disk is not None:  # the free-space check passes (another writer fills the disk later)
        monkeypatch.setattr(writer, "ensure_free_space", lambda path, n: None)
        out = small_disk / "x.gguf"
        assert main(["convert", str(tiny["nvfp4"]), "-o", str(out), "-q"]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"writing {out} failed: the disk of {small_disk} is full" in err, err
        assert list(small_disk.iterdir()) == []
    # a file-size limit gives the same short write wherever mounting is refused (SIGXFSZ ignored, as a
    # shell with `ulimit -f` would deliver EFBIG)
    out = tmp_path / "limited" / "x.gguf"
    p = _run_py("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        from nexlab.cli import main
        sys.exit(main(["convert", sys.argv[1], "-o", sys.argv[2], "-q"]))
    """, str(tiny["nvfp4"]), str(out))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    err = err.strip()
    assert "\n" not in err and f"writing {out} failed" in err and "file-size limit" in err, err
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- a killed run
def test_killed_conversion_litter_is_removed_by_the_next_run(tiny, tmp_path, caplog):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "x.gguf"
    p = _run_py(_SLOW_CONVERT, str(tiny["nvfp4"]), str(out))
    litter = _wait_for_litter(folder, p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert _litter(folder) == litter and f"nexlab-tmp-{p.pid}-" in litter[0] and not out.exists()
    # a live process's temporary file (this test's parent's pid) is not touched
    live = folder / f".y.gguf{fileio.TEMP_MARKER}{os.getppid()}-abcd1234.tmp"
    live.write_bytes(b"in progress")
    with caplog.at_level(logging.WARNING, logger="nexlab.core.fileio"):
        cv.convert_checkpoint(tiny["nvfp4"], out, show_progress=False)
    assert _litter(folder) == [live.name]
    check_gguf(out)
    said = [r.getMessage() for r in caplog.records if r.name == "nexlab.core.fileio"]
    assert len(said) == 1 and litter[0] in said[0] and f"process {p.pid}" in said[0], said


def test_stale_temp_folder_of_a_dead_process_is_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".ckpt{fileio.TEMP_MARKER}{dead.pid}-x1y2z3"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    mine = tmp_path / f".a{fileio.TEMP_MARKER}{os.getpid()}-abc.tmp"
    mine.write_bytes(b"")
    other = tmp_path / ".a.gguf.ab12cd.tmp"  # not nexlab's name: never ours to remove
    other.write_bytes(b"")
    assert fileio.clean_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


def test_replacing_a_folder_never_leaves_the_name_missing(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    with fileio.atomic_directory(final) as d:
        (d / "f").write_text("old")
    seen: list[bool] = []
    real_replace, real_rename = os.replace, os.rename

    def watch(fn):
        def f(*a, **k):
            r = fn(*a, **k)
            seen.append(final.exists())
            return r
        return f

    monkeypatch.setattr(os, "replace", watch(real_replace))
    monkeypatch.setattr(os, "rename", watch(real_rename))
    with fileio.atomic_directory(final) as d:
        (d / "f").write_text("new")
    assert (final / "f").read_text() == "new"
    assert all(seen), seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_output_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    fileio.atomic_write_text(tmp_path / "r.json", "{}")
    assert order[:2] == ["fsync", "replace"], order


# ----------------------------------------------------------------------------- Ctrl-C
def _children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids]


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def test_ctrl_c_during_conversion_exits_130_and_leaves_nothing(tiny, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "x.gguf"
    p = _run_py(_SLOW_CONVERT, str(tiny["nvfp4"]), str(out))
    _wait_for_litter(folder, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.strip() == "nexlab convert: interrupted; no partial output was left"
    assert list(folder.iterdir()) == []


def test_ctrl_c_stops_a_llama_cpp_tool_and_its_children(nexlab_gguf, tmp_path):
    """`nexlab stock` with a stand-in llama-quantize (a shell that writes its output and starts a
    grandchild): SIGINT to nexlab alone stops both and removes the half-written output."""
    fake = tmp_path / "llama-quantize"
    fake.write_text("#!/bin/sh\n"
                    'for a in "$@"; do case "$a" in *nexlab-tmp*) echo partial > "$a";; esac; done\n'
                    "sleep 300 &\nwait\n")
    fake.chmod(0o755)
    out = tmp_path / "out" / "stock.gguf"
    p = _run_py("""
        import sys
        import nexlab.analysis.bench as bench
        bench.tool_path = lambda name: sys.argv[3]
        from nexlab.cli import main
        sys.exit(main(["stock", sys.argv[1], "-o", sys.argv[2], "-q"]))
    """, str(nexlab_gguf("nvfp4")), str(out), str(fake))
    deadline = time.monotonic() + 60
    while not (out.parent.exists() and _litter(out.parent) and _children(p.pid)):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    shell = _children(p.pid)[0]
    while not _children(shell):
        time.sleep(0.05)
    sleeper = _children(shell)[0]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    time.sleep(0.2)
    assert _gone(shell) and _gone(sleeper)
    assert list(out.parent.iterdir()) == []


def test_ctrl_c_stops_the_conversion_benchmark_children(tmp_path):
    """The conversion benchmark runs each converter under /usr/bin/time: Ctrl-C stops the grandchild."""
    p = _run_py("""
        import sys
        from nexlab.llamacpp.process import run_measured
        run_measured(["sh", "-c", "sleep 300 & wait"])
    """)
    deadline = time.monotonic() + 60
    while True:
        kids = _children(p.pid)
        if kids and _children(kids[0]):
            break
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    tree = [kids[0]]
    while _children(tree[-1]):
        tree.append(_children(tree[-1])[0])
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    time.sleep(0.2)
    assert len(tree) >= 2 and all(_gone(t) for t in tree), tree


# ----------------------------------------------------------------------------- damaged files
def _damage(good: bytes, kind: str) -> bytes:
    if kind == "empty":
        return b""
    if kind == "truncated_header":
        return good[:64]
    if kind == "truncated_data":
        return good[:-100]
    if kind == "wrong_magic":
        return b"GGUX" + good[4:]
    if kind == "wrong_version":
        return good[:4] + struct.pack("<I", 99) + good[8:]
    raise ValueError(kind)


KINDS = {"empty": "is empty", "truncated_header": ": truncated: ", "truncated_data": ": truncated: tensor",
         "wrong_magic": "is not a GGUF file", "wrong_version": "unsupported GGUF version",
         "inconsistent": ": inconsistent: "}
COMMANDS = {
    "inspect": ["inspect", "FILE"],
    "memory": ["memory", "--model", "FILE"],
    "imatrix": ["imatrix", "FILE", "--text", "TEXT", "-o", "OUT"],
    "imatrix-show": ["imatrix-show", "FILE"],
    "convert --imatrix": ["convert", "CKPT", "--variant", "q4_k_m", "--imatrix", "FILE", "-o", "OUT", "-q"],
    "bench": ["bench", "FILE"],
    "stock": ["stock", "FILE", "-o", "OUT", "-q"],
    "roofline": ["roofline", "FILE"],
}


@pytest.fixture(scope="module")
def damaged(nexlab_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    good_path = nexlab_gguf("nvfp4")
    good = good_path.read_bytes()
    files = {}
    for kind in KINDS:
        f = root / f"{kind}.gguf"
        if kind == "inconsistent":  # the last tensor's data offset moved off the alignment
            h = check_gguf(good_path)
            b = bytearray(good)
            off = struct.unpack_from("<Q", b, h.tensor_info_end - 8)[0]
            struct.pack_into("<Q", b, h.tensor_info_end - 8, off + 1)
            f.write_bytes(bytes(b))
        else:
            f.write_bytes(_damage(good, kind))
        files[kind] = f
    (root / "calib.txt").write_text("some calibration text " * 200)
    return files, root


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damaged_file_is_one_line_naming_it(command, kind, damaged, tiny, tmp_path, capsys):
    files, root = damaged
    out = tmp_path / "out.gguf"
    subs = {"FILE": str(files[kind]), "TEXT": str(root / "calib.txt"), "OUT": str(out), "CKPT": str(tiny["nvfp4"])}
    argv = [subs.get(a, a) for a in COMMANDS[command]]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nexlab {argv[0]}: error:") and "\n" not in err, err
    assert str(files[kind]) in err and KINDS[kind] in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_checker_accepts_every_file_nexlab_and_llama_cpp_write(nexlab_gguf):
    from nexlab.llamacpp.source import llamacpp_source  # noqa: PLC0415

    h = check_gguf(nexlab_gguf("nvfp4"))
    assert h.version == 3 and h.tensors and h.data_offset % h.alignment == 0
    assert h.tensors[-1].offset + h.tensors[-1].nbytes + h.data_offset <= h.file_size
    vocab = sorted((llamacpp_source() / "models").glob("ggml-vocab-*.gguf"))
    assert vocab
    for f in vocab:  # llama.cpp's own vocabulary files (v2 and v3, no tensors)
        assert check_gguf(f).version in (2, 3)


def test_evict_from_page_cache_covers_every_file_of_a_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1" * 5000)
    (tmp_path / "y.bin").write_bytes(b"2" * 300)
    assert fileio.evict_from_page_cache(tmp_path / "a", tmp_path / "y.bin", tmp_path / "missing") == 5300


def test_conversion_benchmark_alternates_the_order_evicts_and_takes_medians(tmp_path, monkeypatch):
    """Fair timing: the order alternates round by round, the inputs are evicted before every run, the
    ratio is that of the medians (and of the minima beside it)."""
    from nexlab.analysis import speed

    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"0" * 1024)
    seconds = {"nexlab": iter([3.0, 1.0, 2.0]), "llamacpp": iter([6.0, 4.0, 9.0])}
    events = []

    def fake_run(cmd, env=None, cwd=None):
        name = "nexlab" if "nexlab.cli" in cmd else "llamacpp"
        out = Path(cmd[cmd.index("-o") + 1] if name == "nexlab" else cmd[cmd.index("--outfile") + 1])
        out.write_bytes(b"g" * 2048)
        events.append(name)
        return {"seconds": next(seconds[name]), "peak_rss_mib": 10.0 if name == "nexlab" else 20.0}

    monkeypatch.setattr(speed, "run_measured", fake_run)
    monkeypatch.setattr(speed, "evict_from_page_cache", lambda *p: events.append("evict") or 0)
    monkeypatch.setattr(speed, "reference_command", lambda c, o, *, python: (
        [python, str(tmp_path / "convert_hf_to_gguf.py"), str(c), "--outfile", str(o)], {}))
    r = speed.benchmark_conversion(ck, tmp_path / "out", repeats=3)
    assert r["order"] == ["nexlab", "llamacpp", "llamacpp", "nexlab", "nexlab", "llamacpp"]
    assert events == [e for name in r["order"] for e in ("evict", name)]
    assert r["nexlab"]["seconds"] == 2.0 and r["llamacpp"]["seconds"] == 6.0 and r["ratio_time"] == 2.0 / 6.0
    assert r["ratio_time_min"] == 1.0 / 4.0 and r["ratio_rss"] == 0.5
    with pytest.raises(ValueError, match="repeats"):
        speed.benchmark_conversion(ck, tmp_path / "out", repeats=0)
