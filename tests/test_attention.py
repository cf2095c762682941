"""Fused attention (kernels/attention.py) against the fp64 reference (fastbert.reference.ops.attention).

Where the kernels run:
  CPU without CUDA: tests/conftest.py sets TRITON_INTERPRET=1 before fastbert is imported, so the
    Triton interpreter runs the kernels on CPU tensors (fp32 and fp16; interpreter bf16 dots are
    broken). These cases are generated only when TRITON_INTERPRET=1.
  CUDA: the compiled kernels, incl. bf16 and S = 512, 2048.
  AOT: every autotune config compiled for sm_80 and sm_90 in a subprocess without the interpreter,
    printing registers / spills / shared memory.
Error rule (flash-attention's): |kernel - fp64 ref| <= 2 * |torch in the same dtype - fp64 ref| + atol,
with atol 3e-4 (fp32, relative to the largest |ref|) and 2e-3 (fp16/bf16). Outputs are poisoned with
NaN before the kernels write them (FASTBERT_POISON=1).
"""

import ctypes
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F
from fastbert.kernels import attention as A

from fastbert.ops._rng import dropout_seed
from fastbert.ops.attention import fused_attention
from fastbert.reference import ops as ref

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICES = (["cpu"] if INTERP else []) + (["cuda"] if CUDA and not INTERP else [])
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("FASTBERT_POISON", "1")
    monkeypatch.setenv("FASTBERT_ATTN_AUTOTUNE", "0")  # one config per kernel: keeps CUDA compiles few


def _one_blas_thread():
    """The interpreter runs every tl.dot through numpy; a multithreaded BLAS on a shared 2-core box
    spends 100x the time in thread hand-offs for these small tiles. Best effort, numpy's OpenBLAS."""
    import numpy

    for lib in glob.glob(os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs", "*openblas*")):
        try:
            so = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            if hasattr(so, name):
                getattr(so, name)(1)
                break


if INTERP:
    _one_blas_thread()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _lengths(batch, seq, gen):
    """Random lengths with a zero-length and a full-length sequence when batch >= 3."""
    if batch == 1:
        return [seq]
    lens = [0, seq] + torch.randint(1, seq + 1, (batch - 2,), generator=gen).tolist()
    return lens[:batch]


def _pad_mask(lengths, seq, device):
    pos = torch.arange(seq, device=device)
    return pos[None, :] >= torch.tensor(lengths, device=device)[:, None]  # True = padding


def _inputs(batch, seq, heads, dim, dtype, device, gen, strided=True):
    """q, k, v [B, S, H, D] as views of one [B, S, 3, H, D] projection (strided, like the encoder)."""
    qkv = torch.randn(batch, seq, 3, heads, dim, generator=gen).to(device=device, dtype=dtype)
    if strided:
        return tuple(qkv[:, :, i] for i in range(3))
    return tuple(qkv[:, :, i].contiguous() for i in range(3))


def _ref_run(q, k, v, dout, dtype, **kw):
    """Reference output and grads with inputs cast to dtype."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o = ref.attention(qr, kr, vr, **kw)
    grads = torch.autograd.grad(o, (qr, kr, vr), dout.to(dtype)) if dout is not None else ()
    return (o.detach(), *grads)


def _kernel_run(q, k, v, dout, **kw):
    qk = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fused_attention(*qk, **kw)
    grads = torch.autograd.grad(o, qk, dout) if dout is not None else ()
    return (o.detach(), *grads)


def _check(name, got, want64, want_lp, dtype):
    """flash-attention rule: kernel error <= 2x PyTorch-in-dtype error + atol."""
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten output?)"
    g, w = got.double().cpu(), want64.double().cpu()
    err = (g - w).abs().max().item() if g.numel() else 0.0
    base = (want_lp.double().cpu() - w).abs().max().item() if g.numel() else 0.0
    scale = max(1.0, w.abs().max().item() if g.numel() else 1.0)
    atol = (3e-4 if dtype == torch.float32 else 2e-3) * scale
    assert err <= 2 * base + atol, f"{name}: max err {err:.3e} > 2 * torch err {base:.3e} + {atol:.1e}"
    return err


def _pack(x, lengths):
    """[B, S, ...] -> [T, ...] of the first lengths[b] rows of each sequence."""
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)], 0)


def _cu(lengths, device):
    return F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)


ERRORS = {}  # (dtype, mode, what) -> max error seen; printed at the end of the session


def _record(dtype, mode, what, err):
    key = (str(dtype).replace("torch.", ""), mode, what)
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)


def _check_run(dtype, mode, label, tensors, kernel_kw=None, **kw):
    """The kernel's (o, dq, dk, dv) on tensors (q, k, v, dout) with the options kw (and kernel_kw, the
    kernel's only), each within _check's rule of the fp64 reference (the reference in dtype the
    baseline), the errors recorded under mode; returns the kernel's four."""
    got = _kernel_run(*tensors, **kw, **(kernel_kw or {}))
    want = _ref_run(*tensors, torch.float64, **kw)
    lowp = _ref_run(*tensors, dtype, **kw)
    for name, g, w, lp in zip(("o", "dq", "dk", "dv"), got, want, lowp):
        _record(dtype, mode, name, _check(f"{label} {name}", g, w, lp, dtype))
    return got


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    yield
    if ERRORS:
        print("\nattention max |err| vs fp64 reference:")
        for key in sorted(ERRORS):
            print(f"  {key[0]:<9} {key[1]:<7} {key[2]:<3} {ERRORS[key]:.2e}")


# ----------------------------------------------------------------------------------------------
# correctness grid: every value of B {1,3}, H {1,4}, S {1,17,64,129,300}, D {32,64,128}, fp32 and
# fp16, all S x D pairs; D = 80 once. On CUDA also bf16 and S 512, 2048.
# ----------------------------------------------------------------------------------------------
GRID = [
    # (B, H, S, D, dtype)
    (3, 4, 1, 32, torch.float32), (1, 1, 1, 64, torch.float16), (3, 1, 1, 128, torch.float32),
    (1, 4, 17, 32, torch.float16), (3, 4, 17, 64, torch.float32), (3, 1, 17, 128, torch.float16),
    (3, 1, 64, 32, torch.float32), (1, 4, 64, 64, torch.float16), (3, 4, 64, 128, torch.float32),
    (3, 1, 129, 32, torch.float16), (1, 1, 129, 64, torch.float32), (1, 4, 129, 128, torch.float16),
    (1, 1, 300, 32, torch.float32), (3, 1, 300, 64, torch.float16), (1, 1, 300, 128, torch.float32),
    (3, 2, 129, 80, torch.float16),
]
CUDA_GRID = [  # few distinct (dtype, head dim) pairs: each one compiles its own kernels
    (3, 4, 129, 64, torch.bfloat16), (3, 2, 300, 128, torch.bfloat16), (3, 2, 129, 80, torch.bfloat16),
    (4, 12, 512, 64, torch.bfloat16), (3, 4, 512, 128, torch.float16), (2, 4, 2048, 64, torch.bfloat16),
    (3, 2, 2048, 32, torch.float32),
]


def _grid(device):
    """The interpreter covers GRID; CUDA re-checks a few of its awkward cases (S = 1, 17, odd head
    dims, fp32) plus CUDA_GRID, keeping the number of compiled specialisations small."""
    return GRID if device == "cpu" else [GRID[i] for i in (0, 5)] + CUDA_GRID


CASES = [pytest.param(d, *c, id=f"{d}-B{c[0]}-H{c[1]}-S{c[2]}-D{c[3]}-{str(c[4])[6:]}")
         for d in DEVICES for c in _grid(d)]


@pytest.mark.parametrize("device,batch,heads,seq,dim,dtype", CASES)
def test_padded_and_varlen(device, batch, heads, seq, dim, dtype):
    gen = torch.Generator().manual_seed(hash((batch, heads, seq, dim, str(dtype))) % 2**31)
    q, k, v = _inputs(batch, seq, heads, dim, dtype, device, gen)
    lengths = _lengths(batch, seq, gen)
    mask = _pad_mask(lengths, seq, device)
    dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    scale = 0.3 if dim == 80 else None

    # padded mode: every query row (padding queries too) and every gradient
    got = _check_run(dtype, "padded", "padded", (q, k, v, dout), key_padding_mask=mask, scale=scale)
    # zero-length sequences: zero output and zero gradients
    for b, n in enumerate(lengths):
        if n == 0:
            for t in got:
                assert (t[b] == 0).all()

    # varlen mode on the packed valid tokens
    qp, kp, vp = (_pack(t, lengths) for t in (q, k, v))
    dp = _pack(dout, lengths)
    cu = _cu(lengths, device)
    got_v = _check_run(dtype, "varlen", "varlen", (qp, kp, vp, dp), cu_seqlens=cu, scale=scale,
                       kernel_kw=dict(max_seqlen=max(lengths)))

    # padded and varlen agree on the valid rows: the output and dQ (a row's dQ depends on its own dO
    # only; dK, dV differ by the padding queries' share, so those are checked against the reference
    # above). The compiled masked and varlen paths may round differently by an ulp of the dtype.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g_v, g_p in zip(got_v[:2], got[:2]):
        torch.testing.assert_close(g_v, _pack(g_p, lengths), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_arbitrary_mask_and_no_mask(device):
    """A non-right-padding mask (holes, leading padding, a fully masked row) and mask=None."""
    gen = torch.Generator().manual_seed(11)
    batch, seq, heads, dim = 3, 150, 2, 32
    q, k, v = _inputs(batch, seq, heads, dim, torch.float32, device, gen, strided=False)
    mask = torch.rand(batch, seq, generator=gen).to(device) < 0.4
    mask[1, :70] = True  # first key block fully padding
    mask[2] = True  # no valid key
    dout = torch.randn(q.shape, generator=gen).to(device)
    for m in (mask, None):
        got = _kernel_run(q, k, v, dout, key_padding_mask=m)
        want = _ref_run(q, k, v, dout, torch.float64, key_padding_mask=m)
        for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
            _check(f"mask={m is not None} {name}", g, w, w, torch.float32)
    assert (got[0].abs().sum() > 0) and (_kernel_run(q, k, v, None, key_padding_mask=mask)[0][2] == 0).all()


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_same_seed_same_output(device):
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(2, 40, 2, 32, torch.float32, device, gen)
    mask = _pad_mask([40, 23], 40, device)
    rng = dropout_seed(device, torch.Generator(device).manual_seed(7))
    o1 = fused_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2, rng=rng)
    o2 = fused_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2, rng=rng)
    assert torch.equal(o1, o2)
    rng8 = dropout_seed(device, torch.Generator(device).manual_seed(8))
    o3 = fused_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2, rng=rng8)
    assert not torch.equal(o1, o3)
    # seeded from the device's default generator: torch.manual_seed reproduces it
    torch.manual_seed(123)
    o4 = fused_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2)
    torch.manual_seed(123)
    o5 = fused_attention(q, k, v, key_padding_mask=mask, dropout_p=0.2)
    assert torch.equal(o4, o5)
    # dropout_p = 0 ignores the generator entirely
    torch.testing.assert_close(fused_attention(q, k, v, key_padding_mask=mask),
                               ref.attention(q, k, v, key_padding_mask=mask), rtol=0, atol=3e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(device, p):
    batch, heads, seq = 2, 3, 96
    rng = dropout_seed(device, torch.Generator(device).manual_seed(int(p * 100)))
    keep = A.dropout_keep_mask(rng, p, batch, heads, seq)
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # streams differ across heads and batch entries, and rows differ from columns
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0], keep[0, 0].T)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_matches_reference_with_same_mask(device):
    got, got_v, lengths = _dropout_runs(device, (5, 9), 70, [70, 0, 41], 0.25, "dropout", "dropout")
    # varlen draws the same bits (positions are counted inside each sequence)
    torch.testing.assert_close(got_v[0], _pack(got[0], lengths), rtol=1e-5, atol=1e-5)


def _dropout_runs(device, seeds, seq, lengths, p, mode, label, **kw):
    """Padded q, k, v [3, seq, 2, 32] fp32 (seeds[0]) with dropout p (rng from seeds[1]) and the options
    kw, against the fp64 reference on the kernels' keep bits (dropout_keep_mask), the errors recorded
    under mode; then varlen on the packed valid rows. Returns (padded, varlen) (o, dq, dk, dv), lengths."""
    gen = torch.Generator().manual_seed(seeds[0])
    batch, heads, dim = len(lengths), 2, 32
    q, k, v = _inputs(batch, seq, heads, dim, torch.float32, device, gen)
    mask = _pad_mask(lengths, seq, device)
    dout = torch.randn(q.shape, generator=gen).to(device)
    rng = dropout_seed(device, torch.Generator(device).manual_seed(seeds[1]))
    keep = A.dropout_keep_mask(rng, p, batch, heads, seq)
    got = _kernel_run(q, k, v, dout, key_padding_mask=mask, dropout_p=p, rng=rng, **kw)
    want = _ref_run(q, k, v, dout, torch.float64, key_padding_mask=mask, dropout_p=p, dropout_mask=keep, **kw)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        _record(torch.float32, mode, name, _check(f"{label} {name}", g, w, w, torch.float32))
    got_v = _kernel_run(*(_pack(t, lengths) for t in (q, k, v, dout)), cu_seqlens=_cu(lengths, device),
                        dropout_p=p, rng=rng, **kw)
    return got, got_v, lengths


def _opcheck_inputs(lengths, device):
    """q, k, v [2, max(lengths), 1, 32] fp32 (seeded), the padding mask of lengths and a dropout rng."""
    seq = max(lengths)
    q, k, v = _inputs(len(lengths), seq, 1, 32, torch.float32, device, torch.Generator().manual_seed(2),
                      strided=False)
    return q, k, v, _pad_mask(lengths, seq, device), torch.tensor([1234, 5], dtype=torch.int64, device=device)


def _opcheck_forward(args):
    """torch.library.opcheck of fastbert::attention_fwd on args, its float tensors requiring grad."""
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_checkpoint(device):
    from torch.utils.checkpoint import checkpoint

    q, k, v, mask, rng = _opcheck_inputs([17, 5], device)
    lens = torch.tensor([17, 5], dtype=torch.int32, device=device)
    for args in ((q, k, v, None, None, None, A.MODE_DENSE, 0.0, 0.2, 17),
                 (q, k, v, lens, mask.view(torch.uint8), rng, A.MODE_MASKED, 0.1, 0.2, 17)):
        _opcheck_forward(args)
    # activation checkpointing recomputes the same dropout mask
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))

    def f(a, b, c):
        return fused_attention(a, b, c, key_padding_mask=mask, dropout_p=0.3)

    torch.manual_seed(0)
    checkpoint(f, qs, ks, vs, use_reentrant=False).sum().backward()
    torch.manual_seed(0)
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    f(qd, kd, vd).sum().backward()
    for a, b in ((qs, qd), (ks, kd), (vs, vd)):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_dispatch_and_encoder(device, monkeypatch):
    """fastbert.ops.attention routes to the kernel under FASTBERT_BACKEND=triton."""
    from fastbert import ops

    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    gen = torch.Generator().manual_seed(4)
    dim = 16 if device == "cpu" else 32  # 16: an untuned head dim (padded to a 16-wide tile)
    q, k, v = _inputs(2, 33, 2, dim, torch.float32, device, gen)
    mask = _pad_mask([33, 20], 33, device)
    got = ops.attention(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(got, ref.attention(q, k, v, key_padding_mask=mask), rtol=0, atol=3e-5)


# ----------------------------------------------------------------------------------------------
# sliding window: query i attends key j iff |i - j| <= window (flash-attn's window_size=(w, w))
# ----------------------------------------------------------------------------------------------
WINDOW_GRID = [
    # (B, H, S, D, dtype, window): windows below, at and above the 64-wide interpreter tiles, 0, and
    # window >= S - 1 (the launchers run the global kernels then)
    (3, 2, 150, 32, torch.float32, 5), (3, 1, 150, 64, torch.float16, 40), (2, 2, 129, 32, torch.float32, 64),
    (3, 1, 200, 32, torch.float16, 100), (1, 2, 17, 64, torch.float32, 3), (3, 1, 70, 32, torch.float32, 0),
    (2, 1, 33, 32, torch.float16, 32), (3, 2, 129, 80, torch.float16, 7),
]
CUDA_WINDOW_GRID = [
    (4, 12, 512, 64, torch.bfloat16, 64), (2, 4, 2048, 64, torch.bfloat16, 128),
    (3, 4, 300, 128, torch.float16, 17), (3, 2, 1030, 32, torch.float32, 200),
]


def _fuzz_window_cases(n, seed=1234):
    """n fuzzed (B, H, S, D, dtype, window): shapes and windows drawn at random (small: interpreter)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = int(torch.randint(1, 200, (1,), generator=g))
        out.append((int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g)),
                    seq, (16, 32, 64)[int(torch.randint(0, 3, (1,), generator=g))],
                    (torch.float32, torch.float16)[int(torch.randint(0, 2, (1,), generator=g))],
                    int(torch.randint(0, seq + 8, (1,), generator=g))))
    return out


def _window_grid(device):
    return WINDOW_GRID + _fuzz_window_cases(4) if device == "cpu" else WINDOW_GRID[:2] + CUDA_WINDOW_GRID


WINDOW_CASES = [pytest.param(d, *c, id=f"{d}-B{c[0]}-H{c[1]}-S{c[2]}-D{c[3]}-{str(c[4])[6:]}-w{c[5]}")
                for d in DEVICES for c in _window_grid(d)]


@pytest.mark.parametrize("device,batch,heads,seq,dim,dtype,window", WINDOW_CASES)
def test_window_padded_and_varlen(device, batch, heads, seq, dim, dtype, window):
    """Output and dQ/dK/dV with a sliding window against the fp64 reference (the window as a mask),
    padded (random right padding, a zero-length sequence) and varlen; fresh inputs per case."""
    gen = torch.Generator().manual_seed(hash((batch, heads, seq, dim, str(dtype), window)) % 2**31)
    q, k, v = _inputs(batch, seq, heads, dim, dtype, device, gen)
    lengths = _lengths(batch, seq, gen)
    mask = _pad_mask(lengths, seq, device)
    dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    kw = dict(key_padding_mask=mask, window=window)
    _check_run(dtype, "window", "window padded", (q, k, v, dout), **kw)

    qp, kp, vp, dp = (_pack(t, lengths) for t in (q, k, v, dout))
    cu = _cu(lengths, device)
    _check_run(dtype, "win-vl", "window varlen", (qp, kp, vp, dp), cu_seqlens=cu, window=window,
               kernel_kw=dict(max_seqlen=max(lengths)))


@pytest.mark.parametrize("device", DEVICES)
def test_window_skips_blocks_outside_the_band(device):
    """Blocks outside the band are never loaded: NaN in the keys/values (queries/dO) of the last key
    (query) block leaves the outputs (gradients) of the first two blocks finite, which masking them
    (0 * NaN = NaN in P V) would not. The interpreter's tiles are 64 x 64; window 3."""
    gen = torch.Generator().manual_seed(21)
    seq, w = 256, 3
    q, k, v = _inputs(1, seq, 1, 32, torch.float32, device, gen, strided=False)
    dout = torch.randn(q.shape, generator=gen).to(device)
    kn, vn = k.clone(), v.clone()
    kn[:, 192:] = float("nan")
    vn[:, 192:] = float("nan")
    o = fused_attention(q, kn, vn, window=w)
    assert torch.isfinite(o[:, :128]).all() and torch.isnan(o[:, 192:]).all()
    torch.testing.assert_close(o[:, :128], ref.attention(q, k, v, window=w)[:, :128], rtol=0, atol=3e-5)
    # backward: NaN queries/dO rows 192.. leave dK, dV of keys < 128 finite; NaN keys leave dQ finite
    qn, dn = q.clone(), dout.clone()
    qn[:, 192:] = float("nan")
    dn[:, 192:] = float("nan")
    _, dk, dv = _kernel_run(qn, k, v, dn, window=w)[1:]
    assert torch.isfinite(dk[:, :128]).all() and torch.isfinite(dv[:, :128]).all()
    dq = _kernel_run(q, kn, vn, dout, window=w)[1]
    assert torch.isfinite(dq[:, :128]).all()
    # the global kernel, on the same input, reads every block (the test above is not vacuous)
    assert torch.isnan(fused_attention(q, kn, vn)[:, :128]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_window_dropout_matches_reference_with_same_mask(device):
    """Window + dropout, padded and varlen: the kernels' keep bits (dropout_keep_mask) on the reference."""
    got, got_v, lengths = _dropout_runs(device, (6, 10), 140, [140, 0, 77], 0.2, "win-drop", "window dropout",
                                        window=9)
    for g_v, g_p in zip(got_v[:2], got[:2]):  # output and dQ of the valid rows
        torch.testing.assert_close(g_v, _pack(g_p, lengths), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_window_against_sdpa_dense_band_mask(device):
    """The kernel against SDPA with a dense boolean band mask [S, S] (no padding: no empty rows), and
    window >= S - 1 exactly the global kernel."""
    gen = torch.Generator().manual_seed(8)
    batch, seq, heads, dim, w = 2, 100, 2, 32, 12
    q, k, v = _inputs(batch, seq, heads, dim, torch.float32, device, gen, strided=False)
    pos = torch.arange(seq, device=device)
    band = (pos[:, None] - pos[None, :]).abs() <= w  # True = attend
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v)),
                                          attn_mask=band).transpose(1, 2)
    got = fused_attention(q, k, v, window=w)
    torch.testing.assert_close(got.double(), sdpa, rtol=0, atol=3e-5)
    for big in (seq - 1, seq, 10**9):
        assert torch.equal(fused_attention(q, k, v, window=big), fused_attention(q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_window_opcheck(device):
    q, k, v, mask, rng = _opcheck_inputs([40, 9], device)
    _opcheck_forward((q, k, v, None, mask.view(torch.uint8), rng, A.MODE_MASKED, 0.1, 0.2, 40, 6))


def test_window_native_and_reference_paths(monkeypatch):
    """The CPU paths (no kernel): SDPA with a boolean band mask (auto) and the reference agree with the
    fp64 reference, padded (padding queries whose window holds no valid key get zeros and finite
    gradients) and varlen."""
    from fastbert import ops

    gen = torch.Generator().manual_seed(5)
    batch, seq, heads, dim, w = 3, 60, 2, 16, 4
    q, k, v = _inputs(batch, seq, heads, dim, torch.float32, "cpu", gen)
    lengths = [60, 20, 0]
    mask = _pad_mask(lengths, seq, "cpu")
    dout = torch.randn(q.shape, generator=gen)
    want = _ref_run(q, k, v, dout, torch.float64, key_padding_mask=mask, window=w)
    for backend in ("auto", "reference"):
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        # batch 2 has no valid key at all: SDPA is off then (the reference runs); check with and without
        for m, sl in ((mask[:2], slice(0, 2)), (mask, slice(0, 3))):
            qs = tuple(t.detach()[sl].clone().requires_grad_() for t in (q, k, v))
            o = ops.attention(*qs, key_padding_mask=m, window=w)
            grads = torch.autograd.grad(o, qs, dout[sl])
            for name, g, wt in zip(("o", "dq", "dk", "dv"), (o.detach(), *grads), want):
                assert torch.isfinite(g).all(), (backend, name)
                torch.testing.assert_close(g.double(), wt[sl], rtol=0, atol=2e-5)
        assert (o[1, 25:] == 0).all()  # padding queries past length + window: no key in the window
        cu = _cu(lengths, "cpu")
        packed = tuple(_pack(t, lengths) for t in (q, k, v))
        got_v = ops.attention(*packed, cu_seqlens=cu, window=w)
        want_v = ref.attention(*(t.double() for t in packed), cu_seqlens=cu, window=w)
        torch.testing.assert_close(got_v.double(), want_v, rtol=0, atol=2e-5)


def test_window_bad_values():
    q = torch.randn(2, 8, 2, 32)
    _bad("window -1 < 0", q, q, q, window=-1)
    with pytest.raises(TypeError, match="window must be an int"):
        fused_attention(q, q, q, window=2.5)
    with pytest.raises(TypeError, match="window must be an int"):
        fused_attention(q, q, q, window=True)


# ----------------------------------------------------------------------------------------------
# CUDA-only: bf16 and long sequences are in CUDA_GRID above; this one just says so without a GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bf16 and S = 512, 2048 run in CUDA_GRID there)")
def test_cuda_present_for_bf16_grid():
    assert any(c[4] == torch.bfloat16 for c in CUDA_GRID)


# ----------------------------------------------------------------------------------------------
# bad input: clear ValueErrors, raised before any kernel launch (no interpreter needed)
# ----------------------------------------------------------------------------------------------
def _bad(match, *args, **kw):
    with pytest.raises(ValueError, match=match):
        fused_attention(*args, **kw)


def test_bad_inputs(monkeypatch):
    monkeypatch.setenv("FASTBERT_ATTN_CHECK", "1")  # cu_seqlens values are checked (a host sync)
    q = torch.randn(2, 8, 2, 32)
    _bad("head_dim 20 unsupported", *(torch.randn(2, 8, 2, 20),) * 3)
    _bad("head_dim 256 unsupported", *(torch.randn(1, 4, 1, 256),) * 3)
    _bad("shapes differ", q, torch.randn(2, 9, 2, 32), q)
    _bad("dtypes differ", q, q.half(), q)
    _bad("not supported", q.double(), q.double(), q.double())
    _bad("not supported", *(torch.ones(2, 8, 2, 32, dtype=torch.int32),) * 3)
    _bad("padded mode needs", *(torch.randn(16, 2, 32),) * 3)
    _bad("dropout_p", q, q, q, dropout_p=1.0)
    _bad("key_padding_mask must be a bool", q, q, q, key_padding_mask=torch.zeros(2, 8))
    _bad(r"key_padding_mask shape \(2, 7\)", q, q, q, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    t = torch.randn(10, 2, 32)
    _bad("varlen mode", q, q, q, cu_seqlens=torch.tensor([0, 8, 16], dtype=torch.int32))
    _bad("int32", t, t, t, cu_seqlens=torch.tensor([0, 4, 10]))
    _bad("ends at 9", t, t, t, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    _bad("non-decreasing", t, t, t, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    _bad("start at 0", t, t, t, cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32))
    _bad("length 6 > max_seqlen 5", t, t, t, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32),
         max_seqlen=5)
    _bad("exclusive", t, t, t, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32),
         key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    _bad(r"max_seqlen 4 != S 8", q, q, q, max_seqlen=4)
    _bad(r"max_seqlen 9 != S 8", q, q, q, max_seqlen=9)
