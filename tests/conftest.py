"""Test-session setup.

Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before any
@triton.jit decorates a kernel, so it is set here, before test modules import fastbert. The default
backend (auto) still sends CPU tensors to the reference; kernel tests opt in with
FASTBERT_BACKEND=triton (see the `triton_backend` fixture).
"""

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _cuda_present():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture
def triton_backend(monkeypatch):
    """Route fastbert.ops to the Triton kernels (interpreted on CPU) for this test."""
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    yield


@pytest.fixture
def triton_poisoned(monkeypatch):
    """The Triton kernels, with every output NaN-filled before a kernel writes it (FASTBERT_POISON=1):
    an element a kernel fails to write then fails the test."""
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.setenv("FASTBERT_POISON", "1")
    yield


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    yield


