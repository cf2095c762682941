"""fastbert.ops.bias_gelu on its Triton kernels (kernels/bias_gelu.py) against fp64 ground truth.

Where the kernels run (as tests/test_layer_norm.py): compiled on CUDA when present; otherwise
tests/conftest.py has set TRITON_INTERPRET=1 and the interpreted kernels run on "cpu" in-process
(test_interpreter_suite re-runs this file in a child with the interpreter on if neither holds).
The AOT compile test (sm_80, sm_90) runs this file as a script (--aot) without the interpreter.
Tolerances: fp32 max abs error <= 1e-5 * max(1, max |truth|); fp16/bf16 <= 2x the error of plain
PyTorch (F.gelu(x + b)) in the same dtype + one ulp at that scale. Outputs are NaN-poisoned.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from fastbert.kernels import bias_gelu as K
from harness import CUDA, DEVICES, INTERP, assert_within_tolerance, max_errors, run_interpreted

import fastbert.ops as ops
from fastbert.reference import ops as ref

ROWS = (1, 7, 129)
HIDDEN = (64, 96, 768, 1000, 1023)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMS = ("none", "tanh")


def _inputs(rows, hidden, dtype, device):
    x = (torch.randn(rows, hidden, device=device) * 3).to(dtype)  # covers both tails of GELU
    b = torch.randn(hidden, device=device).to(dtype)
    dy = torch.randn(rows, hidden, device=device).to(dtype)
    return x, b, dy


def _forward_backward(fn, x, b, dy, dtype):
    xs = x.detach().to(dtype).requires_grad_()
    bs = b.detach().to(dtype).requires_grad_()
    y = fn(xs, bs)
    (y * dy.to(dtype)).sum().backward()
    return {"y": y, "dx": xs.grad, "db": bs.grad}


def check_against_truth(device, rows, hidden, dtype, form):
    x, b, dy = _inputs(rows, hidden, dtype, device)
    truth = _forward_backward(lambda xx, bb: ref.bias_gelu(xx, bb, form), x, b, dy, torch.float64)
    got = _forward_backward(lambda xx, bb: ops.bias_gelu(xx, bb, form), x, b, dy, dtype)
    for k, v in got.items():
        assert v.dtype == dtype and v.shape == truth[k].shape, k
        assert torch.isfinite(v).all(), f"{k}: non-finite values (unwritten output?)"
    torch_lp = None
    if dtype != torch.float32:
        torch_lp = _forward_backward(lambda xx, bb: F.gelu(xx + bb, approximate=form), x, b, dy, dtype)
    return assert_within_tolerance(got, truth, torch_lp, dtype)


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # kernels with NaN-poisoned outputs

GRID = list(itertools.product(DEVICES, ROWS, HIDDEN, DTYPES, FORMS))  # the whole grid, one case each

if DEVICES:

    @pytest.mark.parametrize("device,rows,hidden,dtype,form", GRID, ids=str)
    def test_grid(device, rows, hidden, dtype, form):
        err = check_against_truth(device, rows, hidden, dtype, form)
        print(f"gelu {device} {rows}x{hidden} {dtype} {form}: "
              + " ".join(f"{k} {v:.2e}" for k, v in err.items()))

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("form", FORMS)
    def test_activation_curve(device, form):
        """gelu and gelu' on a dense sweep of z in [-12, 12] (fp32): the erf/tanh approximations."""
        z = torch.linspace(-12, 12, 24001, dtype=torch.float64, device=device).reshape(1, -1)
        zero = torch.zeros(z.shape[1], dtype=torch.float64, device=device)
        dy = torch.ones_like(z)
        truth = _forward_backward(lambda xx, bb: F.gelu(xx + bb, approximate=form), z, zero, dy,
                                  torch.float64)
        got = _forward_backward(lambda xx, bb: ops.bias_gelu(xx, bb, form), z.float(), zero.float(), dy,
                                torch.float32)
        assert (got["y"].double() - truth["y"]).abs().max().item() <= 1e-5 * 12
        assert (got["dx"].double() - truth["dx"]).abs().max().item() <= 1e-5

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("rows,hidden", [(7, 96), (40, 1000), (40, 64), (33, 3)])
    def test_cuda_tile_configs(device, rows, hidden):
        """The launch configs picked for CUDA (gelu_settings(n)), also run in the interpreter."""
        cfg = K.gelu_settings(hidden)
        x, b, dy = _inputs(rows, hidden, torch.float32, device)
        for form in FORMS:
            truth = _forward_backward(lambda xx, bb, f=form: ref.bias_gelu(xx, bb, f), x, b, dy,
                                      torch.float64)
            y = K.bias_gelu_fwd(x, b, form, config=cfg)
            dx, db = K.bias_gelu_bwd(dy, x, b, form, config=cfg)
            for k, v in {"y": y, "dx": dx, "db": db}.items():
                e = (v.double() - truth[k]).abs().max().item()
                assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (cfg, form, k, e)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("form", FORMS)
    def test_dropout_public_op(device, form):
        """ops.bias_gelu(..., dropout_p): keep rate near 1 - p, kept values gelu(z) / (1 - p), the
        same mask for the same seed, and gradients those of the reference through that mask."""
        rows, hidden, p = 64, 96, 0.25
        x, b, dy = _inputs(rows, hidden, torch.float32, device)
        torch.manual_seed(3)
        got = _forward_backward(lambda xx, bb: ops.bias_gelu(xx, bb, form, dropout_p=p), x, b, dy,
                                torch.float32)
        clean = ref.bias_gelu(x.double(), b.double(), form)
        kept = got["y"] != 0
        rate = kept.float().mean().item()
        assert abs(rate - (1 - p)) < 0.05, rate
        keep = kept.double()
        truth = _forward_backward(lambda xx, bb: ref.bias_gelu(xx, bb, form) * keep / (1 - p), x, b, dy,
                                  torch.float64)
        for k, e in max_errors(got, truth).items():
            assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (k, e)
        assert (got["y"].double() - clean / (1 - p))[kept].abs().max() <= 1e-5 * clean.abs().max()
        torch.manual_seed(3)
        again = ops.bias_gelu(x, b, form, dropout_p=p)
        assert torch.equal(again, got["y"]), "the same seed drew another mask"
        other = ops.bias_gelu(x, b, form, dropout_p=p)
        assert not torch.equal(other, got["y"]), "two calls drew the same dropout mask"

    @pytest.mark.parametrize("device", DEVICES)
    def test_deterministic_bias_grad(device):
        x, b, dy = _inputs(129, 1000, torch.float32, device)
        runs = [_forward_backward(lambda xx, bb: ops.bias_gelu(xx, bb), x, b, dy, torch.float32)
                for _ in range(2)]
        assert torch.equal(runs[0]["db"], runs[1]["db"]) and torch.equal(runs[0]["dx"], runs[1]["dx"])

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(device):
        x, b, _ = _inputs(3, 64, torch.float32, device)
        x.requires_grad_()
        b.requires_grad_()
        seed = torch.randint(0, 2**31 - 1, (1,), device=device)
        for form in FORMS:
            torch.library.opcheck(torch.ops.fastbert.bias_gelu_fwd.default, (x, b, None, form, 0.0))
            torch.library.opcheck(torch.ops.fastbert.bias_gelu_fwd.default, (x, b, seed, form, 0.2))

    @pytest.mark.parametrize("device", DEVICES)
    def test_torch_compile_fullgraph(device):
        """No graph break: Linear (no bias) -> fused bias+GELU -> Linear, as the encoder's FFN."""
        x, _, _ = _inputs(7, 96, torch.float32, device)
        w1 = torch.randn(128, 96, device=device) / math.sqrt(96)
        b1 = torch.randn(128, device=device)
        w2 = torch.randn(96, 128, device=device) / math.sqrt(128)

        def ffn(xx, bb):
            return F.linear(ops.bias_gelu(F.linear(xx, w1), bb, "tanh"), w2)

        dy = torch.randn(7, 96, device=device)
        backend = "inductor" if device == "cuda" else "aot_eager"
        compiled = torch.compile(ffn, fullgraph=True, backend=backend)
        eager = _forward_backward(ffn, x, b1, dy, torch.float32)
        got = _forward_backward(compiled, x, b1, dy, torch.float32)
        for k in eager:
            torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("device", DEVICES)
    def test_autocast(device):
        """bf16 activations from a bias-free linear, fp32 bias: output bf16, bias grad fp32."""
        x = torch.randn(7, 96, device=device)
        lin = torch.nn.Linear(96, 128, bias=False, device=device)
        b = torch.randn(128, device=device).requires_grad_()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            h = lin(x)
            y = ops.bias_gelu(h, b)
        assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert b.grad.dtype == torch.float32 and lin.weight.grad is not None
        expect = F.gelu(h.detach().double() + b.detach().double())
        torch.testing.assert_close(y.double(), expect, rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize("device", DEVICES)
    def test_public_bad_inputs(device):
        x, b, _ = _inputs(4, 64, torch.float32, device)
        with pytest.raises(ValueError, match="contiguous"):
            ops.bias_gelu(torch.randn(64, 4, device=device).t(), b)
        with pytest.raises(ValueError, match="bias has shape"):
            ops.bias_gelu(x, b[:32])
        with pytest.raises(ValueError, match="approximate"):
            ops.bias_gelu(x, b, "sigmoid")


if DEVICES == ["cuda"]:

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
    @pytest.mark.parametrize("rows,hidden", [(4096, 3072), (4096, 768), (1000, 4095), (77, 8192)])
    def test_cuda_large(rows, hidden, dtype, form):
        check_against_truth("cuda", rows, hidden, dtype, form)


def test_launcher_rejects_bad_input():
    """ValueError naming the problem, raised before any Triton compile (CPU tensors)."""
    x, b = torch.randn(4, 64), torch.randn(64)
    cases = [
        ((torch.randn(64, 4).t(), torch.randn(64)), "x must be contiguous"),
        ((x, torch.randn(63)), r"bias has shape \(63,\)"),
        ((torch.randint(0, 5, (4, 64)), b), "x has dtype torch.int64"),
        ((x, b.to(torch.int32)), "bias has dtype torch.int32"),
        ((x.double(), b), "x has dtype torch.float64"),
        ((x, torch.randn(128)[::2]), "bias must be contiguous"),
    ]
    for (xx, bb), msg in cases:
        with pytest.raises(ValueError, match=msg):
            K.bias_gelu_fwd(xx, bb)
    with pytest.raises(ValueError, match="approximate"):
        K.bias_gelu_fwd(x, b, "erf")
    with pytest.raises(TypeError, match="bias must be a tensor"):
        K.bias_gelu_fwd(x, 1.0)
    with pytest.raises(ValueError, match="dropout_p 1.0 outside"):
        K.bias_gelu_fwd(x, b, dropout_p=1.0, seed=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed tensor"):
        K.bias_gelu_fwd(x, b, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p -0.1 outside"):
        ops.bias_gelu(x, b, dropout_p=-0.1)


if not INTERP and not CUDA:

    def test_interpreter_suite():
        """Run this file's correctness tests under the Triton interpreter in a child pytest."""
        run_interpreted(__file__)
