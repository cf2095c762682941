"""Fused bidirectional attention (FlashAttention-2 style) for BERT: padded, masked, varlen, dropout.

Layouts (no transposes, no copies of strided views; only the head dim must be contiguous):
  padded  q, k, v, o  [B, S, H, D]   any strides for B, S, H (views of a linear's output)
          key padding: key_padding_mask [B, S] bool (True = padding key), any pattern
  varlen  q, k, v, o  [T, H, D]      packed valid tokens, cu_seqlens int32 [B+1] (0, l0, l0+l1, .., T)
  lse     [B, H, S] (padded) or [H, T] (varlen), fp32, log2-domain log-sum-exp of the scaled scores
Every kernel addresses one sequence as rows `start .. start + n_rows` of a [rows, H, D] tensor: in
varlen mode start = cu_seqlens[b], in padded mode start = 0 and the batch stride picks the sequence
(the varlen batch stride is 0). Queries run over n_rows rows, keys over k_len <= n_rows rows:
  MODE 0 padded, no mask        n_rows = k_len = S
  MODE 1 padded, mask           n_rows = S, k_len = last non-padding key + 1 (each program finds it
                                 by scanning the mask row); the mask is loaded per key block inside
                                 [0, k_len) (for a right-padding mask all blocks past the length are
                                 skipped, not computed)
  MODE 2 varlen                 n_rows = k_len = cu_seqlens[b+1] - cu_seqlens[b]
Padding queries (padded mode) are computed like the reference (they attend to the valid keys); a
query with no valid key (a sequence whose keys are all padding) gets zeros and zero gradients.

Sliding window (WINDOW, runtime `window` = w >= 0): query i attends key j iff |i - j| <= w, positions
counted inside the sequence (flash-attn's window_size=(w, w), inclusive), on top of the masks above.
The loops run only over the blocks that meet the band: the forward and dQ programs (query block
[m0, m0 + BLOCK_M)) visit key blocks from floor(max(m0 - w, 0) / BLOCK_N) * BLOCK_N up to
min(m0 + BLOCK_M + w, k_len); the dK/dV program (key block [n0, n0 + BLOCK_N)) visits query blocks
from floor(max(n0 - w, 0) / BLOCK_M) * BLOCK_M up to min(n0 + BLOCK_N + w, n_rows). So a program
does O((BLOCK + 2w) / BLOCK) steps whatever the sequence length; every visited block is masked with
the band (and the bounds checks), blocks outside it are never loaded. A query whose window holds no
valid key (a padding query far past the last valid key) gets zeros and zero gradients, as above.
The launchers take window >= max_seqlen - 1 as global attention (every pair is inside the band) and
compile WINDOW = False then, the code of the global kernels unchanged.

Forward (per program: one block of BLOCK_M queries of one (b, h)); scores in the log2 domain with
log2(e) folded into the scale, so exp2 is used throughout:
  s_ij = (q_i . k_j) * scale * log2(e);  online over key blocks:
  m_new = max(m, rowmax(s));  alpha = 2^(m - m_new);  p = 2^(s - m_new)
  l = l * alpha + rowsum(p);  acc = acc * alpha + (p * keep / (1 - p_drop)) @ v
  o_i = acc_i / l_i;  lse_i = m_i + log2(l_i)  (saved; +inf when the row has no valid key)
The running max starts at -1e30 (finite) so a block whose keys are all masked gives p = 0 and
alpha = 1 instead of NaN. fp32 inputs use tl.dot with input_precision "tf32x3" (three tf32
tensor-core products: about fp32 accuracy) unless torch.backends.cuda.matmul.allow_tf32 is set (then
"tf32", about 1e-3 relative error); fp16/bf16 dots take the tensor cores with fp32 accumulation.

Dropout: counter-based Philox (tl.philox, 10 rounds) keyed by a 64-bit seed; counters are
(key quad j // 4, query position i, b * H + h, offset) with positions inside the sequence, and one
call's four output words serve four neighbouring keys, so the forward, both backward kernels,
dropout_keep_mask() and padded/varlen runs of the same batch draw the same keep bits.
keep_ij = (word >> 1) >= floor(p * 2^31). dropout_p = 0 compiles without RNG. The seed and offset
are read from an int64 [2] tensor on the device (RNG), never passed as host scalars: a captured CUDA
graph then replays with each replay's fresh draw.

This file holds the kernels, their launchers (attention_fwd, attention_bwd, dropout_keep_mask) and
the input checks (check_supported, prepare, check_window); fastbert.ops.attention registers and
differentiates them.
"""

import operator
import os

import torch
import triton
import triton.language as tl

from fastbert._env import getenv

from ._common import allocator, cdiv, next_power_of_2

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# autotune configs and the keep() predicate
# ----------------------------------------------------------------------------------------------
def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


if _INTERPRET:  # one small config: the interpreter's cost grows with the number of programs
    FWD_CONFIGS = [_cfg(64, 64, 4, 1)]
    DKDV_CONFIGS = [_cfg(64, 64, 4, 1)]
    DQ_CONFIGS = [_cfg(64, 64, 4, 1)]
else:
    # (BLOCK_M queries, BLOCK_N keys); the first kept config is the default when autotune is off.
    # The 32 x 32 configs are for fp32 only. H100 timings (bf16, D 64, S 128..2048): the three
    # forward configs are within 5% of each other; dK/dV 64 x 64 x 4 warps beat 128-key tiles by 5-10%
    # and 8 warps by 2x at D 64 (8 warps is the D 128 config); dQ 128 x 64 wins from S 512 on.
    FWD_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 2), _cfg(32, 32, 4, 2)]
    # dK/dV: BLOCK_N keys per program, BLOCK_M queries per step
    DKDV_CONFIGS = [_cfg(64, 64, 4, 2), _cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)]
    # dQ: BLOCK_M queries per program, BLOCK_N keys per step
    DQ_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2), _cfg(32, 32, 4, 2)]


def keep(cfg, kind, block_d, seq_bucket, fp32):
    """Whether an autotune config is worth trying for (padded head dim, seq bucket, dtype).

    From the AOT register table (tests/test_attention.py): fp32 operands (tf32x3) spill on any
    tile but 32 x 32; 4-warp 128-row forward tiles and 4-warp dK/dV tiles spill at head dim 128.
    """
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if _INTERPRET:
        return True
    if fp32 or bm * bn <= 32 * 32:
        return fp32 and bm * bn <= 32 * 32
    rows = bn if kind == "dkdv" else bm  # rows owned by one program
    if seq_bucket <= 64 and rows > 64:
        return False
    if kind == "dkdv":  # 8 warps only for D 128 (4 spill there, and lose 2x at D 64)
        return (cfg.num_warps == 8) == (block_d >= 128)
    if block_d >= 128 and kind == "fwd":
        return cfg.num_warps == 8 or bm <= 64
    return True


def _pruner(kind):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        fp32 = args["Q"].dtype == torch.float32
        kept = [c for c in configs if keep(c, kind, args["BLOCK_D"], args["SEQ_BUCKET"], fp32)]
        kept = kept or configs[-1:]
        if os.environ.get("FASTBERT_ATTN_AUTOTUNE", "1") == "0":
            kept = kept[:1]
        return kept

    return prune


_KEY = ["BLOCK_D", "SEQ_BUCKET", "MODE", "DROPOUT", "HEAD_DIM", "WINDOW"]


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _seq_bounds(SEQINFO, MASK, smb, b, SEQ, MODE: tl.constexpr):
    """(start row, n_rows, k_len) of sequence b; see the module docstring.

    MODE 1 finds k_len = last non-padding key + 1 by scanning the mask row (S bytes, a few
    vector loads), so the host launches nothing besides the kernel."""
    if MODE == 2:
        start = tl.load(SEQINFO + b)
        end = tl.load(SEQINFO + b + 1)
        n_rows = end - start
        k_len = n_rows
    elif MODE == 1:
        start = b * 0
        n_rows = b * 0 + SEQ
        offs = tl.arange(0, 1024)
        best = tl.zeros([1024], dtype=tl.int32)
        row = MASK + b.to(tl.int64) * smb
        for s0 in range(0, SEQ, 1024):
            pos = s0 + offs
            pad = tl.load(row + pos, mask=pos < SEQ, other=1)
            best = tl.maximum(best, tl.where(pad == 0, pos + 1, 0))
        k_len = tl.max(best, 0)
    else:
        start = b * 0
        n_rows = b * 0 + SEQ
        k_len = n_rows
    return start, n_rows, k_len


@triton.jit
def _load_rows(ptrs, rows, n_rows, cols, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load a [R, BLOCK_D] tile; rows >= n_rows (if CHECK_ROWS) and cols >= HEAD_DIM read as 0."""
    if CHECK_ROWS:
        if HEAD_DIM != BLOCK_D:
            t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            t = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if HEAD_DIM != BLOCK_D:
            t = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _rng_words(RNG, DROPOUT: tl.constexpr):
    """(seed, offset) from RNG int64 [2] on the device (drawn by fastbert.ops._rng.dropout_seed; read
    in the kernel, so a replayed CUDA graph sees each replay's fresh draw)."""
    if DROPOUT:
        seed = tl.load(RNG)
        rng_offset = tl.load(RNG + 1)
    else:
        seed = 0
        rng_offset = 0
    return seed, rng_offset


@triton.jit
def _keep(seed, rng_offset, bh, rows, cols, col0, thresh):
    """Dropout keep bits [R, C] for query positions rows [R] and key positions cols [C] = col0 +
    arange(C), col0 a multiple of 4. One Philox call (counters: key quad j // 4, query position,
    b * H + h, offset) gives four 32-bit words, used by keys 4c, 4c + 2, 4c + 1, 4c + 3 (the
    order the joins below interleave them); keep = (word >> 1) >= floor(p * 2^31)."""
    R: tl.constexpr = rows.shape[0]
    C: tl.constexpr = cols.shape[0]
    quads = col0 // 4 + tl.arange(0, C // 4)
    c0 = (quads[None, :] + rows[:, None] * 0).to(tl.uint32)  # [R, C/4]
    c1 = (rows[:, None] + quads[None, :] * 0).to(tl.uint32)
    c2 = (c0 * 0 + bh).to(tl.uint32)
    c3 = (c0 * 0 + rng_offset).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [R, C])  # [R, C/4, 2, 2] -> [R, C]
    return (r >> 1).to(tl.int32, bitcast=True) >= thresh


@triton.jit
def _band(rows, cols, window):
    """[R, C] True where |rows_i - cols_j| <= window (the sliding window, inclusive)."""
    d = rows[:, None] - cols[None, :]
    return (d <= window) & (d >= -window)


@triton.jit
def _window_range(start, block, window, block_other, limit):
    """[lo, hi) of the other side's positions that a block [start, start + block) meets within the
    window: lo rounded down to a multiple of block_other (the loop's step), hi clipped to limit."""
    lo = tl.maximum(start - window, 0)
    lo = (lo // block_other) * block_other
    hi = tl.minimum(start + block + window, limit)
    return lo, hi


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, MASK_ROW, start_n, k_len, offs_m, offs_n, offs_d,
              sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh, window,
              LAST: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
              WINDOW: tl.constexpr = False):
    cols = start_n + offs_n  # key positions [BLOCK_N]
    k = _load_rows(k_ptrs + start_n * sks, cols, k_len, offs_d, LAST, HEAD_DIM, BLOCK_D)  # [BN, BD]
    v = _load_rows(v_ptrs + start_n * svs, cols, k_len, offs_d, LAST, HEAD_DIM, BLOCK_D)  # [BN, BD]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BM, BN] fp32
    if WINDOW:  # every windowed step is masked: bounds, padding and the band
        valid = cols < k_len
        if HAS_MASK:
            pad = tl.load(MASK_ROW + cols, mask=valid, other=1)
            valid = valid & (pad == 0)
        valid2 = valid[None, :] & _band(offs_m, cols, window)
        s = tl.where(valid2, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    elif LAST or HAS_MASK:
        valid = cols < k_len
        if HAS_MASK:
            pad = tl.load(MASK_ROW + cols, mask=valid, other=1)
            valid = valid & (pad == 0)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        p = tl.where(_keep(seed, rng_offset, bh, offs_m, cols, start_n, drop_thresh), p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.autotune(configs=FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit(do_not_specialize=["SEQ", "SEQ_BUCKET", "drop_thresh", "window"])
def _attn_fwd(Q, K, V, O, LSE, SEQINFO, MASK,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh, smb,
              H, SEQ, SEQ_BUCKET, qk_scale, RNG, drop_thresh, drop_scale, window,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr, HAS_MASK: tl.constexpr,
              DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Q, K, V, O: [rows, H, D] per sequence (strides s*b, s*s, s*h; unit stride over D)
    # LSE: [B or 1, H, rows] fp32 (strides slb, slh, 1); SEQINFO: cu_seqlens [B+1] int32 (MODE 2)
    # MASK: [B, S] bool/uint8 key padding (stride smb, 1), read when HAS_MASK
    # window: the sliding window w (read when WINDOW; see the module docstring)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    seed, rng_offset = _rng_words(RNG, DROPOUT)
    h = bh % H
    start, n_rows, k_len = _seq_bounds(SEQINFO, MASK, smb, b, SEQ, MODE)
    start_m = pid_m * BLOCK_M
    if start_m >= n_rows:
        return
    b64 = b.to(tl.int64)
    row0 = start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b64 * sqb + row0 * sqs + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
    k_ptrs = K + b64 * skb + row0 * sks + h * skh + offs_n[:, None] * sks + offs_d[None, :]
    v_ptrs = V + b64 * svb + row0 * svs + h * svh + offs_n[:, None] * svs + offs_d[None, :]
    MASK_ROW = MASK + b64 * smb
    q = _load_rows(q_ptrs, offs_m, n_rows, offs_d, True, HEAD_DIM, BLOCK_D)  # [BM, BD]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:  # only the key blocks that meet the band of this query block
        lo, hi = _window_range(start_m, BLOCK_M, window, BLOCK_N, k_len)
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, MASK_ROW, start_n, k_len, offs_m,
                                      offs_n, offs_d, sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh,
                                      window, True, HAS_MASK, DROPOUT, HEAD_DIM, BLOCK_D, DOT_PREC, True)
    else:
        k_full = (k_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, k_full, BLOCK_N):  # full key blocks: no bounds checks
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, MASK_ROW, start_n, k_len, offs_m,
                                      offs_n, offs_d, sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh,
                                      window, False, HAS_MASK, DROPOUT, HEAD_DIM, BLOCK_D, DOT_PREC)
        if k_full < k_len:  # the partial last key block
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, MASK_ROW, k_full, k_len, offs_m,
                                      offs_n, offs_d, sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh,
                                      window, True, HAS_MASK, DROPOUT, HEAD_DIM, BLOCK_D, DOT_PREC)

    empty = l_i == 0.0  # no valid key at all
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if DROPOUT:
        inv = inv * drop_scale
    acc = acc * inv[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = O + b64 * sob + row0 * sos + h * soh + offs_m[:, None] * sos + offs_d[None, :]
    row_ok = offs_m < n_rows
    if HEAD_DIM != BLOCK_D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b64 * slb + h * slh + row0 + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
# With P_ij = 2^(s_ij - lse_i) = softmax_j(scale * q_i . k_j), Z_ij = keep_ij / (1 - p_drop) and
# O_i = sum_j P_ij Z_ij v_j:
#   dV_j  = sum_i P_ij Z_ij dO_i
#   dP_ij = Z_ij (dO_i . v_j)                      (gradient w.r.t. the undropped probability)
#   dS_ij = P_ij (dP_ij - D_i),  D_i = sum_j P_ij dP_ij = dO_i . O_i   (softmax Jacobian; the
#                                 identity holds with dropout too since O_i already carries Z)
#   dQ_i  = scale * sum_j dS_ij k_j;   dK_j = scale * sum_i dS_ij q_i
# Kernels: _attn_bwd_pre computes D = rowsum(dO * O); _attn_bwd_dkdv runs one program per key block
# over all query blocks (recomputing P from lse); _attn_bwd_dq one program per query block over all
# key blocks. No atomics; P and dP are recomputed in both (7 block matmuls instead of 5).
# Padding keys (k >= k_len or masked) get exactly zero dK, dV: P is zeroed on them, and rows past
# k_len are written as zeros. Queries past the sequence read lse = +inf, so their P is 0.
@triton.jit
def _attn_bwd_pre(O, DO, DELTA, sob, sos, soh, sdb, sds, sdh, slb, slh, SEQINFO, MASK, smb, H, SEQ,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    # O, DO: [rows, H, D]; DELTA: like LSE, fp32
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start, n_rows, k_len = _seq_bounds(SEQINFO, MASK, smb, b, SEQ, MODE)
    start_m = pid_m * BLOCK_M
    if start_m >= n_rows:
        return
    b64 = b.to(tl.int64)
    row0 = start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b64 * sob + row0 * sos + h * soh + offs_m[:, None] * sos + offs_d[None, :],
                   offs_m, n_rows, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + b64 * sdb + row0 * sds + h * sdh + offs_m[:, None] * sds + offs_d[None, :],
                    offs_m, n_rows, offs_d, True, HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + b64 * slb + h * slh + row0 + offs_m, tl.sum(o * do, 1), mask=offs_m < n_rows)


@triton.jit
def _dkdv_step(dk, dv, k, v, kpad, q_ptrs, do_ptrs, l_ptrs, d_ptrs, start_m, n_rows, offs_m, offs_n,
               key0, offs_d, sqs, sds, qk_scale, seed, rng_offset, bh, drop_thresh, drop_scale, window,
               LAST: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
               WINDOW: tl.constexpr = False):
    rows = start_m + offs_m  # query positions [BLOCK_M]
    q = _load_rows(q_ptrs + start_m * sqs, rows, n_rows, offs_d, LAST, HEAD_DIM, BLOCK_D)  # [BM, BD]
    do = _load_rows(do_ptrs + start_m * sds, rows, n_rows, offs_d, LAST, HEAD_DIM, BLOCK_D)  # [BM, BD]
    if LAST:
        lse = tl.load(l_ptrs + start_m, mask=rows < n_rows, other=float("inf"))
        delta = tl.load(d_ptrs + start_m, mask=rows < n_rows, other=0.0)
    else:
        lse = tl.load(l_ptrs + start_m)
        delta = tl.load(d_ptrs + start_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BN, BM] = S^T
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    if HAS_MASK:
        p_t = tl.where(kpad[:, None], 0.0, p_t)
    if WINDOW:
        p_t = tl.where(_band(offs_n, rows, window), p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM] = (dO V^T)^T
    if DROPOUT:
        keep_t = tl.trans(_keep(seed, rng_offset, bh, rows, offs_n, key0, drop_thresh))
        pz_t = tl.where(keep_t, p_t * drop_scale, 0.0)
        dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
    else:
        pz_t = p_t
    dv = tl.dot(pz_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit(do_not_specialize=["SEQ", "SEQ_BUCKET", "drop_thresh", "window"])
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, SEQINFO, MASK,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh, slb, slh, smb,
                   H, SEQ, SEQ_BUCKET, qk_scale, sm_scale, RNG, drop_thresh, drop_scale, window,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
                   HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                   WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # DK, DV: [rows, H, D] contiguous-like (strides sgb, sgs, sgh); the rest as in _attn_fwd.
    # Deliberate twin of _attn_bwd_dq (same arguments and preamble): dK/dV loop over query blocks
    # per key block, dQ over key blocks per query block, so that neither needs atomics.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    seed, rng_offset = _rng_words(RNG, DROPOUT)
    h = bh % H
    start, n_rows, k_len = _seq_bounds(SEQINFO, MASK, smb, b, SEQ, MODE)
    start_n = pid_n * BLOCK_N
    if start_n >= n_rows:
        return
    b64 = b.to(tl.int64)
    row0 = start.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if start_n < k_len:  # key blocks past the last valid key only write zeros
        k = _load_rows(K + b64 * skb + row0 * sks + h * skh + offs_n[:, None] * sks + offs_d[None, :],
                       offs_n, k_len, offs_d, True, HEAD_DIM, BLOCK_D)  # [BN, BD]
        v = _load_rows(V + b64 * svb + row0 * svs + h * svh + offs_n[:, None] * svs + offs_d[None, :],
                       offs_n, k_len, offs_d, True, HEAD_DIM, BLOCK_D)  # [BN, BD]
        if HAS_MASK:
            kpad = tl.load(MASK + b64 * smb + offs_n, mask=offs_n < k_len, other=1) != 0
        else:
            kpad = offs_n < 0
        q_ptrs = Q + b64 * sqb + row0 * sqs + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
        do_ptrs = DO + b64 * sdb + row0 * sds + h * sdh + offs_m[:, None] * sds + offs_d[None, :]
        l_ptrs = LSE + b64 * slb + h * slh + row0 + offs_m
        d_ptrs = DELTA + b64 * slb + h * slh + row0 + offs_m
        if WINDOW:  # only the query blocks that meet the band of this key block
            lo, hi = _window_range(start_n, BLOCK_N, window, BLOCK_M, n_rows)
            for start_m in range(lo, hi, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, kpad, q_ptrs, do_ptrs, l_ptrs, d_ptrs, start_m, n_rows,
                                    offs_m, offs_n, start_n, offs_d, sqs, sds, qk_scale, seed, rng_offset,
                                    bh, drop_thresh, drop_scale, window, True, HAS_MASK, DROPOUT, HEAD_DIM,
                                    BLOCK_D, DOT_PREC, True)
        else:
            m_full = (n_rows // BLOCK_M) * BLOCK_M
            for start_m in range(0, m_full, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, kpad, q_ptrs, do_ptrs, l_ptrs, d_ptrs, start_m, n_rows,
                                    offs_m, offs_n, start_n, offs_d, sqs, sds, qk_scale, seed, rng_offset,
                                    bh, drop_thresh, drop_scale, window, False, HAS_MASK, DROPOUT, HEAD_DIM,
                                    BLOCK_D, DOT_PREC)
            if m_full < n_rows:
                dk, dv = _dkdv_step(dk, dv, k, v, kpad, q_ptrs, do_ptrs, l_ptrs, d_ptrs, m_full, n_rows,
                                    offs_m, offs_n, start_n, offs_d, sqs, sds, qk_scale, seed, rng_offset,
                                    bh, drop_thresh, drop_scale, window, True, HAS_MASK, DROPOUT, HEAD_DIM,
                                    BLOCK_D, DOT_PREC)
        live = offs_n < k_len
        dk = tl.where(live[:, None], dk * sm_scale, 0.0)
        dv = tl.where(live[:, None], dv, 0.0)
    base = DK.dtype.element_ty
    g_off = b64 * sgb + row0 * sgs + h * sgh + offs_n[:, None] * sgs + offs_d[None, :]
    st_mask = offs_n[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        st_mask = st_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + g_off, dk.to(base), mask=st_mask)
    tl.store(DV + g_off, dv.to(base), mask=st_mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, MASK_ROW, start_n, k_len, offs_m, offs_n, offs_d,
             sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh, drop_scale, window,
             LAST: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
             WINDOW: tl.constexpr = False):
    cols = start_n + offs_n
    k = _load_rows(k_ptrs + start_n * sks, cols, k_len, offs_d, LAST, HEAD_DIM, BLOCK_D)  # [BN, BD]
    v = _load_rows(v_ptrs + start_n * svs, cols, k_len, offs_d, LAST, HEAD_DIM, BLOCK_D)  # [BN, BD]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BM, BN]
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if LAST or HAS_MASK or WINDOW:
        valid = cols < k_len
        if HAS_MASK:
            pad = tl.load(MASK_ROW + cols, mask=valid, other=1)
            valid = valid & (pad == 0)
        if WINDOW:
            p = tl.where(valid[None, :] & _band(offs_m, cols, window), p, 0.0)
        else:
            p = tl.where(valid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BM, BN]
    if DROPOUT:
        keep = _keep(seed, rng_offset, bh, offs_m, cols, start_n, drop_thresh)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit(do_not_specialize=["SEQ", "SEQ_BUCKET", "drop_thresh", "window"])
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, SEQINFO, MASK,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh, slb, slh, smb,
                 H, SEQ, SEQ_BUCKET, qk_scale, sm_scale, RNG, drop_thresh, drop_scale, window,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
                 HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                 WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # DQ: [rows, H, D] (strides sgb, sgs, sgh); the rest as in _attn_fwd.
    # Deliberate twin of _attn_bwd_dkdv (same arguments and preamble; see there).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    seed, rng_offset = _rng_words(RNG, DROPOUT)
    h = bh % H
    start, n_rows, k_len = _seq_bounds(SEQINFO, MASK, smb, b, SEQ, MODE)
    start_m = pid_m * BLOCK_M
    if start_m >= n_rows:
        return
    b64 = b.to(tl.int64)
    row0 = start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_rows
    q = _load_rows(Q + b64 * sqb + row0 * sqs + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                   offs_m, n_rows, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b64 * sdb + row0 * sds + h * sdh + offs_m[:, None] * sds + offs_d[None, :],
                    offs_m, n_rows, offs_d, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + b64 * slb + h * slh + row0 + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + b64 * slb + h * slh + row0 + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b64 * skb + row0 * sks + h * skh + offs_n[:, None] * sks + offs_d[None, :]
    v_ptrs = V + b64 * svb + row0 * svs + h * svh + offs_n[:, None] * svs + offs_d[None, :]
    MASK_ROW = MASK + b64 * smb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if WINDOW:  # only the key blocks that meet the band, as in the forward
        lo, hi = _window_range(start_m, BLOCK_M, window, BLOCK_N, k_len)
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, MASK_ROW, start_n, k_len, offs_m, offs_n,
                          offs_d, sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh, drop_scale, window,
                          True, HAS_MASK, DROPOUT, HEAD_DIM, BLOCK_D, DOT_PREC, True)
    else:
        k_full = (k_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, k_full, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, MASK_ROW, start_n, k_len, offs_m, offs_n,
                          offs_d, sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh, drop_scale, window,
                          False, HAS_MASK, DROPOUT, HEAD_DIM, BLOCK_D, DOT_PREC)
        if k_full < k_len:
            dq = _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, MASK_ROW, k_full, k_len, offs_m, offs_n,
                          offs_d, sks, svs, qk_scale, seed, rng_offset, bh, drop_thresh, drop_scale, window,
                          True, HAS_MASK, DROPOUT, HEAD_DIM, BLOCK_D, DOT_PREC)
    dq = dq * sm_scale
    g_ptrs = DQ + b64 * sgb + row0 * sgs + h * sgh + offs_m[:, None] * sgs + offs_d[None, :]
    st_mask = row_ok[:, None]
    if HEAD_DIM != BLOCK_D:
        st_mask = st_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(g_ptrs, dq.to(DQ.dtype.element_ty), mask=st_mask)


@triton.jit
def _keep_mask_kernel(OUT, H, SEQ, RNG, drop_thresh,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # OUT: [B, H, SEQ, SEQ] int8 keep-mask, the bits the attention kernels draw
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    seed, rng_offset = _rng_words(RNG, True)
    keep = _keep(seed, rng_offset, bh, rows, cols, pid_n * BLOCK_N, drop_thresh)
    ptrs = OUT + bh.to(tl.int64) * SEQ * SEQ + rows[:, None] * SEQ + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < SEQ) & (cols[None, :] < SEQ))


# ----------------------------------------------------------------------------------------------
# host side: validation, launchers, custom op
# ----------------------------------------------------------------------------------------------
MODE_DENSE, MODE_MASKED, MODE_VARLEN = 0, 1, 2


def _block_d(head_dim):
    return max(16, next_power_of_2(head_dim))


def _seq_bucket(n):
    return min(max(16, next_power_of_2(max(int(n), 1))), 8192)


def _dot_prec(x):
    """fp32 matmuls: tf32x3 (three tf32 tensor-core products, about fp32 accuracy) by default,
    plain tf32 (about 1e-3 relative) when torch.backends.cuda.matmul.allow_tf32 is set."""
    if x.dtype != torch.float32 or not x.is_cuda:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _drop_params(dropout_p):
    thresh = min(int(dropout_p * 2**31), 2**31 - 1)
    return thresh, (1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0)


def _head_strides(x):
    """(batch, row, head) strides of a [B, S, H, D] or [T, H, D] tensor (batch 0 when packed)."""
    s = x.stride()  # one call: stride(i) three times costs about three times as much host time
    return s[:3] if len(s) == 4 else (0, s[0], s[1])


def _geometry(q):
    """(batch, heads, S or T, head_dim, lse shape, lse strides (b, h)); batch None when packed."""
    if q.dim() == 4:
        batch, seq, heads, dim = q.shape
        return batch, heads, seq, dim, (batch, heads, seq), (heads * seq, seq)
    total, heads, dim = q.shape
    return None, heads, total, dim, (heads, total), (0, total)


def lse_shape(q):
    return _geometry(q)[4]


def window_arg(window, max_seqlen):
    """The kernels' (WINDOW, window) for a sliding window `window` (None or an int >= 0, checked by
    check_window): global attention (False, 0) when None or when the band holds every pair of a
    sequence of max_seqlen positions (window >= max_seqlen - 1)."""
    if window is None or window >= max_seqlen - 1:
        return False, 0
    return True, int(window)


def check_window(window):
    """None, or the window as an int >= 0; ValueError/TypeError otherwise."""
    if window is None:
        return None
    try:
        if isinstance(window, bool):
            raise TypeError
        window = operator.index(window)
    except TypeError:
        raise TypeError(f"fastbert attention: window must be an int or None, got "
                        f"{type(window).__name__}") from None
    if window < 0:
        _fail(f"window {window} < 0; expected None (global attention) or an int >= 0")
    return int(window)


def attention_fwd(q, k, v, seqinfo, mask, rng, mode, dropout_p, scale, max_seqlen, window=None, lse=None):
    """Launch the forward on prepared inputs (see prepare). rng: int64 [2] (seed, offset) on q's device
    when dropout_p > 0; window: the sliding window (None: global; an int w >= 0: query i attends key j
    iff |i - j| <= w). Returns (out like q, lse fp32 [B, H, S] or [H, T]).
    lse: a contiguous fp32 tensor of lse's shape to write it into instead of a new one (a forward with
    no backward passes a scratch buffer)."""
    batch, heads, rows, dim, lse_shp, (slb, slh) = _geometry(q)
    if mode == MODE_VARLEN:
        batch = seqinfo.numel() - 1
    new = allocator()  # NaN-poisoned outputs under FASTBERT_POISON=1
    out = new.like(q) if q.is_contiguous() else new(q.shape, q.dtype, q.device)
    if lse is None:
        lse = new(lse_shp, torch.float32, q.device)
    if q.numel() == 0 or batch == 0 or max_seqlen == 0:
        return out.zero_(), lse.fill_(float("inf"))
    thresh, drop_scale = _drop_params(dropout_p)
    seqinfo_t = seqinfo if seqinfo is not None else q
    mask_t = mask if mask is not None else q
    rng_t = rng if dropout_p > 0 else q
    smb = mask.stride(0) if mask is not None else 0
    block_d = _block_d(dim)
    bucket = _seq_bucket(max_seqlen)
    has_window, win = window_arg(window, max_seqlen)
    grid = lambda meta: (cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_fwd[grid](q, k, v, out, lse, seqinfo_t, mask_t, *_head_strides(q), *_head_strides(k),
                    *_head_strides(v), *_head_strides(out), slb, slh, smb,
                    heads, rows if mode != MODE_VARLEN else 0, bucket, scale * LOG2E, rng_t, thresh,
                    drop_scale, win, HEAD_DIM=dim, BLOCK_D=block_d, MODE=mode, HAS_MASK=mask is not None,
                    DROPOUT=dropout_p > 0, DOT_PREC=_dot_prec(q), WINDOW=has_window)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, seqinfo, mask, rng, mode, dropout_p, scale, max_seqlen,
                  grads=None, window=None):
    """Launch the backward (the forward's saved tensors and arguments, window included). Returns
    (dq, dk, dv) like q.
    grads: (dq, dk, dv) to write into instead of new tensors, shaped like q with one set of strides
    for the three and a contiguous head dim (the fused block passes views of one [T, 3N] buffer)."""
    batch, heads, rows, dim, lse_shp, (slb, slh) = _geometry(q)
    if mode == MODE_VARLEN:
        batch = seqinfo.numel() - 1
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    new = allocator()
    if grads is None:
        like = new.like if q.is_contiguous() else lambda t: new(t.shape, t.dtype, t.device)
        dq, dk, dv = like(q), like(q), like(q)
    else:
        dq, dk, dv = grads
    if q.numel() == 0 or batch == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    thresh, drop_scale = _drop_params(dropout_p)
    seqinfo_t = seqinfo if seqinfo is not None else q
    mask_t = mask if mask is not None else q
    rng_t = rng if dropout_p > 0 else q
    smb = mask.stride(0) if mask is not None else 0
    block_d = _block_d(dim)
    bucket = _seq_bucket(max_seqlen)
    seq_arg = rows if mode != MODE_VARLEN else 0
    delta = new(lse_shp, torch.float32, q.device)
    pre_bm = 64
    _attn_bwd_pre[(cdiv(max_seqlen, pre_bm), batch * heads)](
        out, dout, delta, *_head_strides(out), *_head_strides(dout), slb, slh, seqinfo_t, mask_t, smb,
        heads, seq_arg,
        HEAD_DIM=dim, BLOCK_D=block_d, MODE=mode, BLOCK_M=pre_bm)
    has_window, win = window_arg(window, max_seqlen)
    common = (*_head_strides(q), *_head_strides(k), *_head_strides(v), *_head_strides(dout),
              *_head_strides(dk), slb, slh, smb, heads, seq_arg, bucket, scale * LOG2E, scale,
              rng_t, thresh, drop_scale, win)
    meta = dict(HEAD_DIM=dim, BLOCK_D=block_d, MODE=mode, HAS_MASK=mask is not None,
                DROPOUT=dropout_p > 0, DOT_PREC=_dot_prec(q), WINDOW=has_window)
    grid_n = lambda m: (cdiv(max_seqlen, m["BLOCK_N"]), batch * heads)  # noqa: E731
    _attn_bwd_dkdv[grid_n](q, k, v, dout, dk, dv, lse, delta, seqinfo_t, mask_t, *common, **meta)
    grid_m = lambda m: (cdiv(max_seqlen, m["BLOCK_M"]), batch * heads)  # noqa: E731
    _attn_bwd_dq[grid_m](q, k, v, dout, dq, lse, delta, seqinfo_t, mask_t, *common, **meta)
    return dq, dk, dv


def dropout_keep_mask(rng, dropout_p, batch, heads, seqlen):
    """The keep-mask [B, H, S, S] bool that the kernels apply with rng (int64 [2] (seed, offset), on
    the device the mask is computed on). mask[b, h, i, j] is True when query position i keeps key
    position j in sequence b (positions counted inside the sequence, so it is the same in padded and
    varlen mode)."""
    thresh, _ = _drop_params(dropout_p)
    out = torch.empty((batch, heads, seqlen, seqlen), dtype=torch.int8, device=rng.device)
    if out.numel():
        bm = 32
        grid = (cdiv(seqlen, bm), cdiv(seqlen, bm), batch * heads)
        _keep_mask_kernel[grid](out, heads, seqlen, rng, thresh, BLOCK_M=bm, BLOCK_N=bm)
    return out.bool()


def _fail(msg):
    raise ValueError(f"fastbert attention: {msg}")


def check_supported(q):
    """The kernel's limits: raise ValueError naming what it does not take (dtype, head dim)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"fastbert attention: q must be a tensor, got {type(q).__name__}")
    if q.dtype not in SUPPORTED_DTYPES:
        _fail(f"q.dtype {q.dtype} not supported; expected float16, bfloat16 or float32")
    dim = q.shape[-1] if q.dim() else 0
    if dim > MAX_HEAD_DIM or dim % 8 != 0 or dim == 0:
        _fail(f"head_dim {dim} unsupported; expected a multiple of 8 up to {MAX_HEAD_DIM} "
              "(32, 64, 80, 128 are tuned)")


def prepare(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None, max_seqlen=None):
    """Validate the arguments of fastbert.ops.attention for the kernels and return the launchers'
    (q, k, v, seqinfo, mask, mode, scale, max_seqlen); ValueError names any problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            _fail(f"{name}.dtype {t.dtype} not supported; expected float16, bfloat16 or float32")
    if not (q.shape == k.shape == v.shape):
        _fail(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        _fail(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    varlen = cu_seqlens is not None
    if varlen and q.dim() != 3:
        _fail(f"varlen mode (cu_seqlens given) needs q [T, H, D], got {tuple(q.shape)}")
    if not varlen and q.dim() != 4:
        _fail(f"padded mode needs q [B, S, H, D] (or [T, H, D] with cu_seqlens), got {tuple(q.shape)}")
    dim = q.shape[-1]  # the head-dim limit of check_supported, inline (a call saved per launch)
    if dim > MAX_HEAD_DIM or dim % 8 != 0 or dim == 0:
        _fail(f"head_dim {dim} unsupported; expected a multiple of 8 up to {MAX_HEAD_DIM} "
              "(32, 64, 80, 128 are tuned)")
    if not 0.0 <= float(dropout_p) < 1.0:
        _fail(f"dropout_p {dropout_p} outside [0, 1)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    mask = None
    if varlen:
        if key_padding_mask is not None:
            _fail("key_padding_mask and cu_seqlens are exclusive (varlen mode has no padding)")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 \
                or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            what = getattr(cu_seqlens, "dtype", type(cu_seqlens))
            _fail(f"cu_seqlens must be an int32 tensor [B+1] with B >= 1, got {what} "
                  f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
        if cu_seqlens.device != q.device:
            _fail(f"cu_seqlens on {cu_seqlens.device}, q on {q.device}")
        total = q.shape[0]
        # checking the values costs a host sync (and a graph break under torch.compile): done when
        # max_seqlen must be computed anyway, or with FASTBERT_ATTN_CHECK=1; a caller passing
        # max_seqlen is trusted (as flash-attn's varlen API does), on every device
        if max_seqlen is None or getenv("FASTBERT_ATTN_CHECK") == "1":
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            first, last, min_len, max_len = torch.stack(
                [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()  # one sync
            if first != 0:
                _fail(f"cu_seqlens must start at 0, starts at {first}")
            if min_len < 0:
                _fail("cu_seqlens must be non-decreasing (a sequence length is negative)")
            if last != total:
                _fail(f"cu_seqlens ends at {last}, but q has total_tokens {total}")
            if max_seqlen is None:
                max_seqlen = max_len
            elif max_len > max_seqlen:
                _fail(f"a sequence has length {max_len} > max_seqlen {max_seqlen}")
        return q, k, v, cu_seqlens.contiguous(), None, MODE_VARLEN, scale, int(max_seqlen)
    batch, seq = q.shape[0], q.shape[1]
    if max_seqlen is not None and max_seqlen != seq:
        _fail(f"max_seqlen {max_seqlen} != S {seq}: in padded mode every sequence spans S positions")
    if key_padding_mask is None:
        return q, k, v, None, None, MODE_DENSE, scale, seq
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        _fail(f"key_padding_mask must be a bool tensor [B, S], got "
              f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
    if tuple(key_padding_mask.shape) != (batch, seq):
        _fail(f"key_padding_mask shape {tuple(key_padding_mask.shape)} != (B, S) = {(batch, seq)}")
    if key_padding_mask.device != q.device:
        _fail(f"key_padding_mask on {key_padding_mask.device}, q on {q.device}")
    mask = key_padding_mask
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    # k_len is found in-kernel from the mask row
    return q, k, v, None, mask.view(torch.uint8), MODE_MASKED, scale, seq
