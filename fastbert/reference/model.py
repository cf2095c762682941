"""Reference BERT encoder in eager PyTorch, covering both families of BERT people use.

One config, three presets:
  "bert_pytorch"  the PyPI package bert-pytorch==0.0.1a4: sinusoidal fixed positions (buffer `pe`),
                  3-entry segment table with padding_idx 0, key mask from pad id 0, pre-LN sublayers
                  x + dropout(sublayer(norm(x))), LayerNorm a*(x-mean)/(std_unbiased+eps)+b with
                  eps 1e-6, tanh GELU, dropout after the FFN activation and after each block.
  "hf"            transformers.BertModel: learned positions, token types, embedding LayerNorm,
                  post-LN sublayers norm(x + dropout(sublayer(x))), erf GELU, eps from config.
  "modernbert"    transformers.ModernBertModel (Warner et al. 2024): rotary positions, GeGLU, pre-LN
                  with bias-free norms, sliding-window attention in all but every global_every-th
                  layer; its modules live in fastbert.reference.modernbert (ModernEncoder).
Parameter names follow bert_pytorch (so its state dicts load with strict=True); fastbert.models.hf
maps HF names onto them.

Every op goes through `ops`, a namespace with layer_norm, bias_gelu, attention and embed. Here it is
fastbert.reference.ops; the fast model (fastbert.models.bert) reuses these modules with fastbert.ops.
Shapes: B batch, S sequence, N hidden, H heads, D = N / H.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import ops as reference_ops

PRESETS = ("bert_pytorch", "hf", "modernbert")
FFNS = ("gelu", "geglu")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden: int = 768
    n_layers: int = 12
    heads: int = 12
    intermediate: int = 0  # FFN width; 0 means 4 * hidden
    max_position: int = 512  # rows of the position table
    type_vocab_size: int = 3  # bert_pytorch: 3 (0 is padding); HF: 2
    dropout: float = 0.1  # hidden dropout (after attention, FFN and, for bert_pytorch, each block)
    attn_dropout: float = 0.1  # on attention probabilities
    emb_dropout: float = 0.1  # after the embedding sum
    preset: str = "bert_pytorch"
    layer_norm_eps: float = 1e-6
    pad_id: int = 0
    gelu: str = "tanh"  # "tanh" (bert_pytorch, Google BERT) or "none" (exact erf, HF "gelu")
    # ModernBERT's fields (preset "modernbert"; the BERT presets keep the defaults)
    ffn: str = ""  # "gelu" (w_2(gelu(w_1 x))) or "geglu" (w_2(gelu(a) * g), [a, g] = w_1 x); "": by preset
    local_window: int = 128  # local layers: query i sees key j iff |i - j| <= local_window // 2
    global_every: int = 3  # layer i is global (full attention) iff i % global_every == 0
    rope_theta: float = 160000.0  # rotary base of the global layers
    local_rope_theta: float = 10000.0  # and of the local ones
    norm_bias: bool = True  # LayerNorms with a shift (ModernBERT: none)
    bias: bool = True  # linears with a bias (ModernBERT: attention_bias = mlp_bias = False)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r}; expected one of {PRESETS}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.intermediate == 0:
            object.__setattr__(self, "intermediate", 4 * self.hidden)
        modern = self.preset == "modernbert"
        if not self.ffn:
            object.__setattr__(self, "ffn", "geglu" if modern else "gelu")
        if self.ffn != ("geglu" if modern else "gelu"):
            raise ValueError(f"ffn={self.ffn!r} with preset {self.preset!r}: ModernBERT's FFN is 'geglu', "
                             f"the BERT presets' 'gelu'")
        if not modern and not (self.norm_bias and self.bias):
            raise ValueError(f"preset {self.preset!r} has biases in every LayerNorm and linear; "
                             f"norm_bias / bias False is for preset 'modernbert'")
        if modern:
            if self.head_dim % 2:
                raise ValueError(f"rotary embeddings need an even head dim, got {self.head_dim}")
            if self.local_window < 0 or self.global_every < 1:
                raise ValueError(f"local_window={self.local_window} must be >= 0 and global_every="
                                 f"{self.global_every} >= 1")
            if not (self.rope_theta > 0 and self.local_rope_theta > 0):
                raise ValueError(f"rope thetas must be positive, got {self.rope_theta}, "
                                 f"{self.local_rope_theta}")

    @classmethod
    def bert_pytorch(cls, vocab_size, hidden=768, n_layers=12, attn_heads=12, dropout=0.1, **kw):
        """The configuration bert_pytorch.BERT(vocab_size, hidden, n_layers, attn_heads, dropout) has."""
        return cls(vocab_size, hidden, n_layers, attn_heads, dropout=dropout, **kw)

    @classmethod
    def hf(cls, vocab_size=30522, hidden=768, n_layers=12, heads=12, intermediate=3072, **kw):
        base = dict(max_position=512, type_vocab_size=2, layer_norm_eps=1e-12, gelu="none",
                    preset="hf")
        base.update(kw)
        return cls(vocab_size, hidden, n_layers, heads, intermediate, **base)

    @classmethod
    def modernbert(cls, vocab_size=50368, hidden=768, n_layers=22, heads=12, intermediate=1152, **kw):
        """transformers' ModernBertConfig defaults (ModernBERT-base): GeGLU of width `intermediate`
        (Wi is [2 * intermediate, hidden]), erf GELU, eps 1e-5, no biases, no dropout, 8192 positions,
        window 128 with a global layer every 3, rotary thetas 160000 / 10000."""
        base = dict(max_position=8192, type_vocab_size=0, layer_norm_eps=1e-5, gelu="none",
                    preset="modernbert", dropout=0.0, attn_dropout=0.0, emb_dropout=0.0, norm_bias=False,
                    bias=False)
        base.update(kw)
        return cls(vocab_size, hidden, n_layers, heads, intermediate, **base)

    def is_local(self, layer):
        """Whether layer `layer` attends in a sliding window (preset "modernbert")."""
        return self.preset == "modernbert" and bool(layer % self.global_every)

    def with_(self, **kw):
        return replace(self, **kw)

    @property
    def head_dim(self):
        return self.hidden // self.heads


def sinusoid_table(max_len, d_model):
    """bert_pytorch's fixed position table: sin on even, cos on odd features. [max_len, d_model]"""
    pe = torch.zeros(max_len, d_model).float()
    position = torch.arange(0, max_len).float().unsqueeze(1)
    div_term = (torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model)).exp()
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class SinusoidalPosition(nn.Module):
    def __init__(self, d_model, max_len=512):
        super().__init__()
        self.register_buffer("pe", sinusoid_table(max_len, d_model).unsqueeze(0))  # [1, P, N]

    @property
    def table(self):
        return self.pe[0]


class LearnedPosition(nn.Embedding):
    @property
    def table(self):
        return self.weight


class LayerNorm(nn.Module):
    """LayerNorm with bert_pytorch's parameter names a_2 (scale) and b_2 (shift; None when bias=False)."""

    def __init__(self, features, eps, variant, ops, bias=True):
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(features))
        self.b_2 = nn.Parameter(torch.zeros(features)) if bias else None
        self.eps = eps
        self.variant = variant
        self.ops = ops

    def forward(self, x, residual=None, dropout_p=0.0):
        return self.ops.layer_norm(x, self.a_2, self.b_2, self.eps, residual=residual,
                                   variant=self.variant, dropout_p=dropout_p)


class Embedding(nn.Module):
    def __init__(self, cfg: BertConfig, ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        n = cfg.hidden
        self.token = nn.Embedding(cfg.vocab_size, n, padding_idx=cfg.pad_id)
        if cfg.preset == "bert_pytorch":
            self.position = SinusoidalPosition(n, cfg.max_position)
            self.segment = nn.Embedding(cfg.type_vocab_size, n, padding_idx=0)
            self.norm = None
        else:
            self.position = LearnedPosition(cfg.max_position, n)
            self.segment = nn.Embedding(cfg.type_vocab_size, n)
            self.norm = LayerNorm(n, cfg.layer_norm_eps, "standard", ops)

    def forward(self, input_ids, segment_ids, position_ids=None):
        norm = self.norm
        return self.ops.embed(
            input_ids, self.token.weight, self.position.table, segment_ids, self.segment.weight,
            position_ids=position_ids,
            ln_weight=None if norm is None else norm.a_2,
            ln_bias=None if norm is None else norm.b_2,
            eps=self.cfg.layer_norm_eps,
            dropout_p=self.cfg.emb_dropout if self.training else 0.0,
            padding_idx=self.token.padding_idx,
            segment_padding_idx=self.segment.padding_idx,
        )


class Attention(nn.Module):
    """Multi-head self-attention; q/k/v stay in [B, S, H, D] (or packed [T, H, D]), no transposes."""

    def __init__(self, cfg: BertConfig, ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        n = cfg.hidden
        self.linear_layers = nn.ModuleList([nn.Linear(n, n) for _ in range(3)])  # q, k, v
        self.output_linear = nn.Linear(n, n)

    def forward(self, x, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        heads_shape = (*x.shape[:-1], self.cfg.heads, self.cfg.head_dim)
        q, k, v = (lin(x).view(heads_shape) for lin in self.linear_layers)
        o = self.ops.attention(q, k, v, key_padding_mask=key_padding_mask,
                               dropout_p=self.cfg.attn_dropout if self.training else 0.0,
                               cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.output_linear(o.reshape(x.shape))


class FeedForward(nn.Module):
    """w_2(gelu(x @ w_1.weight^T + w_1.bias)): the bias add is fused into the GELU op."""

    def __init__(self, cfg: BertConfig, ops):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.w_1 = nn.Linear(cfg.hidden, cfg.intermediate)
        self.w_2 = nn.Linear(cfg.intermediate, cfg.hidden)
        # bert_pytorch drops out after the activation; HF does not
        self.dropout = nn.Dropout(cfg.dropout if cfg.preset == "bert_pytorch" else 0.0)

    def forward(self, x):
        # the dropout runs inside the bias+GELU op (fused on the Triton path; the same F.dropout
        # call as nn.Dropout elsewhere)
        p = self.dropout.p if self.training else 0.0
        h = self.ops.bias_gelu(F.linear(x, self.w_1.weight), self.w_1.bias, self.cfg.gelu, dropout_p=p)
        return self.w_2(h)


class Sublayer(nn.Module):
    """Holds the norm of one sublayer (bert_pytorch's SublayerConnection keeps it as .norm)."""

    def __init__(self, cfg: BertConfig, ops):
        super().__init__()
        variant = "bert_pytorch" if cfg.preset == "bert_pytorch" else "standard"
        self.norm = LayerNorm(cfg.hidden, cfg.layer_norm_eps, variant, ops)


class Block(nn.Module):
    def __init__(self, cfg: BertConfig, ops):
        super().__init__()
        self.cfg = cfg
        self.attention = Attention(cfg, ops)
        self.feed_forward = FeedForward(cfg, ops)
        self.input_sublayer = Sublayer(cfg, ops)
        self.output_sublayer = Sublayer(cfg, ops)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        # fastbert.ops runs the whole block as one autograd node where every op takes its Triton
        # kernel (eager: fastbert.ops.block); it returns None otherwise, and the reference
        # ops have no such hook: the code below is the block's math
        fused = getattr(self.attention.ops, "fused_block", None)
        if fused is not None:
            y = fused(self, x, key_padding_mask, cu_seqlens, max_seqlen)
            if y is not None:
                return y
        # a dropout followed by a residual add and a LayerNorm runs inside the norm op (one fused
        # kernel on the Triton path; F.dropout then the norm in the reference, the same RNG draws
        # in the same order as a separate nn.Dropout)
        norm1, norm2 = self.input_sublayer.norm, self.output_sublayer.norm
        drop = self.dropout
        p = drop.p if self.training else 0.0
        if self.cfg.preset == "bert_pytorch":  # pre-LN
            a = self.attention(norm1(x), key_padding_mask, cu_seqlens, max_seqlen)
            y, h = norm2(a, residual=x, dropout_p=p)  # h = x + drop(a), y = norm2(h)
            h = h + drop(self.feed_forward(y))
            return drop(h)
        a = self.attention(x, key_padding_mask, cu_seqlens, max_seqlen)  # post-LN
        h, _ = norm1(a, residual=x, dropout_p=p)
        y, _ = norm2(self.feed_forward(h), residual=h, dropout_p=p)
        return y


class Encoder(nn.Module):
    """BERT encoder: embedding then n_layers blocks. forward -> [B, S, N]."""

    ops = reference_ops

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.preset == "modernbert":
            raise ValueError("preset 'modernbert' is built by ModernEncoder (fastbert.ModernEncoder, "
                             "fastbert.reference.modernbert.ModernEncoder) or fastbert.build_encoder(cfg)")
        self.config = cfg
        self.embedding = Embedding(cfg, self.ops)
        self.transformer_blocks = nn.ModuleList([Block(cfg, self.ops) for _ in range(cfg.n_layers)])
        self.reset_parameters()

    def reset_parameters(self):
        if self.config.preset == "hf":  # HF's init: N(0, 0.02), zero biases, unit norms
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
                    if isinstance(m, nn.Linear):
                        nn.init.zeros_(m.bias)
                    elif m.padding_idx is not None:
                        m.weight.data[m.padding_idx].zero_()

    def key_padding_mask(self, input_ids, attention_mask=None):
        """[B, S] bool, True at padding keys; None when nothing is padded."""
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                                 f"shape {tuple(input_ids.shape)}")
            return attention_mask == 0
        if self.config.preset == "bert_pytorch":
            return input_ids == self.config.pad_id
        return None

    def check_inputs(self, input_ids, segment_ids):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input ids must be an int64/int32 tensor, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2:
            raise ValueError(f"input ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"empty batch: input ids have shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the position table "
                             f"({cfg.max_position})")
        if segment_ids is not None and segment_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"segment ids must be int64/int32, got {segment_ids.dtype}")
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(f"segment ids shape {tuple(segment_ids.shape)} != input ids shape "
                             f"{tuple(input_ids.shape)}")
        if torch.compiler.is_compiling() or input_ids.device.type != "cpu":
            # value checks would break the graph, and on a GPU they would cost a device-to-host sync
            # per step; the embed op checks every id on every device
            return
        # the bounds of ids and segments in one read (free on the CPU)
        bounds = torch.stack([*torch.aminmax(input_ids)] + (
            [*torch.aminmax(segment_ids.to(input_ids.dtype))] if segment_ids is not None else []))
        bounds = bounds.tolist()
        lo, hi = bounds[0], bounds[1]
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token id out of range: ids span [{lo}, {hi}], vocab_size is "
                             f"{cfg.vocab_size}")
        if segment_ids is not None:
            lo, hi = bounds[2], bounds[3]
            if lo < 0 or hi >= cfg.type_vocab_size:
                raise ValueError(f"segment id out of range: ids span [{lo}, {hi}], the segment "
                                 f"table has {cfg.type_vocab_size} rows")

    @staticmethod
    def segments(segment_ids, token_type_ids):
        """segment_ids (bert_pytorch's name) or token_type_ids (transformers'), not both."""
        if token_type_ids is None:
            return segment_ids
        if segment_ids is not None:
            raise ValueError("pass segment_ids or token_type_ids (the same input), not both")
        return token_type_ids

    def embed(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None):
        """Checked inputs -> (embeddings [B, S, N], key padding mask [B, S] or None)."""
        self.check_inputs(input_ids, segment_ids)
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        pad = self.key_padding_mask(input_ids, attention_mask)
        return self.embedding(input_ids, segment_ids, position_ids), pad

    def forward(self, input_ids, segment_ids=None, attention_mask=None, position_ids=None, *,
                token_type_ids=None):
        """input_ids [B, S]; segment_ids (alias token_type_ids) [B, S]; attention_mask [B, S] with 0 at
        padding; position_ids [S] or [B, S] -> [B, S, N]."""
        segment_ids = self.segments(segment_ids, token_type_ids)
        x, pad = self.embed(input_ids, segment_ids, attention_mask, position_ids)  # [B, S, N]
        for block in self.transformer_blocks:
            x = block(x, pad)
        return x

    def forward_packed(self, input_ids, segment_ids, position_ids, cu_seqlens, max_seqlen):
        """The encoder on a packed batch: every sequence's tokens back to back, no padding layout.

        input_ids, segment_ids, position_ids [T] (positions counted inside each sequence);
        cu_seqlens int32 [R+1] = (0, l0, l0+l1, ..., T), non-decreasing (zero-length sequences
        allowed, so R can be fixed); max_seqlen an int >= every length. Each sequence attends only to
        itself (varlen attention). Returns [T, N]. With fixed T, R and max_seqlen every tensor has the
        same shape on every step, and nothing here reads a value back to the host: the ids are
        checked where the batch is built (fastbert.train.packing checks them on the CPU).
        """
        self.check_packed(input_ids, segment_ids, position_ids, cu_seqlens, max_seqlen)
        x = self.embedding(input_ids[None], segment_ids[None], position_ids[None])  # [1, T, N]
        h = x[0]  # [T, N]
        for block in self.transformer_blocks:
            h = block(h, None, cu_seqlens, max_seqlen)
        return h

    def check_packed(self, input_ids, segment_ids, position_ids, cu_seqlens, max_seqlen, optional=()):
        """forward_packed's checks (of types and shapes only: nothing is read back from the device);
        `optional` names the id tensors that may be None."""
        cfg = self.config
        tokens = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) else None
        named = [("input_ids", input_ids), ("segment_ids", segment_ids), ("position_ids", position_ids)]
        for name, t in named:
            if t is None and name in optional:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"packed {name} must be an int64/int32 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != 1 or t.shape[0] != tokens:
                raise ValueError(f"packed {name} must be [T] with T = {tokens}, got shape {tuple(t.shape)}")
        if tokens == 0:
            raise ValueError("empty packed batch: T = 0 tokens")
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32
                or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
            raise ValueError(f"cu_seqlens must be an int32 tensor [R+1] with R >= 1, got "
                             f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                             f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
        if (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                or not 0 < max_seqlen <= cfg.max_position):
            raise ValueError(f"max_seqlen must be an int in [1, {cfg.max_position}] (the position "
                             f"table), got {max_seqlen!r}")
