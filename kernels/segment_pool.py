"""Pooling of a varlen batch: the mean or the max of each sequence's token vectors, forward and backward.

Layout: x [T, N] packed tokens (row stride free, unit over N), cu_seqlens int32 [B+1]: sequence b is
rows cu_seqlens[b] .. cu_seqlens[b+1] - 1 (the layout fastbert's unpadded encoder and transformers'
DataCollatorWithFlattening use). Output [B, N] in x's dtype, contiguous.
Math, per sequence b of n_b tokens and column j (fp32 accumulation):
  mean  y[b, j] = (1 / n_b) sum_t x[t, j]      dx[t, j] = dy[b, j] / n_b for every t of b
  max   y[b, j] = max_t x[t, j], c[b, j] rows   dx[t, j] = dy[b, j] / c[b, j] where x[t, j] == y[b, j],
        hold it                                  else 0 (tied maxima share the gradient, as torch's amax)
An empty sequence gives 0 (mean) or -inf (max), as sentence-transformers' flattened pooling does,
and no gradient. The CLS token (row cu_seqlens[b]) is a plain gather (fastbert.ops.segment_pool does
it with index_select).

Grid: (B, cdiv(N, BLOCK_N)); a program walks its sequence's rows BLOCK_T at a time for BLOCK_N
columns: the forward accumulates (the sum, or the max and its count), the backward writes every row
of the sequence (dy / n_b, or dy / c where the row holds the max, reading x again).
"""

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, allocator, cdiv

MODE_MEAN, MODE_MAX = 0, 1
MODES = {"mean": MODE_MEAN, "max": MODE_MAX}


def segment_pool_settings(device=None):
    """(BLOCK_T, BLOCK_N, num_warps): a [32, 128] tile on CUDA; [64, 128] in the interpreter."""
    cuda = device is None or getattr(device, "type", device) == "cuda"
    return (32, 128, 4) if cuda else (64, 128, 4)


def segment_pool_configs():
    """(BLOCK_T, BLOCK_N, num_warps) the AOT test compiles: the CUDA tile."""
    return [segment_pool_settings()]


def _fail(msg):
    raise ValueError(f"fastbert segment_pool: {msg}")


def check_inputs(x, cu_seqlens, mode="mean"):
    """Raise ValueError/TypeError naming the problem before anything reaches Triton."""
    if not isinstance(x, torch.Tensor) or not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError("fastbert segment_pool: x and cu_seqlens must be tensors")
    if mode not in MODES:
        _fail(f"mode {mode!r}; the kernel pools {tuple(MODES)} (cls is a gather)")
    if x.dim() != 2:
        _fail(f"x must be [T, N], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastbert segment_pool: x must be fp32/fp16/bf16, got {x.dtype}")
    if x.stride(1) != 1:
        _fail("x must be contiguous over N")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        _fail(f"cu_seqlens must be int32 [B+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != x.device:
        _fail(f"cu_seqlens on {cu_seqlens.device}, x on {x.device}")


@triton.jit
def _program_segment(CU, N, BLOCK_N: tl.constexpr):
    """(sequence b, its BLOCK_N columns, their in-range mask, first row, end row) of this program."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return b, cols, cols < N, tl.load(CU + b), tl.load(CU + b + 1)


@triton.jit
def _segment_pool_fwd_kernel(
    X,  # [T, N] (row stride sxt, unit over N)
    Y,  # [B, N] contiguous: the pooled vectors
    COUNT,  # [B, N] fp32: how many rows hold each maximum (MODE 1)
    CU,  # int32 [B+1]
    sxt, N,
    MODE: tl.constexpr,  # 0 mean, 1 max
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, cols, col_ok, start, end = _program_segment(CU, N, BLOCK_N)
    if MODE == 0:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        count = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < end)[:, None] & col_ok[None, :]
        ptrs = X + rows.to(tl.int64)[:, None] * sxt + cols[None, :]
        if MODE == 0:
            acc += tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), axis=0)
        else:
            tile = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
            tile_max = tl.max(tile, axis=0)
            ties = tl.sum(((tile == tile_max[None, :]) & mask).to(tl.float32), axis=0)
            count = tl.where(tile_max > acc, ties, tl.where(tile_max == acc, count + ties, count))
            acc = tl.maximum(acc, tile_max)
    if MODE == 0:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    else:
        tl.store(COUNT + b * N + cols, count, mask=col_ok)
    tl.store(Y + b * N + cols, acc.to(Y.dtype.element_ty), mask=col_ok)


@triton.jit
def _segment_pool_bwd_kernel(
    DY,  # [B, N] contiguous: the pooled vectors' gradient
    DX,  # [T, N] contiguous, zeroed: every row of a sequence written
    X,  # [T, N] (row stride sxt) the input (MODE 1)
    Y,  # [B, N] contiguous: the maxima (MODE 1)
    COUNT,  # [B, N] fp32 (MODE 1)
    CU,  # int32 [B+1]
    sxt, N,
    MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, cols, col_ok, start, end = _program_segment(CU, N, BLOCK_N)
    dy = tl.load(DY + b * N + cols, mask=col_ok, other=0.0).to(tl.float32)
    if MODE == 0:
        g = dy / tl.maximum(end - start, 1).to(tl.float32)
    else:
        y = tl.load(Y + b * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        g = dy / tl.maximum(tl.load(COUNT + b * N + cols, mask=col_ok, other=1.0), 1.0)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask = (rows < end)[:, None] & col_ok[None, :]
        if MODE == 0:
            tile = tl.broadcast_to(g[None, :], (BLOCK_T, BLOCK_N))
        else:
            x = tl.load(X + rows.to(tl.int64)[:, None] * sxt + cols[None, :], mask=mask, other=0.0)
            tile = tl.where(x.to(tl.float32) == y[None, :], g[None, :], 0.0)
        tl.store(DX + rows.to(tl.int64)[:, None] * N + cols[None, :], tile.to(DX.dtype.element_ty), mask=mask)


def segment_pool_fwd(x, cu_seqlens, mode):
    """(y [B, N], count [B, N] fp32: the rows holding each maximum (max), an empty tensor (mean));
    inputs checked (check_inputs)."""
    batch, n = cu_seqlens.numel() - 1, x.shape[1]
    alloc = allocator()
    y = alloc((batch, n), x.dtype, x.device)
    code = MODES[mode]
    count = (alloc((batch, n), torch.float32, x.device) if code == MODE_MAX
             else torch.empty(0, dtype=torch.float32, device=x.device))
    if batch == 0 or n == 0:
        return y, count
    block_t, block_n, warps = segment_pool_settings(x.device)
    _segment_pool_fwd_kernel[(batch, cdiv(n, block_n))](
        x, y, count if code == MODE_MAX else y, cu_seqlens, x.stride(0), n,
        MODE=code, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=warps)
    return y, count


def segment_pool_bwd(dy, x, y, count, cu_seqlens, mode):
    """dx [T, N] (x's shape) from dy [B, N]; x, y, count: the forward's input and outputs (max)."""
    dy = dy.contiguous()
    batch, n = dy.shape
    code = MODES[mode]
    total = x.shape[0]
    # zeros: rows past cu_seqlens[-1] belong to no sequence and no program writes them (zero-filling
    # costs no host sync, where checking cu_seqlens[-1] == T would)
    dx = torch.zeros((total, n), dtype=dy.dtype, device=dy.device)
    if batch == 0 or n == 0 or total == 0:
        return dx
    block_t, block_n, warps = segment_pool_settings(dy.device)
    _segment_pool_bwd_kernel[(batch, cdiv(n, block_n))](
        dy, dx, x, y if code == MODE_MAX else dy, count if code == MODE_MAX else dy, cu_seqlens,
        x.stride(0), n, MODE=code, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=warps)
    return dx

