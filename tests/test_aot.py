"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed): one test per
kernel file, over the launch configs that file exports (tests/aot.py lists them). Each runs
tests/aot.py in a child process without TRITON_INTERPRET and prints the register/spill table."""

import os
import subprocess
import sys

import pytest
import torch
from aot import FAMILIES

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the CUDA tests compile for the device")
@pytest.mark.parametrize("family", FAMILIES)
def test_aot_compile(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "aot.py"), family], cwd=os.path.dirname(HERE),
                          env=env, capture_output=True, text=True, timeout=1500)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-10000:] + proc.stderr[-5000:]
