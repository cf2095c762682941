# ruff: noqa: UP045
"""bias_gelu(x, bias, approximate="none", *, dropout_p=0.0) -> dropout(gelu(x + bias)).

    x            [..., N] fp32/fp16/bf16 (contiguous on the Triton path): a linear's output without bias
    bias         [N] (any float dtype: fp32 master weights under autocast work)
    approximate  "none" (exact erf form) or "tanh" (bert_pytorch / Google BERT)
    dropout_p    dropout on the activation (training; pass 0.0 in eval). The fused kernel draws its
                 mask from a seed and regenerates it in the backward (no mask is stored).
Returns [..., N] in x's dtype.

Where fastbert.ops.use_triton(x) (CUDA tensors; CPU under FASTBERT_BACKEND=triton with
TRITON_INTERPRET=1) this runs kernels/bias_gelu.py through the custom ops fastbert::bias_gelu_fwd /
fastbert::bias_gelu_bwd (register_fake and register_autograd: no graph break under torch.compile;
the backward recomputes gelu' from the saved pre-activation x and the bias, so the activation is
not kept twice). Elsewhere the native form F.gelu(x + bias) (FASTBERT_BACKEND=reference: the
reference, fastbert.reference.ops.bias_gelu). Bad input on the
Triton path raises ValueError naming the problem before any kernel is compiled.
"""

from typing import Optional  # custom_op schema inference: Optional[Tensor] works on every torch

import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref

from ._backend import triton_available, use_reference, use_triton

if triton_available():
    from fastbert.kernels import bias_gelu as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None

Tensor = torch.Tensor


@torch.library.custom_op("fastbert::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd(x: Tensor, bias: Tensor, seed: Optional[Tensor], approximate: str,
                   dropout_p: float) -> Tensor:
    # validated by bias_gelu() below before the op is called (also under torch.compile)
    return _k.bias_gelu_fwd(x, bias, approximate, validate=False, dropout_p=dropout_p, seed=seed)


@_bias_gelu_fwd.register_fake
def _(x, bias, seed, approximate, dropout_p):
    return torch.empty_like(x)


@torch.library.custom_op("fastbert::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Tensor, seed: Optional[Tensor], approximate: str,
                   dropout_p: float) -> tuple[Tensor, Tensor]:
    return _k.bias_gelu_bwd(dy, x, bias, approximate, dropout_p=dropout_p, seed=seed)


@_bias_gelu_bwd.register_fake
def _(dy, x, bias, seed, approximate, dropout_p):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias, seed, approximate, dropout_p = inputs
    ctx.save_for_backward(x, bias, seed)
    ctx.approximate, ctx.dropout_p = approximate, dropout_p


def _backward(ctx, dy):
    x, bias, seed = ctx.saved_tensors
    dx, dbias = torch.ops.fastbert.bias_gelu_bwd(dy, x, bias, seed, ctx.approximate, ctx.dropout_p)
    return dx, dbias, None, None, None


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBiasGelu(torch.autograd.Function):
    """The custom op's forward and backward without the dispatcher (tens of microseconds of host
    time per call). Eager mode uses this; torch.compile traces the custom ops. forward takes ctx
    itself (a separate setup_context costs an inspect.signature bind per call)."""

    @staticmethod
    def forward(ctx, x, bias, seed, approximate, dropout_p):
        _setup_context(ctx, (x, bias, seed, approximate, dropout_p), None)
        return _k.bias_gelu_fwd(x, bias, approximate, validate=False, dropout_p=dropout_p, seed=seed)

    @staticmethod
    def backward(ctx, dy):
        x, bias, seed = ctx.saved_tensors
        dx, dbias = _k.bias_gelu_bwd(dy, x, bias, ctx.approximate, dropout_p=ctx.dropout_p, seed=seed)
        return dx, dbias, None, None, None


def bias_gelu(x, bias, approximate="none", *, dropout_p=0.0):
    if approximate not in ref.GELU_FORMS:
        raise ValueError(f"bias_gelu approximate={approximate!r}; expected one of {ref.GELU_FORMS}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"bias_gelu dropout_p {dropout_p} outside [0, 1)")
    if not use_triton(x):
        if use_reference():
            return ref.bias_gelu(x, bias, approximate, dropout_p=dropout_p)
        y = F.gelu(x + bias, approximate=approximate)
        return F.dropout(y, dropout_p) if dropout_p > 0.0 else y
    _k.check_inputs(x, bias, approximate)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    args = (x, bias, seed, approximate, float(dropout_p))
    if torch.compiler.is_compiling():
        return torch.ops.fastbert.bias_gelu_fwd(*args)
    return _EagerBiasGelu.apply(*args)
