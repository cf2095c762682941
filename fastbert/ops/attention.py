"""attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None, max_seqlen=None,
          *, window=None)

Bidirectional softmax(q k^T * scale) v per head; scale defaults to head_dim ** -0.5.

Padded mode: q, k, v [B, S, H, D] (views with arbitrary B/S/H strides and a contiguous head dim are
  used without copies); key_padding_mask [B, S] bool, True marks a padding key (ignored by every
  query), any pattern. Queries at padding positions are computed like any other (they attend to the
  valid keys), as in the reference. max_seqlen, if given, must equal S. Returns [B, S, H, D].
Varlen mode: q, k, v [T, H, D] packed valid tokens; cu_seqlens int32 [B+1] = (0, l0, l0+l1, ..., T),
  non-decreasing (zero-length sequences allowed); max_seqlen the longest length (computed when
  None, which costs a host sync; when given, the kernel path trusts cu_seqlens and max_seqlen, as
  flash-attn's varlen API does, unless FASTBERT_ATTN_CHECK=1). Each sequence attends only within
  itself. Returns [T, H, D].
window: None (global attention) or an int w >= 0, a symmetric sliding window: query i attends key j
  iff |i - j| <= w, positions counted inside each sequence (flash-attn's window_size=(w, w); ModernBERT's
  local layers pass w = local_attention // 2). Combines with key_padding_mask, cu_seqlens and dropout.
  The kernels skip the key blocks outside the band, so a windowed layer costs O(S * w), not O(S^2).
A query whose keys are all masked (or whose window holds no valid key) gets zeros (and zero
gradients). dropout_p > 0 drops attention probabilities (training); the fused kernel's seed and
offset are drawn on q's device (fastbert.ops._rng), so torch.manual_seed, activation checkpointing
and CUDA graph replays behave as for torch's own dropout.

Implementations (chosen by fastbert.ops._dispatch.choose): the Triton kernel (kernels/attention.py)
through the FusedOp fastbert::attention_fwd / attention_bwd, head_dim a multiple of 8 up to 128 (32,
64, 80, 128 tuned), fp16/bf16/fp32 (fp32 matmuls as tf32x3, about fp32 accuracy, or plain tf32 when
torch.backends.cuda.matmul.allow_tf32 is set); the native form, padded mode on
F.scaled_dot_product_attention (boolean mask from key_padding_mask; a window as a boolean band
mask), for CPU tensors and input the kernel does not take (varlen mode on CPU tensors: padded to
[B, max_len] around SDPA); the reference (fastbert.reference.ops.attention) for varlen CUDA tensors
off the kernel and for batches with a sequence whose keys are all padding (SDPA would give NaN where
fastbert promises zeros), and everywhere under FASTBERT_BACKEND=reference.
"""

import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref

from ._dispatch import NATIVE, TRITON, choose, triton_available
from ._fused import FusedOp
from ._rng import dropout_seed

if triton_available():
    from fastbert.kernels import attention as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None
_CHECK = _k.check_supported if _k is not None else None  # the kernel's input check (choose() calls it)


def _fwd_fake(q, k, v, seqinfo, mask, rng, mode, dropout_p, scale, max_seqlen, window=None):
    return torch.empty_like(q), q.new_empty(_k.lse_shape(q), dtype=torch.float32)


def _bwd(dout, q, k, v, out, lse, seqinfo, mask, rng, mode, dropout_p, scale, max_seqlen, window=None):
    return _k.attention_bwd(dout, q, k, v, out, lse, seqinfo, mask, rng, mode, dropout_p, scale, max_seqlen,
                            window=window)


def _bwd_fake(dout, q, k, v, out, lse, seqinfo, mask, rng, mode, dropout_p, scale, max_seqlen, window=None):
    return torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)


def _save(ctx, inputs, output):
    # inputs: the 10 arguments of a global call, or 11 with the window (always 11 through the custom op)
    q, k, v, seqinfo, mask, rng = inputs[:6]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seqinfo, mask, rng)
    ctx.params = inputs[6:]  # (mode, dropout_p, scale, max_seqlen[, window])


_NONES = (None,) * 8


def _backward(ctx, grads, bwd):
    q, k, v, out, lse, seqinfo, mask, rng = ctx.saved_tensors
    dq, dk, dv = bwd(grads[0], q, k, v, out, lse, seqinfo, mask, rng, *ctx.params)
    return (dq, dk, dv, *_NONES[:len(ctx.params) + 3])


_OP = FusedOp(
    "attention", fwd=_k.attention_fwd if _k else None, fwd_fake=_fwd_fake,
    bwd=_bwd, bwd_fake=_bwd_fake, save=_save, backward=_backward,
    grad_args=(0, 1, 2), non_differentiable=(1,),
    fwd_schema="(Tensor q, Tensor k, Tensor v, Tensor? seqinfo, Tensor? mask, Tensor? rng, int mode, "
               "float dropout_p, float scale, int max_seqlen, int? window=None) -> (Tensor, Tensor)",
    bwd_schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? seqinfo, "
               "Tensor? mask, Tensor? rng, int mode, float dropout_p, float scale, int max_seqlen, "
               "int? window=None) -> (Tensor, Tensor, Tensor)",
) if _k is not None else None


def fused_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None,
                    max_seqlen=None, *, window=None, rng=None, generator=None):
    """The Triton path of attention() with its arguments (window included), whatever the backend.
    Extra arguments:
    rng: an explicit (seed, offset) pair (int64 [2] tensor or tuple); with
         fastbert.kernels.attention.dropout_keep_mask(rng, ...) it gives the mask the kernels apply.
    generator: the torch.Generator (of q's device) the pair is drawn from when rng is None."""
    q, k, v, seqinfo, mask, mode, scale, max_seqlen = _k.prepare(
        q, k, v, key_padding_mask, dropout_p, scale, cu_seqlens, max_seqlen)
    if window is not None:
        window = _k.check_window(window)
    if dropout_p > 0:
        if rng is None:
            rng = dropout_seed(q.device, generator)
        elif not (isinstance(rng, torch.Tensor) and rng.device == q.device and rng.dtype == torch.int64):
            rng = torch.as_tensor(rng, dtype=torch.int64, device=q.device)
    else:
        rng = None
    if window is None:  # the call of the global kernels, unchanged
        return _OP(q, k, v, seqinfo, mask, rng, mode, float(dropout_p), scale, max_seqlen)[0]
    return _OP(q, k, v, seqinfo, mask, rng, mode, float(dropout_p), scale, max_seqlen, window)[0]


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None,
              max_seqlen=None, *, window=None):
    impl = choose("attention", q, _CHECK, (q,),
                  native=lambda: _native_supports(q, k, v, key_padding_mask, cu_seqlens))
    if impl == TRITON:
        if window is None:
            return fused_attention(q, k, v, key_padding_mask, dropout_p, scale, cu_seqlens, max_seqlen)
        return fused_attention(q, k, v, key_padding_mask, dropout_p, scale, cu_seqlens, max_seqlen,
                               window=window)
    if window is not None:
        window = _check_window(window)
    if impl == NATIVE:
        if cu_seqlens is not None:
            return _native_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, window)
        return _native(q, k, v, key_padding_mask, dropout_p, scale, window)
    if window is None:
        return ref.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                             scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return ref.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale,
                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window)


def _check_window(window):
    """The kernel's window check where triton is importable, else the same rule inline."""
    if _k is not None:
        return _k.check_window(window)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:  # pragma: no cover
        raise ValueError(f"attention: window {window!r}; expected None or an int >= 0")
    return window  # pragma: no cover


def _native_supports(q, k, v, key_padding_mask, cu_seqlens=None):
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False
    if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        return False  # the reference gives the error or handles the case
    if not q.dtype.is_floating_point or q.device.type != "cpu" and cu_seqlens is not None:
        return False  # native varlen (below) reads lengths on the host: CPU tensors only
    if cu_seqlens is not None:
        return (q.dim() == 3 and key_padding_mask is None and isinstance(cu_seqlens, torch.Tensor)
                and cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2)
    if q.dim() != 4:
        return False
    if key_padding_mask is None:
        return True
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
        return False
    return not bool(key_padding_mask.all(-1).any())  # a sequence with no valid key


def _native_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale, window=None):
    """Varlen mode on SDPA: [T, H, D] scattered into a zero-padded [B, S, H, D] batch, attention with
    the padding keys masked, gathered back. The lengths are read on the host (CPU tensors only)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if bool((lengths < 0).any()) or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
        return ref.attention(q, k, v, dropout_p=dropout_p, scale=scale, cu_seqlens=cu_seqlens,
                             max_seqlen=max_seqlen, window=window)  # the reference names the problem
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    seq = int(lengths.max())
    if max_seqlen is not None and seq > max_seqlen:
        raise ValueError(f"attention: a sequence has length {seq} > max_seqlen {max_seqlen}")
    batch, total = lengths.numel(), q.shape[0]
    which = torch.repeat_interleave(torch.arange(batch), lengths)  # [T] sequence of each token
    pos = torch.arange(total) - cu_seqlens[:-1].long()[which]  # [T] position inside it
    pad = torch.arange(seq)[None, :] >= lengths[:, None]  # [B, S] True at padding keys
    pad[lengths == 0] = False  # empty sequences have no queries: any finite result will do

    def padded(t):
        return t.new_zeros(batch, seq, *t.shape[1:]).index_put((which, pos), t)

    out = _native(padded(q), padded(k), padded(v), pad, dropout_p, scale, window)  # [B, S, H, D]
    return out[which, pos]


def band_mask(seq, window, device=None):
    """[S, S] bool, True where key j is inside query i's window (|i - j| <= window)."""
    pos = torch.arange(seq, device=device)
    return (pos[:, None] - pos[None, :]).abs() <= window


def _native(q, k, v, key_padding_mask, dropout_p, scale, window=None):
    """[B, S, H, D] in and out; SDPA works on [B, H, S, D] views (no copies). A window becomes a boolean
    band mask [S, S] (with the padding: [B, 1, S, S]); rows whose window holds no valid key (padding
    queries far past the last valid key) attend everywhere and are zeroed after, as the kernels give."""
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    empty = None
    if window is not None and window < q.shape[1] - 1:
        band = band_mask(q.shape[1], window, q.device)  # [S, S]
        if mask is not None:
            mask = mask & band  # [B, 1, S, S]
            empty = ~mask.any(-1, keepdim=True)  # [B, 1, S, 1]
            mask = mask | empty
        else:
            mask = band
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.transpose(1, 2)
