"""The fast ModernBERT encoder (preset "modernbert"): the reference's modules on fastbert.ops.

On the Triton path a padded batch is unpadded once before the embedding (only the real tokens are
embedded); every layer runs on the [T, N] real tokens: one Wqkv matmul, ops.rotary on the packed
projection (positions restart in each sequence, which for rotary attention is the padded batch's
arithmetic whatever the padding side: scores depend on i - j only), varlen ops.attention with the
layer's window (key blocks outside it are skipped), ops.geglu, each residual add fused into the next
LayerNorm. The output is scattered back to [B, S, N] with zeros at padding positions (unpad=False
keeps the padded layout, as the reference computes it). Unpadding reads the count of real tokens back
(one sync per forward); forward_packed has fixed shapes and none.
"""

from fastbert import ops as fast_ops
from fastbert.ops import use_triton
from fastbert.reference.model import BertConfig
from fastbert.reference.modernbert import ModernEncoder as ReferenceModernEncoder

from .bert import check_unpad, scatter_tokens, unpad_plan


class ModernEncoder(ReferenceModernEncoder):
    """ModernBERT encoder on fastbert.ops. unpad: "auto" (when attention is fused), True or False."""

    ops = fast_ops

    def __init__(self, cfg: BertConfig, unpad="auto"):
        super().__init__(cfg)
        self.unpad = check_unpad(unpad)

    def forward(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None, *,
                token_type_ids=None):
        """As the reference's forward; at padding positions the output is zeros when it unpads."""
        self._no_segments(segment_ids, token_type_ids, position_ids)
        self.check_inputs(input_ids, None)
        pad = self.key_padding_mask(input_ids, attention_mask)
        weight = self.embedding.token.weight
        unpad = self.unpad if self.unpad != "auto" else use_triton(weight)
        if pad is None or not unpad:
            return self.run_layers(self.embedding(input_ids), pad)
        batch, seq = input_ids.shape
        index, cu_seqlens = unpad_plan(pad)
        real = input_ids.reshape(-1).index_select(0, index)  # [T]: only the real tokens are embedded
        h = self.run_layers(self.embedding(real), None, cu_seqlens, seq)
        return scatter_tokens(h, index, batch, seq)
