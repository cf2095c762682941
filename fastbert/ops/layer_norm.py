# ruff: noqa: UP045
"""layer_norm(x, weight, bias, eps, residual=None, variant="standard", *, dropout_p=0.0).

    x         [..., N] fp32/fp16/bf16, contiguous on the Triton path, N <= 8192
    weight    [N] scale, bias [N] shift (any float dtype: fp32 master weights under autocast work)
    residual  [..., N] or None
    variant   "standard": torch.nn.LayerNorm's math (eps inside the sqrt, biased variance);
              "bert_pytorch": (s - mean) / (std_unbiased + eps)
    dropout_p dropout applied to x before the residual add (pass 0.0 in eval)
Returns y [..., N], or (y, s) with s = dropout(x) + residual when residual is given (the pre-LN
residual stream). y and s are in the dtype of x (promoted with residual's); statistics are fp32.

Where fastbert.ops.use_triton(x) (CUDA tensors; CPU under FASTBERT_BACKEND=triton with
TRITON_INTERPRET=1) this runs kernels/layer_norm.py through the custom ops
fastbert::layer_norm_fwd / fastbert::layer_norm_bwd (register_fake and register_autograd, so
torch.compile traces them without a graph break; under autocast the kernel takes the mixed dtypes
as they come and computes in fp32). Elsewhere the native form: F.dropout, the residual add and
F.layer_norm (variant "standard", parameters in the input's dtype) or torch.std_mean (variant
"bert_pytorch"); FASTBERT_BACKEND=reference runs fastbert.reference.ops.layer_norm instead.
Bad input on the Triton path raises ValueError naming the problem before any kernel is compiled.
"""

from typing import Optional  # custom_op schema inference: Optional[Tensor] works on every torch

import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref

from ._backend import triton_available, use_reference, use_triton

if triton_available():
    from fastbert.kernels import layer_norm as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None

Tensor = torch.Tensor


@torch.library.custom_op("fastbert::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                    seed: Optional[Tensor], eps: float, unbiased: bool,
                    dropout_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd); s has shape [0] unless residual or dropout."""
    # validated by layer_norm() below before the op is called (also under torch.compile)
    return _k.layer_norm_fwd(x, weight, bias, eps, residual, unbiased, dropout_p, seed, validate=False)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, seed, eps, unbiased, dropout_p):
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    store_sum = residual is not None or dropout_p > 0.0
    y = x.new_empty(x.shape, dtype=dtype)
    s = x.new_empty(x.shape if store_sum else (0,), dtype=dtype)
    stats = x.shape[:-1]
    return y, s, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


@torch.library.custom_op("fastbert::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, dsum_out: Optional[Tensor], s: Tensor, weight: Tensor, mean: Tensor,
                    rstd: Tensor, seed: Optional[Tensor], unbiased: bool,
                    dropout_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dsum, dx, dweight, dbias); dx has shape [0] unless dropout."""
    return _k.layer_norm_bwd(dy, dsum_out, s, weight, mean, rstd, unbiased, dropout_p, seed)


@_layer_norm_bwd.register_fake
def _(dy, dsum_out, s, weight, mean, rstd, seed, unbiased, dropout_p):
    n = s.shape[-1]
    dx = s.new_empty(s.shape if dropout_p > 0.0 else (0,))
    return (s.new_empty(s.shape), dx, weight.new_empty((n,)), weight.new_empty((n,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, seed, eps, unbiased, dropout_p = inputs
    ctx.set_materialize_grads(False)  # no zero tensors for the unused s / mean / rstd gradients
    _, s, mean, rstd = output
    stored = residual is not None or dropout_p > 0.0
    ctx.save_for_backward(s if stored else x, weight, mean, rstd, seed)
    ctx.unbiased, ctx.dropout_p = unbiased, dropout_p
    ctx.has_residual = residual is not None
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, weight.dtype, bias.dtype)


def _backward(ctx, dy, ds, _dmean, _drstd, bwd=None):
    s, weight, mean, rstd, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    dsum_out = ds if ctx.has_residual and ds is not None else None
    bwd = bwd or torch.ops.fastbert.layer_norm_bwd
    dsum, dx, dw, db = bwd(dy, dsum_out, s, weight, mean, rstd, seed, ctx.unbiased, ctx.dropout_p)
    x_dtype, r_dtype, _, b_dtype = ctx.dtypes
    dres = dsum.to(r_dtype) if ctx.has_residual else None
    dx = (dx if ctx.dropout_p > 0.0 else dsum).to(x_dtype)
    return dx, dw, db.to(b_dtype), dres, None, None, None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _kernel_bwd(dy, dsum_out, s, weight, mean, rstd, seed, unbiased, dropout_p):
    return _k.layer_norm_bwd(dy, dsum_out, s, weight, mean, rstd, unbiased, dropout_p, seed)


class _EagerLayerNorm(torch.autograd.Function):
    """The custom op's forward and backward without the dispatcher (tens of microseconds of host
    time per call, more than the kernel at BERT sizes). Eager mode uses this; torch.compile traces
    the custom ops. forward takes ctx itself: a separate setup_context makes every apply() bind
    the arguments with inspect.signature (about 100 us of host time)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, seed, eps, unbiased, dropout_p):
        output = _k.layer_norm_fwd(x, weight, bias, eps, residual, unbiased, dropout_p, seed,
                                   validate=False)
        _setup_context(ctx, (x, weight, bias, residual, seed, eps, unbiased, dropout_p), output)
        ctx.mark_non_differentiable(output[2], output[3])
        return output

    @staticmethod
    def backward(ctx, dy, ds, dmean, drstd):
        return _backward(ctx, dy, ds, dmean, drstd, bwd=_kernel_bwd)


def _native_supports(x, weight, bias, residual):
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
        y = weight * (s - mean) / (std + eps) + bias
    return y if residual is None else (y, s)


def layer_norm(x, weight, bias, eps, residual=None, variant="standard", *, dropout_p=0.0):
    if variant not in ref.LN_VARIANTS:
        raise ValueError(f"layer_norm variant {variant!r}; expected one of {ref.LN_VARIANTS}")
    if not use_triton(x):
        if use_reference() or not _native_supports(x, weight, bias, residual):
            return ref.layer_norm(x, weight, bias, eps, residual=residual, variant=variant,
                                  dropout_p=dropout_p)
        return _native(x, weight, bias, eps, residual, variant, dropout_p)
    _k.check_inputs(x, weight, bias, residual, variant, dropout_p)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    args = (x, weight, bias, residual, seed, float(eps), variant == "bert_pytorch", float(dropout_p))
    if torch.compiler.is_compiling():
        y, s, _, _ = torch.ops.fastbert.layer_norm_fwd(*args)
    else:
        y, s, _, _ = _EagerLayerNorm.apply(*args)
    return y if residual is None else (y, s)
