"""Fused bias + GELU: out = gelu(x + bias), forward and backward Triton kernels and their launchers.

Shapes: x is viewed as M rows of N features (x [..., N] -> [M, N], contiguous), bias [N].
Both kernels work on [BLOCK_M, BLOCK_N] tiles; the bias tile is loaded once per tile and broadcast.

GELU forms (z = x + bias, computed in fp32 whatever the storage dtype; low-precision loads are
upcast first, which is also the only way bf16 arithmetic is right in the Triton interpreter):
  "none" (exact):  gelu(z) = z * Phi(z),  Phi(z) = (1 + erf(z / sqrt(2))) / 2
                   gelu'(z) = Phi(z) + z * phi(z),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
  "tanh":          gelu(z) = z * (1 + t) / 2,  t = tanh(u),  u = c (z + a z^3),
                   c = sqrt(2 / pi), a = 0.044715
                   gelu'(z) = (1 + t) / 2 + z (1 - t^2) c (1 + 3 a z^2) / 2
erf and tanh are written out here from exp and polynomials (no libdevice), so the same code runs
compiled and in the interpreter, which has no libdevice:
  erf(x), |x| < 1:  x * P(x^2), P of degree 6
  erf(x), |x| >= 1: 1 - exp(Q(min(|x|, 4) - 2.5)), Q of degree 8 fitting log(erfc) on [1, 4]
                    (erfc(4) = 1.5e-8, below fp32 resolution of 1)
  The coefficients are our own least-squares fits (numpy, Chebyshev-spaced points, against
  math.erf in float64); evaluated in fp32 the max abs error is 1.5e-7 over the real line.
  tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|), which never overflows.

Dropout (optional, training): out = gelu(z) * keep / (1 - p) with the keep-mask of layer_norm's
kernels (a PCG hash of (seed, row * N + col), so the backward regenerates it from the seed; nothing
is stored); dx = dy * keep / (1 - p) * gelu'(z).

Backward: recomputes z from the saved pre-activation x and the bias (the activation is not
stored), dx = dy * gelu'(z), dbias = sum over rows of dx. dbias is reduced without atomics: the
grid is (G, column tiles); program (g, j) walks row tiles g, g + G, g + 2G, ..., accumulates in an
fp32 [BLOCK_M, BLOCK_N] register tile, and writes one row of a [G, N] partial buffer that a second
small kernel (layer_norm's column sum) sums in a fixed order (deterministic).
"""


import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import dropout_keep, seed_hash

GELU_FORMS = ("none", "tanh")
BLOCK_N_CHOICES = (64, 256)


def gelu_settings(n, device=None):
    """(BLOCK_M, BLOCK_N, num_warps). CUDA: tiles of TILE (kernels/_common.py) elements (16 per
    thread), 64 columns wide for n <= 64 and 256 otherwise (two configs keep the AOT test short).
    Elsewhere (the interpreter, whose cost is ~20 ms per program) big tiles of up to 64 x 1024;
    the kernel code is the same, and tests also run the CUDA configs in the interpreter."""
    if device is not None and torch.device(device).type != "cuda":
        block_n = min(max(C.next_power_of_2(n), 16), 1024)
        return 64, block_n, 4
    block_n = BLOCK_N_CHOICES[0] if n <= BLOCK_N_CHOICES[0] else BLOCK_N_CHOICES[1]
    return C.TILE // block_n, block_n, 4


def gelu_configs():
    """Every (BLOCK_M, BLOCK_N, num_warps) the launchers can pick (the AOT test compiles each)."""
    return [gelu_settings(b) for b in BLOCK_N_CHOICES]


PROGRAMS_PER_SM = 4  # 4 warps x <= 113 registers (AOT table): 4 programs fit on an SM at once
# (the dropout backward at N % 16 != 0 takes up to 157 registers: 3 fit; BERT widths are multiples of 16)


def bwd_programs(row_tiles, col_tiles, device):
    """Row-programs G of the backward: about 4 programs per SM over all column tiles on CUDA."""
    if device.type == "cuda":
        return max(1, min(row_tiles, C.cdiv(PROGRAMS_PER_SM * C.sm_count(device.index or 0), col_tiles)))
    return max(1, min(row_tiles, 4))


def input_check(op, halves):
    """The input check of `op` (bias_gelu, halves=False: x [..., N], bias [N] required; geglu,
    halves=True: x [..., 2F] with 2F even and > 0, bias [2F] or None): check_inputs(x, bias,
    approximate) raising ValueError/TypeError naming the problem before anything reaches Triton.
    A closure, so the check that choose() calls on every op call costs no extra Python frame."""
    what = "the 2F projection features" if halves else "the feature size"

    def check_inputs(x, bias=None, approximate="none"):
        if approximate not in GELU_FORMS:
            raise ValueError(f"{op}: approximate={approximate!r}; expected one of {GELU_FORMS}")
        for name, t in (("x", x), ("bias", bias)):
            if t is None and halves and name == "bias":
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype not in C.FLOAT_DTYPES:
                raise ValueError(f"{op}: {name} has dtype {t.dtype}; the Triton kernel supports float32, "
                                 f"float16 and bfloat16 (integer and float64 inputs are not supported)")
        if x.dim() < 1:
            raise ValueError(f"{op}: x must have at least one dimension ({what})")
        n = x.shape[-1]
        if halves and (n % 2 or n == 0):
            raise ValueError(f"{op}: the last dimension of x {tuple(x.shape)} must be even and > 0 "
                             f"(the concatenated [a, g] projection, 2F features)")
        if not x.is_contiguous():
            raise ValueError(f"{op}: x must be contiguous (shape {tuple(x.shape)}, strides {x.stride()}); "
                             f"call .contiguous() first")
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}; expected ({n},) to match the "
                                 f"last dimension of x {tuple(x.shape)}")
            if not bias.is_contiguous():
                raise ValueError(f"{op}: bias must be contiguous (stride {bias.stride()})")
            if bias.device != x.device:
                raise ValueError(f"{op}: bias is on {bias.device}, x on {x.device}")

    return check_inputs


check_inputs = input_check("bias_gelu", halves=False)


def check_dropout(op, dropout_p, seed):
    """dropout_p in [0, 1), and a seed tensor when dropout_p > 0 (the launchers' validate=True)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p {dropout_p} outside [0, 1)")
    if dropout_p > 0.0 and (not isinstance(seed, torch.Tensor) or seed.numel() < 1):
        raise ValueError(f"{op}: dropout_p > 0 needs an int64 seed tensor (seed at element 0)")


@triton.jit
def _erf(x):
    """erf in fp32 from a polynomial (|x| < 1) and exp of a polynomial (|x| >= 1); abs error 1.5e-7."""
    a = tl.abs(x)
    t = a * a
    p = 7.958780497e-05
    p = p * t - 0.0008041438518
    p = p * t + 0.005191826903
    p = p * t - 0.02685562939
    p = p * t + 0.1128362844
    p = p * t - 0.3761262975
    p = p * t + 1.128379166
    small = a * p
    u = tl.minimum(a, 4.0) - 2.5
    q = 1.618346293e-06
    q = q * u - 1.330280833e-05
    q = q * u + 7.737613864e-05
    q = q * u - 0.0004201689786
    q = q * u + 0.002165184389
    q = q * u - 0.0108584916
    q = q * u - 0.9438936502
    q = q * u - 5.352680688
    q = q * u - 7.806815276
    large = 1.0 - tl.exp(q)
    r = tl.where(a < 1.0, small, large)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def _tanh(u):
    """tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) in (0, 1]: no overflow."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _gelu(z, TANH: tl.constexpr):
    if TANH:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        return 0.5 * z * (1.0 + t)
    else:
        return 0.5 * z * (1.0 + _erf(z * 0.7071067811865476))


@triton.jit
def _gelu_and_grad(z, TANH: tl.constexpr):
    """(gelu(z), gelu'(z)) sharing one erf (or tanh) evaluation (geglu's backward needs both; bias+GELU's
    uses gelu' only, and the compiler drops the unused gelu)."""
    if TANH:
        # 1 - t^2 = 4 e / (1 + e)^2 with e = exp(-2|u|): no cancellation where |t| is close to 1
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(u < 0.0, -t, t)
        sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
        grad = 0.5 * (1.0 + t) + 0.5 * z * sech2 * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return 0.5 * z * (1.0 + t), grad
    else:
        cdf = 0.5 * (1.0 + _erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@triton.jit
def _masks(rows, cols, M, N):
    """(cols < N, the [rows, cols] tile's in-bounds mask) of a tile of an [M, N] array."""
    col_ok = cols < N
    return col_ok, (rows < M)[:, None] & col_ok[None, :]


@triton.jit
def _dropped(v, seed, offs, dropout_p):
    """v * keep / (1 - p), keep the dropout mask of element indices offs under the hashed seed: the
    forward's dropout and, on dy, the backward's (the same mask, regenerated)."""
    return tl.where(dropout_keep(seed, offs, dropout_p), v / (1.0 - dropout_p), 0.0)


@triton.jit
def _store_output(OUT, offs, y, mask, SEED, dropout_p, HAS_DROPOUT: tl.constexpr):
    """The forward's end: y dropped out (seed at SEED[0]) when HAS_DROPOUT, stored in OUT's dtype."""
    if HAS_DROPOUT:
        y = _dropped(y, seed_hash(SEED), offs, dropout_p)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # [M, N] pre-activation without bias
    B,  # [N] bias
    OUT,  # [M, N] gelu(x + bias), dropped out when HAS_DROPOUT
    SEED,  # int64 dropout seed at SEED[0] (read when HAS_DROPOUT)
    M, N, dropout_p,  # rows, features, dropout probability
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok, mask = _masks(rows, cols, M, N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    _store_output(OUT, offs, _gelu(z, TANH), mask, SEED, dropout_p, HAS_DROPOUT)


@triton.jit
def _bwd_program(SEED, N, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """A backward program's start: (its row-program index, the number G of row programs, its columns,
    cols < N, the hashed dropout seed, computed once outside the row loop; 0 without dropout)."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = seed_hash(SEED) if HAS_DROPOUT else 0
    return tl.program_id(0), tl.num_programs(0), cols, cols < N, seed


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # [M, N] gradient of the output
    X,  # [M, N] saved pre-activation without bias
    B,  # [N] bias
    DX,  # [M, N] out: dy * gelu'(x + bias)
    DB_PART,  # [G, N] fp32 out: per-row-program partial sums of dx
    SEED,  # int64 dropout seed at SEED[0] (read when HAS_DROPOUT)
    M, N, dropout_p,  # rows, features, dropout probability (as in the forward)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    pid, g_programs, cols, col_ok, seed = _bwd_program(SEED, N, BLOCK_N, HAS_DROPOUT)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), g_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        _, mask = _masks(rows, cols, M, N)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:  # the forward's mask, regenerated from the seed
            dy = _dropped(dy, seed, offs, dropout_p)
        _, grad = _gelu_and_grad(z, TANH)
        dx = tl.where(mask, dy * grad, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        acc += dx
    tl.store(DB_PART + pid * N + cols, tl.sum(acc, axis=0), mask=col_ok)


def bias_gelu_fwd(x, bias, approximate="none", config=None, validate=True, dropout_p=0.0, seed=None):
    """Launch the forward. x [..., N] contiguous, bias [N]. Returns gelu(x + bias) [..., N] in x's dtype,
    dropped out with probability dropout_p (seed: int64 [>= 1] on x's device, the seed at element 0,
    needed when dropout_p > 0).
    config (BLOCK_M, BLOCK_N, num_warps) overrides gelu_settings (tests); validate=False skips the
    input checks (fastbert.ops has run them already)."""
    if validate:
        check_inputs(x, bias, approximate)
        check_dropout("bias_gelu", dropout_p, seed)
    n = x.shape[-1]
    m = x.numel() // max(n, 1)
    _alloc = C.allocator()  # NaN-poisoned outputs under FASTBERT_POISON=1
    out = _alloc.like(x) if x.is_contiguous() else _alloc(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return out
    block_m, block_n, warps = config or gelu_settings(n, x.device)
    grid = (C.cdiv(m, block_m), C.cdiv(n, block_n))
    has_dropout = dropout_p > 0.0
    _bias_gelu_fwd_kernel[grid](x, bias, out, seed if has_dropout else bias, m, n, float(dropout_p),
                                BLOCK_M=block_m, BLOCK_N=block_n, TANH=approximate == "tanh",
                                HAS_DROPOUT=has_dropout, num_warps=warps)
    return out


def bias_gelu_bwd(dy, x, bias, approximate="none", config=None, programs=None, dropout_p=0.0, seed=None):
    """Launch the backward. dy, x [..., N]; bias [N]; dropout_p and seed as in the forward.
    Returns (dx [..., N] in x's dtype, dbias [N] in bias's dtype)."""
    n = x.shape[-1]
    m = x.numel() // max(n, 1)
    dy = dy.contiguous()
    _alloc = C.allocator()
    dx = _alloc.like(x) if x.is_contiguous() else _alloc(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return dx, torch.zeros(n, dtype=bias.dtype, device=bias.device)
    block_m, block_n, warps = config or gelu_settings(n, x.device)
    col_tiles = C.cdiv(n, block_n)
    g = programs or bwd_programs(C.cdiv(m, block_m), col_tiles, x.device)
    db_part = _alloc((g, n), torch.float32, x.device)
    has_dropout = dropout_p > 0.0
    _bias_gelu_bwd_kernel[(g, col_tiles)](dy, x, bias, dx, db_part, seed if has_dropout else bias, m, n,
                                          float(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n,
                                          TANH=approximate == "tanh", HAS_DROPOUT=has_dropout,
                                          num_warps=warps)
    # second, deterministic reduction of the G partial rows (fixed order), cast to bias's dtype
    db = _alloc.like(bias) if bias.is_contiguous() else _alloc((n,), bias.dtype, x.device)
    return dx, C.column_sums(db_part, db)
