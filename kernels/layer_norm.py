"""Fused LayerNorm over the last dimension: forward and backward Triton kernels and their launchers.

Shapes: the input is viewed as M rows of N features (x [..., N] -> [M, N], contiguous), N <= 8192.

Forward, one program per tile of BLOCK_M whole rows (BLOCK_N = next power of two >= N):
    d = dropout(x)                       optional, keep-mask drawn from (seed, row * N + col)
    s = d + residual                     optional; written out when asked (pre-LN residual stream)
    mean = sum(s) / N,   xc = s - mean
    "standard":     rstd = 1 / sqrt(sum(xc^2) / N + eps)          (torch.nn.LayerNorm, HF BERT)
    "bert_pytorch": rstd = 1 / (sqrt(sum(xc^2) / (N - 1)) + eps)  (bert_pytorch: (s - mean) / (std + eps))
    y = w * xc * rstd + b                (bias optional: y = w * xc * rstd without it, HAS_BIAS = False;
                                          ModernBERT's norms have no bias)
Loads of every dtype (fp32/fp16/bf16) are upcast to fp32 before any arithmetic: statistics of
low-precision rows lose accuracy fast in 16 bits, and the interpreter's bf16 arithmetic is only right
after the cast. mean and rstd are stored in fp32 for the backward.

Backward: see the derivation above _ln_bwd_kernel (the bias only adds the dB output: without one,
nothing else changes and dB is neither accumulated nor written). dW and dB are reduced without
atomics: each of G programs owns a contiguous slice of rows, sums dy * xhat and dy over its slice in
fp32 registers and writes one row of a [G, N] partial buffer; a second small kernel sums the G rows
in a fixed order (so the result is the same run to run) and casts to the parameter dtype.
"""

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    TILE,
    allocator,
    cdiv,
    column_sums,
    dropout_keep,
    next_power_of_2,
    seed_hash,
    sm_count,
)

MAX_HIDDEN = 8192
MIN_BLOCK = 256
LN_VARIANTS = ("standard", "bert_pytorch")


def ln_settings(n, device=None):
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n features, forward and backward alike: whole rows
    in one block (BLOCK_N = next power of two >= n, at least MIN_BLOCK). CUDA: BLOCK_M rows per tile
    so that a tile holds >= TILE elements and each thread about 8 of them (16 at n > 4096, where
    16 warps is the limit). Elsewhere (the interpreter, whose cost is ~20 ms per program) tiles of
    32 rows; the kernel code is the same, and the tests also run the CUDA configs in the interpreter."""
    cuda = device is None or getattr(device, "type", device) == "cuda"
    return _settings(n, cuda)


@functools.lru_cache(maxsize=256)
def _settings(n, cuda):  # cached: the launchers ask on every call
    block_n = max(next_power_of_2(n), MIN_BLOCK)
    if not cuda:
        return 32, block_n, 4
    block_m = max(1, TILE // block_n)
    # 8 warps up to 2048 features (8 values per thread); 32 warps above, where 16 warps left the
    # backward at the 128-register cap and spilling for odd n
    return block_m, block_n, 8 if block_n <= 2048 else 32


def ln_configs():
    """Every (BLOCK_M, BLOCK_N, num_warps) the launchers can pick (the AOT test compiles each)."""
    out, b = [], MIN_BLOCK
    while b <= MAX_HIDDEN:
        out.append(ln_settings(b))
        b *= 2
    return out


REGS_ESTIMATE = 80  # registers per thread of the backward (AOT table: 64-80 vectorised, <= 128 odd N)


def bwd_programs(tiles, device, num_warps=8):
    """Number of programs of the backward for `tiles` row tiles: on CUDA as many as fit on the SMs
    at once (one wave: a second partial wave of equal-work programs would double the time), each
    keeping its dW/dB partial sums in registers; a handful in the interpreter."""
    if device.type == "cuda":
        per_sm = max(1, 65536 // (REGS_ESTIMATE * 32 * num_warps))
        return max(1, min(tiles, per_sm * sm_count(device.index or 0)))
    return max(1, min(tiles, 4))


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layer_norm: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"layer_norm: {name} has dtype {t.dtype}; the Triton kernel supports "
                         f"float32, float16 and bfloat16 (integer and float64 inputs are not supported)")


def check_inputs(x, weight, bias, residual=None, variant="standard", dropout_p=0.0):
    """Raise ValueError/TypeError naming the problem before anything reaches Triton."""
    if variant not in LN_VARIANTS:
        raise ValueError(f"layer_norm: variant {variant!r}; expected one of {LN_VARIANTS}")
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have at least one dimension (the hidden size)")
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(f"layer_norm: hidden size {n} is above the supported maximum {MAX_HIDDEN}")
    if n < 1 or (variant == "bert_pytorch" and n < 2):
        raise ValueError(f"layer_norm: hidden size {n} too small for variant {variant!r}")
    if not x.is_contiguous():
        raise ValueError(f"layer_norm: x must be contiguous (shape {tuple(x.shape)}, strides "
                         f"{x.stride()}); call .contiguous() first")
    operands = [("weight", weight, (n,), f"({n},) to match the hidden size of x {tuple(x.shape)}")]
    if bias is not None:  # None: a bias-free LayerNorm (weight only)
        operands.append(("bias", bias, (n,), f"({n},) to match the hidden size of x {tuple(x.shape)}"))
    if residual is not None:
        operands.append(("residual", residual, tuple(x.shape), f"{tuple(x.shape)} (the shape of x)"))
    for name, t, shape, expected in operands:
        _check_float(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"layer_norm: {name} has shape {tuple(t.shape)}; expected {expected}")
        if not t.is_contiguous():
            raise ValueError(f"layer_norm: {name} must be contiguous (strides {t.stride()})")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device}, x on {x.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"layer_norm: dropout_p={dropout_p} must be in [0, 1)")


@triton.jit
def _ln_fwd_kernel(
    X,  # [M, N] input, any float dtype
    R,  # [M, N] residual (read when HAS_RESIDUAL)
    W,  # [N] scale
    B,  # [N] shift (read when HAS_BIAS)
    Y,  # [M, N] output
    S,  # [M, N] s = dropout(x) + residual, written when STORE_SUM
    MEAN,  # [M] fp32
    RSTD,  # [M] fp32: 1/sqrt(var + eps) or 1/(std + eps)
    SEED,  # int64 dropout seed at SEED[0] (read when HAS_DROPOUT)
    M,  # rows
    N,  # features per row
    eps,
    dropout_p,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # >= N, a whole row
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_SUM: tl.constexpr,
    UNBIASED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    # every tensor is kept 2-D ([BLOCK_M, 1] per-row values, reductions with keep_dims): with
    # BLOCK_M = 1, 1-D row vectors made Triton pick a replicated layout and doubled the registers
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
    cols = tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]
    row_ok = rows < M
    mask = row_ok & (cols < N)  # [BLOCK_M, BLOCK_N]
    offs = rows.to(tl.int64) * N + cols
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = seed_hash(SEED)
        # the same (seed, element index) pairs regenerate the mask in the backward
        keep = dropout_keep(seed, rows * N + cols, dropout_p)
        s = tl.where(keep, s / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        s += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_SUM:
        tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)
    # div_rn: IEEE division (plain `/` is approximate on NVIDIA); a row of one element then gets
    # mean == s exactly, and rstd = 1/sqrt(eps) does not amplify a rounding residue
    mean = tl.math.div_rn(tl.sum(s, axis=1, keep_dims=True), N * 1.0)  # [BLOCK_M, 1]
    xc = tl.where(mask, s - mean, 0.0)
    sq = tl.sum(xc * xc, axis=1, keep_dims=True)
    if UNBIASED:
        rstd = 1.0 / (tl.sqrt(sq / (N - 1)) + eps)
    else:
        rstd = 1.0 / tl.sqrt(sq / N + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = xc * rstd * w + b
    else:
        y = xc * rstd * w
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


# Backward math. Per row, with g = dy * w, xc = s - mean, r = rstd, xhat = xc * r, y = w * xhat + b:
#   dL/ds_i = sum_j g_j d(xc_j r)/ds_i = r (g_i - mean(g)) + (sum_j g_j xc_j) dr/ds_i
# (d xc_j / ds_i = delta_ij - 1/N gives the mean(g) term). For the spread, sum_j xc_j = 0 makes
#   d(sum_j xc_j^2)/ds_i = 2 xc_i.
# "standard":     r = (q/N + eps)^(-1/2), q = sum xc^2  ->  dr/ds_i = -r^3 xc_i / N
# "bert_pytorch": r = 1/(std + eps), std = sqrt(q/(N-1))  ->  dr/ds_i = -r^2 xc_i / ((N-1) std)
# so in both cases  ds_i = r (g_i - mean(g)) - k xc_i  with
#   k = r^3 sum(g xc) / N                  (standard)
#   k = r^2 sum(g xc) / ((N-1) std)        (bert_pytorch; 0 for a constant row, std = 0)
# The sum output s also feeds the residual stream, so its own gradient dS is added: dsum = ds + dS,
# which is the gradient of the residual. Through dropout, dx = dsum * keep / (1 - p) (same mask,
# regenerated from the seed). dW = sum_rows dy * xhat, dB = sum_rows dy.
# Program pid owns rows [pid * rows_per_program, (pid + 1) * rows_per_program), BLOCK_M at a time.
@triton.jit
def _ln_bwd_kernel(
    DY,  # [M, N] gradient of y
    DS,  # [M, N] gradient of the sum output (read when HAS_DSUM)
    S,  # [M, N] the pre-norm sum s = dropout(x) + residual saved by the forward
    W,  # [N]
    MEAN,  # [M] fp32
    RSTD,  # [M] fp32
    DSUM,  # [M, N] out: gradient of s (= gradient of the residual)
    DX,  # [M, N] out: gradient of x through dropout (written when HAS_DROPOUT)
    DW_PART,  # [G, N] fp32 out: per-program partial sums of dy * xhat
    DB_PART,  # [G, N] fp32 out: per-program partial sums of dy (written when HAS_BIAS)
    SEED,  # int64 dropout seed at SEED[0] (read when HAS_DROPOUT)
    M,
    N,
    rows_per_program,  # a multiple of BLOCK_M
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    UNBIASED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]; 2-D throughout, as in the forward
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if HAS_DROPOUT:
        seed = seed_hash(SEED)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
        row_ok = rows < row_end
        mask = row_ok & col_ok
        offs = rows.to(tl.int64) * N + cols
        if HAS_DROPOUT:  # first, so that the hash's temporaries are dead before the row math
            keep = dropout_keep(seed, rows * N + cols, dropout_p)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        r = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xc = tl.where(mask, s - mean, 0.0)
        g = dy * w
        gxc = tl.sum(g * xc, axis=1, keep_dims=True)  # [BLOCK_M, 1]
        if UNBIASED:
            std = tl.sqrt(tl.sum(xc * xc, axis=1, keep_dims=True) / (N - 1))
            k = tl.where(std > 0.0, r * r * gxc / ((N - 1) * tl.where(std > 0.0, std, 1.0)), 0.0)
        else:
            k = r * r * r * gxc / N
        ds = r * (g - tl.math.div_rn(tl.sum(g, axis=1, keep_dims=True), N * 1.0)) - k * xc
        if HAS_DSUM:
            ds += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DSUM + offs, ds.to(DSUM.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            dx = tl.where(keep, ds / (1.0 - dropout_p), 0.0)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xc * r
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0, keep_dims=True), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0, keep_dims=True), mask=col_ok)


def layer_norm_fwd(x, weight, bias, eps, residual=None, unbiased=False, dropout_p=0.0, seed=None,
                   config=None, validate=True, store_sum=None, stats=None):
    """Launch the forward. x, residual [..., N] contiguous; weight [N], bias [N] or None (a
    bias-free LayerNorm, y = w * xhat); seed int64 [>= 1] (the
    seed at element 0) when dropout_p > 0. Returns (y, s, mean, rstd): y [..., N] in the dtype of x
    (+ residual), s the pre-norm sum [..., N] (shape [0] when neither residual nor dropout), mean and
    rstd fp32 [...].
    config (BLOCK_M, BLOCK_N, num_warps) overrides ln_settings (tests); validate=False skips the
    input checks (fastbert.ops has run them already).
    For a forward with no backward (the fused block without autograd): store_sum=False leaves s
    unwritten even with a residual or dropout (returned as None); stats (mean, rstd), contiguous fp32 tensors
    of at least one element per row, are written instead of new ones (the same tensor twice: a
    scratch buffer, when the statistics are not read).
    """
    if validate:
        check_inputs(x, weight, bias, residual, "bert_pytorch" if unbiased else "standard", dropout_p)
    has_dropout = dropout_p > 0.0
    if has_dropout and (seed is None or seed.numel() < 1):
        raise ValueError("layer_norm: dropout_p > 0 needs an int64 seed tensor (seed at element 0)")
    n = x.shape[-1]
    m = x.numel() // n
    out_dtype = x.dtype if residual is None or residual.dtype == x.dtype else \
        torch.promote_types(x.dtype, residual.dtype)
    placeholder = store_sum is None  # s is a [0] tensor when not stored (None when store_sum=False)
    if store_sum is None:
        store_sum = residual is not None or has_dropout
    _alloc = allocator()  # NaN-poisoned outputs under FASTBERT_POISON=1
    if out_dtype == x.dtype and x.is_contiguous():
        y = _alloc.like(x)
        s = _alloc.like(x) if store_sum else None
    else:
        y = _alloc(x.shape, out_dtype, x.device)
        s = _alloc(x.shape, out_dtype, x.device) if store_sum else None
    if s is None and placeholder:
        s = _alloc((0,), out_dtype, x.device)
    if stats is None:
        mean = _alloc(x.shape[:-1], torch.float32, x.device)
        rstd = _alloc(x.shape[:-1], torch.float32, x.device)
    else:
        mean, rstd = stats
    if m == 0:
        return y, s, mean, rstd
    block_m, block_n, warps = config or ln_settings(n, x.device)
    _ln_fwd_kernel[(cdiv(m, block_m),)](
        x, x if residual is None else residual, weight, weight if bias is None else bias, y,
        s if store_sum else y, mean, rstd, seed if has_dropout else mean, m, n, float(eps), float(dropout_p),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=has_dropout, STORE_SUM=store_sum, UNBIASED=bool(unbiased), HAS_BIAS=bias is not None,
        num_warps=warps,
    )
    return y, s, mean, rstd


def layer_norm_bwd(dy, dsum_out, s, weight, mean, rstd, unbiased=False, dropout_p=0.0, seed=None,
                   config=None, programs=None, bias_dtype=None, has_bias=True):
    """Launch the backward. dy [..., N]; dsum_out [..., N] or None (gradient of the sum output);
    s [..., N] the saved pre-norm sum (dropout(x) + residual); weight [N]; mean, rstd fp32 [...].
    Returns (dsum, dx, dweight, dbias): dsum [..., N] in s's dtype, dx [..., N] (shape [0] unless
    dropout_p > 0), dweight [N] in weight's dtype and dbias [N] in bias_dtype (default: weight's), or
    None when has_bias is False (the forward ran without a bias: no dB is accumulated).
    config and programs (the number G of backward programs) override the defaults (tests, tuning).
    """
    bias_dtype = bias_dtype or weight.dtype
    n = s.shape[-1]
    m = s.numel() // n
    dy = dy.contiguous()
    if dsum_out is not None:
        dsum_out = dsum_out.contiguous()
    has_dropout = dropout_p > 0.0
    _alloc = allocator()
    if s.is_contiguous():
        dsum = _alloc.like(s)
        dx = _alloc.like(s) if has_dropout else _alloc((0,), s.dtype, s.device)
    else:
        dsum = _alloc(s.shape, s.dtype, s.device)
        dx = _alloc(s.shape if has_dropout else (0,), s.dtype, s.device)
    if m == 0:
        return (dsum, dx, torch.zeros(n, dtype=weight.dtype, device=weight.device),
                torch.zeros(n, dtype=bias_dtype, device=weight.device) if has_bias else None)
    block_m, block_n, warps = config or ln_settings(n, s.device)
    g = programs or bwd_programs(cdiv(m, block_m), s.device, warps)
    rows_per_program = cdiv(cdiv(m, g), block_m) * block_m
    g = cdiv(m, rows_per_program)
    if has_bias:
        part = _alloc((2, g, n), torch.float32, s.device)  # dW, dB partial sums
        dw_part, db_part = part.unbind(0)
    else:
        part = dw_part = db_part = _alloc((g, n), torch.float32, s.device)  # dW partial sums only
    _ln_bwd_kernel[(g,)](
        dy, dy if dsum_out is None else dsum_out, s, weight, mean, rstd, dsum,
        dx if has_dropout else dsum, dw_part, db_part, seed if has_dropout else mean,
        m, n, rows_per_program, float(dropout_p),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_DSUM=dsum_out is not None,
        HAS_DROPOUT=has_dropout, UNBIASED=bool(unbiased), HAS_BIAS=bool(has_bias), num_warps=warps,
    )
    # second, deterministic reduction over the G partial rows, cast to the parameters' dtypes
    like_w = weight.is_contiguous()
    dw = _alloc.like(weight) if like_w else _alloc((n,), weight.dtype, s.device)
    if not has_bias:
        return dsum, dx, column_sums(part, dw), None
    db = _alloc.like(weight) if like_w and bias_dtype == weight.dtype else _alloc((n,), bias_dtype, s.device)
    dw, db = column_sums(part, dw, db)
    return dsum, dx, dw, db
