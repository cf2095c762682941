"""bias + GELU forward and forward+backward: fastbert's Triton kernel against eager PyTorch
(F.gelu(x + b)) and torch.compile, side by side per shape (one benchmark group per shape and mode).

Providers:
  fastbert  fastbert.ops.bias_gelu (kernels/bias_gelu.py; CUDA only: the interpreter is never timed)
  eager     F.gelu(x + b, approximate=form)
  compile   torch.compile of the eager function
Sizes: CUDA rows = 16384, features 768, 1024 (the issue's target sizes) and 3072 (BERT-base's
intermediate), bf16; CPU rows = 256, the same features, fp32 (eager and compile only). Form "none"
(exact erf, HF BERT) everywhere, "tanh" (bert_pytorch) at 3072.
bytes_moved, the fused op's minimum traffic (E = element size): forward 2*M*N*E (x in, y out),
backward 3*M*N*E (dy, x in, dx out; gelu' is recomputed from x and the bias), bias traffic
negligible. Same formula for every provider: GB/s is effective bandwidth, roofline_frac the
fraction of the measured device-to-device copy rate.
On CUDA each result also records gpu_us / gpu_gbps / gpu_roofline_frac: device time from
triton.testing.do_bench, without the host launch overhead that run()'s synchronised rounds include.
"""

import pytest
import torch
import torch.nn.functional as F
from _util import op_step, provider_fn, row_op_setup, skip_interpreted, time_step

import fastbert.ops as ops

DEVICE, ROWS, DTYPE = row_op_setup()
CASES = [(768, "none"), (1024, "none"), (3072, "none"), (3072, "tanh")]


def _eager(x, b, form):
    return F.gelu(x + b, approximate=form)


def _step(provider, n, form, backward):
    x = torch.randn(ROWS, n, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
    b = torch.randn(n, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
    dy = torch.randn(ROWS, n, device=DEVICE, dtype=DTYPE) if backward else None
    return op_step(provider_fn(provider, ops.bias_gelu, _eager), (x, b, form), backward, (x, b), dy)


def _bytes(n, backward):
    e = torch.finfo(DTYPE).bits // 8
    return (5 if backward else 2) * ROWS * n * e


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("n,form", CASES)
@pytest.mark.parametrize("provider", ["fastbert", "eager", "compile"])
def test_bias_gelu(benchmark, provider, n, form, backward):
    mode = "forward+backward" if backward else "forward"
    benchmark.group = f"bias_gelu {mode} {form} [{ROWS}, {n}] {str(DTYPE)[6:]} {DEVICE}"
    skip_interpreted(provider, "bias+GELU")
    time_step(benchmark, _step(provider, n, form, backward), DEVICE, _bytes(n, backward), ROWS)
