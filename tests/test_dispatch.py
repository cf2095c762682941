"""fastbert.ops dispatch: the one decision point (choose), the backend switch, consistent `auto` fallback
for input a kernel does not take, and the info command."""

import subprocess
import sys

import pytest
import torch

from fastbert import ops
from fastbert.ops import _dispatch
from fastbert.reference import ops as ref


def test_backend_switch(monkeypatch):
    x = torch.randn(2)
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    assert not _dispatch.use_triton(x)  # CPU tensors take the native torch ops under auto
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND='cuda-please'"):
        _dispatch.use_triton(x)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(torch.randn(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_cpu_path_matches_reference(monkeypatch, dtype):
    """Off the Triton path (auto on CPU) the ops run torch's fused ops: same values and gradients
    as FASTBERT_BACKEND=reference, and the all-padding sequence still gets zeros."""
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


# ----------------------------------------------------------------------------------------------
# `auto` on a device with kernels: input a kernel does not take falls back, for every op
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def kernels_here(monkeypatch):
    """Make the decision function treat CPU tensors as it treats CUDA ones under auto (the Triton
    kernels, interpreted here, for input they take): the CUDA decision, run by the same code."""
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    monkeypatch.setattr(_dispatch, "_triton_device", lambda x, name: name != "reference")
    yield


def _rejected_cases():
    """(op, call, inputs, the kernel's complaint) with input each Triton kernel rejects."""
    g = torch.Generator().manual_seed(11)
    x64, w64, b64 = (torch.randn(3, 40, dtype=torch.float64, generator=g) for _ in range(3))
    strided = torch.randn(40, 6, generator=g).t()  # [6, 40], not contiguous
    w, b = torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g)
    wide = torch.randn(2, 8200, generator=g)
    wide_w, wide_b = torch.rand(8200, generator=g) + 0.5, torch.randn(8200, generator=g)
    q20 = torch.randn(2, 5, 2, 20, generator=g)  # head dim 20: not a multiple of 8
    q64 = torch.randn(2, 5, 2, 16, dtype=torch.float64, generator=g)
    return [
        ("layer_norm", lambda x, w, b: ops.layer_norm(x, w[0], b[0], 1e-5), (x64, w64, b64), "dtype"),
        ("layer_norm", lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), (strided, w, b), "contiguous"),
        ("layer_norm", lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), (wide, wide_w, wide_b), "8192"),
        ("bias_gelu", lambda x, b: ops.bias_gelu(x, b[0]), (x64, b64), "dtype"),
        ("bias_gelu", lambda x, b: ops.bias_gelu(x, b), (strided, b), "contiguous"),
        ("attention", lambda q, k, v: ops.attention(q, k, v), (q20, q20 + 1, q20 - 1), "head_dim 20"),
        ("attention", lambda q, k, v: ops.attention(q, k, v), (q64, q64 + 1, q64 - 1), "not supported"),
    ]


def _with_reference(monkeypatch, fn, inputs):
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    out = fn(*inputs)
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    return out


@pytest.mark.parametrize("case", range(7))
def test_auto_falls_back_for_input_the_kernel_rejects(kernels_here, monkeypatch, case):
    op, fn, inputs, complaint = _rejected_cases()[case]
    want = _with_reference(monkeypatch, fn, inputs)
    got = fn(*inputs)
    assert _dispatch.last_choices()[op, "cpu"] == _dispatch.NATIVE
    tol = 1e-12 if inputs[0].dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # under FASTBERT_BACKEND=triton the kernel's own error names the problem instead
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    with pytest.raises((ValueError, TypeError), match=complaint):
        fn(*inputs)


def test_auto_takes_the_kernel_for_input_it_takes(kernels_here):
    g = torch.Generator().manual_seed(12)
    x, w, b = torch.randn(3, 40, generator=g), torch.rand(40, generator=g) + 0.5, torch.randn(40, generator=g)
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5), ref.layer_norm(x, w, b, 1e-5), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(ops.bias_gelu(x, b), ref.bias_gelu(x, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.geglu(x, b), ref.geglu(x, b), rtol=1e-5, atol=1e-5)
    qkv, (cos, sin) = torch.randn(2, 5, 3, 2, 16, generator=g), ops.rotary_tables(16, 5)
    torch.testing.assert_close(ops.rotary(qkv, cos, sin), ref.rotary(qkv, cos, sin), rtol=1e-5, atol=1e-5)
    q = torch.randn(2, 5, 2, 16, generator=g)
    torch.testing.assert_close(ops.attention(q, q + 1, q - 1), ref.attention(q, q + 1, q - 1), rtol=1e-4,
                               atol=1e-4)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    torch.testing.assert_close(ops.segment_pool(x, cu), ref.segment_pool(x, cu), rtol=1e-5, atol=1e-5)
    choices = _dispatch.last_choices()
    assert all(choices[op, "cpu"] == _dispatch.TRITON for op in _dispatch.TRITON_OPS)


def test_cpp_ops_fall_back_without_the_extension(monkeypatch):
    from fastbert import _ext

    ids = torch.randint(0, 50, (2, 7))
    if _ext.has_op("embedding_gather"):
        assert _dispatch.choose("embed", ids) == _dispatch.CPP
    monkeypatch.setattr(_ext, "has_op", lambda name: False)
    assert _dispatch.choose("embed", ids) == _dispatch.REFERENCE
    assert _dispatch.choose("mlm_mask", ids) == _dispatch.REFERENCE
    tok, pos = torch.randn(50, 16), torch.randn(7, 16)
    torch.testing.assert_close(ops.embed(ids, tok, pos), ref.embed(ids, tok, pos))


def test_info_names_what_the_ops_choose(monkeypatch):
    from fastbert import info

    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert all(info.implementation(op, "cpu") == "reference" for op in info.OPS)
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    assert info.implementation("layer_norm", "cpu") == "torch (F.layer_norm)"
    assert info.implementation("attention", "cuda").startswith("triton")


def test_native_varlen_attention_matches_reference(monkeypatch):
    """auto on CPU: varlen attention runs SDPA on a padded copy; values and gradients equal the
    reference's per-sequence loop, zero-length sequences included."""
    g = torch.Generator().manual_seed(13)
    lengths = [5, 0, 9, 1, 0, 7]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 3, 16, generator=g, dtype=torch.float64) for _ in range(3))
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    results = []
    for mode in ("auto", "reference"):
        monkeypatch.setenv("FASTBERT_BACKEND", mode)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*leaves, cu_seqlens=cu, max_seqlen=9)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, dout)])
        assert _dispatch.last_choices()["attention", "cpu"] == (_dispatch.NATIVE if mode == "auto"
                                                                else _dispatch.REFERENCE)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    with pytest.raises(ValueError, match="max_seqlen"):
        ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=8)


def test_getenv_follows_os_environ(monkeypatch):
    """fastbert._env.getenv (the per-call reads of FASTBERT_* switches) sees every change made through
    os.environ at once: monkeypatch's setenv / delenv, assignment, del, and unset names."""
    import os

    from fastbert._env import getenv

    name = "FASTBERT_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert getenv(name) is None and getenv(name, "dflt") == "dflt"
    monkeypatch.setenv(name, "triton")
    assert getenv(name, "auto") == "triton"
    os.environ[name] = "ü 1"  # non-ASCII survives the encoding round trip
    assert getenv(name) == "ü 1"
    del os.environ[name]
    assert getenv(name, "auto") == "auto"
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert _dispatch.backend() == "reference"
    assert _dispatch.choose("layer_norm", torch.zeros(2)) == _dispatch.REFERENCE
