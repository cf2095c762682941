"""embed(input_ids, token_weight, position_weight, segment_ids=None, segment_weight=None,
position_ids=None, ln_weight=None, ln_bias=None, eps=1e-12, dropout_p=0.0) -> [B, S, N]

token[ids] + position[pos] + segment[seg], then optional LayerNorm and dropout.
"""

from fastbert.reference import ops as ref


def embed(input_ids, token_weight, position_weight, segment_ids=None, segment_weight=None,
          position_ids=None, ln_weight=None, ln_bias=None, eps=1e-12, dropout_p=0.0):
    return ref.embed(input_ids, token_weight, position_weight, segment_ids, segment_weight,
                     position_ids=position_ids, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps,
                     dropout_p=dropout_p)
