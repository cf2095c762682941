"""What tests/test_bias_gelu.py and tests/test_geglu.py share: the two ops take (x, bias, approximate,
*, dropout_p) and return one tensor whose gradients go to x and bias (bias None: geglu without one), so
the forward+backward run, the check against the fp64 truth, the dropout, determinism, opcheck and
torch.compile checks and the launchers' bad-input checks are written once here, each op's test file
passing its op, its reference and its inputs."""

import pytest
import torch
from harness import assert_within_tolerance, max_errors

FORMS = ("none", "tanh")


def forward_backward(fn, x, b, dy, dtype):
    """{"y", "dx", "db"} of fn(x, b) in dtype with upstream gradient dy (b None: "db" is None)."""
    xs = x.detach().to(dtype).requires_grad_()
    bs = None if b is None else b.detach().to(dtype).requires_grad_()
    y = fn(xs, bs)
    (y * dy.to(dtype)).sum().backward()
    return {"y": y, "dx": xs.grad, "db": None if bs is None else bs.grad}


def check_against_truth(op, reference, torch_op, inputs, dtype, form):
    """op (fastbert.ops) against reference in fp64 on inputs (x, b, dy), the outputs finite and of the
    right dtype and shape; fp16/bf16 within the tolerance rule's 2x of torch_op in the same dtype."""
    x, b, dy = inputs
    truth = forward_backward(lambda xx, bb: reference(xx, bb, form), x, b, dy, torch.float64)
    got = forward_backward(lambda xx, bb: op(xx, bb, form), x, b, dy, dtype)
    assert (got["db"] is None) == (b is None)
    for k, v in got.items():
        if truth[k] is None:
            continue
        assert v.dtype == dtype and v.shape == truth[k].shape, k
        assert torch.isfinite(v).all(), f"{k}: non-finite values (unwritten output?)"
    torch_lp = None
    if dtype != torch.float32:
        torch_lp = forward_backward(lambda xx, bb: torch_op(xx, bb, form), x, b, dy, dtype)
    return assert_within_tolerance(got, truth, torch_lp, dtype)


def print_errors(case, err):
    """One line of the max errors of a case (pytest -s shows them)."""
    print(f"{case}: " + " ".join(f"{k} {v:.2e}" for k, v in err.items()))


def check_dropout(op, reference, inputs, form, p=0.25):
    """op(..., dropout_p=p): keep rate near 1 - p, kept values reference / (1 - p), the same mask for
    the same seed, another for the next call, and gradients those of the reference through that mask."""
    x, b, dy = inputs
    torch.manual_seed(3)
    got = forward_backward(lambda xx, bb: op(xx, bb, form, dropout_p=p), x, b, dy, torch.float32)
    clean = reference(x.double(), None if b is None else b.double(), form)
    kept = got["y"] != 0
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 0.05, rate
    keep = kept.double()
    truth = forward_backward(lambda xx, bb: reference(xx, bb, form) * keep / (1 - p), x, b, dy,
                             torch.float64)
    for k, e in max_errors(got, truth).items():
        assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (k, e)
    assert (got["y"].double() - clean / (1 - p))[kept].abs().max() <= 1e-5 * clean.abs().max()
    torch.manual_seed(3)
    assert torch.equal(op(x, b, form, dropout_p=p), got["y"]), "the same seed drew another mask"
    assert not torch.equal(op(x, b, form, dropout_p=p), got["y"]), "two calls drew the same dropout mask"


def check_deterministic(op, inputs):
    """Two forward+backward runs give bitwise the same dx and dbias (no atomics in the reduction)."""
    x, b, dy = inputs
    runs = [forward_backward(lambda xx, bb: op(xx, bb), x, b, dy, torch.float32) for _ in range(2)]
    assert torch.equal(runs[0]["db"], runs[1]["db"]) and torch.equal(runs[0]["dx"], runs[1]["dx"])


def check_opcheck(custom_op, inputs, optional_bias=False):
    """torch.library.opcheck of the forward custom op on inputs (x, b, _), without and with dropout, with
    the bias b (and without one where the bias is optional)."""
    x, b, _ = inputs
    x.requires_grad_()
    biases = (b.requires_grad_(), None) if optional_bias else (b.requires_grad_(),)
    seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
    for form in FORMS:
        for b in biases:
            torch.library.opcheck(custom_op, (x, b, None, form, 0.0))
            torch.library.opcheck(custom_op, (x, b, seed, form, 0.2))


def check_compile_fullgraph(fn, x, b, dy, device):
    """torch.compile(fn, fullgraph=True) (no graph break) gives fn's outputs and gradients."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager = forward_backward(fn, x, b, dy, torch.float32)
    got = forward_backward(compiled, x, b, dy, torch.float32)
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-5)


def check_public_rejects(op, x, b, x_bias, device, extra=()):
    """The public op raises ValueError naming a non-contiguous x (beside x_bias: b, or None where the
    bias is optional), a bias of the wrong shape, an unknown GELU form, and each (args, message) of
    extra. x [4, 64], b [64] on device."""
    cases = [((torch.randn(64, 4, device=device).t(), x_bias), "contiguous"), ((x, b[:32]), "bias has shape"),
             *extra, ((x, b, "sigmoid"), "approximate")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            op(*args)


def check_launcher_rejects(fwd, op, x_bias, extra=()):
    """The launcher fwd raises ValueError naming the problem, before any Triton compile (CPU tensors),
    for a non-contiguous or integer or float64 x (beside x_bias: a valid bias, or None where the bias is
    optional), a bias of the wrong shape, dtype or stride, each ((x, bias), message) of extra, a bad
    form, dropout_p or missing seed; TypeError for a bias that is no tensor; the public op names a bad
    dropout_p. x [4, 64], bias [64]."""
    x, b = torch.randn(4, 64), torch.randn(64)
    cases = [
        ((torch.randn(64, 4).t(), x_bias), "x must be contiguous"),
        ((x, torch.randn(63)), r"bias has shape \(63,\)"),
        *extra,
        ((torch.randint(0, 5, (4, 64)), x_bias), "x has dtype torch.int64"),
        ((x, b.to(torch.int32)), "bias has dtype torch.int32"),
        ((x.double(), x_bias), "x has dtype torch.float64"),
        ((x, torch.randn(128)[::2]), "bias must be contiguous"),
    ]
    for (xx, bb), msg in cases:
        with pytest.raises(ValueError, match=msg):
            fwd(xx, bb)
    with pytest.raises(ValueError, match="approximate"):
        fwd(x, b, "erf")
    with pytest.raises(TypeError, match="bias must be a tensor"):
        fwd(x, 1.0)
    with pytest.raises(ValueError, match="dropout_p 1.0 outside"):
        fwd(x, b, dropout_p=1.0, seed=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed tensor"):
        fwd(x, b, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p -0.1 outside"):
        op(x, b, dropout_p=-0.1)
