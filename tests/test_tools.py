"""The developer tools in tools/ still run: tools/host_overhead.py (a subprocess: it sets
TRITON_INTERPRET and FASTBERT_BACKEND for its own process)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_tool_runs():
    """Rows `fastbert` (packed) and `hf-sdpa` with ms/step in the second column; the packed step
    launches (stubbed) Triton kernels and reads nothing back, the padded fastbert path reads one
    count (its unpadding), and every row counts the launches a GPU would make."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "host_overhead.py"), "--layers", "1", "--steps", "2",
           "--rounds", "1", "--providers", "fastbert,fastbert-hf,hf-sdpa"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = ("fastbert", "fastbert-hf", "hf-sdpa")
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in names}
    assert set(rows) == set(names), proc.stdout
    ms, _, launches, syncs, ops = (float(v) for v in rows["fastbert"])
    assert ms > 0 and launches > 0 and ops >= launches
    assert syncs == 0  # the packed step
    assert int(rows["fastbert-hf"][3]) == 1  # nonzero: the count of real tokens
    assert float(rows["hf-sdpa"][0]) > 0 and int(rows["hf-sdpa"][2]) > 0
    assert "host time ratio fastbert / hf-sdpa" in proc.stdout
