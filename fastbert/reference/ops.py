"""Eager PyTorch reference for every fastbert op: the ground truth of the tests and the CPU path.

Readable rather than fast. Each function computes in the dtype it is given; pass fp32/fp64 inputs
(or upcast) to get a high-precision reference. Shapes:
  B batch, S sequence length, H heads, D head dim, N hidden size, T total (unpadded) tokens.
"""

import math

import torch
import torch.nn.functional as F

LN_VARIANTS = ("standard", "bert_pytorch")
GELU_FORMS = ("none", "tanh")


def layer_norm(x, weight, bias, eps, residual=None, variant="standard", *, dropout_p=0.0):
    """LayerNorm over the last dim, optionally of (dropout(x) + residual).

    variant "standard": w * (s - mean) / sqrt(var_biased + eps) + b   (torch.nn.LayerNorm, HF BERT)
    variant "bert_pytorch": w * (s - mean) / (std_unbiased + eps) + b (bert_pytorch's LayerNorm)
    dropout_p > 0 applies F.dropout to x first (training; pass 0.0 in eval).
    bias None: no shift (a bias-free LayerNorm, weight only).
    Returns y, or (y, s) with s = dropout(x) + residual when residual is given (the residual stream).
    """
    if variant not in LN_VARIANTS:
        raise ValueError(f"layer_norm variant {variant!r}; expected one of {LN_VARIANTS}")
    if dropout_p > 0.0:
        x = F.dropout(x, dropout_p)
    s = x if residual is None else x + residual
    mean = s.mean(-1, keepdim=True)
    if variant == "standard":
        var = (s - mean).pow(2).mean(-1, keepdim=True)
        y = (s - mean) / torch.sqrt(var + eps) * weight
    else:
        std = s.std(-1, keepdim=True)  # unbiased, as bert_pytorch's LayerNorm
        y = weight * (s - mean) / (std + eps)
    if bias is not None:
        y = y + bias
    return y if residual is None else (y, s)


def gelu(x, approximate="none"):
    """GELU: exact erf form, or the tanh approximation used by bert_pytorch and Google's BERT."""
    if approximate == "none":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
    raise ValueError(f"gelu approximate={approximate!r}; expected one of {GELU_FORMS}")


def bias_gelu(x, bias, approximate="none", *, dropout_p=0.0):
    """gelu(x + bias), bias broadcast over the last dim, then F.dropout when dropout_p > 0.
    x [..., N], bias [N]."""
    y = gelu(x + bias, approximate)
    return F.dropout(y, dropout_p) if dropout_p > 0.0 else y


def geglu(x, bias=None, approximate="none", *, dropout_p=0.0):
    """GeGLU: gelu(a) * g with a, g = (x + bias).chunk(2, dim=-1), then F.dropout when dropout_p > 0.
    x [..., 2F] (the concatenated [a, g] projection), bias [2F] or None; returns [..., F]."""
    a, g = (x if bias is None else x + bias).chunk(2, dim=-1)
    y = gelu(a, approximate) * g
    return F.dropout(y, dropout_p) if dropout_p > 0.0 else y


def rotate_half(x):
    """cat(-x2, x1) of the two halves of the last dim (transformers' rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(rotary_dim, max_positions, theta=10000.0, device=None):
    """(cos, sin) fp32 [max_positions, rotary_dim // 2]: cos(p f_j), sin(p f_j), f_j = theta^(-2j/R)."""
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(f"rotary_tables: rotary_dim {rotary_dim} must be even and > 0")
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float()
                                / rotary_dim))
    freqs = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def rotary(qkv, cos, sin, cu_seqlens=None, max_seqlen=None):
    """Rotary embeddings on q and k of a packed projection, half-split layout (transformers'
    apply_rotary_pos_emb with rotate_half): x * cat(c, c) + rotate_half(x) * cat(s, s) on the first
    R = 2 * cos.shape[1] dims of every head of q and k, the rest and v unchanged.
    qkv [T, 3, H, D] with cu_seqlens [B+1] (positions restart at 0 in each sequence) or
    [B, S, 3, H, D] (position s); cos, sin [P, R/2] tables; max_seqlen is fastbert.ops.rotary's
    (unused here). Returns a new tensor of qkv's shape."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        pos = torch.cat([torch.arange(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]
                        + [torch.zeros(0, dtype=torch.int64)]).to(qkv.device)  # [T]
        shape = (-1, 1, 1)  # [T, 1, 1, R]: broadcast over (q/k, H)
    else:
        pos = torch.arange(qkv.shape[1], device=qkv.device)  # [S]
        shape = (1, -1, 1, 1)  # [1, S, 1, 1, R]
    rot = 2 * cos.shape[1]
    c = torch.cat((cos[pos], cos[pos]), dim=-1).to(qkv.dtype).reshape(*shape, rot)
    s = torch.cat((sin[pos], sin[pos]), dim=-1).to(qkv.dtype).reshape(*shape, rot)
    qk = qkv.narrow(-3, 0, 2)
    head, tail = qk[..., :rot], qk[..., rot:]
    rotated = torch.cat((head * c + rotate_half(head) * s, tail), dim=-1)
    return torch.cat((rotated, qkv.narrow(-3, 2, 1)), dim=-3)


def segment_pool(x, cu_seqlens, mode="mean"):
    """One vector per sequence of x [T, N] (sequence b: rows cu_seqlens[b] .. cu_seqlens[b+1] - 1):
    "mean" of its rows (fp32 accumulation for half inputs; 0 when empty), "max" per column (-inf when
    empty), "cls" its first row (0 when empty). Returns [B, N] in x's dtype."""
    if mode not in ("mean", "max", "cls"):
        raise ValueError(f"segment_pool mode {mode!r}; expected mean, max or cls")
    if x.dim() != 2 or cu_seqlens.dim() != 1:
        raise ValueError(f"segment_pool: x [T, N] and cu_seqlens [B+1], got {tuple(x.shape)}, "
                         f"{tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    batch, n = lengths.numel(), x.shape[1]
    seg = torch.repeat_interleave(torch.arange(batch, device=x.device), lengths)
    rows = x[: int(cu[-1])] if batch else x[:0]
    if mode == "cls":
        first = x[cu[:-1].clamp(max=max(x.shape[0] - 1, 0))] if batch else x.new_zeros(0, n)
        return first.masked_fill((lengths == 0)[:, None], 0)
    if mode == "max":
        out = x.new_full((batch, n), float("-inf"))
        return out.scatter_reduce(0, seg[:, None].expand(-1, n), rows, reduce="amax")
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    total = x.new_zeros((batch, n), dtype=acc).index_add(0, seg, rows.to(acc))
    return (total / lengths.clamp(min=1)[:, None].to(acc)).to(x.dtype)


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, scale=None, cu_seqlens=None,
              max_seqlen=None, dropout_mask=None, *, window=None):
    """Bidirectional scaled dot-product attention.

    Padded mode: q, k, v [B, S, H, D]; key_padding_mask [B, S] bool, True marks a padding key
    (ignored), as torch.nn.MultiheadAttention. Returns [B, S, H, D].
    Varlen mode: q, k, v [T, H, D] packed, cu_seqlens int [B+1] (0, len0, len0+len1, ..., T);
    each sequence attends only within itself. Returns [T, H, D].
    A query whose keys are all masked gets zeros. dropout_mask [B, H, S, S] (padded mode) gives
    an explicit keep-mask (scaled by 1/(1-p)) instead of drawing one.
    window: None, or an int w >= 0: query i sees key j only when |i - j| <= w (a symmetric sliding
    window, inclusive, positions inside each sequence), as a mask on top of key_padding_mask.
    """
    if cu_seqlens is not None:
        out = torch.empty_like(q)
        bounds = cu_seqlens.tolist()
        for b in range(len(bounds) - 1):
            lo, hi = bounds[b], bounds[b + 1]
            if hi > lo:
                out[lo:hi] = attention(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi],
                                       dropout_p=dropout_p, scale=scale, window=window)[0]
        return out
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, S, S]
    masked = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # [B, 1, 1, S]
    if window is not None:
        pos = torch.arange(q.shape[1], device=q.device)
        outside = (pos[:, None] - pos[None, :]).abs() > window  # [S, S]
        masked = outside if masked is None else masked | outside
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    p = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    p = torch.nan_to_num(p, nan=0.0).to(q.dtype)  # all-masked rows -> zeros
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def embed(input_ids, token_weight, position_weight, segment_ids=None, segment_weight=None,
          position_ids=None, ln_weight=None, ln_bias=None, eps=1e-12, dropout_p=0.0, *,
          padding_idx=None, segment_padding_idx=None):
    """token[ids] + position[pos] + segment[seg], then optional LayerNorm and dropout.

    input_ids [B, S] int; token_weight [V, N]; position_weight [P, N] (rows 0..S-1 used unless
    position_ids [B, S] or [S] is given); segment_ids [B, S] int with segment_weight [G, N].
    padding_idx / segment_padding_idx: rows that get no gradient, as nn.Embedding(padding_idx=...).
    """
    seq = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device)
    x = F.embedding(input_ids, token_weight, padding_idx) + position_weight[position_ids]
    if segment_ids is not None:
        x = x + F.embedding(segment_ids, segment_weight, segment_padding_idx)
    if ln_weight is not None:
        x = layer_norm(x, ln_weight, ln_bias, eps)
    if dropout_p > 0.0:
        x = F.dropout(x, dropout_p)
    return x


def mlm_mask(input_ids, vocab_size, mask_id, pad_id=0, special_ids=(), mask_prob=0.15,
             replace_probs=(0.8, 0.1, 0.1), ignore_index=0, generator=None, word_starts=None,
             max_predictions=None, return_positions=False):
    """BERT's masked-LM corruption, vectorised (the statistics reference for the C++/CUDA op).

    Each non-special token is chosen with probability mask_prob (whole words together when
    word_starts [B, S] bool marks the first piece of each word); at most max_predictions per row
    (lowest draws kept). A chosen token becomes mask_id with probability replace_probs[0], a random
    non-special id with replace_probs[1], and stays with replace_probs[2]. labels hold the original
    id at chosen positions and ignore_index elsewhere. Returns (masked_ids, labels[, positions])
    where positions are flat indices into input_ids.view(-1) of the chosen tokens.
    """
    ids = input_ids
    dev = ids.device
    special = torch.zeros(vocab_size, dtype=torch.bool, device=dev)
    special[[pad_id, *special_ids]] = True
    candidate = ~special[ids]
    u = torch.rand(ids.shape, generator=generator, device=dev)
    if word_starts is not None:
        # every piece of a word uses the draw of the word's first piece
        word_index = torch.cumsum(word_starts.long(), dim=1).clamp(min=1) - 1
        first = torch.where(word_starts, u, torch.full_like(u, 2.0))
        per_word = torch.full_like(u, 2.0).scatter_reduce(1, word_index, first, "amin")
        u = per_word.gather(1, word_index)
    chosen = candidate & (u < mask_prob)
    if max_predictions is not None:
        key = torch.where(chosen, u, torch.full_like(u, 3.0))
        rank = key.argsort(dim=1).argsort(dim=1)
        chosen = chosen & (rank < max_predictions)
    r = torch.rand(ids.shape, generator=generator, device=dev)
    allowed = (~special).nonzero().squeeze(1)
    pick = torch.randint(0, allowed.numel(), ids.shape, generator=generator, device=dev)
    random_tok = allowed[pick].to(ids.dtype)
    p_mask, p_rand = replace_probs[0], replace_probs[1]
    out = torch.where(chosen & (r < p_mask), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (r >= p_mask) & (r < p_mask + p_rand), random_tok, out)
    labels = torch.where(chosen, ids, torch.full_like(ids, ignore_index))
    if return_positions:
        return out, labels, chosen.view(-1).nonzero().squeeze(1)
    return out, labels
