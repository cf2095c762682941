"""LayerNorm forward and forward+backward: fastbert's Triton kernel against eager PyTorch and
torch.compile, side by side per shape (one benchmark group per shape and mode).

Providers:
  fastbert  fastbert.ops.layer_norm (kernels/layer_norm.py; CUDA only: the interpreter is never timed)
  eager     F.layer_norm(x) or F.layer_norm(x + residual)
  compile   torch.compile of the eager function
Cases: "plain" y = LN(x); "residual" (y, s) = (LN(x + r), x + r), the post-LN block's add + norm.
Sizes: CUDA rows = 16384, hidden 768 and 1024, bf16 (the issue's target: >= 85% of copy bandwidth,
>= 1.3x eager); CPU rows = 256, hidden 768 and 1024, fp32 (eager and compile only).
bytes_moved is the minimum traffic of the fused op (E = element size): forward plain 2*M*N*E
(read x, write y), residual 4*M*N*E (x, r in; y, s out); backward plain 3*M*N*E (dy, x in; dx
out), residual 4*M*N*E (dy, ds, s in; one gradient out, dx = d residual); plus 8 bytes of fp32
statistics per row each way. The same formula is used for every provider, so GB/s is effective
bandwidth and roofline_frac is the fraction of the measured device-to-device copy rate.
On CUDA each result also records gpu_us / gpu_gbps / gpu_roofline_frac: device time from
triton.testing.do_bench, without the host launch overhead that run()'s synchronised rounds include.
"""

import pytest
import torch
import torch.nn.functional as F
from _util import kernel_time, row_op_setup, run, skip_interpreted

import fastbert.ops as ops

DEVICE, ROWS, DTYPE = row_op_setup()
EPS = 1e-12


def _eager(x, w, b, r=None):
    if r is None:
        return F.layer_norm(x, (x.shape[-1],), w, b, EPS)
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), w, b, EPS), s


def _fast(x, w, b, r=None):
    return ops.layer_norm(x, w, b, EPS, residual=r)


_compiled = {}


def _provider_fn(provider):
    if provider == "fastbert":
        return _fast
    if provider == "eager":
        return _eager
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_eager)
    return _compiled["fn"]


def _bytes(hidden, case, backward):
    e = torch.finfo(DTYPE).bits // 8
    mn = ROWS * hidden
    fwd = (2 if case == "plain" else 4) * mn * e + 8 * ROWS
    bwd = (3 if case == "plain" else 4) * mn * e + 8 * ROWS
    return fwd + (bwd if backward else 0)


def _step(provider, hidden, case, backward):
    def t(*shape, grad=False):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(grad)

    x, r = t(ROWS, hidden, grad=backward), (t(ROWS, hidden, grad=backward) if case == "residual" else None)
    w, b = t(hidden, grad=backward), t(hidden, grad=backward)
    fn = _provider_fn(provider)
    if not backward:
        def forward():
            with torch.no_grad():
                return fn(x, w, b, r)

        return forward
    leaves = [v for v in (x, r, w, b) if v is not None]
    dy = t(ROWS, hidden)

    def step():
        out = fn(x, w, b, r)
        if case == "plain":
            return torch.autograd.grad(out, leaves, dy)
        return torch.autograd.grad(out, leaves, (dy, dy))

    return step


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("case", ["plain", "residual"])
@pytest.mark.parametrize("hidden", [768, 1024])
@pytest.mark.parametrize("provider", ["fastbert", "eager", "compile"])
def test_layer_norm(benchmark, provider, hidden, case, backward):
    mode = "forward+backward" if backward else "forward"
    benchmark.group = f"layer_norm {mode} {case} [{ROWS}, {hidden}] {str(DTYPE)[6:]} {DEVICE}"
    skip_interpreted(provider, "LayerNorm")
    step, nbytes = _step(provider, hidden, case, backward), _bytes(hidden, case, backward)
    run(benchmark, step, DEVICE, bytes_moved=nbytes, tokens=ROWS)
    kernel_time(benchmark, step, nbytes)
