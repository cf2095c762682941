"""GeGLU forward and forward+backward: fastbert's Triton kernel against eager PyTorch and
torch.compile, side by side per shape (one benchmark group per shape and mode).

Providers:
  fastbert  fastbert.ops.geglu (kernels/geglu.py; CUDA only: the interpreter is never timed)
  eager     a, g = x.chunk(2, -1); F.gelu(a, approximate=form) * g  (ModernBERT's MLP activation)
  compile   torch.compile of the eager function
Sizes: CUDA rows = 16384, F = 1152 (ModernBERT-base's intermediate half), 2624 (ModernBERT-large),
3072, bf16, no bias (ModernBERT's Wi has none); one row with a bias at 3072. CPU rows = 256, F 1152
and 3072 (tanh; bias), fp32 (eager and compile only). Form "none" (exact erf, ModernBERT's "gelu") everywhere,
"tanh" at 3072.
bytes_moved, the fused op's minimum traffic (E = element size): forward 3*M*F*E (x [M, 2F] in,
y [M, F] out), backward 5*M*F*E (dy and x in, dx [M, 2F] out; gelu(a) and gelu'(a) are recomputed
from x), bias traffic negligible; forward+backward 8*M*F*E. Same formula for every provider: GB/s is
effective bandwidth, roofline_frac the fraction of the measured device-to-device copy rate.
On CUDA each result also records gpu_us / gpu_gbps / gpu_roofline_frac (triton.testing.do_bench).
"""

import pytest
import torch
import torch.nn.functional as F
from _util import op_step, provider_fn, row_op_setup, skip_interpreted, time_step

import fastbert.ops as ops

DEVICE, ROWS, DTYPE = row_op_setup()
CASES = [(1152, "none", False), (2624, "none", False), (3072, "none", False), (3072, "tanh", False),
         (3072, "none", True)]
if DEVICE != "cuda":  # the CPU smoke run: a form, a bias and a size each once (compile is slow there)
    CASES = [CASES[0], CASES[3], CASES[4]]


def _eager(x, b, form):
    a, g = (x if b is None else x + b).chunk(2, dim=-1)
    return F.gelu(a, approximate=form) * g


def _step(provider, f, form, bias, backward):
    x = torch.randn(ROWS, 2 * f, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
    b = torch.randn(2 * f, device=DEVICE, dtype=DTYPE).requires_grad_(backward) if bias else None
    dy = torch.randn(ROWS, f, device=DEVICE, dtype=DTYPE) if backward else None
    return op_step(provider_fn(provider, ops.geglu, _eager), (x, b, form), backward,
                   (x,) if b is None else (x, b), dy)


def _bytes(f, backward):
    e = torch.finfo(DTYPE).bits // 8
    return (8 if backward else 3) * ROWS * f * e


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("f,form,bias", CASES, ids=[f"F{f}-{fm}{'-bias' if b else ''}" for f, fm, b in CASES])
@pytest.mark.parametrize("provider", ["fastbert", "eager", "compile"])
def test_geglu(benchmark, provider, f, form, bias, backward):
    mode = "forward+backward" if backward else "forward"
    benchmark.group = (f"geglu {mode} {form}{' bias' if bias else ''} [{ROWS}, 2x{f}] {str(DTYPE)[6:]} "
                       f"{DEVICE}")
    skip_interpreted(provider, "GeGLU")
    time_step(benchmark, _step(provider, f, form, bias, backward), DEVICE, _bytes(f, backward), ROWS)
