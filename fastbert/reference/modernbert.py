"""Reference ModernBERT encoder (preset "modernbert" of BertConfig) in eager PyTorch.

What transformers' ModernBertModel computes (Warner et al. 2024, arXiv:2412.13663), with fastbert's names:

    x = drop(norm(token(ids)))                                        embedding (no positions)
    layer i:  h = x + drop(Wo(attn(rope(Wqkv(LN_a(x))))))            layer 0 has no LN_a
              y = h + w_2(drop(gelu(a) * g)),  [a, g] = w_1(LN_m(h))   GeGLU
    out = final_norm(y)

LayerNorms without a shift (norm_bias=False) and linears without a bias by default; rotary embeddings
(half-split layout) with theta rope_theta in the global layers (i % global_every == 0) and
local_rope_theta in the others, which attend in a symmetric sliding window: query i sees key j iff
|i - j| <= local_window // 2 (flash-attn's window_size=(w, w); transformers passes it
sliding_window = local_window // 2 + 1, which it counts exclusive).

The residual stream is carried as (res, delta) with the layer's input res + delta, so each residual
add runs inside the LayerNorm that follows it (ops.layer_norm(delta, residual=res)), across layers
too: the last add is fused into final_norm.

Shapes: [B, S, N] padded (key_padding_mask [B, S], True at padding; position s at column s) or
[T, N] packed with cu_seqlens (positions restart at 0 in every sequence). Rotary tables are fp32,
built once per device (not buffers: a .half() of the model leaves them fp32, as transformers computes
them).
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as reference_ops
from .model import BertConfig, Encoder, LayerNorm


def _norm(cfg, ops):
    return LayerNorm(cfg.hidden, cfg.layer_norm_eps, "standard", ops, bias=cfg.norm_bias)


class ModernEmbedding(nn.Module):
    """drop(norm(token(ids))): token table, bias-free LayerNorm, dropout."""

    def __init__(self, cfg: BertConfig, ops):
        super().__init__()
        self.cfg = cfg
        self.token = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_id)
        self.norm = _norm(cfg, ops)
        self.dropout = nn.Dropout(cfg.emb_dropout)

    def forward(self, input_ids):
        return self.dropout(self.norm(self.token(input_ids)))


class ModernAttention(nn.Module):
    """One Wqkv projection, rotary on q and k of the packed [.., 3, H, D] view, attention (windowed
    in local layers), Wo and its dropout (transformers' out_drop, at the attention dropout rate)."""

    def __init__(self, cfg: BertConfig, ops, local):
        super().__init__()
        self.cfg, self.ops, self.local = cfg, ops, local
        n = cfg.hidden
        self.qkv = nn.Linear(n, 3 * n, bias=cfg.bias)
        self.output_linear = nn.Linear(n, n, bias=cfg.bias)
        self.window = cfg.local_window // 2 if local else None

    def forward(self, x, cos, sin, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        cfg = self.cfg
        p = cfg.attn_dropout if self.training else 0.0
        qkv = self.qkv(x).view(*x.shape[:-1], 3, cfg.heads, cfg.head_dim)
        q, k, v = self.ops.rotary(qkv, cos, sin, cu_seqlens, max_seqlen).unbind(-3)
        o = self.ops.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=p, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen, window=self.window)
        out = self.output_linear(o.reshape(x.shape))
        return F.dropout(out, p) if p > 0.0 else out


class GegluFeedForward(nn.Module):
    """w_2(drop(gelu(a) * g)), [a, g] = w_1 x: the bias, GELU, product and dropout in one ops.geglu."""

    def __init__(self, cfg: BertConfig, ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.w_1 = nn.Linear(cfg.hidden, 2 * cfg.intermediate, bias=cfg.bias)
        self.w_2 = nn.Linear(cfg.intermediate, cfg.hidden, bias=cfg.bias)

    def forward(self, x):
        p = self.cfg.dropout if self.training else 0.0
        inner = self.ops.geglu(F.linear(x, self.w_1.weight), self.w_1.bias, self.cfg.gelu, dropout_p=p)
        return self.w_2(inner)


class ModernBlock(nn.Module):
    """One pre-LN layer on the residual stream (res, delta); returns (res', delta')."""

    def __init__(self, cfg: BertConfig, ops, index):
        super().__init__()
        self.attn_norm = _norm(cfg, ops) if index else None  # transformers: Identity in layer 0
        self.attention = ModernAttention(cfg, ops, cfg.is_local(index))
        self.mlp_norm = _norm(cfg, ops)
        self.feed_forward = GegluFeedForward(cfg, ops)

    def forward(self, res, delta, tables, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        """The layer on x = res + delta (delta None: x = res); tables {local: (cos, sin)}."""
        # fastbert.ops runs the whole layer as one autograd node where every op takes its Triton kernel
        # (eager: fastbert.ops.modern_block); it returns None otherwise, and the reference ops have no
        # such hook: the code below is the layer's math
        fused = getattr(self.attention.ops, "modern_block", None)
        if fused is not None:
            out = fused(self, res, delta, tables, key_padding_mask, cu_seqlens, max_seqlen)
            if out is not None:
                return out
        if self.attn_norm is None:
            x = res if delta is None else res + delta
            a_in = x
        elif delta is None:
            x, a_in = res, self.attn_norm(res)
        else:
            a_in, x = self.attn_norm(delta, residual=res)
        cos, sin = tables[self.attention.local]
        a = self.attention(a_in, cos, sin, key_padding_mask, cu_seqlens, max_seqlen)
        m_in, h = self.mlp_norm(a, residual=x)  # h = x + a
        return h, self.feed_forward(m_in)


class ModernEncoder(Encoder):
    """ModernBERT encoder: embedding, n_layers ModernBlocks, final_norm. forward -> [B, S, N].

    Takes BERT's encoder arguments (input_ids, attention_mask; forward_packed) without token types or
    position ids: positions are the columns of a padded batch, or restart in each packed sequence."""

    ops = reference_ops

    def __init__(self, cfg: BertConfig):
        nn.Module.__init__(self)
        if cfg.preset != "modernbert":
            raise ValueError(f"ModernEncoder needs a config of preset 'modernbert', got {cfg.preset!r}")
        self.config = cfg
        self.embedding = ModernEmbedding(cfg, self.ops)
        self.transformer_blocks = nn.ModuleList([ModernBlock(cfg, self.ops, i) for i in range(cfg.n_layers)])
        self.final_norm = _norm(cfg, self.ops)
        self._tables = {}
        self.reset_parameters()

    def reset_parameters(self):
        """transformers' ModernBERT init: truncated normals (cut at 2 std) of std 0.02 for the embedding
        and the input projections (Wqkv, w_1), 0.02 / sqrt(2 n_layers) for the output ones (Wo, w_2);
        zero biases, unit norms."""
        std = 0.02
        out_std = std / (2.0 * self.config.n_layers) ** 0.5

        def init(m, s):
            nn.init.trunc_normal_(m.weight, std=s, a=-2 * s, b=2 * s)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

        init(self.embedding.token, std)
        for block in self.transformer_blocks:
            init(block.attention.qkv, std)
            init(block.attention.output_linear, out_std)
            init(block.feed_forward.w_1, std)
            init(block.feed_forward.w_2, out_std)

    def rope_tables(self, device):
        """{False: global (cos, sin), True: local (cos, sin)} fp32 [max_position, head_dim / 2] on device."""
        key = torch.device(device)
        if key not in self._tables:
            cfg = self.config
            make = reference_ops.rotary_tables
            self._tables[key] = {False: make(cfg.head_dim, cfg.max_position, cfg.rope_theta, key),
                                 True: make(cfg.head_dim, cfg.max_position, cfg.local_rope_theta, key)}
        return self._tables[key]

    def _no_segments(self, segment_ids, token_type_ids, position_ids):
        if self.segments(segment_ids, token_type_ids) is not None:
            raise ValueError("ModernBERT has no token types: pass no segment_ids / token_type_ids")
        if position_ids is not None:
            raise ValueError("ModernBERT's rotary positions are the columns of the batch (or restart in each "
                             "packed sequence); position_ids is not taken")

    def run_layers(self, x, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        """final_norm(layers(x)) of embedded tokens x ([B, S, N] or packed [T, N])."""
        tables = self.rope_tables(x.device)
        res, delta = x, None
        for block in self.transformer_blocks:
            res, delta = block(res, delta, tables, key_padding_mask, cu_seqlens, max_seqlen)
        return self.final_norm(delta, residual=res)[0]

    def forward(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None, *,
                token_type_ids=None):
        """input_ids [B, S]; attention_mask [B, S] with 0 at padding (None: no padding) -> [B, S, N]."""
        self._no_segments(segment_ids, token_type_ids, position_ids)
        self.check_inputs(input_ids, None)
        pad = self.key_padding_mask(input_ids, attention_mask)
        return self.run_layers(self.embedding(input_ids), pad)

    def forward_packed(self, input_ids, segment_ids, position_ids, cu_seqlens, max_seqlen):
        """BERT's packed forward (see Encoder.forward_packed): input_ids [T], cu_seqlens int32 [R+1],
        max_seqlen an int -> [T, N]. segment_ids must be None; position_ids (None, or each token's
        position inside its sequence, as packs carry them) are not read: the rotary op counts the
        positions from cu_seqlens."""
        if segment_ids is not None:
            raise ValueError("ModernBERT has no token types: pass segment_ids=None")
        self.check_packed(input_ids, None, position_ids, cu_seqlens, max_seqlen,
                          optional=("segment_ids", "position_ids"))
        return self.run_layers(self.embedding(input_ids), None, cu_seqlens, max_seqlen)
