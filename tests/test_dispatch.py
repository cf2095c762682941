"""fastbert.ops dispatch: the backend switch, the info command, and a fallback that never breaks import."""

import subprocess
import sys

import pytest
import torch

from fastbert.ops import _backend


def test_backend_switch(monkeypatch):
    x = torch.randn(2)
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert not _backend.use_triton(x)
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    assert not _backend.use_triton(x)  # CPU tensors take the reference under auto
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND='cuda-please'"):
        _backend.use_triton(x)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.use_triton(torch.randn(2))


def test_info_command_reports_every_op():
    out = subprocess.run([sys.executable, "-m", "fastbert.info"], capture_output=True, text=True, check=True)
    for op in ("layer_norm", "bias_gelu", "attention", "embed", "mlm_mask"):
        assert op in out.stdout
    assert "fastbert._C" in out.stdout and "torch" in out.stdout
