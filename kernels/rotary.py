"""Rotary position embeddings (RoPE) on the packed QKV projection: one kernel rotates Q and K and
copies V, forward and backward.

Layouts (the head dim contiguous; token, q/k/v and head strides free, so views of a linear's output
are read without copies; the output is a new tensor of the input's shape, contiguous):
  varlen  qkv [T, 3, H, D]      packed tokens, cu_seqlens int32 [B+1]: token cu_seqlens[b] + i of
                                sequence b has position i (positions restart at 0 in every sequence)
  padded  qkv [B, S, 3, H, D]   token s of every sequence has position s
  cos, sin [P, R/2]             tables of cos(p * f_j) and sin(p * f_j) for positions p < P and the
                                R/2 frequencies f_j (R = rotary dim <= D, even; fastbert.ops.rotary
                                builds them, transformers' ModernBERT uses f_j = theta^(-2j/R))
Math (the half-split layout of transformers' rotate_half, as ModernBERT, Llama, GPT-NeoX): with
x1 = x[:R/2], x2 = x[R/2:R] of one head of q or k at position p, c = cos[p], s = sin[p],
  out1 = x1 c - x2 s,   out2 = x2 c + x1 s,   out[R:] = x[R:] (dims past the rotary dim pass through)
which is x * cat(c, c) + rotate_half(x) * cat(s, s), rotate_half(x) = cat(-x2, x1). V is copied.
Backward: each (x1_j, x2_j) pair is rotated by the angle p f_j, an orthogonal map, so the input
gradient is the output gradient rotated back by the same angle (the transpose):
  dx1 = dy1 c + dy2 s,   dx2 = dy2 c - dy1 s   (= the forward with s -> -s, CONJ); dV = dY_V.
cos and sin are constants (buffers, as in transformers): they get no gradient.
Arithmetic in fp32 (loads upcast, which the interpreter also needs for bf16), stored in qkv's dtype.

Grid: (cdiv(max_seqlen, BLOCK_T), B, H); a program rotates BLOCK_T tokens of one sequence and head,
for q, k and v in turn, loading the cos/sin rows of its positions once.
"""


import torch
import triton
import triton.language as tl

from fastbert._env import getenv

from ._common import FLOAT_DTYPES, allocator, cdiv, next_power_of_2

MODE_PADDED, MODE_VARLEN = 0, 2
MAX_HEAD_DIM = 256


def rotary_settings(device=None):
    """(BLOCK_T, num_warps): 32 tokens of one head per program on CUDA (a [32, D] tile for each of q,
    k and v); 64 in the interpreter (fewer programs)."""
    cuda = device is None or getattr(device, "type", device) == "cuda"
    return (32, 4) if cuda else (64, 4)


def rotary_configs():
    """(BLOCK_T, num_warps, HEAD_DIM, ROT_HALF) the AOT test compiles: the CUDA tile at the head dims
    of BERT/ModernBERT (64, full rotary), 128 and a partial rotary dim."""
    block_t, warps = rotary_settings()
    return [(block_t, warps, 64, 32), (block_t, warps, 128, 64), (block_t, warps, 80, 16)]


def _fail(msg):
    raise ValueError(f"fastbert rotary: {msg}")


def check_inputs(qkv, cos, sin, cu_seqlens=None):
    """Raise ValueError/TypeError naming the problem before anything reaches Triton."""
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastbert rotary: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            _fail(f"{name} has dtype {t.dtype}; the Triton kernel supports float32, float16 and bfloat16")
        if t.device != qkv.device:
            _fail(f"{name} is on {t.device}, qkv on {qkv.device}")
    want = 4 if cu_seqlens is not None else 5
    if qkv.dim() != want or qkv.shape[-3] != 3:
        layout = "[T, 3, H, D] with cu_seqlens" if cu_seqlens is not None else "[B, S, 3, H, D]"
        _fail(f"qkv must be {layout}, got {tuple(qkv.shape)}")
    dim = qkv.shape[-1]
    if dim > MAX_HEAD_DIM or dim == 0:
        _fail(f"head_dim {dim} unsupported; expected 1 to {MAX_HEAD_DIM}")
    if cos.dim() != 2 or tuple(cos.shape) != tuple(sin.shape):
        _fail(f"cos and sin must be [P, R/2] tables of one shape, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.shape[1] == 0 or 2 * cos.shape[1] > dim:
        _fail(f"rotary dim 2 * {cos.shape[1]} must be in [2, head_dim {dim}]")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        _fail("cos and sin must be contiguous (one row stride, unit stride over the frequencies)")
    if qkv.stride(-1) != 1:
        _fail(f"qkv's head dim must be contiguous (strides {qkv.stride()})")
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32
                                   or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
        _fail("cu_seqlens must be an int32 tensor [B+1] with B >= 1")


@triton.jit
def _rotary_kernel(
    X,  # [rows, 3, H, D] (strides sxt, sxw, sxh; 1 over D): qkv, or the output gradient (CONJ)
    OUT,  # [rows, 3, H, D] (strides sot, sow, soh; 1): rotated q, k and copied v (or their gradients)
    COS,  # [P, ROT_HALF] cos(p f_j) (row stride scp, unit over j)
    SIN,  # [P, ROT_HALF] sin(p f_j), same strides
    SEQINFO,  # cu_seqlens int32 [B+1] (MODE 2)
    sxt, sxw, sxh, sot, sow, soh, scp,
    SEQ,  # S (MODE 0): sequence b spans rows b * S .. b * S + S - 1
    HEAD_DIM: tl.constexpr,  # D
    ROT_HALF: tl.constexpr,  # R / 2
    BLOCK_R: tl.constexpr,  # next power of two >= ROT_HALF
    BLOCK_D: tl.constexpr,  # next power of two >= D
    MODE: tl.constexpr,  # 0 padded, 2 varlen
    CONJ: tl.constexpr,  # the backward: rotate by -angle
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if MODE == 2:
        start = tl.load(SEQINFO + b)
        n = tl.load(SEQINFO + b + 1) - start
    else:
        start = b * SEQ
        n = SEQ
    if pid_t * BLOCK_T >= n:
        return
    pos = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # positions inside the sequence [BT]
    row_ok = pos < n
    rows = (start + pos).to(tl.int64)[:, None]  # [BT, 1]
    j = tl.arange(0, BLOCK_R)[None, :]  # [1, BR]
    rmask = row_ok[:, None] & (j < ROT_HALF)
    c = tl.load(COS + pos.to(tl.int64)[:, None] * scp + j, mask=rmask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos.to(tl.int64)[:, None] * scp + j, mask=rmask, other=0.0).to(tl.float32)
    if CONJ:
        s = -s
    for w in tl.static_range(2):  # q, then k
        xp = X + rows * sxt + w * sxw + h * sxh
        op = OUT + rows * sot + w * sow + h * soh
        x1 = tl.load(xp + j, mask=rmask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + ROT_HALF + j, mask=rmask, other=0.0).to(tl.float32)
        tl.store(op + j, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=rmask)
        tl.store(op + ROT_HALF + j, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=rmask)
        if 2 * ROT_HALF < HEAD_DIM:  # dims past the rotary dim pass through
            d = tl.arange(0, BLOCK_D)[None, :]
            pmask = row_ok[:, None] & (d >= 2 * ROT_HALF) & (d < HEAD_DIM)
            tl.store(op + d, tl.load(xp + d, mask=pmask).to(OUT.dtype.element_ty), mask=pmask)
    d = tl.arange(0, BLOCK_D)[None, :]  # v: copied
    vmask = row_ok[:, None] & (d < HEAD_DIM)
    v = tl.load(X + rows * sxt + 2 * sxw + h * sxh + d, mask=vmask)
    tl.store(OUT + rows * sot + 2 * sow + h * soh + d, v.to(OUT.dtype.element_ty), mask=vmask)


def _geometry(qkv, cu_seqlens):
    """(mode, batch, rows per sequence in padded mode (0 varlen), the [rows, 3, H, D] strides)."""
    if cu_seqlens is not None:
        return MODE_VARLEN, cu_seqlens.numel() - 1, 0, qkv.stride()[:3]
    batch, seq = qkv.shape[:2]
    if batch > 1 and qkv.stride(0) != seq * qkv.stride(1):
        return None  # B and S do not merge into one row index: the caller makes it contiguous
    return MODE_PADDED, batch, seq, qkv.stride()[1:4]


def _launch(x, cos, sin, cu_seqlens, max_seqlen, conj):
    if _geometry(x, cu_seqlens) is None:
        x = x.contiguous()
    mode, batch, seq, (sxt, sxw, sxh) = _geometry(x, cu_seqlens)
    out = allocator()(x.shape, x.dtype, x.device)  # contiguous; NaN-poisoned under FASTBERT_POISON=1
    if out.numel() == 0 or batch == 0 or max_seqlen == 0:
        return out
    heads, dim = x.shape[-2], x.shape[-1]
    sot, sow, soh = out.stride()[-4:-1]
    block_t, warps = rotary_settings(x.device)
    half = cos.shape[1]
    grid = (cdiv(max_seqlen, block_t), batch, heads)
    _rotary_kernel[grid](x, out, cos, sin, cu_seqlens if cu_seqlens is not None else cos,
                         sxt, sxw, sxh, sot, sow, soh, cos.stride(0), seq,
                         HEAD_DIM=dim, ROT_HALF=half, BLOCK_R=next_power_of_2(half),
                         BLOCK_D=next_power_of_2(dim), MODE=mode, CONJ=conj, BLOCK_T=block_t,
                         num_warps=warps)
    return out


def prepare(qkv, cos, sin, cu_seqlens=None, max_seqlen=None):
    """Check the inputs (check_inputs) and return (cu_seqlens, max_seqlen) for the launchers; the
    varlen lengths are read on the host (one sync) when max_seqlen is None or FASTBERT_ATTN_CHECK=1,
    as fastbert.ops.attention does. Positions must stay below the tables' P rows."""
    check_inputs(qkv, cos, sin, cu_seqlens)
    if cu_seqlens is None:
        seq = qkv.shape[1]
        if max_seqlen is not None and max_seqlen != seq:
            _fail(f"max_seqlen {max_seqlen} != S {seq} in padded mode")
        max_seqlen = seq
    elif max_seqlen is None or getenv("FASTBERT_ATTN_CHECK") == "1":
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        first, last, min_len, max_len = torch.stack(
            [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()  # one sync
        if first != 0 or min_len < 0 or last != qkv.shape[0]:
            _fail(f"cu_seqlens must run from 0 to T = {qkv.shape[0]}, non-decreasing "
                  f"(starts at {first}, ends at {last}, shortest {min_len})")
        if max_seqlen is None:
            max_seqlen = max_len
        elif max_len > max_seqlen:
            _fail(f"a sequence has length {max_len} > max_seqlen {max_seqlen}")
    if max_seqlen > cos.shape[0]:
        _fail(f"positions up to {max_seqlen - 1} but the cos/sin tables have {cos.shape[0]} rows")
    return (cu_seqlens.contiguous() if cu_seqlens is not None else None), int(max_seqlen)


def rotary_fwd(qkv, cos, sin, cu_seqlens, max_seqlen):
    """Launch the forward on prepared inputs (see prepare): qkv [T, 3, H, D] (cu_seqlens int32 [B+1])
    or [B, S, 3, H, D] (cu_seqlens None); returns a new contiguous tensor of qkv's shape with q and k
    rotated and v copied."""
    return _launch(qkv, cos, sin, cu_seqlens, max_seqlen, False)


def rotary_bwd(dout, cos, sin, cu_seqlens, max_seqlen):
    """Launch the backward: the gradient of qkv from the output's, dout rotated back (and dV copied)."""
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    return _launch(dout, cos, sin, cu_seqlens, max_seqlen, True)
