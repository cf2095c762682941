"""Fused GeGLU: out = dropout(gelu(a) * g) with a, g the two halves of one [..., 2F] projection.

Shapes: x [..., 2F] contiguous is viewed as M rows of 2F features (x [..., 2F] -> [M, 2F]); the first
F columns of a row are a, the last F are g (torch.chunk(2, dim=-1) of the projection, as ModernBERT's
Wi); bias [2F] optional (added to both halves before the split); out [..., F] -> [M, F].
Both kernels work on [BLOCK_M, BLOCK_N] tiles of the [M, F] output: one tile of a and the matching
tile of g (F columns further along the row) per program.

Math (everything in fp32 whatever the storage dtype: low-precision loads are upcast first, which is
also the only way bf16 arithmetic is right in the Triton interpreter):
  a = x[:, :F] + bias[:F],  g = x[:, F:] + bias[F:]
  y = gelu(a) * g,  GELU exact (erf) or tanh: kernels/bias_gelu.py's _gelu and _gelu_and_grad (the
      polynomial erf and the overflow-free tanh, no libdevice, so the interpreter runs the same code)
  out = y * keep / (1 - p)   (dropout, training), keep from the hash of layer_norm's and bias_gelu's
      kernels (kernels/_common.dropout_keep) at the output element index row * F + col, regenerated
      in the backward from the seed (int64 at SEED[0], drawn on the device): nothing is stored.

Backward (derivation): with dy' = dy * keep / (1 - p) (the forward's mask),
  d out / d a = gelu'(a) * g   ->  da = dy' * g * gelu'(a)
  d out / d g = gelu(a)        ->  dg = dy' * gelu(a)
  dx = [da, dg] (the [M, 2F] layout of x), dbias = sum over rows of dx (when there is a bias).
The backward recomputes a and g from the saved x and bias (the activation is not stored). dbias is
reduced without atomics as bias_gelu's: the grid is (G, column tiles); program (p, j) walks row
tiles p, p + G, ..., accumulates the da and dg tiles in fp32 registers and writes row p of a
[G, 2F] partial buffer (columns j*BLOCK_N.. and F + j*BLOCK_N..), summed in a fixed order by
_common.column_sums (deterministic).
"""

import torch
import triton
import triton.language as tl

from . import _common as C
from .bias_gelu import (  # the GELU math and the checks, shared with bias+GELU
    GELU_FORMS,
    _bwd_program,
    _dropped,
    _gelu,
    _gelu_and_grad,
    _masks,
    _store_output,
    bwd_programs,
    check_dropout,
    gelu_configs,
    gelu_settings,
    input_check,
)

__all__ = ["GELU_FORMS", "check_inputs", "geglu_bwd", "geglu_configs", "geglu_fwd", "geglu_settings"]


def geglu_settings(f, device=None):
    """(BLOCK_M, BLOCK_N, num_warps) for F output features: bias_gelu's tiles (kernels/bias_gelu.py
    gelu_settings), since a GeGLU tile reads two input tiles and writes one as bias+GELU reads one."""
    return gelu_settings(f, device)


def geglu_configs():
    """Every (BLOCK_M, BLOCK_N, num_warps) the launchers can pick on CUDA (the AOT test compiles each)."""
    return gelu_configs()


check_inputs = input_check("geglu", halves=True)


@triton.jit
def _geglu_fwd_kernel(
    X,  # [M, 2F] projection: a in columns [0, F), g in [F, 2F)
    B,  # [2F] bias (read when HAS_BIAS)
    OUT,  # [M, F] gelu(a) * g, dropped out when HAS_DROPOUT
    SEED,  # int64 dropout seed at SEED[0] (read when HAS_DROPOUT)
    M, F, dropout_p,  # rows, output features (half of x's row), dropout probability
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok, mask = _masks(rows, cols, M, F)
    r64 = rows.to(tl.int64)[:, None]
    a_offs = r64 * (2 * F) + cols[None, :]  # [BM, BN] into X
    a = tl.load(X + a_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + a_offs + F, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        g += tl.load(B + F + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = _gelu(a, TANH) * g
    o_offs = r64 * F + cols[None, :]  # [BM, BN] into OUT
    _store_output(OUT, o_offs, y, mask, SEED, dropout_p, HAS_DROPOUT)


@triton.jit
def _geglu_bwd_kernel(
    DY,  # [M, F] gradient of the output
    X,  # [M, 2F] saved projection
    B,  # [2F] bias (read when HAS_BIAS)
    DX,  # [M, 2F] out: [da, dg]
    DB_PART,  # [G, 2F] fp32 out: per-row-program partial sums of dx (written when HAS_BIAS)
    SEED,  # int64 dropout seed at SEED[0] (read when HAS_DROPOUT)
    M, F, dropout_p,  # rows, output features, dropout probability (as in the forward)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    pid, g_programs, cols, col_ok, seed = _bwd_program(SEED, F, BLOCK_N, HAS_DROPOUT)
    if HAS_BIAS:
        ba = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        bg = tl.load(B + F + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), g_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        _, mask = _masks(rows, cols, M, F)
        r64 = rows.to(tl.int64)[:, None]
        a_offs = r64 * (2 * F) + cols[None, :]
        o_offs = r64 * F + cols[None, :]
        a = tl.load(X + a_offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(X + a_offs + F, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            a += ba[None, :]
            g += bg[None, :]
        dy = tl.load(DY + o_offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:  # the forward's mask, regenerated from the seed
            dy = _dropped(dy, seed, o_offs, dropout_p)
        act, act_grad = _gelu_and_grad(a, TANH)
        da = tl.where(mask, dy * g * act_grad, 0.0)
        dg = tl.where(mask, dy * act, 0.0)
        tl.store(DX + a_offs, da.to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + a_offs + F, dg.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc_a += da
            acc_g += dg
    if HAS_BIAS:
        part = DB_PART + pid.to(tl.int64) * (2 * F)
        tl.store(part + cols, tl.sum(acc_a, axis=0), mask=col_ok)
        tl.store(part + F + cols, tl.sum(acc_g, axis=0), mask=col_ok)


def geglu_fwd(x, bias=None, approximate="none", config=None, validate=True, dropout_p=0.0, seed=None):
    """Launch the forward. x [..., 2F] contiguous, bias [2F] or None. Returns dropout(gelu(a) * g)
    [..., F] in x's dtype (seed: int64 [>= 1] on x's device, the seed at element 0, needed when
    dropout_p > 0). config (BLOCK_M, BLOCK_N, num_warps) overrides geglu_settings (tests);
    validate=False skips the input checks (fastbert.ops has run them already)."""
    if validate:
        check_inputs(x, bias, approximate)
        check_dropout("geglu", dropout_p, seed)
    f = x.shape[-1] // 2
    m = x.numel() // max(2 * f, 1)
    out = C.allocator()((*x.shape[:-1], f), x.dtype, x.device)  # NaN-poisoned under FASTBERT_POISON=1
    if out.numel() == 0:
        return out
    block_m, block_n, warps = config or geglu_settings(f, x.device)
    grid = (C.cdiv(m, block_m), C.cdiv(f, block_n))
    has_dropout = dropout_p > 0.0
    _geglu_fwd_kernel[grid](x, x if bias is None else bias, out, seed if has_dropout else x, m, f,
                            float(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n, TANH=approximate == "tanh",
                            HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, num_warps=warps)
    return out


def geglu_bwd(dy, x, bias=None, approximate="none", config=None, programs=None, dropout_p=0.0, seed=None):
    """Launch the backward. dy [..., F]; x [..., 2F] the saved projection; bias [2F] or None; dropout_p
    and seed as in the forward. Returns (dx [..., 2F] in x's dtype, dbias [2F] in bias's dtype, or
    None without a bias). programs: the number G of row programs (tests, tuning)."""
    f = x.shape[-1] // 2
    m = x.numel() // max(2 * f, 1)
    dy = dy.contiguous()
    alloc = C.allocator()
    dx = alloc.like(x) if x.is_contiguous() else alloc(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return dx, None if bias is None else torch.zeros_like(bias)
    block_m, block_n, warps = config or geglu_settings(f, x.device)
    col_tiles = C.cdiv(f, block_n)
    g = programs or bwd_programs(C.cdiv(m, block_m), col_tiles, x.device)
    db_part = alloc((g, 2 * f), torch.float32, x.device) if bias is not None else dx
    has_dropout = dropout_p > 0.0
    _geglu_bwd_kernel[(g, col_tiles)](dy, x, x if bias is None else bias, dx, db_part,
                                      seed if has_dropout else x, m, f, float(dropout_p),
                                      BLOCK_M=block_m, BLOCK_N=block_n, TANH=approximate == "tanh",
                                      HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, num_warps=warps)
    if bias is None:
        return dx, None
    # second, deterministic reduction of the G partial rows (fixed order), cast to bias's dtype
    db = alloc.like(bias) if bias.is_contiguous() else alloc((2 * f,), bias.dtype, x.device)
    return dx, C.column_sums(db_part, db)
