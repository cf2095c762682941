"""segment_pool(x, cu_seqlens, mode="mean") -> [B, N]: one vector per sequence of a varlen batch.

    x           [T, N] packed tokens (unit stride over N), cu_seqlens int32 [B+1] (sequence b is rows
                cu_seqlens[b] .. cu_seqlens[b+1] - 1: fastbert's unpadded encoder, transformers'
                DataCollatorWithFlattening)
    mode        "mean" (of the sequence's rows), "max" (per column), "cls" (its first row)
Returns [B, N] in x's dtype (mean: fp32 accumulation). An empty sequence pools to 0 (mean, cls: its
first row would be another sequence's, so 0) or -inf (max), as sentence-transformers' flattened
pooling; no gradient flows from it. The pooled embedding of a sentence-transformers model
(fastbert.hf.st) without building the padded [B, S, N] tensor.

Implementations (chosen by fastbert.ops._dispatch.choose): kernels/segment_pool.py (mean and max; one
program per sequence and column block, forward and backward) through the FusedOp
fastbert::segment_pool_fwd / segment_pool_bwd; cls is one gather (index_select) everywhere; elsewhere
(CPU tensors, input the kernel does not take, FASTBERT_BACKEND=reference) fastbert.reference.ops.
segment_pool (index_add / scatter_reduce).
"""

import torch

from fastbert.reference import ops as ref

from ._dispatch import TRITON, choose, triton_available
from ._fused import FusedOp

if triton_available():
    from fastbert.kernels import segment_pool as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None
_CHECK = _k.check_inputs if _k is not None else None  # the kernel's input check (choose() calls it)


def _fwd(x, cu_seqlens, mode):
    return _k.segment_pool_fwd(x, cu_seqlens, mode)


def _fwd_fake(x, cu_seqlens, mode):
    batch, n = cu_seqlens.shape[0] - 1, x.shape[1]
    count = (batch, n) if mode == "max" else (0,)
    return x.new_empty((batch, n)), torch.empty(count, dtype=torch.float32, device=x.device)


def _bwd(dy, x, y, count, cu_seqlens, mode):
    return _k.segment_pool_bwd(dy, x, y, count, cu_seqlens, mode)


def _bwd_fake(dy, x, y, count, cu_seqlens, mode):
    return torch.empty((x.shape[0], dy.shape[1]), dtype=dy.dtype, device=dy.device)


def _save(ctx, inputs, output):
    x, cu_seqlens, mode = inputs
    if mode == "max":  # the backward finds the rows holding each maximum again
        ctx.save_for_backward(x, output[0], output[1], cu_seqlens)
    else:  # the mean's needs only x's row count: a [T, 0] stand-in, not x
        ctx.save_for_backward(x.new_empty((x.shape[0], 0)), output[1], output[1], cu_seqlens)
    ctx.mode = mode


def _backward(ctx, grads, bwd):
    x, y, count, cu_seqlens = ctx.saved_tensors
    return bwd(grads[0], x, y, count, cu_seqlens, ctx.mode), None, None


_OP = FusedOp(
    "segment_pool", fwd=_fwd, fwd_fake=_fwd_fake, bwd=_bwd, bwd_fake=_bwd_fake, save=_save,
    backward=_backward, grad_args=(0,), non_differentiable=(1,),
    fwd_schema="(Tensor x, Tensor cu_seqlens, str mode) -> (Tensor, Tensor)",
    bwd_schema="(Tensor dy, Tensor x, Tensor y, Tensor count, Tensor cu_seqlens, str mode) -> Tensor",
) if _k is not None else None


def _cls(x, cu_seqlens):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"fastbert segment_pool: x must be a [T, N] tensor, got {getattr(x, 'shape', x)}")
    first = cu_seqlens[:-1].long()
    empty = cu_seqlens[1:] == cu_seqlens[:-1]
    pooled = x.index_select(0, first.clamp(max=max(x.shape[0] - 1, 0)))
    return pooled.masked_fill(empty[:, None], 0)


def segment_pool(x, cu_seqlens, mode="mean"):
    if mode == "cls":
        return _cls(x, cu_seqlens)
    impl = choose("segment_pool", x, _CHECK, (x, cu_seqlens, mode), native=False)
    if impl == TRITON:
        return _OP(x, cu_seqlens, mode)[0]
    return ref.segment_pool(x, cu_seqlens, mode)
