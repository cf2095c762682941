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
    assert not _backend.use_triton(x)  # CPU tensors take the native torch ops under auto
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND='cuda-please'"):
        _backend.use_triton(x)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.use_triton(torch.randn(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_cpu_path_matches_reference(monkeypatch, dtype):
    """Off the Triton path (auto on CPU) the ops run torch's fused ops: same values and gradients
    as FASTBERT_BACKEND=reference, and the all-padding sequence still gets zeros."""
    from fastbert import ops

    tol = 1e-5 if dtype == torch.float32 else 1e-12
    x, r = torch.randn(4, 6, 40, dtype=dtype), torch.randn(4, 6, 40, dtype=dtype)
    w, b = torch.rand(40, dtype=dtype) + 0.5, torch.randn(40, dtype=dtype)
    q, k, v = (torch.randn(4, 6, 2, 16, dtype=dtype) for _ in range(3))
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[1, 3:] = True
    pad[2, 1:] = True
    cases = {
        "layer_norm standard": (lambda x, r, w, b: ops.layer_norm(x, w, b, 1e-5, residual=r), (x, r, w, b)),
        "layer_norm bert_pytorch": (lambda x, r, w, b: ops.layer_norm(x, w, b, 1e-6, residual=r,
                                                                       variant="bert_pytorch"), (x, r, w, b)),
        "bias_gelu": (lambda x, b: ops.bias_gelu(x, b), (x, b)),
        "bias_gelu tanh": (lambda x, b: ops.bias_gelu(x, b, "tanh"), (x, b)),
        "attention": (lambda q, k, v: ops.attention(q, k, v), (q, k, v)),
        "attention masked": (lambda q, k, v: ops.attention(q, k, v, key_padding_mask=pad), (q, k, v)),
    }
    for name, (fn, inputs) in cases.items():
        results = []
        for mode in ("auto", "reference"):
            monkeypatch.setenv("FASTBERT_BACKEND", mode)
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum((o * torch.linspace(-1, 2, o.shape[-1], dtype=dtype)).sum() for o in outs)
            results.append([o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves)))
        for got, want in zip(*results):
            scale = max(1.0, float(want.abs().max()))
            assert float((got - want).abs().max()) <= tol * scale, name
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    pad[0] = True  # a sequence with no valid key: zeros, not NaN
    out = ops.attention(q, k, v, key_padding_mask=pad)
    assert torch.isfinite(out).all() and torch.all(out[0] == 0)


def test_info_command_reports_every_op():
    out = subprocess.run([sys.executable, "-m", "fastbert.info"], capture_output=True, text=True, check=True)
    for op in ("layer_norm", "bias_gelu", "attention", "embed", "mlm_mask"):
        assert op in out.stdout
    assert "fastbert._C" in out.stdout and "torch" in out.stdout
