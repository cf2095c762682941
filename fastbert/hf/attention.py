"""fastbert's attention as a transformers attention implementation named "fastbert".

transformers' BERT-family self-attention calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
as fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs) with query/key/value
[B, H, S, D] and expects ([B, S, H, D], weights or None). The mask it receives is whatever
`ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]` built; a name without a mask builder gets
None (the padding mask is then silently lost), so both are registered (see register()).

The mask builder `fastbert_mask` returns the 2D boolean padding mask itself ([B, S], True = attend; None
without padding) for plain bidirectional self-attention, and hands everything else (causal/decoder
masks, offsets from a cache, custom mask functions) to transformers' own sdpa mask builder, so those
arrive as 4D masks. The attention `fastbert_attention` then runs:
  - varlen: `cu_seq_lens_q` in kwargs (the unpadded encoder of fastbert.hf.patch, or a packed batch from
    DataCollatorWithFlattening(return_flash_attn_kwargs=True)), or a [1, T] batch whose position_ids
    restart (a packed batch from DataCollatorWithFlattening): fastbert.ops.attention(cu_seqlens=...);
  - padded: a 2D mask or None: fastbert.ops.attention(key_padding_mask=~mask);
  - a `sliding_window` keyword (ModernBERT's local layers; flash-attn's inclusive count) on a non-causal
    call becomes fastbert.ops.attention's window = sliding_window - 1 in both forms above. The mask
    builder leaves a ModernBERT band mask without padding to it (None); with padding the 4D band mask,
    which carries the window itself, still goes to SDPA (its rows whose window holds only padding are
    stock's, which heads reading a left-padded position 0 see);
  - stock: anything else runs transformers' SDPA attention (causal/decoder use, 4D masks, cross-attention
    whose key length differs, cache), and output_attentions=True runs the eager softmax so the weights
    are returned, as attn_implementation="eager" does.
"""

import torch
import torch.nn.functional as F
from transformers import masking_utils  # at module level: an import inside traced code breaks dynamo

from fastbert import ops

from . import compat

NAME = "fastbert"


def _masking():
    return masking_utils


def _find_collector():
    try:
        from transformers.utils import output_capturing
    except ImportError:  # pragma: no cover - a transformers without capture hooks
        return None
    return getattr(output_capturing, "_active_collector", None)


_ACTIVE = _find_collector()


def _collector():
    """transformers' active output collector (a dict of lists) or None; feature-gated."""
    return None if _ACTIVE is None else _ACTIVE.get()


def wants_attentions(module_config=None, kwargs=None) -> bool:
    """True when the caller asked for attention weights (output_attentions)."""
    if kwargs is not None and kwargs.get("output_attentions"):
        return True
    collected = _collector()
    if collected is not None:
        return "attentions" in collected or "cross_attentions" in collected
    return bool(getattr(module_config, "output_attentions", False))


def fastbert_mask(*args, **kwargs):
    """transformers mask builder: the 2D padding mask for bidirectional self-attention, else sdpa's.

    Its arguments are sdpa_mask's, whose names changed within 5.x: the query positions are
    `cache_position` (a tensor) in the early releases and `q_length`/`q_offset` later."""
    mu = _masking()
    a = compat.bind(mu.sdpa_mask, args, kwargs, method=False)
    if a is not None:
        batch, kv_length, mask = a.get("batch_size"), a.get("kv_length"), a.get("attention_mask")
        if "q_length" in a:
            q_length, q_offset = a["q_length"], a.get("q_offset", 0)
        else:
            position = a.get("cache_position")
            q_length = position.shape[0] if isinstance(position, torch.Tensor) else None
            q_offset = 0  # bidirectional self-attention without a cache: positions 0..S-1
        kv_offset = a.get("kv_offset", 0)
        bidirectional = getattr(mu, "bidirectional_mask_function", None)
        if (bidirectional is not None and a.get("mask_function") is bidirectional
                and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0
                and kv_offset == 0 and q_length == kv_length
                and (mask is None or (mask.dim() == 2 and mask.shape == (batch, kv_length)))):
            return None if mask is None else mask.to(torch.bool)
        if (_window_in_attention(a.get("config")) and isinstance(a.get("local_size"), int)
                and not a.get("use_vmap") and isinstance(q_offset, int) and isinstance(kv_offset, int)
                and q_offset == 0 and kv_offset == 0 and q_length == kv_length
                and not torch.compiler.is_compiling()
                and (mask is None or (mask.dim() == 2 and mask.shape == (batch, kv_length)
                                      and bool(mask.all())))
                and _is_band(a.get("mask_function"), a["local_size"])):
            return None  # no padding: the attention call applies the window (its sliding_window keyword)
    kwargs.pop("dtype", None)
    kwargs.pop("config", None)
    return mu.sdpa_mask(*args, **kwargs)


# models whose attention call passes transformers' `sliding_window` keyword wherever their mask builder
# makes a bidirectional sliding-window mask (so a mask without padding may be left to the attention)
_WINDOW_IN_ATTENTION = ("modernbert",)


def _window_in_attention(config):
    return getattr(config, "model_type", None) in _WINDOW_IN_ATTENTION


def _is_band(mask_function, window):
    """True when mask_function is exactly the symmetric band |q - kv| <= window (transformers'
    sliding_window_bidirectional_mask_function), probed on a grid wider than the band."""
    if not callable(mask_function) or window < 0:
        return False
    n = 2 * window + 3
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, q, kv)
    except Exception:  # a mask function that does not take index tensors
        return False
    want = (q - kv).abs() <= window
    return isinstance(got, torch.Tensor) and got.dtype == torch.bool and torch.equal(got.expand(n, n), want)


def _expand(mask, q_length):
    """[B, Skv] bool (True = attend) -> [B, 1, Sq, Skv], the layout of transformers' sdpa mask."""
    return mask[:, None, None, :].expand(mask.shape[0], 1, q_length, mask.shape[1])


def _stock_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = _expand(attention_mask, query.shape[2])
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal):
    """softmax(q k^T * scaling + mask) v with the weights returned, as transformers' eager attention."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, Sq, Skv]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            attention_mask = _expand(attention_mask, query.shape[2])
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros_like(attention_mask, dtype=scores.dtype).masked_fill(
                ~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores + attention_mask
    elif is_causal and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, Sq, H, D]
    return out, weights


def packed_cu_seqlens(position_ids):
    """cu_seqlens (int32 [n+1]) and max length of a packed [1, T] row whose position_ids restart at each
    sequence (DataCollatorWithFlattening), or None when the row is a single sequence. Host sync."""
    pos = position_ids.reshape(-1)
    if pos.numel() < 2:
        return None
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    begin = starts.nonzero().squeeze(1)
    if begin.numel() < 2:
        return None
    cu = torch.cat([begin, begin.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_args(kwargs, query, attention_mask):
    """(cu_seqlens, max_seqlen) when this call is a packed [1, T] batch, else None."""
    if query.shape[0] != 1 or attention_mask is not None:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if kwargs.get("cu_seq_lens_k") is not None and kwargs["cu_seq_lens_k"] is not cu \
                and not torch.equal(kwargs["cu_seq_lens_k"], cu):
            return None  # different key boundaries: not self-attention over one packing
        max_len = kwargs.get("max_length_q")
        max_len = int(max_len) if max_len is not None else None
        return cu.to(torch.int32), max_len
    position_ids = kwargs.get("position_ids")
    if position_ids is None or torch.compiler.is_compiling() or position_ids.numel() != query.shape[2]:
        return None
    return packed_cu_seqlens(position_ids)


def fastbert_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers attention function: query/key/value [B, H, S, D] -> ([B, S, H, D], weights or None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    causal = bool(causal) and query.shape[2] > 1
    if wants_attentions(getattr(module, "config", None), kwargs):
        return _eager(module, query, key, value, attention_mask, dropout, scaling, causal)
    exotic = any(kwargs.get(name) is not None for name in ("softcap", "position_bias"))
    window = _window(kwargs.get("sliding_window"))
    exotic = exotic or window is False
    mask_2d = attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                         and attention_mask.dim() == 2)
    if (causal or exotic or not mask_2d or query.shape != key.shape or key.shape != value.shape
            or (attention_mask is not None and torch.compiler.is_compiling() and not ops.use_triton(query))):
        # the CPU form of fastbert.ops.attention checks for all-padding rows with a host sync, which
        # torch.compile(fullgraph=True) cannot trace; off the Triton path it is SDPA anyway
        return _stock_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    packed = varlen_args(kwargs, query, attention_mask)
    if packed is not None:
        cu, max_len = packed
        # [1, H, T, D] views of [1, T, H, D] projections -> [T, H, D]
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        if window is None:
            out = ops.attention(q, k, v, dropout_p=dropout, scale=scaling, cu_seqlens=cu, max_seqlen=max_len)
        else:
            out = ops.attention(q, k, v, dropout_p=dropout, scale=scaling, cu_seqlens=cu, max_seqlen=max_len,
                                window=window)
        return out.unsqueeze(0), None
    pad = None if attention_mask is None else ~attention_mask
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if window is None:
        out = ops.attention(q, k, v, key_padding_mask=pad, dropout_p=dropout, scale=scaling)
    else:
        out = ops.attention(q, k, v, key_padding_mask=pad, dropout_p=dropout, scale=scaling, window=window)
    return out, None


def _window(sliding_window):
    """transformers' `sliding_window` keyword (ModernBERT's local layers) as fastbert.ops.attention's
    window: flash-attn counts it inclusively, window_size = (sliding_window - 1, sliding_window - 1)
    (transformers.modeling_flash_attention_utils), so query i attends key j iff |i - j| <=
    sliding_window - 1 (ModernBERT: local_attention // 2, the band of its eager/sdpa mask). None: no
    window; False: a value fastbert does not take (the stock path)."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        return False
    return sliding_window - 1


def register():
    """Register "fastbert" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface

    mu = _masking()
    AttentionInterface.register(NAME, fastbert_attention)
    mu.AttentionMaskInterface.register(NAME, fastbert_mask)
