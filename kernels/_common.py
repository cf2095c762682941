"""Helpers shared by the kernel files: host-side integer math and output allocation, dtype lists and
tile sizes, the device's SM count, the element-wise dropout hash, and the deterministic column sum.

Host side. A BERT-base training step makes hundreds of launcher calls, so their host cost matters at
BERT sizes (a kernel takes tens of microseconds): cdiv / next_power_of_2 replace triton.cdiv /
triton.next_power_of_2 (about 6 us per call in triton 3.9, where they are constexpr functions).
"""

import functools

import torch
import triton
import triton.language as tl

from fastbert._env import getenv

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the row-wise kernels load
TILE = 2048  # elements per program of the row-wise kernels on CUDA


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _nan_like(t):
    return torch.full_like(t, float("nan"))


_empty.like = torch.empty_like  # about 1 us per call against 2.5 for torch.empty(shape, dtype=, device=)
_nan.like = _nan_like


def allocator():
    """The output allocator for one launcher call: torch.empty, or NaN-filled tensors when
    FASTBERT_POISON=1 (tests: an element a kernel fails to write then shows as NaN). The variable
    is read once per call, not once per tensor. alloc(shape, dtype, device), or alloc.like(t) for a
    tensor of t's shape, dtype and device (t contiguous: the result is too)."""
    return _nan if getenv("FASTBERT_POISON", "0") == "1" else _empty


@functools.cache
def sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


# ------------------------------------------------------------------------------------------------
# dropout of the row-wise kernels (LayerNorm, bias+GELU)
# ------------------------------------------------------------------------------------------------
@triton.jit
def pcg(h):
    """The PCG output permutation of a uint32 (Jarzynski and Olano, "Hash Functions for GPU
    Rendering", JCGT 2020); all constants fit in int32, so the arithmetic stays uint32 (wrapping)
    compiled and in the interpreter."""
    h = h * 747796405 + 1442695041
    h = ((h >> ((h >> 28) + 4)) ^ h) * 277803737
    return (h >> 22) ^ h


@triton.jit
def seed_hash(SEED):
    """pcg of the int64 dropout seed at SEED [1] (drawn on the device, see fastbert.ops._rng)."""
    return pcg(tl.load(SEED).to(tl.uint32))


@triton.jit
def dropout_keep(seed_h, idx, dropout_p):
    """Dropout keep-mask of element idx: pcg(idx ^ seed_h) with seed_h = seed_hash(SEED), computed
    once per program; the top 24 bits as a uniform in [0, 1). A few integer ops per element, lighter
    than philox (tl.rand); forward and backward draw the same bits for the same (seed, idx).
    tests/test_dropout_stats.py checks the masks' statistics across seeds, rows and columns."""
    h = pcg(idx.to(tl.uint32) ^ seed_h)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0) >= dropout_p


# ------------------------------------------------------------------------------------------------
# deterministic column sums (second stage of the dW / dB / dbias reductions)
# ------------------------------------------------------------------------------------------------
@triton.jit
def column_sum_kernel(
    PART,  # [P, G, N] fp32: P planes (1 or 2) of G partial rows
    OUT0,  # [N] sum of plane 0, in its output dtype
    OUT1,  # [N] sum of plane 1 (written when the grid has 2 planes)
    G,
    N,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """OUT_p[c] = sum_g PART[p, g, c], in a fixed order (the same result run to run)."""
    plane = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    col_ok = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    base = PART + plane * G * N
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)[:, None]  # [BLOCK_G, 1]
        acc += tl.load(base + g * N + cols, mask=(g < G) & col_ok, other=0.0)
    total = tl.sum(acc, axis=0, keep_dims=True)
    if plane == 0:
        tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=col_ok)
    else:
        tl.store(OUT1 + cols, total.to(OUT1.dtype.element_ty), mask=col_ok)


COLSUM_CONFIG = (32, 128, 4)  # BLOCK_G, BLOCK_C, num_warps


def column_sums(part, out0, out1=None):
    """out0[c] = part[0].sum(0)[c] and out1[c] = part[1].sum(0)[c] for part [2, G, N] fp32, or
    out0[c] = part.sum(0)[c] for part [G, N] (out1 None); fp32 accumulation in a fixed order."""
    planes = 1 if part.dim() == 2 else part.shape[0]
    g, n = part.shape[-2:]
    block_g, block_c, warps = COLSUM_CONFIG
    column_sum_kernel[(cdiv(n, block_c), planes)](part, out0, out0 if out1 is None else out1, g, n,
                                                  BLOCK_G=block_g, BLOCK_C=block_c, num_warps=warps)
    return out0 if out1 is None else (out0, out1)
