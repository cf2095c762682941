"""The developer tools in tools/ still run: tools/host_overhead.py (a subprocess: it sets
TRITON_INTERPRET and FASTBERT_BACKEND for its own process)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_tool_runs():
    cmd = [sys.executable, os.path.join(ROOT, "tools", "host_overhead.py"), "--layers", "1", "--steps", "2",
           "--providers", "fastbert-hf,hf-sdpa"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
            if line.startswith(("fastbert-hf", "hf-sdpa"))}
    assert set(rows) == {"fastbert-hf", "hf-sdpa"}, proc.stdout
    assert float(rows["fastbert-hf"][0]) > 0
    assert int(rows["fastbert-hf"][2]) > 0  # the fused path launched (stubbed) Triton kernels
    assert int(rows["hf-sdpa"][2]) == 0
