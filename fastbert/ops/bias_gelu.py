"""bias_gelu(x, bias, approximate="none") -> gelu(x + bias).

    x            [..., N] fp32/fp16/bf16 (contiguous on the Triton path): a linear's output without bias
    bias         [N] (any float dtype: fp32 master weights under autocast work)
    approximate  "none" (exact erf form) or "tanh" (bert_pytorch / Google BERT)
Returns [..., N] in x's dtype.

Where fastbert.ops.use_triton(x) (CUDA tensors; CPU under FASTBERT_BACKEND=triton with
TRITON_INTERPRET=1) this runs kernels/bias_gelu.py through the custom ops fastbert::bias_gelu_fwd /
fastbert::bias_gelu_bwd (register_fake and register_autograd: no graph break under torch.compile;
the backward recomputes gelu' from the saved pre-activation x and the bias, so the activation is
not kept twice). Elsewhere the native form F.gelu(x + bias) (FASTBERT_BACKEND=reference: the
reference, fastbert.reference.ops.bias_gelu). Bad input on the
Triton path raises ValueError naming the problem before any kernel is compiled.
"""

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
def _bias_gelu_fwd(x: Tensor, bias: Tensor, approximate: str) -> Tensor:
    # validated by bias_gelu() below before the op is called (also under torch.compile)
    return _k.bias_gelu_fwd(x, bias, approximate, validate=False)


@_bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@torch.library.custom_op("fastbert::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd(dy: Tensor, x: Tensor, bias: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    return _k.bias_gelu_bwd(dy, x, bias, approximate)


@_bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = torch.ops.fastbert.bias_gelu_bwd(dy, x, bias, ctx.approximate)
    return dx, dbias, None


_bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBiasGelu(torch.autograd.Function):
    """The custom op's forward and backward without the dispatcher (tens of microseconds of host
    time per call). Eager mode uses this; torch.compile traces the custom ops. forward takes ctx
    itself (a separate setup_context costs an inspect.signature bind per call)."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        _setup_context(ctx, (x, bias, approximate), None)
        return _k.bias_gelu_fwd(x, bias, approximate, validate=False)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = _k.bias_gelu_bwd(dy, x, bias, ctx.approximate)
        return dx, dbias, None


def bias_gelu(x, bias, approximate="none"):
    if approximate not in ref.GELU_FORMS:
        raise ValueError(f"bias_gelu approximate={approximate!r}; expected one of {ref.GELU_FORMS}")
    if not use_triton(x):
        if use_reference():
            return ref.bias_gelu(x, bias, approximate)
        return F.gelu(x + bias, approximate=approximate)
    _k.check_inputs(x, bias, approximate)
    if torch.compiler.is_compiling():
        return torch.ops.fastbert.bias_gelu_fwd(x, bias, approximate)
    return _EagerBiasGelu.apply(x, bias, approximate)
