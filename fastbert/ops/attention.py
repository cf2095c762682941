"""attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None, max_seqlen=None)

Bidirectional softmax(q k^T * scale) v per head; scale defaults to head_dim ** -0.5.

Padded mode: q, k, v [B, S, H, D] (views with arbitrary B/S/H strides and a contiguous head dim are
  used without copies); key_padding_mask [B, S] bool, True marks a padding key (ignored by every
  query), any pattern. Queries at padding positions are computed like any other (they attend to the
  valid keys), as in the reference. Returns [B, S, H, D].
Varlen mode: q, k, v [T, H, D] packed valid tokens; cu_seqlens int32 [B+1] = (0, l0, l0+l1, ..., T),
  non-decreasing (zero-length sequences allowed); max_seqlen the longest length (computed when
  None). Each sequence attends only within itself. Returns [T, H, D].
A query whose keys are all masked gets zeros (and zero gradients). dropout_p > 0 drops attention
probabilities (training); the fused kernel seeds its counter-based RNG from torch's default CPU
generator, so torch.manual_seed and activation checkpointing reproduce the mask.

Implementation: the Triton kernel (kernels/attention.py) for CUDA tensors (and for CPU tensors
under FASTBERT_BACKEND=triton with TRITON_INTERPRET=1), head_dim a multiple of 8 up to 128 (32, 64,
80, 128 tuned), fp16/bf16/fp32 (fp32 matmuls as tf32x3, about fp32 accuracy, or plain tf32 when
torch.backends.cuda.matmul.allow_tf32 is set). With
FASTBERT_BACKEND=auto, a head_dim the kernel does not support takes the native form. Elsewhere
the native form: padded mode runs F.scaled_dot_product_attention (its fused CPU kernel; boolean
mask from key_padding_mask); varlen mode, and a batch with a sequence whose keys are all padding
(SDPA would give NaN where fastbert promises zeros), run the reference.
FASTBERT_BACKEND=reference runs the reference (fastbert.reference.ops.attention) everywhere.
"""

import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref

from ._backend import backend, use_reference, use_triton


def _kernel_supports(q):
    dim = q.shape[-1]
    return dim <= 128 and dim % 8 == 0 and dim > 0


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None,
              max_seqlen=None):
    if use_triton(q) and (backend() == "triton" or _kernel_supports(q)):
        from fastbert.kernels.attention import attention as fused

        return fused(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale,
                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if cu_seqlens is None and not use_reference() and _native_supports(q, k, v, key_padding_mask):
        return _native(q, k, v, key_padding_mask, dropout_p, scale)
    return ref.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                         scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _native_supports(q, k, v, key_padding_mask):
    if q.dim() != 4 or not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype):
        return False  # the reference gives the error or handles the case
    if key_padding_mask is None:
        return True
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
        return False
    return not bool(key_padding_mask.all(-1).any())  # a sequence with no valid key


def _native(q, k, v, key_padding_mask, dropout_p, scale):
    """[B, S, H, D] in and out; SDPA works on [B, H, S, D] views (no copies)."""
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)
