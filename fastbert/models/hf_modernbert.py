"""Conversion between transformers.ModernBertModel and fastbert's ModernEncoder (preset "modernbert").

fastbert.from_hf / fastbert.to_hf call these for ModernBERT; the weights map one to one:

    embeddings.tok_embeddings / norm   embedding.token / embedding.norm
    layers.i.attn_norm / mlp_norm      transformer_blocks.i.attn_norm / mlp_norm  (layer 0: no attn_norm)
    layers.i.attn.Wqkv / attn.Wo       transformer_blocks.i.attention.qkv / output_linear
    layers.i.mlp.Wi / mlp.Wo           transformer_blocks.i.feed_forward.w_1 / w_2
    final_norm                         final_norm
with LayerNorm weight/bias as a_2/b_2. Heads (prefix "model.", head, decoder, classifier) are not part
of the encoder: from_hf takes the `model.` weights of a head model and drops the rest.
"""

import re

from fastbert.reference.model import BertConfig

from .modernbert import ModernEncoder

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_NORMS = ("embeddings.norm", "final_norm")
_LAYER = {"attn_norm": "attn_norm", "mlp_norm": "mlp_norm", "attn.Wqkv": "attention.qkv",
          "attn.Wo": "attention.output_linear", "mlp.Wi": "feed_forward.w_1", "mlp.Wo": "feed_forward.w_2"}
_HF_LAYER = r"^layers\.(\d+)\.(attn_norm|mlp_norm|attn\.Wqkv|attn\.Wo|mlp\.Wi|mlp\.Wo)\.(weight|bias)$"
_FIXED = {"embeddings.tok_embeddings.weight": "embedding.token.weight",
          "embeddings.norm.weight": "embedding.norm.a_2", "embeddings.norm.bias": "embedding.norm.b_2",
          "final_norm.weight": "final_norm.a_2", "final_norm.bias": "final_norm.b_2"}


def _global_every(layer_types):
    """n with layer i global iff i % n == 0 (transformers' global_attn_every_n_layers), or None."""
    for n in range(1, len(layer_types) + 1):
        if all((t == "full_attention") == (i % n == 0) for i, t in enumerate(layer_types)):
            return n
    return None


def _thetas(hf_config):
    """(global theta, local theta) of transformers' rope_parameters (5.x) or its older fields."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:
        out = []
        for kind in ("full_attention", "sliding_attention"):
            p = params.get(kind) or {}
            if p.get("rope_type", "default") != "default":
                raise ValueError(f"rope_type {p.get('rope_type')!r} ({kind}) is not supported (default only)")
            out.append(float(p["rope_theta"]))
        return tuple(out)
    if getattr(hf_config, "rope_scaling", None):
        raise ValueError("rope_scaling is not supported (default rotary embeddings only)")
    return float(hf_config.global_rope_theta), float(hf_config.local_rope_theta)


def config_from_hf(hf_config) -> BertConfig:
    """fastbert BertConfig (preset "modernbert") of a transformers ModernBertConfig; ValueError naming
    what it cannot take (another activation, rope scaling, a layer pattern that is not "global every n",
    attention and MLP biases that differ, a head dim of its own)."""
    act = hf_config.hidden_activation
    if act not in _GELU:
        raise ValueError(f"hidden_activation {act!r} is not supported; expected one of {sorted(_GELU)}")
    n_layers, hidden = hf_config.num_hidden_layers, hf_config.hidden_size
    heads = hf_config.num_attention_heads
    types = getattr(hf_config, "layer_types", None)
    every = (_global_every(list(types)) if types else getattr(hf_config, "global_attn_every_n_layers", 3))
    if every is None:
        raise ValueError(f"layer_types {list(types)} is not a global layer every n layers")
    if hf_config.attention_bias != hf_config.mlp_bias:
        raise ValueError(f"attention_bias={hf_config.attention_bias} and mlp_bias={hf_config.mlp_bias} "
                         f"differ; fastbert's ModernEncoder has one bias flag")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hidden // heads):
        raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    theta, local_theta = _thetas(hf_config)
    pad = hf_config.pad_token_id
    return BertConfig.modernbert(
        vocab_size=hf_config.vocab_size, hidden=hidden, n_layers=n_layers, heads=heads,
        intermediate=int(hf_config.intermediate_size), max_position=hf_config.max_position_embeddings,
        layer_norm_eps=hf_config.norm_eps, norm_bias=bool(hf_config.norm_bias),
        bias=bool(hf_config.attention_bias),
        dropout=float(hf_config.mlp_dropout), attn_dropout=float(hf_config.attention_dropout),
        emb_dropout=float(hf_config.embedding_dropout), gelu=_GELU[act], pad_id=0 if pad is None else pad,
        local_window=int(hf_config.local_attention), global_every=every, rope_theta=theta,
        local_rope_theta=local_theta)


def hf_to_fastbert_state_dict(sd):
    """Rename a ModernBertModel state dict (or a head model's `model.` part) to fastbert's names."""
    prefixed = any(k.startswith("model.") for k in sd)
    out = {}
    for name, t in sd.items():
        if prefixed:
            if not name.startswith("model."):
                continue  # the head's weights
            name = name[6:]
        if name in _FIXED:
            out[_FIXED[name]] = t
            continue
        m = re.match(_HF_LAYER, name)
        if not m:
            raise KeyError(f"unexpected HF ModernBERT parameter {name!r}")
        i, mod, leaf = m.groups()
        if mod.endswith("norm"):
            leaf = {"weight": "a_2", "bias": "b_2"}[leaf]
        out[f"transformer_blocks.{i}.{_LAYER[mod]}.{leaf}"] = t
    return out


def fastbert_to_hf_state_dict(sd):
    """Inverse of hf_to_fastbert_state_dict (names of a ModernBertModel)."""
    fixed = {v: k for k, v in _FIXED.items()}
    layer = {v: k for k, v in _LAYER.items()}
    out = {}
    for name, t in sd.items():
        if name in fixed:
            out[fixed[name]] = t
            continue
        m = re.match(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias|a_2|b_2)$", name)
        if not m or m.group(2) not in layer:
            raise KeyError(f"parameter {name!r} has no HF ModernBertModel counterpart")
        i, mod, leaf = m.groups()
        out[f"layers.{i}.{layer[mod]}.{ {'a_2': 'weight', 'b_2': 'bias'}.get(leaf, leaf)}"] = t
    return out


def from_hf(hf_model, unpad="auto") -> ModernEncoder:
    """A fastbert ModernEncoder with the weights of a transformers ModernBertModel (or of the `model` of
    a ModernBERT head model): forward(input_ids, attention_mask=) matches last_hidden_state at real tokens."""
    model = ModernEncoder(config_from_hf(hf_model.config), unpad=unpad)
    model.load_state_dict(hf_to_fastbert_state_dict(hf_model.state_dict()), strict=True)
    p = next(hf_model.parameters())
    return model.to(p.device, p.dtype)  # the source model's device and dtype


def hf_config(cfg: BertConfig, **extra):
    """The transformers ModernBertConfig of a fastbert config of preset "modernbert" (the special token ids
    bos/eos/cls/sep None unless given in `extra`: fastbert's config does not know the vocabulary's)."""
    import transformers

    gelu = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[cfg.gelu]
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.heads, hidden_activation=gelu,
              max_position_embeddings=cfg.max_position, norm_eps=cfg.layer_norm_eps, norm_bias=cfg.norm_bias,
              attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.attn_dropout,
              embedding_dropout=cfg.emb_dropout, mlp_dropout=cfg.dropout, local_attention=cfg.local_window,
              global_attn_every_n_layers=cfg.global_every, pad_token_id=cfg.pad_id,
              global_rope_theta=cfg.rope_theta, local_rope_theta=cfg.local_rope_theta,
              classifier_activation=gelu, bos_token_id=None, eos_token_id=None, cls_token_id=None,
              sep_token_id=None)
    kw.update(extra)
    return transformers.ModernBertConfig(**kw)


def to_hf(model: ModernEncoder, attn_implementation="sdpa"):
    """A transformers.ModernBertModel with the weights of a fastbert ModernEncoder."""
    import transformers

    hf = transformers.ModernBertModel._from_config(hf_config(model.config),
                                                   attn_implementation=attn_implementation)
    missing, unexpected = hf.load_state_dict(fastbert_to_hf_state_dict(model.state_dict()), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"to_hf: missing {missing}, unexpected {unexpected}")
    p = next(model.parameters())
    return hf.to(p.device, p.dtype)
