"""layer_norm(x, weight, bias, eps, residual=None, variant="standard", *, dropout_p=0.0).

    x         [..., N] fp32/fp16/bf16, contiguous on the Triton path, N <= 8192
    weight    [N] scale, bias [N] shift or None (a bias-free LayerNorm, as ModernBERT's; any float
              dtype: fp32 master weights under autocast work)
    residual  [..., N] or None
    variant   "standard": torch.nn.LayerNorm's math (eps inside the sqrt, biased variance);
              "bert_pytorch": (s - mean) / (std_unbiased + eps)
    dropout_p dropout applied to x before the residual add (pass 0.0 in eval)
Returns y [..., N], or (y, s) with s = dropout(x) + residual when residual is given (the pre-LN
residual stream). y and s are in the dtype of x (promoted with residual's); statistics are fp32.

Implementations (chosen by fastbert.ops._dispatch.choose): kernels/layer_norm.py through the
FusedOp fastbert::layer_norm_fwd / layer_norm_bwd (torch.compile traces them without a graph break;
under autocast the kernel takes the mixed dtypes as they come and computes in fp32); the native form
F.dropout, the residual add and F.layer_norm (variant "standard") or torch.std_mean ("bert_pytorch"),
for CPU tensors and for input the kernel does not take; or fastbert.reference.ops.layer_norm.
The dropout seed is drawn on x's device (fastbert.ops._rng).
"""

import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref

from ._dispatch import NATIVE, TRITON, choose, triton_available
from ._fused import FusedOp
from ._rng import dropout_seed

if triton_available():
    from fastbert.kernels import layer_norm as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None
_CHECK = _k.check_inputs if _k is not None else None  # the kernel's input check (choose() calls it)

Tensor = torch.Tensor


def _fwd(x, weight, bias, residual, seed, eps, unbiased, dropout_p):
    """(y, s, mean, rstd); s has shape [0] unless residual or dropout. Inputs checked by choose()."""
    return _k.layer_norm_fwd(x, weight, bias, eps, residual, unbiased, dropout_p, seed, validate=False)


def _fwd_fake(x, weight, bias, residual, seed, eps, unbiased, dropout_p):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    store_sum = residual is not None or dropout_p > 0.0
    y = x.new_empty(x.shape, dtype=dtype)
    s = x.new_empty(x.shape if store_sum else (0,), dtype=dtype)
    stats = x.shape[:-1]
    return y, s, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def _bwd(dy, dsum_out, s, weight, mean, rstd, seed, unbiased, dropout_p, has_bias=True):
    """(dsum, dx, dweight, dbias); dx has shape [0] unless dropout, dbias shape [0] without a bias."""
    if has_bias:
        return _k.layer_norm_bwd(dy, dsum_out, s, weight, mean, rstd, unbiased, dropout_p, seed)
    dsum, dx, dw, _ = _k.layer_norm_bwd(dy, dsum_out, s, weight, mean, rstd, unbiased, dropout_p, seed,
                                        has_bias=False)
    return dsum, dx, dw, weight.new_empty((0,))


def _bwd_fake(dy, dsum_out, s, weight, mean, rstd, seed, unbiased, dropout_p, has_bias=True):
    n = s.shape[-1]
    dx = s.new_empty(s.shape if dropout_p > 0.0 else (0,))
    return (s.new_empty(s.shape), dx, weight.new_empty((n,)), weight.new_empty((n,) if has_bias else (0,)))


def _save(ctx, inputs, output):
    x, weight, bias, residual, seed, eps, unbiased, dropout_p = inputs
    ctx.set_materialize_grads(False)  # no zero tensors for the unused s / mean / rstd gradients
    _, s, mean, rstd = output
    stored = residual is not None or dropout_p > 0.0
    ctx.save_for_backward(s if stored else x, weight, mean, rstd, seed)
    ctx.unbiased, ctx.dropout_p = unbiased, dropout_p
    ctx.has_residual = residual is not None
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grads, bwd):
    dy, ds = grads[0], grads[1]
    s, weight, mean, rstd, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    dsum_out = ds if ctx.has_residual and ds is not None else None
    x_dtype, r_dtype, b_dtype = ctx.dtypes
    if b_dtype is None:  # bias-free: no dB
        dsum, dx, dw, _ = bwd(dy, dsum_out, s, weight, mean, rstd, seed, ctx.unbiased, ctx.dropout_p, False)
        db = None
    else:
        dsum, dx, dw, db = bwd(dy, dsum_out, s, weight, mean, rstd, seed, ctx.unbiased, ctx.dropout_p)
        db = db.to(b_dtype)
    dres = dsum.to(r_dtype) if ctx.has_residual else None
    dx = (dx if ctx.dropout_p > 0.0 else dsum).to(x_dtype)
    return dx, dw, db, dres, None, None, None, None


_OP = FusedOp(
    "layer_norm", fwd=_fwd, fwd_fake=_fwd_fake, bwd=_bwd, bwd_fake=_bwd_fake, save=_save,
    backward=_backward, grad_args=(0, 1, 2, 3), non_differentiable=(2, 3),
    fwd_schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? seed, float eps, "
               "bool unbiased, float dropout_p) -> (Tensor, Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor dy, Tensor? dsum_out, Tensor s, Tensor weight, Tensor mean, Tensor rstd, "
               "Tensor? seed, bool unbiased, float dropout_p, bool has_bias=True) "
               "-> (Tensor, Tensor, Tensor, Tensor)",
) if _k is not None else None


def _native_supports(x, weight, bias, residual):
    if bias is None:  # bias-free
        return (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dtype == weight.dtype
                and x.dtype.is_floating_point
                and (residual is None or (isinstance(residual, Tensor) and residual.dtype == x.dtype)))
    return (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(bias, Tensor)
            and x.dtype == weight.dtype == bias.dtype and x.dtype.is_floating_point
            and (residual is None or (isinstance(residual, Tensor) and residual.dtype == x.dtype)))


def _native(x, weight, bias, eps, residual, variant, dropout_p):
    """The reference's math on torch's fused ops (one LayerNorm kernel, or one std_mean pass)."""
    if dropout_p > 0.0:
        x = F.dropout(x, dropout_p)
    s = x if residual is None else x + residual
    if variant == "standard":
        y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    else:
        std, mean = torch.std_mean(s, dim=-1, keepdim=True)  # unbiased std, as bert_pytorch
        y = weight * (s - mean) / (std + eps)
        if bias is not None:
            y = y + bias
    return y if residual is None else (y, s)



def layer_norm(x, weight, bias, eps, residual=None, variant="standard", *, dropout_p=0.0):
    if variant not in ref.LN_VARIANTS:
        raise ValueError(f"layer_norm variant {variant!r}; expected one of {ref.LN_VARIANTS}")
    impl = choose("layer_norm", x, _CHECK, (x, weight, bias, residual, variant, dropout_p),
                  native=lambda: _native_supports(x, weight, bias, residual))
    if impl == TRITON:
        seed = dropout_seed(x.device) if dropout_p > 0.0 else None
        y, s, _, _ = _OP(x, weight, bias, residual, seed, float(eps), variant == "bert_pytorch",
                         float(dropout_p))
        return y if residual is None else (y, s)
    if impl == NATIVE:
        return _native(x, weight, bias, eps, residual, variant, dropout_p)
    return ref.layer_norm(x, weight, bias, eps, residual=residual, variant=variant, dropout_p=dropout_p)
