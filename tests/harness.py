"""What the per-op kernel tests share: the devices the kernels run on here, max-error measurement, the
tolerance rule, the child run of a test file under the Triton interpreter, and the activations
autograd saves (the fused model tests' memory checks).

Tolerances (the rule flash-attention's tests use): fp32 max abs error <= tol * max(1, max |truth|)
against an fp64 truth; fp16/bf16 max abs error <= 2x the error of plain PyTorch in the same dtype
(against the same truth) + one ulp of the dtype at that scale. Fixtures (triton_backend,
triton_poisoned, reference_backend) live in tests/conftest.py.
"""

import os
import re
import subprocess
import sys

import torch

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] if INTERP else (["cuda"] if CUDA else [])  # where the Triton kernels run here
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def max_errors(got, truth):
    """{name: max |got - truth|} over the entries of truth that are not None."""
    return {k: (got[k].double() - truth[k].double()).abs().max().item() if truth[k].numel() else 0.0
            for k in truth if truth[k] is not None}


def assert_within_tolerance(got, truth, torch_lp=None, dtype=torch.float32, fp32_tol=1e-5):
    """The tolerance rule for dicts of tensors: got (kernel, in dtype), truth (fp64), torch_lp (plain
    PyTorch in dtype; needed for fp16/bf16). Returns the kernel's errors."""
    err = max_errors(got, truth)
    scale = {k: max(1.0, truth[k].abs().max().item() if truth[k].numel() else 1.0) for k in err}
    if dtype == torch.float32 or dtype == torch.float64:
        for k in err:
            assert err[k] <= fp32_tol * scale[k], \
                f"{k}: max abs error {err[k]:.3g} > {fp32_tol} * {scale[k]:.3g}"
        return err
    base = max_errors(torch_lp, truth)
    ulp = torch.finfo(dtype).eps
    for k in err:
        assert err[k] <= 2 * base[k] + ulp * scale[k], \
            f"{k}: error {err[k]:.3g} > 2 x torch's {base[k]:.3g} + ulp slack"
    return err


def assert_compiles_as_eager(fn, x, dy, device, forward_backward):
    """torch.compile(fn, fullgraph=True) (inductor on CUDA, aot_eager elsewhere) gives eager's
    forward_backward(fn, x, dy, fp32) results (a dict of tensors) within 1e-6."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager = forward_backward(fn, x, dy, torch.float32)
    got = forward_backward(compiled, x, dy, torch.float32)
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], rtol=1e-6, atol=1e-6)


def saved_activations(module, run):
    """{storage pointer: (shape, storage bytes)} of what autograd saves for the backward while run()
    runs, module's parameters left out: the activations a training step keeps."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


def run_interpreted(test_file):
    """Run test_file's correctness tests in a child pytest under the Triton interpreter (for a process
    that has neither CUDA nor the interpreter: conftest bypassed); assert they all ran and passed."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTBERT_BACKEND="triton", FASTBERT_POISON="1")
    cmd = [sys.executable, "-m", "pytest", os.path.abspath(test_file), "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:]
    print(tail)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert re.search(r"\d+ passed", tail) and "skipped" not in tail, tail
