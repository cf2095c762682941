"""fastbert.ops.layer_norm on its Triton kernels (kernels/layer_norm.py) against fp64 ground truth.

Where the kernels run:
  * CUDA present: the correctness tests run the compiled kernels in this process (bf16 included,
    plus larger shapes).
  * No CUDA: tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (triton's own
    helpers such as tl.zeros are decorated at import, so it cannot be switched on later), and the
    correctness tests run the interpreted kernels on "cpu". In a process with neither (conftest
    bypassed), test_interpreter_suite re-runs this file in a child pytest with the interpreter on.
  * The ahead-of-time compile test (sm_80, sm_90) runs this file as a script (--aot) in a child
    without TRITON_INTERPRET; the launcher's bad-input tests run anywhere (no Triton launch).
Tolerances (tests/harness.py): fp32 max abs error <= 1e-5 * max(1, max |truth|); fp16/bf16 max abs
error <= 2x the error of plain PyTorch in the same dtype + one ulp of the dtype at that scale.
Outputs are NaN-poisoned (FASTBERT_POISON=1) so unwritten elements fail.
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastbert.kernels import layer_norm as K
from harness import CUDA, DEVICES, INTERP, assert_within_tolerance, max_errors, run_interpreted

import fastbert.ops as ops
from fastbert.reference import ops as ref

ROWS = (1, 7, 129)
HIDDEN = (64, 96, 768, 1000, 1023)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VARIANTS = ("standard", "bert_pytorch")


def _inputs(rows, hidden, dtype, device, residual=True):
    """Fresh random inputs: an offset and spread per row so the mean and variance matter."""
    def t(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * scale + shift).to(dtype)

    x = t(rows, hidden, scale=2.0, shift=0.5)
    r = t(rows, hidden) if residual else None
    w = t(hidden, scale=0.5, shift=1.0)
    b = t(hidden, scale=0.5)
    dy = t(rows, hidden)
    ds = t(rows, hidden) if residual else None
    return x, r, w, b, dy, ds


def _forward_backward(fn, x, r, w, b, dy, ds, dtype):
    """Run fn(x, r, w, b) -> y or (y, s) with inputs cast to dtype; return outputs and grads."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, r, w, b)]
    out = fn(*leaves)
    y, s = out if isinstance(out, tuple) else (out, None)
    loss = (y.to(dtype) * dy.to(dtype)).sum()
    if s is not None:
        loss = loss + (s.to(dtype) * ds.to(dtype)).sum()
    loss.backward()
    xs, rs, ws, bs = leaves
    return {"y": y, "s": s, "dx": xs.grad, "dres": None if rs is None else rs.grad, "dw": ws.grad,
            "db": None if bs is None else bs.grad}


def _torch_ln(variant, eps):
    """Plain PyTorch (the baseline of the error-ratio rule)."""
    def fn(x, r, w, b):
        s = x if r is None else x + r
        if variant == "standard":
            y = F.layer_norm(s, (s.shape[-1],), w, b, eps)
        else:
            y = ref.layer_norm(s, w, b, eps, variant=variant)
        return y if r is None else (y, s)

    return fn


def _fast_ln(variant, eps, **kw):
    def fn(x, r, w, b):
        return ops.layer_norm(x, w, b, eps, residual=r, variant=variant, **kw)

    return fn


def check_against_truth(device, rows, hidden, dtype, variant, residual, eps=1e-5, bias=True):
    """fastbert.ops.layer_norm against plain PyTorch (standard) or the reference (bert_pytorch) in fp64:
    y, s, dx, d residual, dW and dB (bias=False: bias None, and no dB exists)."""
    x, r, w, b, dy, ds = _inputs(rows, hidden, dtype, device, residual)
    b = b if bias else None
    truth = _forward_backward(_torch_ln(variant, eps), x, r, w, b, dy, ds, torch.float64)
    got = _forward_backward(_fast_ln(variant, eps), x, r, w, b, dy, ds, dtype)
    assert bias or (got["db"] is None and truth["db"] is None)
    for k, v in got.items():
        if truth[k] is not None:
            assert v is not None and v.dtype == dtype and v.shape == truth[k].shape, k
            assert torch.isfinite(v).all(), f"{k}: non-finite values (unwritten output?)"
    torch_lp = None
    if dtype != torch.float32:
        torch_lp = _forward_backward(_torch_ln(variant, eps), x, r, w, b, dy, ds, dtype)
    return assert_within_tolerance(got, truth, torch_lp, dtype)


def check_tile_configs(device, rows, hidden, bias):
    """The launchers at the config picked for CUDA (ln_settings(n)) against the fp64 truth, both
    variants; bias=False: bias None, db None and y as with a zero bias."""
    cfg = K.ln_settings(hidden)
    x, r, w, b, dy, ds = _inputs(rows, hidden, torch.float32, device)
    bb = b if bias else None
    for unbiased in (False, True):
        y, s, mean, rstd = K.layer_norm_fwd(x, w, bb, 1e-5, r, unbiased, config=cfg)
        dsum, _, dw, db = K.layer_norm_bwd(dy, ds, s, w, mean, rstd, unbiased, config=cfg, has_bias=bias)
        if not bias:
            assert db is None
            yb, *_ = K.layer_norm_fwd(x, w, torch.zeros_like(b), 1e-5, r, unbiased, config=cfg)
            torch.testing.assert_close(y, yb, rtol=1e-6, atol=1e-6)
        variant = "bert_pytorch" if unbiased else "standard"
        truth = _forward_backward(_torch_ln(variant, 1e-5), x, r, w, bb, dy, ds, torch.float64)
        got = {"y": y, "s": s, "dx": dsum, "dres": dsum, "dw": dw, "db": db}
        for k, e in max_errors(got, truth).items():
            assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (cfg, k, e)


def _pcg_reference(h):
    u = np.uint32
    h = h * u(747796405) + u(1442695041)
    h = ((h >> ((h >> u(28)) + u(4))) ^ h) * u(277803737)
    return (h >> u(22)) ^ h


def _keep_reference(seed, idx, p):
    """NumPy twin of kernels.layer_norm._keep (uint32 arithmetic, wrapping)."""
    h = _pcg_reference(idx.astype(np.uint32) ^ _pcg_reference(np.uint32(seed)))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0) >= np.float32(p)


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # kernels with NaN-poisoned outputs

if DEVICES:

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("hidden", HIDDEN)
    @pytest.mark.parametrize("rows", ROWS)
    def test_residual_grid(device, rows, hidden, dtype, variant):
        """y, s = LN(x + r): forward, dx, d residual, dW, dB over the whole grid."""
        err = check_against_truth(device, rows, hidden, dtype, variant, residual=True)
        print(f"ln {device} {rows}x{hidden} {dtype} {variant} residual: "
              + " ".join(f"{k} {v:.2e}" for k, v in err.items()))

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
    @pytest.mark.parametrize("rows,hidden", [(7, 96), (129, 1023), (1, 64)])
    def test_plain(device, rows, hidden, dtype, variant):
        """y = LN(x): no residual, no sum output."""
        check_against_truth(device, rows, hidden, dtype, variant, residual=False)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("rows,hidden", [(3, 8192), (2, 4097), (5, 2048), (4, 1)])
    def test_wide_and_tiny_rows(device, rows, hidden):
        variant = "standard" if hidden == 1 else "bert_pytorch"
        check_against_truth(device, rows, hidden, torch.float32, variant, residual=hidden != 1)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("rows,hidden", [(7, 96), (129, 1000), (5, 2048), (3, 4097)])
    def test_cuda_tile_configs(device, rows, hidden):
        """The launch configs picked for CUDA (ln_settings(n)), also run in the interpreter."""
        check_tile_configs(device, rows, hidden, bias=True)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_dropout_mask_matches_hash(device, variant):
        """s = dropout(x) + r with the keep-mask of the documented hash; dx uses the same mask."""
        rows, hidden, p, seed = 37, 96, 0.3, int(torch.randint(0, 2**31 - 1, ()).item())
        x, r, w, b, dy, ds = _inputs(rows, hidden, torch.float32, device)
        keep = torch.from_numpy(_keep_reference(seed, np.arange(rows * hidden).reshape(rows, hidden), p))
        keep = keep.to(device)
        seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
        unbiased = variant == "bert_pytorch"
        y, s, mean, rstd = K.layer_norm_fwd(x, w, b, 1e-5, r, unbiased, p, seed_t)
        torch.testing.assert_close(s, torch.where(keep, x / (1 - p), 0.0) + r, rtol=1e-6, atol=1e-6)
        dsum, dx, dw, db = K.layer_norm_bwd(dy, ds, s, w, mean, rstd, unbiased, p, seed_t)
        torch.testing.assert_close(dx, torch.where(keep, dsum / (1 - p), 0.0), rtol=1e-6, atol=1e-6)

        def masked(xx, rr, ww, bb):
            return ref.layer_norm(xx * keep / (1 - p), ww, bb, 1e-5, residual=rr, variant=variant)

        truth = _forward_backward(masked, x, r, w, b, dy, ds, torch.float64)
        got = {"y": y, "s": s, "dx": dx, "dres": dsum, "dw": dw, "db": db}
        for k, e in max_errors(got, truth).items():
            assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (k, e)

    @pytest.mark.parametrize("device", DEVICES)
    def test_dropout_public_op(device):
        """ops.layer_norm(..., dropout_p): keep rate near 1 - p, grads consistent with the mask."""
        rows, hidden, p = 64, 96, 0.25
        x, r, w, b, dy, ds = _inputs(rows, hidden, torch.float32, device)
        got = _forward_backward(_fast_ln("standard", 1e-5, dropout_p=p), x, r, w, b, dy, ds, torch.float32)
        kept = (got["s"] - r).abs() > 0
        rate = kept.float().mean().item()
        assert abs(rate - (1 - p)) < 0.05, rate
        keep = kept.double()

        def masked(xx, rr, ww, bb):
            return ref.layer_norm(xx * keep / (1 - p), ww, bb, 1e-5, residual=rr)

        truth = _forward_backward(masked, x, r, w, b, dy, ds, torch.float64)
        for k, e in max_errors(got, truth).items():
            assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (k, e)
        other = ops.layer_norm(x, w, b, 1e-5, residual=r, dropout_p=p)[1]
        assert not torch.equal(other, got["s"]), "two calls drew the same dropout mask"

    @pytest.mark.parametrize("device", DEVICES)
    def test_deterministic_weight_grads(device):
        x, r, w, b, dy, ds = _inputs(129, 768, torch.float32, device)
        runs = [_forward_backward(_fast_ln("standard", 1e-12), x, r, w, b, dy, ds, torch.float32)
                for _ in range(2)]
        for k in ("dw", "db", "dx"):
            assert torch.equal(runs[0][k], runs[1][k]), k

    @pytest.mark.parametrize("device", DEVICES)
    def test_forward_without_backward_outputs(device):
        """store_sum=False and stats= (the fused block without autograd): the same y, no sum written
        (None), the statistics in the given buffers, or one scratch buffer given twice."""
        x, r, w, b, _, _ = _inputs(37, 96, torch.float32, device)
        y, s, mean, rstd = K.layer_norm_fwd(x, w, b, 1e-5, r)
        m, rs = torch.empty(37, device=device), torch.empty(37, device=device)
        y2, s2, mean2, rstd2 = K.layer_norm_fwd(x, w, b, 1e-5, r, store_sum=False, stats=(m, rs))
        assert s2 is None and mean2 is m and rstd2 is rs
        assert torch.equal(y2, y) and torch.equal(m, mean) and torch.equal(rs, rstd)
        scratch = torch.empty(2 * 37, device=device)
        y3 = K.layer_norm_fwd(x, w, b, 1e-5, r, store_sum=False, stats=(scratch, scratch))[0]
        assert torch.equal(y3, y)
        assert K.layer_norm_fwd(x, w, b, 1e-5)[1].shape == (0,)  # the default keeps the [0] placeholder

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(device):
        x, r, w, b, _, _ = _inputs(3, 64, torch.float32, device)
        seed = torch.tensor([7], dtype=torch.int64, device=device)
        op = torch.ops.fastbert.layer_norm_fwd.default
        x.requires_grad_()
        w.requires_grad_()
        for args in [(x, w, b, r, None, 1e-5, False, 0.0), (x, w, b, None, None, 1e-6, True, 0.0),
                     (x, w, b, r, seed, 1e-5, True, 0.2)]:
            torch.library.opcheck(op, args)

    @pytest.mark.parametrize("device", DEVICES)
    def test_torch_compile_fullgraph(device):
        """No graph break: the custom ops (forward and backward) are traced whole."""
        x, r, w, b, dy, ds = _inputs(7, 96, torch.float32, device)

        def block(xx, rr, ww, bb):
            y, s = ops.layer_norm(xx, ww, bb, 1e-5, residual=rr, variant="bert_pytorch")
            return ops.layer_norm(y, ww, bb, 1e-5), s

        backend = "inductor" if device == "cuda" else "aot_eager"
        compiled = torch.compile(block, fullgraph=True, backend=backend)
        eager = _forward_backward(block, x, r, w, b, dy, ds, torch.float32)
        got = _forward_backward(compiled, x, r, w, b, dy, ds, torch.float32)
        for k in eager:
            torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("device", DEVICES)
    def test_autocast(device):
        """bf16 activations from a linear, fp32 weights: runs, output in bf16, fp32 weight grads."""
        rows, hidden = 7, 96
        x = torch.randn(rows, hidden, device=device)
        lin = torch.nn.Linear(hidden, hidden, device=device)
        w = (1 + 0.5 * torch.randn(hidden, device=device)).requires_grad_()
        b = torch.randn(hidden, device=device).requires_grad_()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            h = lin(x)
            y = ops.layer_norm(h, w, b, 1e-5)
        assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert w.grad.dtype == torch.float32 and lin.weight.grad is not None
        expect = F.layer_norm(h.detach().double(), (hidden,), w.detach().double(), b.detach().double(), 1e-5)
        torch.testing.assert_close(y.double(), expect, rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize("device", DEVICES)
    def test_public_bad_inputs(device):
        x, r, w, b, _, _ = _inputs(4, 64, torch.float32, device)
        with pytest.raises(ValueError, match="contiguous"):
            ops.layer_norm(x.t(), w[:4], b[:4], 1e-5)
        with pytest.raises(ValueError, match="maximum"):
            big = torch.randn(2, 8200, device=device)
            ops.layer_norm(big, torch.ones(8200, device=device), torch.zeros(8200, device=device), 1e-5)
        with pytest.raises(ValueError, match="weight has shape"):
            ops.layer_norm(x, w[:32], b, 1e-5)


if DEVICES:
    # ---- bias-free LayerNorm (weight only: ModernBERT's norms) ------------------------------------

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("residual", (False, True), ids=("plain", "residual"))
    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("rows,hidden", [(7, 96), (129, 1023), (1, 64), (33, 768)])
    def test_bias_free(device, rows, hidden, dtype, variant, residual):
        err = check_against_truth(device, rows, hidden, dtype, variant, residual, bias=False)
        print(f"ln bias-free {device} {rows}x{hidden} {dtype} {variant} residual={residual}: "
              + " ".join(f"{k} {v:.2e}" for k, v in err.items()))

    @pytest.mark.parametrize("device", DEVICES)
    def test_bias_free_fuzzed(device):
        """Fuzzed shapes (rows, hidden) with fresh inputs, residual or not, both variants, fp32."""
        g = torch.Generator().manual_seed(77)
        for _ in range(6):
            rows = int(torch.randint(1, 70, (1,), generator=g))
            hidden = int(torch.randint(2, 1500, (1,), generator=g))
            variant = VARIANTS[int(torch.randint(0, 2, (1,), generator=g))]
            residual = bool(torch.randint(0, 2, (1,), generator=g))
            check_against_truth(device, rows, hidden, torch.float32, variant, residual, bias=False)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("rows,hidden", [(7, 96), (129, 1000), (3, 4097)])
    def test_bias_free_cuda_tile_configs(device, rows, hidden):
        """The launchers with bias=None at the CUDA configs: db is None, the rest as with a bias."""
        check_tile_configs(device, rows, hidden, bias=False)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("residual", (False, True), ids=("plain", "residual"))
    def test_bias_free_dropout(device, residual):
        """Dropout before the (optional) residual add without a bias: the documented hash's mask."""
        rows, hidden, p, seed = 37, 96, 0.3, int(torch.randint(0, 2**31 - 1, ()).item())
        x, r, w, _, dy, ds = _inputs(rows, hidden, torch.float32, device, residual)
        keep = torch.from_numpy(_keep_reference(seed, np.arange(rows * hidden).reshape(rows, hidden), p))
        keep = keep.to(device)
        seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
        y, s, mean, rstd = K.layer_norm_fwd(x, w, None, 1e-5, r, False, p, seed_t)
        dsum, dx, dw, db = K.layer_norm_bwd(dy, ds if residual else None, s, w, mean, rstd, False, p, seed_t,
                                            has_bias=False)
        assert db is None
        torch.testing.assert_close(dx, torch.where(keep, dsum / (1 - p), 0.0), rtol=1e-6, atol=1e-6)

        def masked(xx, rr, ww, bb):
            return ref.layer_norm(xx * keep / (1 - p), ww, None, 1e-5, residual=rr)

        truth = _forward_backward(masked, x, r, w, None, dy, ds, torch.float64)
        if not residual:  # y only; s is the kernel's dropout(x), not an output of the op
            truth["s"] = None
        got = {"y": y, "s": s, "dx": dx, "dres": dsum if residual else None, "dw": dw, "db": None}
        for k, e in max_errors(got, truth).items():
            assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (k, e)
        # the public op draws a mask; gradients consistent with it
        got = _forward_backward(_fast_ln("standard", 1e-5, dropout_p=p), x, r, w, None, dy, ds, torch.float32)
        assert got["db"] is None and torch.isfinite(got["dx"]).all() and torch.isfinite(got["dw"]).all()

    @pytest.mark.parametrize("device", DEVICES)
    def test_bias_free_opcheck_and_compile(device):
        x, r, w, _, dy, ds = _inputs(3, 64, torch.float32, device)
        seed = torch.tensor([7], dtype=torch.int64, device=device)
        op = torch.ops.fastbert.layer_norm_fwd.default
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        for args in [(xs, ws, None, r, None, 1e-5, False, 0.0), (xs, ws, None, None, None, 1e-6, True, 0.0),
                     (xs, ws, None, r, seed, 1e-5, True, 0.2)]:
            torch.library.opcheck(op, args)

        def block(xx, rr, ww, bb):
            y, s = ops.layer_norm(xx, ww, None, 1e-5, residual=rr)
            return ops.layer_norm(y, ww, None, 1e-5, variant="bert_pytorch"), s

        backend = "inductor" if device == "cuda" else "aot_eager"
        compiled = torch.compile(block, fullgraph=True, backend=backend)
        eager = _forward_backward(block, x, r, w, None, dy, ds, torch.float32)
        got = _forward_backward(compiled, x, r, w, None, dy, ds, torch.float32)
        for k in eager:
            if eager[k] is not None:
                torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-5)


def test_bias_free_native_and_reference(monkeypatch):
    """The CPU paths (no kernel): F.layer_norm(s, (N,), w, None) and the reference, both variants."""
    x, r, w, _, dy, ds = _inputs(9, 50, torch.float32, "cpu")
    for backend in ("auto", "reference"):
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        for variant in VARIANTS:
            truth = _forward_backward(_torch_ln(variant, 1e-5), x, r, w, None, dy, ds, torch.float64)
            got = _forward_backward(_fast_ln(variant, 1e-5), x, r, w, None, dy, ds, torch.float32)
            assert got["db"] is None
            for k, e in max_errors(got, truth).items():
                assert e <= 1e-5 * max(1.0, truth[k].abs().max().item()), (backend, variant, k, e)


if DEVICES == ["cuda"]:

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
    @pytest.mark.parametrize("rows,hidden", [(4096, 768), (4096, 1024), (1000, 4096), (333, 8192),
                                             (513, 4095)])
    def test_cuda_large(rows, hidden, dtype, variant):
        check_against_truth("cuda", rows, hidden, dtype, variant, residual=True)


# ---- tests that need no Triton launch: run in every process ----------------------------------------

def test_launcher_rejects_bad_input():
    """ValueError naming the problem, raised before any Triton compile (CPU tensors, no interpreter)."""
    x = torch.randn(4, 64)
    w, b = torch.ones(64), torch.zeros(64)
    cases = [
        ((torch.randn(2, 8193), torch.ones(8193), torch.zeros(8193)), {}, "above the supported maximum 8192"),
        ((torch.randn(64, 4).t(), w, b), {}, "contiguous"),
        ((x, torch.ones(63), b), {}, r"weight has shape \(63,\)"),
        ((x, w, torch.zeros(2, 32)), {}, r"bias has shape \(2, 32\)"),
        ((torch.randint(0, 5, (4, 64)), w, b), {}, "dtype torch.int64"),
        ((x.double(), w, b), {}, "dtype torch.float64"),
        ((x, w.to(torch.int32), b), {}, "weight has dtype torch.int32"),
        ((x, w, b), {"residual": torch.randn(4, 32)}, r"residual has shape \(4, 32\)"),
        ((x, w, b), {"residual": torch.randn(64, 4).t()}, "residual must be contiguous"),
        ((x, w, b), {"dropout_p": 1.0}, "dropout_p"),
    ]
    for (xx, ww, bb), kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            K.layer_norm_fwd(xx, ww, bb, 1e-5, **kw)
    with pytest.raises(ValueError, match="variant"):
        K.check_inputs(x, w, b, variant="rms")
    with pytest.raises(ValueError, match="variant"):
        ops.layer_norm(x, w, b, 1e-5, variant="rms")


def test_settings_cover_every_hidden_size():
    """Every hidden size 1..8192 maps to one of ln_configs() (the set the AOT test compiles)."""
    configs = set(K.ln_configs())
    for n in range(1, K.MAX_HIDDEN + 1):
        block_m, block_n, warps = K.ln_settings(n)
        assert (block_m, block_n, warps) in configs and block_n >= n


if not INTERP and not CUDA:

    def test_interpreter_suite():
        """Run this file's correctness tests under the Triton interpreter in a child pytest."""
        run_interpreted(__file__)
