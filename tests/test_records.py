"""nexlab.workbook.records: every committed record says which commit, command, machine and versions made it."""

from __future__ import annotations

import json
import subprocess
import time

from nexlab.workbook import records


def _git(*args):
    return subprocess.run(["git", "-C", str(records.REPO_ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_record_carries_its_commit_command_machine_and_versions(tmp_path):
    started = time.time() - 2.0
    out = records.write_record(tmp_path / "x.json", {"seconds": 1.5, "path": tmp_path}, started=started,
                               argv=["benchmarks/x.py", "--fast"])
    rec = json.loads(out.read_text())
    prov = rec["provenance"]
    assert rec["seconds"] == 1.5 and rec["path"] == str(tmp_path)
    assert prov["git"]["commit"] == _git("rev-parse", "HEAD") and isinstance(prov["git"]["dirty"], bool)
    assert prov["command"].endswith("benchmarks/x.py --fast") and prov["wall_seconds"] >= 2.0
    assert prov["machine"]["logical_cpus"] >= 1 and prov["versions"]["nexlab"]
    assert prov["versions"]["llama_cpp"]["llama_cpp_python"]


def test_describe_says_how_far_behind_head_a_record_is():
    head = _git("rev-parse", "HEAD")
    first = _git("rev-list", "--max-parents=0", "HEAD").splitlines()[0]
    n = int(_git("rev-list", "--count", f"{first}..HEAD", "--", "nexlab"))
    rec = {"provenance": {"git": {"commit": first, "dirty": False}, "command": "python benchmarks/x.py",
                          "started": "2026-01-01T00:00:00+00:00", "wall_seconds": 3.0}}
    line = records.describe_record("x", rec)
    assert f"commit {first[:10]}" in line and (f"changed in {n} commit(s)" in line if n else "unchanged" in line)
    rec["provenance"]["git"]["commit"] = head
    assert "nexlab/ is unchanged since" in records.describe_record("x", rec)
    assert "carries no provenance" in records.describe_record("x", {"seconds": 1})
