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

import gelu_checks as gc
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
FORMS = gc.FORMS


def _inputs(rows, f, dtype, device, bias=True):
    x = (torch.randn(rows, 2 * f, device=device) * 3).to(dtype)  # covers both tails of GELU
    b = torch.randn(2 * f, device=device).to(dtype) if bias else None
    dy = torch.randn(rows, f, device=device).to(dtype)
    return x, b, dy


def _torch_geglu(xx, bb, form):
    a, g = (xx if bb is None else xx + bb).chunk(2, dim=-1)
    return F.gelu(a, approximate=form) * g


def check_against_truth(device, rows, f, dtype, form, bias=True):
    return gc.check_against_truth(ops.geglu, ref.geglu, _torch_geglu, _inputs(rows, f, dtype, device, bias),
                                  dtype, form)


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # kernels with NaN-poisoned outputs

GRID = list(itertools.product(DEVICES, ROWS, FEATURES, DTYPES, FORMS))

if DEVICES:

    @pytest.mark.parametrize("device,rows,f,dtype,form", GRID, ids=str)
    def test_grid(device, rows, f, dtype, form):
        """With a bias: y, dx, dbias over rows x features x dtype x GELU form."""
        gc.print_errors(f"geglu {device} {rows}x{f} {dtype} {form}",
                        check_against_truth(device, rows, f, dtype, form))

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
            truth = gc.forward_backward(lambda xx, bb, fm=form: ref.geglu(xx, bb, fm), x, b, dy,
                                        torch.float64)
            got = gc.forward_backward(lambda xx, bb, fm=form: ops.geglu(xx, bb, fm), x, b, dy,
                                      torch.float32)
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
                truth = gc.forward_backward(lambda xx, bb, fm=form: ref.geglu(xx, bb, fm), x, b, dy,
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
        gc.check_dropout(ops.geglu, ref.geglu, _inputs(64, 96, torch.float32, device, bias), form)

    @pytest.mark.parametrize("device", DEVICES)
    def test_deterministic_bias_grad(device):
        gc.check_deterministic(ops.geglu, _inputs(129, 1000, torch.float32, device))

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(device):
        gc.check_opcheck(torch.ops.fastbert.geglu_fwd.default, _inputs(3, 32, torch.float32, device),
                         optional_bias=True)

    @pytest.mark.parametrize("device", DEVICES)
    def test_torch_compile_fullgraph(device):
        """No graph break: Linear (no bias) -> GeGLU -> Linear, as ModernBERT's MLP."""
        w1 = torch.randn(2 * 64, 96, device=device) / math.sqrt(96)
        w2 = torch.randn(96, 64, device=device) / math.sqrt(64)
        x = torch.randn(7, 96, device=device)

        def mlp(xx, bb):
            return F.linear(ops.geglu(F.linear(xx, w1), bb), w2)

        gc.check_compile_fullgraph(mlp, x, torch.randn(128, device=device), torch.randn(7, 96, device=device),
                                   device)

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
        gc.check_public_rejects(ops.geglu, x, b, None, device,
                                extra=[((torch.randn(4, 63, device=device),), "must be even")])


if DEVICES == ["cuda"]:

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
    @pytest.mark.parametrize("rows,f", [(4096, 1152), (4096, 3072), (1000, 4095), (77, 8192)])
    def test_cuda_large(rows, f, dtype, form):
        check_against_truth("cuda", rows, f, dtype, form)
        check_against_truth("cuda", rows, f, dtype, form, bias=False)


def test_launcher_rejects_bad_input():
    """ValueError naming the problem, raised before any Triton compile (CPU tensors)."""
    gc.check_launcher_rejects(K.geglu_fwd, ops.geglu, None,
                              extra=[((torch.randn(4, 7), None), "must be even")])


def test_native_and_reference_paths(monkeypatch):
    """The CPU paths without the kernel: F.gelu(a) * g (auto) and the reference, bias or not."""
    for backend in ("auto", "reference"):
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        for bias in (True, False):
            x, b, dy = _inputs(5, 40, torch.float32, "cpu", bias)
            for form in FORMS:
                truth = gc.forward_backward(lambda xx, bb, fm=form: ref.geglu(xx, bb, fm), x, b, dy,
                                            torch.float64)
                got = gc.forward_backward(lambda xx, bb, fm=form: ops.geglu(xx, bb, fm), x, b, dy,
                                          torch.float32)
                assert_within_tolerance(got, truth, None, torch.float32)


if not INTERP and not CUDA:

    def test_interpreter_suite():
        """Run this file's correctness tests under the Triton interpreter in a child pytest."""
        run_interpreted(__file__)
