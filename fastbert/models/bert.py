"""The fast BERT encoder and the bert_pytorch drop-ins BERT and BERTLM.

The modules are the reference's (fastbert.reference.model) with every op taken from fastbert.ops,
so each op runs its fused kernel where one applies. When the batch has padding and attention runs
its Triton kernel, the encoder unpads once after the embedding: all layers run on the packed
[T, N] valid tokens (varlen attention), and the output is scattered back to [B, S, N] with zeros at
padding positions (bert_pytorch computes values there that no loss reads; pass unpad=False to get
them). Unpadding reads the count of real tokens back to the host (one sync per forward: the shapes
depend on it); the packed form (Encoder.forward_packed, batches from fastbert.train.packing) has fixed
shapes and no sync at all.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops as fast_ops
from fastbert.ops import use_triton
from fastbert.reference.model import BertConfig
from fastbert.reference.model import Encoder as ReferenceEncoder


def check_unpad(unpad):
    if unpad not in ("auto", True, False):
        raise ValueError(f"unpad={unpad!r}; expected 'auto', True or False")
    return unpad


def unpad_plan(pad, total=None):
    """(index [T] flat positions of the real tokens, cu_seqlens int32 [B+1]) of a key padding mask
    [B, S] (True at padding); the index's size is read back to the host (the one sync) unless the
    caller read it already (total: the count of real tokens)."""
    valid = ~pad
    flat = valid.reshape(-1)
    index = flat.nonzero().squeeze(1) if total is None else _nonzero_static(flat, total)
    lengths = valid.sum(1, dtype=torch.int32)
    return index, F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _nonzero_static(flat, total):
    try:
        return torch.nonzero_static(flat, size=total).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):  # a torch or device without it
        return flat.nonzero().squeeze(1)


def scatter_tokens(h, index, batch, seq):
    """[T, N] real tokens -> [B, S, N] with zeros at padding positions."""
    return h.new_zeros(batch * seq, h.shape[-1]).index_copy(0, index, h).view(batch, seq, -1)


class FastModules:
    """What makes a reference encoder the fast one: its modules take fastbert.ops, and it may unpad
    ("auto": when attention runs fused, True or False)."""

    ops = fast_ops

    def __init__(self, cfg: BertConfig, unpad="auto"):
        super().__init__(cfg)
        self.unpad = check_unpad(unpad)


class Encoder(FastModules, ReferenceEncoder):
    """BERT encoder on fastbert.ops. unpad: "auto" (when attention is fused), True or False."""

    def forward(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None, *,
                token_type_ids=None):
        """As the reference encoder's forward; token_type_ids is transformers' name for segment_ids."""
        segment_ids = self.segments(segment_ids, token_type_ids)
        x, pad = self.embed(input_ids, segment_ids, attention_mask, position_ids)  # [B, S, N]
        unpad = self.unpad if self.unpad != "auto" else use_triton(x)
        if pad is None or not unpad:
            for block in self.transformer_blocks:
                x = block(x, pad)
            return x
        batch, seq, hidden = x.shape
        index, cu_seqlens = unpad_plan(pad)
        max_seqlen = seq  # a bound, not the longest length: reading that back would sync the host
        h = x.reshape(batch * seq, hidden).index_select(0, index)  # [T, N]
        for block in self.transformer_blocks:
            h = block(h, None, cu_seqlens, max_seqlen)
        return scatter_tokens(h, index, batch, seq)


class BERT(Encoder):
    """Drop-in for bert_pytorch.model.BERT: same constructor, forward, outputs and state_dict keys."""

    def __init__(self, vocab_size, hidden=768, n_layers=12, attn_heads=12, dropout=0.1, unpad="auto",
                 **config):
        super().__init__(BertConfig.bert_pytorch(vocab_size, hidden, n_layers, attn_heads, dropout,
                                                 **config), unpad=unpad)
        self.hidden = hidden
        self.n_layers = n_layers
        self.attn_heads = attn_heads
        self.feed_forward_hidden = hidden * 4

    def forward(self, x, segment_info=None):
        """x [B, S] token ids (0 is padding), segment_info [B, S] in {0, 1, 2} -> [B, S, hidden]."""
        return super().forward(x, segment_info)


class NextSentencePrediction(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.linear = nn.Linear(hidden, 2)

    def forward(self, x):
        return F.log_softmax(self.linear(x[:, 0]), dim=-1)


class MaskedLanguageModel(nn.Module):
    def __init__(self, hidden, vocab_size):
        super().__init__()
        self.linear = nn.Linear(hidden, vocab_size)

    def forward(self, x):
        return F.log_softmax(self.linear(x), dim=-1)


class BERTLM(nn.Module):
    """Drop-in for bert_pytorch.model.BERTLM: forward(x, segment_label) -> (nsp, mlm) log-probs."""

    def __init__(self, bert: nn.Module, vocab_size):
        super().__init__()
        self.bert = bert
        self.next_sentence = NextSentencePrediction(bert.hidden)
        self.mask_lm = MaskedLanguageModel(bert.hidden, vocab_size)

    def forward(self, x, segment_label):
        h = self.bert(x, segment_label)
        return self.next_sentence(h), self.mask_lm(h)
