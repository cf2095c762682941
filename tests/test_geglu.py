"""fastbert.ops.geglu on its Triton kernels (kernels/geglu.py) against fp64 ground truth.

Where the kernels run (as tests/test_bias_gelu.py): compiled on CUDA when present; otherwise
tests/conftest.py has set TRITON_INTERPRET=1 and the interpreted kernels run on "cpu" in-process
(test_interpreter_suite re-runs this file in a child with the interpreter on if neither holds).
The AOT compile (sm_80, sm_90) is tests/aot.py's "geglu" family (tests/test_aot.py).
Ground truth: fastbert.reference.ops.geglu in fp64 (gelu(a) * g with a, g = (x + bias).chunk(2)).
Tolerances: fp32 max abs error <= 1e-5 * max(1, max |truth|); fp16/bf16 <= 2x the error of plain
PyTorch (F.gelu(a) * g) in the same dtype + one ulp at that scale. Outputs are NaN-poisoned.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from fastbert.kernels import geglu as K
from harness import CUDA, DEVICES, INTERP, assert_within_tolerance, max_errors, run_interpreted

import fastbert.ops as ops
from fastbert.reference import ops as ref

ROWS = (1, 7, 129)
FEATURES = (64, 96, 1000, 1023)  # F: the output width (x has 2F)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMS = ("none", "tanh")


def _inputs(rows, f, dtype, device, bias=True):
    x = (torch.randn(rows, 2 * f, device=device) * 3).to(dtype)  # covers both tails of GELU
    b = torch.randn(2 * f, device=device).to(dtype) if bias else None
    dy = torch.randn(rows, f, device=device).to(dtype)
    return x, b, dy


def _forward_backward(fn, x, b, dy, dtype):
    xs = x.detach().to(dtype).requires_grad_()
    bs = None if b is None else b.detach().to(dtype).requires_grad_()
    y = fn(xs, bs)
    (y * dy.to(dtype)).sum().backward()
    return {"y": y, "dx": xs.grad, "db": None if bs is None else bs.grad}


def _torch_geglu(form):
    def fn(xx, bb):
        a, g = (xx if bb is None else xx + bb).chunk(2, dim=-1)
        return F.gelu(a, approximate=form) * g

    return fn


def check_against_truth(device, rows, f, dtype, form, bias=True):
    x, b, dy = _inputs(rows, f, dtype, device, bias)
    truth = _forward_backward(lambda xx, bb: ref.geglu(xx, bb, form), x, b, dy, torch.float64)
    got = _forward_backward(lambda xx, bb: ops.geglu(xx, bb, form), x, b, dy, dtype)
    assert (got["db"] is None) == (not bias)
    for k, v in got.items():
        if truth[k] is None:
            continue
        assert v.dtype == dtype and v.shape == truth[k].shape, k
        assert torch.isfinite(v).all(), f"{k}: non-finite values (unwritten output?)"
    torch_lp = None
    if dtype != torch.float32:
        torch_lp = _forward_backward(_torch_geglu(form), x, b, dy, dtype)
    return assert_within_tolerance(got, truth, torch_lp, dtype)


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # kernels with NaN-poisoned outputs

GRID = list(itertools.product(DEVICES, ROWS, FEATURES, DTYPES, FORMS))

if DEVICES:

    @pytest.mark.parametrize("device,rows,f,dtype,form", GRID, ids=str)
    def test_grid(device, rows, f, dtype, form):
        """With a bias: y, dx, dbias over rows x features x dtype x GELU form."""
        err = check_against_truth(device, rows, f, dtype, form)
        print(f"geglu {device} {rows}x{f} {dtype} {form}: "
              + " ".join(f"{k} {v:.2e}" for k, v in err.items()))

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows,f", [(7, 96), (129, 1023), (1, 64)])
    def test_no_bias(device, rows, f, dtype, form):
        """bias=None (ModernBERT's Wi has no bias): y and dx, no dbias."""
        check_against_truth(device, rows, f, dtype, form, bias=False)

    @pytest.mark.parametrize("device", DEVICES)
    def test_fuzzed_shapes(device):
        """Fuzzed leading shapes and widths (odd F, 3-D x), both forms, with and without bias, fp32."""
        g = torch.Generator().manual_seed(31)
        for _ in range(6):
            lead = tuple(int(n) for n in torch.randint(1, 9, (int(torch.randint(1, 3, (1,), generator=g)),),
                                                       generator=g))
            f = int(torch.randint(1, 700, (1,), generator=g))
            form = FORMS[int(torch.randint(0, 2, (1,), generator=g))]
            bias = bool(torch.randint(0, 2, (1,), generator=g))
            x = (torch.randn(*lead, 2 * f, device=device) * 3)
            b = torch.randn(2 * f, device=device) if bias else None
            dy = torch.randn(*lead, f, device=device)
            truth = _forward_backward(lambda xx, bb, fm=form: ref.geglu(xx, bb, fm), x, b, dy, torch.float64)
            got = _forward_backward(lambda xx, bb, fm=form: ops.geglu(xx, bb, fm), x, b, dy, torch.float32)
            assert got["y"].shape == (*lead, f)
            assert_within_tolerance(got, truth, None, torch.float32)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("rows,f", [(7, 96), (40, 1000), (40, 64), (33, 3)])
    def test_cuda_tile_configs(device, rows, f):
        """The launch configs picked for CUDA (geglu_settings(F)), also run in the interpreter."""
        cfg = K.geglu_settings(f)
        for bias in (True, False):
            x, b, dy = _inputs(rows, f, torch.float32, device, bias)
            for form in FORMS:
                truth = _forward_backward(lambda xx, bb, fm=form: ref.geglu(xx, bb, fm), x, b, dy,
                                          torch.float64)
                y = K.geglu_fwd(x, b, form, config=cfg)
                dx, db = K.geglu_bwd(dy, x, b, form, config=cfg, programs=3)
                assert (db is None) == (not bias)
                for k, e in max_errors({"y": y, "dx": dx, "db": db}, truth).items():
                    assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (cfg, form, k, e)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("bias", (True, False), ids=("bias", "no_bias"))
    def test_dropout_public_op(device, form, bias):
        """ops.geglu(..., dropout_p): keep rate near 1 - p, kept values gelu(a) g / (1 - p), the same
        mask for the same seed, and gradients those of the reference through that mask."""
        rows, f, p = 64, 96, 0.25
        x, b, dy = _inputs(rows, f, torch.float32, device, bias)
        torch.manual_seed(3)
        got = _forward_backward(lambda xx, bb: ops.geglu(xx, bb, form, dropout_p=p), x, b, dy, torch.float32)
        clean = ref.geglu(x.double(), None if b is None else b.double(), form)
        kept = got["y"] != 0
        rate = kept.float().mean().item()
        assert abs(rate - (1 - p)) < 0.05, rate
        keep = kept.double()
        truth = _forward_backward(lambda xx, bb: ref.geglu(xx, bb, form) * keep / (1 - p), x, b, dy,
                                  torch.float64)
        for k, e in max_errors(got, truth).items():
            assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (k, e)
        assert (got["y"].double() - clean / (1 - p))[kept].abs().max() <= 1e-5 * clean.abs().max()
        torch.manual_seed(3)
        assert torch.equal(ops.geglu(x, b, form, dropout_p=p), got["y"]), "the same seed drew another mask"
        assert not torch.equal(ops.geglu(x, b, form, dropout_p=p), got["y"]), "two calls drew one mask"

    @pytest.mark.parametrize("device", DEVICES)
    def test_deterministic_bias_grad(device):
        x, b, dy = _inputs(129, 1000, torch.float32, device)
        runs = [_forward_backward(lambda xx, bb: ops.geglu(xx, bb), x, b, dy, torch.float32)
                for _ in range(2)]
        assert torch.equal(runs[0]["db"], runs[1]["db"]) and torch.equal(runs[0]["dx"], runs[1]["dx"])

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(device):
        x, b, _ = _inputs(3, 32, torch.float32, device)
        x.requires_grad_()
        b.requires_grad_()
        seed = torch.randint(0, 2**31 - 1, (1,), device=device)
        for form in FORMS:
            for bb in (b, None):
                torch.library.opcheck(torch.ops.fastbert.geglu_fwd.default, (x, bb, None, form, 0.0))
                torch.library.opcheck(torch.ops.fastbert.geglu_fwd.default, (x, bb, seed, form, 0.2))

    @pytest.mark.parametrize("device", DEVICES)
    def test_torch_compile_fullgraph(device):
        """No graph break: Linear (no bias) -> GeGLU -> Linear, as ModernBERT's MLP."""
        w1 = torch.randn(2 * 64, 96, device=device) / math.sqrt(96)
        w2 = torch.randn(96, 64, device=device) / math.sqrt(64)
        x = torch.randn(7, 96, device=device)

        def mlp(xx, bb):
            return F.linear(ops.geglu(F.linear(xx, w1), bb), w2)

        b1 = torch.randn(128, device=device)
        dy = torch.randn(7, 96, device=device)
        backend = "inductor" if device == "cuda" else "aot_eager"
        compiled = torch.compile(mlp, fullgraph=True, backend=backend)
        eager = _forward_backward(mlp, x, b1, dy, torch.float32)
        got = _forward_backward(compiled, x, b1, dy, torch.float32)
        for k in eager:
            torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("device", DEVICES)
    def test_autocast(device):
        """bf16 activations from a bias-free linear, no GeGLU bias: output bf16, weight grad present."""
        x = torch.randn(7, 96, device=device)
        lin = torch.nn.Linear(96, 128, bias=False, device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            h = lin(x)
            y = ops.geglu(h)
        assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 and y.shape == (7, 64)
        y.float().sum().backward()
        assert lin.weight.grad is not None
        expect = ref.geglu(h.detach().double())
        torch.testing.assert_close(y.double(), expect, rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize("device", DEVICES)
    def test_public_bad_inputs(device):
        x, b, _ = _inputs(4, 32, torch.float32, device)
        with pytest.raises(ValueError, match="contiguous"):
            ops.geglu(torch.randn(64, 4, device=device).t(), None)
        with pytest.raises(ValueError, match="bias has shape"):
            ops.geglu(x, b[:32])
        with pytest.raises(ValueError, match="must be even"):
            ops.geglu(torch.randn(4, 63, device=device))
        with pytest.raises(ValueError, match="approximate"):
            ops.geglu(x, b, "sigmoid")


if DEVICES == ["cuda"]:

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
    @pytest.mark.parametrize("rows,f", [(4096, 1152), (4096, 3072), (1000, 4095), (77, 8192)])
    def test_cuda_large(rows, f, dtype, form):
        check_against_truth("cuda", rows, f, dtype, form)
        check_against_truth("cuda", rows, f, dtype, form, bias=False)


def test_launcher_rejects_bad_input():
    """ValueError naming the problem, raised before any Triton compile (CPU tensors)."""
    x, b = torch.randn(4, 64), torch.randn(64)
    cases = [
        ((torch.randn(64, 4).t(), None), "x must be contiguous"),
        ((x, torch.randn(63)), r"bias has shape \(63,\)"),
        ((torch.randn(4, 7), None), "must be even"),
        ((torch.randint(0, 5, (4, 64)), None), "x has dtype torch.int64"),
        ((x, b.to(torch.int32)), "bias has dtype torch.int32"),
        ((x.double(), None), "x has dtype torch.float64"),
        ((x, torch.randn(128)[::2]), "bias must be contiguous"),
    ]
    for (xx, bb), msg in cases:
        with pytest.raises(ValueError, match=msg):
            K.geglu_fwd(xx, bb)
    with pytest.raises(ValueError, match="approximate"):
        K.geglu_fwd(x, b, "erf")
    with pytest.raises(TypeError, match="bias must be a tensor"):
        K.geglu_fwd(x, 1.0)
    with pytest.raises(ValueError, match="dropout_p 1.0 outside"):
        K.geglu_fwd(x, b, dropout_p=1.0, seed=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed tensor"):
        K.geglu_fwd(x, b, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p -0.1 outside"):
        ops.geglu(x, b, dropout_p=-0.1)


def test_native_and_reference_paths(monkeypatch):
    """The CPU paths without the kernel: F.gelu(a) * g (auto) and the reference, bias or not."""
    for backend in ("auto", "reference"):
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        for bias in (True, False):
            x, b, dy = _inputs(5, 40, torch.float32, "cpu", bias)
            for form in FORMS:
                truth = _forward_backward(lambda xx, bb, fm=form: ref.geglu(xx, bb, fm), x, b, dy,
                                          torch.float64)
                got = _forward_backward(lambda xx, bb, fm=form: ops.geglu(xx, bb, fm), x, b, dy,
                                        torch.float32)
                assert_within_tolerance(got, truth, None, torch.float32)


if not INTERP and not CUDA:

    def test_interpreter_suite():
        """Run this file's correctness tests under the Triton interpreter in a child pytest."""
        run_interpreted(__file__)
