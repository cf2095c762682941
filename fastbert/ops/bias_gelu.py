"""bias_gelu(x, bias, approximate="none", *, dropout_p=0.0) -> dropout(gelu(x + bias)).

    x            [..., N] fp32/fp16/bf16 (contiguous on the Triton path): a linear's output without bias
    bias         [N] (any float dtype: fp32 master weights under autocast work)
    approximate  "none" (exact erf form) or "tanh" (bert_pytorch / Google BERT)
    dropout_p    dropout on the activation (training; pass 0.0 in eval). The fused kernel draws its
                 mask from a seed and regenerates it in the backward (no mask is stored).
Returns [..., N] in x's dtype.

Implementations (chosen by fastbert.ops._dispatch.choose): kernels/bias_gelu.py through the FusedOp
fastbert::bias_gelu_fwd / bias_gelu_bwd (no graph break under torch.compile; the backward recomputes
gelu' from the saved pre-activation x and the bias, so the activation is not kept twice); the native
form F.gelu(x + bias) and F.dropout, for CPU tensors and input the kernel does not take; or
fastbert.reference.ops.bias_gelu. The dropout seed is drawn on x's device (fastbert.ops._rng).
"""

import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref

from ._dispatch import NATIVE, TRITON, choose, triton_available
from ._fused import FusedOp
from ._rng import dropout_seed

if triton_available():
    from fastbert.kernels import bias_gelu as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None
_CHECK = _k.check_inputs if _k is not None else None  # the kernel's input check (choose() calls it)


def gelu_family_op(name, fwd, bwd, halves):
    """The FusedOp of an op (x, bias, seed, approximate, dropout_p) on launchers of kernels/bias_gelu.py's
    signature: bias_gelu's (halves=False: the output like x, bias [N] required) and geglu's (halves=True:
    the output [..., F] of x [..., 2F], bias optional; without one the backward's dbias is an empty
    tensor, since a custom op returns tensors only). The backward recomputes from the saved x and bias.
    The launchers are called straight from these closures: no frame more than a function per op."""
    bias_type = "Tensor?" if halves else "Tensor"

    def _fwd(x, bias, seed, approximate, dropout_p):
        return fwd(x, bias, approximate, validate=False, dropout_p=dropout_p, seed=seed)

    def _fwd_fake(x, bias, seed, approximate, dropout_p):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2)) if halves else torch.empty_like(x)

    def _bwd(dy, x, bias, seed, approximate, dropout_p):
        dx, db = bwd(dy, x, bias, approximate, dropout_p=dropout_p, seed=seed)
        return dx, db if db is not None else x.new_empty((0,))

    def _bwd_fake(dy, x, bias, seed, approximate, dropout_p):
        return torch.empty_like(x), x.new_empty((0,)) if bias is None else torch.empty_like(bias)

    def _save(ctx, inputs, output):
        x, bias, seed, approximate, dropout_p = inputs
        ctx.save_for_backward(x, bias, seed)
        ctx.approximate, ctx.dropout_p = approximate, dropout_p

    def _backward(ctx, grads, bwd):
        x, bias, seed = ctx.saved_tensors
        dx, dbias = bwd(grads[0], x, bias, seed, ctx.approximate, ctx.dropout_p)
        return dx, dbias if bias is not None else None, None, None, None

    return FusedOp(
        name, fwd=_fwd, fwd_fake=_fwd_fake, bwd=_bwd, bwd_fake=_bwd_fake, save=_save,
        backward=_backward, grad_args=(0, 1),
        fwd_schema=f"(Tensor x, {bias_type} bias, Tensor? seed, str approximate, float dropout_p) -> Tensor",
        bwd_schema=f"(Tensor dy, Tensor x, {bias_type} bias, Tensor? seed, str approximate, float dropout_p) "
                   "-> (Tensor, Tensor)",
    )


_OP = gelu_family_op("bias_gelu", _k.bias_gelu_fwd, _k.bias_gelu_bwd, halves=False) if _k else None


def bias_gelu(x, bias, approximate="none", *, dropout_p=0.0):
    if approximate not in ref.GELU_FORMS:
        raise ValueError(f"bias_gelu approximate={approximate!r}; expected one of {ref.GELU_FORMS}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"bias_gelu dropout_p {dropout_p} outside [0, 1)")
    impl = choose("bias_gelu", x, _CHECK, (x, bias, approximate),
                  native=lambda: isinstance(bias, torch.Tensor) and x.dtype.is_floating_point)
    if impl == TRITON:
        seed = dropout_seed(x.device) if dropout_p > 0.0 else None
        return _OP(x, bias, seed, approximate, float(dropout_p))
    if impl == NATIVE:
        y = F.gelu(x + bias, approximate=approximate)
        return F.dropout(y, dropout_p) if dropout_p > 0.0 else y
    return ref.bias_gelu(x, bias, approximate, dropout_p=dropout_p)
