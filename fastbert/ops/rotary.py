"""rotary(qkv, cos, sin, cu_seqlens=None, max_seqlen=None) -> qkv with rotary embeddings on q and k.

    qkv         [T, 3, H, D] packed tokens with cu_seqlens int32 [B+1] (varlen: positions restart at 0
                in every sequence), or [B, S, 3, H, D] (padded: token s has position s); the head dim
                contiguous, other strides free (a view of the QKV linear's output)
    cos, sin    [P, R/2] tables, cos[p, j] = cos(p * f_j) (rotary_tables builds them; R <= D the
                rotary dim, dims past it pass through); constants: no gradient flows into them
    max_seqlen  the longest sequence (varlen; computed when None, a host sync, as attention's)
Returns a new tensor of qkv's shape: q and k rotated in the half-split layout of transformers'
rotate_half (ModernBERT, Llama): q * cat(cos, cos) + rotate_half(q) * cat(sin, sin) on the first R
dims, v unchanged. fp32 arithmetic, stored in qkv's dtype.

    rotary_tables(rotary_dim, max_positions, theta=10000.0, device=None) -> (cos, sin) fp32 [P, R/2]
with f_j = theta^(-2j/R), as transformers' default RoPE (ModernBERT: theta 160000 for global layers,
10000 for local ones).

Implementations (chosen by fastbert.ops._dispatch.choose): kernels/rotary.py (one kernel for q, k and
v; the backward is the same kernel rotating back) through the FusedOp fastbert::rotary_fwd /
rotary_bwd; elsewhere (CPU tensors, input the kernel does not take, FASTBERT_BACKEND=reference)
fastbert.reference.ops.rotary, which is plain PyTorch (there is no torch fused form).
"""

import torch

from fastbert.reference import ops as ref

from ._dispatch import TRITON, choose, triton_available
from ._fused import FusedOp

if triton_available():
    from fastbert.kernels import rotary as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None
_CHECK = _k.check_inputs if _k is not None else None  # the kernel's input check (choose() calls it)


rotary_tables = ref.rotary_tables  # the tables are plain PyTorch: the reference's function


def _fwd(qkv, cos, sin, seqinfo, max_seqlen):
    return _k.rotary_fwd(qkv, cos, sin, seqinfo, max_seqlen)


def _fwd_fake(qkv, cos, sin, seqinfo, max_seqlen):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _bwd(dout, cos, sin, seqinfo, max_seqlen):
    return _k.rotary_bwd(dout, cos, sin, seqinfo, max_seqlen)


def _bwd_fake(dout, cos, sin, seqinfo, max_seqlen):
    return torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)


def _save(ctx, inputs, output):
    _, cos, sin, seqinfo, max_seqlen = inputs
    ctx.save_for_backward(cos, sin, seqinfo)
    ctx.max_seqlen = max_seqlen


def _backward(ctx, grads, bwd):
    cos, sin, seqinfo = ctx.saved_tensors
    return bwd(grads[0], cos, sin, seqinfo, ctx.max_seqlen), None, None, None, None


_OP = FusedOp(
    "rotary", fwd=_fwd, fwd_fake=_fwd_fake, bwd=_bwd, bwd_fake=_bwd_fake, save=_save,
    backward=_backward, grad_args=(0,),
    fwd_schema="(Tensor qkv, Tensor cos, Tensor sin, Tensor? seqinfo, int max_seqlen) -> Tensor",
    bwd_schema="(Tensor dout, Tensor cos, Tensor sin, Tensor? seqinfo, int max_seqlen) -> Tensor",
) if _k is not None else None


def rotary(qkv, cos, sin, cu_seqlens=None, max_seqlen=None):
    impl = choose("rotary", qkv, _CHECK, (qkv, cos, sin, cu_seqlens), native=False)
    if impl == TRITON:
        seqinfo, max_seqlen = _k.prepare(qkv, cos, sin, cu_seqlens, max_seqlen)
        return _OP(qkv, cos, sin, seqinfo, max_seqlen)
    return ref.rotary(qkv, cos, sin, cu_seqlens=cu_seqlens)
