"""fastbert's ops: every fused op behind one decision point (fastbert.ops._dispatch.choose).

    layer_norm(x, weight, bias, eps, residual=None, variant="standard"|"bert_pytorch", *, dropout_p=0.0)
    bias_gelu(x, bias, approximate="none"|"tanh", *, dropout_p=0.0)
    geglu(x, bias=None, approximate="none"|"tanh", *, dropout_p=0.0)  gelu(a) * g of a [..., 2F] projection
    attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None, max_seqlen=None,
              *, window=None)
    rotary(qkv, cos, sin, cu_seqlens=None, max_seqlen=None)  RoPE on q, k of a packed [T, 3, H, D]
        projection (rotary_tables(rotary_dim, max_positions, theta) builds cos, sin)
    segment_pool(x, cu_seqlens, mode="mean"|"max"|"cls")  one vector per sequence of a varlen [T, N] batch
    embed(input_ids, token_weight, position_weight, segment_ids=None, segment_weight=None, ...)
    mlm_mask(input_ids, vocab_size, mask_id, pad_id=0, special_ids=(), ...)
    fused_block(block, x, key_padding_mask, cu_seqlens, max_seqlen)  a whole transformer block in one
        autograd node where every op would take its Triton kernel (eager); None elsewhere
    modern_block(block, res, delta, tables, key_padding_mask, cu_seqlens, max_seqlen)  the same for a
        ModernBERT layer on the residual stream (res, delta); run_modern_block from its parameters

Each is documented in its own module. FASTBERT_BACKEND (see _dispatch) forces a path; `python -m
fastbert.info` shows which implementation each op uses on each device, and last_choices() what the
latest calls ran.
"""

from ._dispatch import backend, choose, last_choices, use_triton
from .attention import attention
from .bias_gelu import bias_gelu
from .block import fused_block
from .embed import embed
from .geglu import geglu
from .layer_norm import layer_norm
from .mlm_mask import mlm_mask
from .modern_block import modern_block, run_modern_block
from .rotary import rotary, rotary_tables
from .segment_pool import segment_pool

__all__ = ["attention", "backend", "bias_gelu", "choose", "embed", "fused_block", "geglu", "last_choices",
           "layer_norm", "mlm_mask", "modern_block", "rotary", "rotary_tables", "run_modern_block",
           "segment_pool", "use_triton"]
