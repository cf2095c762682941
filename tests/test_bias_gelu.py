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

import gelu_checks as gc
import pytest
import torch
import torch.nn.functional as F
from fastbert.kernels import bias_gelu as K
from harness import CUDA, DEVICES, INTERP, run_interpreted

import fastbert.ops as ops
from fastbert.reference import ops as ref

FORMS = gc.FORMS
ROWS = (1, 7, 129)
HIDDEN = (64, 96, 768, 1000, 1023)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inputs(rows, hidden, dtype, device):
    x = (torch.randn(rows, hidden, device=device) * 3).to(dtype)  # covers both tails of GELU
    b = torch.randn(hidden, device=device).to(dtype)
    dy = torch.randn(rows, hidden, device=device).to(dtype)
    return x, b, dy


def _torch_bias_gelu(x, b, form):
    return F.gelu(x + b, approximate=form)


def check_against_truth(device, rows, hidden, dtype, form):
    return gc.check_against_truth(ops.bias_gelu, ref.bias_gelu, _torch_bias_gelu,
                                  _inputs(rows, hidden, dtype, device), dtype, form)


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # kernels with NaN-poisoned outputs

GRID = list(itertools.product(DEVICES, ROWS, HIDDEN, DTYPES, FORMS))  # the whole grid, one case each

if DEVICES:

    @pytest.mark.parametrize("device,rows,hidden,dtype,form", GRID, ids=str)
    def test_grid(device, rows, hidden, dtype, form):
        gc.print_errors(f"gelu {device} {rows}x{hidden} {dtype} {form}",
                        check_against_truth(device, rows, hidden, dtype, form))

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("form", FORMS)
    def test_activation_curve(device, form):
        """gelu and gelu' on a dense sweep of z in [-12, 12] (fp32): the erf/tanh approximations."""
        z = torch.linspace(-12, 12, 24001, dtype=torch.float64, device=device).reshape(1, -1)
        zero = torch.zeros(z.shape[1], dtype=torch.float64, device=device)
        dy = torch.ones_like(z)
        truth = gc.forward_backward(lambda xx, bb: F.gelu(xx + bb, approximate=form), z, zero, dy,
                                    torch.float64)
        got = gc.forward_backward(lambda xx, bb: ops.bias_gelu(xx, bb, form), z.float(), zero.float(), dy,
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
            truth = gc.forward_backward(lambda xx, bb, f=form: ref.bias_gelu(xx, bb, f), x, b, dy,
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
        gc.check_dropout(ops.bias_gelu, ref.bias_gelu, _inputs(64, 96, torch.float32, device), form)

    @pytest.mark.parametrize("device", DEVICES)
    def test_deterministic_bias_grad(device):
        gc.check_deterministic(ops.bias_gelu, _inputs(129, 1000, torch.float32, device))

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(device):
        gc.check_opcheck(torch.ops.fastbert.bias_gelu_fwd.default, _inputs(3, 64, torch.float32, device))

    @pytest.mark.parametrize("device", DEVICES)
    def test_torch_compile_fullgraph(device):
        """No graph break: Linear (no bias) -> fused bias+GELU -> Linear, as the encoder's FFN."""
        x, _, _ = _inputs(7, 96, torch.float32, device)
        w1 = torch.randn(128, 96, device=device) / math.sqrt(96)
        b1 = torch.randn(128, device=device)
        w2 = torch.randn(96, 128, device=device) / math.sqrt(128)

        def ffn(xx, bb):
            return F.linear(ops.bias_gelu(F.linear(xx, w1), bb, "tanh"), w2)

        gc.check_compile_fullgraph(ffn, x, b1, torch.randn(7, 96, device=device), device)

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
        gc.check_public_rejects(ops.bias_gelu, x, b, b, device)


if DEVICES == ["cuda"]:

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
    @pytest.mark.parametrize("rows,hidden", [(4096, 3072), (4096, 768), (1000, 4095), (77, 8192)])
    def test_cuda_large(rows, hidden, dtype, form):
        check_against_truth("cuda", rows, hidden, dtype, form)


def test_launcher_rejects_bad_input():
    """ValueError naming the problem, raised before any Triton compile (CPU tensors)."""
    gc.check_launcher_rejects(K.bias_gelu_fwd, ops.bias_gelu, torch.randn(64))


if not INTERP and not CUDA:

    def test_interpreter_suite():
        """Run this file's correctness tests under the Triton interpreter in a child pytest."""
        run_interpreted(__file__)
