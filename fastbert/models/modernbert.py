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

import torch

from fastbert.ops import use_triton
from fastbert.reference.modernbert import ModernEncoder as ReferenceModernEncoder

from .bert import FastModules, scatter_tokens, unpad_plan


class ModernEncoder(FastModules, ReferenceModernEncoder):
    """ModernBERT encoder on fastbert.ops. unpad: "auto" (when attention is fused), True or False."""

    def forward(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None, *,
                token_type_ids=None):
        """As the reference's forward; at padding positions the output is zeros when it unpads."""
        self._no_segments(segment_ids, token_type_ids, position_ids)
        self.check_inputs(input_ids, None)
        pad = self.key_padding_mask(input_ids, attention_mask)
        weight = self.embedding.token.weight
        unpad = self.unpad if self.unpad != "auto" else use_triton(weight)
        if pad is None or not unpad:
            self._check_ids_on_device(input_ids)
            return self.run_layers(self.embedding(input_ids), pad)
        batch, seq = input_ids.shape
        index, cu_seqlens = self._unpad_checked(input_ids, pad)
        real = input_ids.reshape(-1).index_select(0, index)  # [T]: only the real tokens are embedded
        h = self.run_layers(self.embedding(real), None, cu_seqlens, seq)
        return scatter_tokens(h, index, batch, seq)

    def _device_check(self, input_ids):
        """Whether ids on this device are checked here: off the CPU (check_inputs checks those), not while
        compiling or capturing a CUDA graph (no reads back there; fastbert.train.packing checks its ids)."""
        return (input_ids.device.type != "cpu" and not torch.compiler.is_compiling()
                and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()))

    def _bad_ids(self, input_ids):
        return (input_ids < 0) | (input_ids >= self.config.vocab_size)

    def _raise_bad_ids(self):
        raise ValueError(f"token id out of range: every id must be in [0, {self.config.vocab_size}) (the "
                         f"embedding table's rows)")

    def _check_ids_on_device(self, input_ids):
        """The token table is indexed by nn.Embedding, which would fault on a GPU for an id outside it: a
        ValueError instead (one read back)."""
        if self._device_check(input_ids) and bool(self._bad_ids(input_ids).any()):
            self._raise_bad_ids()

    def _unpad_checked(self, input_ids, pad):
        """unpad_plan(pad), with the real tokens' ids checked in the same read back off the CPU."""
        if not self._device_check(input_ids):
            return unpad_plan(pad)
        valid = ~pad
        total, bad = torch.stack([valid.sum(), (self._bad_ids(input_ids) & valid).sum()]).tolist()  # one sync
        if bad:
            self._raise_bad_ids()
        return unpad_plan(pad, total)
