"""geglu(x, bias=None, approximate="none", *, dropout_p=0.0) -> dropout(gelu(a) * g).

    x            [..., 2F] fp32/fp16/bf16 (contiguous on the Triton path): the concatenated [a, g]
                 projection (a linear of 2F outputs, as ModernBERT's Wi); a, g = (x + bias).chunk(2, -1)
    bias         [2F] or None (ModernBERT's linears have no bias; any float dtype: fp32 master weights
                 under autocast work)
    approximate  "none" (exact erf GELU, ModernBERT's "gelu") or "tanh"
    dropout_p    dropout on the product (training; pass 0.0 in eval). The fused kernel draws its mask
                 from a seed and regenerates it in the backward (no mask is stored).
Returns [..., F] in x's dtype.

Implementations (chosen by fastbert.ops._dispatch.choose): kernels/geglu.py through the FusedOp
fastbert::geglu_fwd / geglu_bwd (no graph break under torch.compile; the backward recomputes gelu(a)
and gelu'(a) from the saved projection x, so neither the activation nor the product is kept); the
native form F.gelu(a) * g and F.dropout, for CPU tensors and input the kernel does not take; or
fastbert.reference.ops.geglu. The dropout seed is drawn on x's device (fastbert.ops._rng).
"""

import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref

from ._dispatch import NATIVE, TRITON, choose, triton_available
from ._rng import dropout_seed
from .bias_gelu import gelu_family_op  # the same custom ops and autograd, geglu's shapes

if triton_available():
    from fastbert.kernels import geglu as _k
else:  # pragma: no cover - triton is a dependency; the reference keeps working without it
    _k = None
_CHECK = _k.check_inputs if _k is not None else None  # the kernel's input check (choose() calls it)
_OP = gelu_family_op("geglu", _k.geglu_fwd, _k.geglu_bwd, halves=True) if _k is not None else None


def _native_supports(x, bias):
    return (isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.dim() >= 1
            and x.shape[-1] % 2 == 0 and (bias is None or isinstance(bias, torch.Tensor)))


def geglu(x, bias=None, approximate="none", *, dropout_p=0.0):
    if approximate not in ref.GELU_FORMS:
        raise ValueError(f"geglu approximate={approximate!r}; expected one of {ref.GELU_FORMS}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"geglu dropout_p {dropout_p} outside [0, 1)")
    impl = choose("geglu", x, _CHECK, (x, bias, approximate), native=lambda: _native_supports(x, bias))
    if impl == TRITON:
        seed = dropout_seed(x.device) if dropout_p > 0.0 else None
        return _OP(x, bias, seed, approximate, float(dropout_p))
    if impl == NATIVE:
        a, g = (x if bias is None else x + bias).chunk(2, dim=-1)
        y = F.gelu(a, approximate=approximate) * g
        return F.dropout(y, dropout_p) if dropout_p > 0.0 else y
    return ref.geglu(x, bias, approximate, dropout_p=dropout_p)
