"""Conversion between transformers.BertModel and fastbert's encoder (preset "hf").

fastbert keeps bert_pytorch's parameter names; HF_TO_FASTBERT maps each HF name pattern onto them.
The pooler is not part of the encoder: from_hf drops it, to_hf builds a BertModel without one.
"""

import re

from fastbert.reference.model import BertConfig

from .bert import Encoder

_LAYER = {
    "attention.self.query": "attention.linear_layers.0",
    "attention.self.key": "attention.linear_layers.1",
    "attention.self.value": "attention.linear_layers.2",
    "attention.output.dense": "attention.output_linear",
    "attention.output.LayerNorm": "input_sublayer.norm",
    "intermediate.dense": "feed_forward.w_1",
    "output.dense": "feed_forward.w_2",
    "output.LayerNorm": "output_sublayer.norm",
}
_EMBED = {
    "embeddings.word_embeddings.weight": "embedding.token.weight",
    "embeddings.position_embeddings.weight": "embedding.position.weight",
    "embeddings.token_type_embeddings.weight": "embedding.segment.weight",
    "embeddings.LayerNorm.weight": "embedding.norm.a_2",
    "embeddings.LayerNorm.bias": "embedding.norm.b_2",
}
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_IGNORED = re.compile(r"^(pooler\.|embeddings\.position_ids|embeddings\.token_type_ids)")


def _leaf(name):
    return {"weight": "weight", "bias": "bias"}[name]


def _norm_leaf(name):
    return {"weight": "a_2", "bias": "b_2"}[name]


def config_from_hf(hf_config) -> BertConfig:
    """fastbert BertConfig (preset "hf") from a transformers BertConfig."""
    act = hf_config.hidden_act
    if act not in _GELU:
        raise ValueError(f"hidden_act {act!r} is not supported; expected one of {sorted(_GELU)}")
    kind = getattr(hf_config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type {kind!r} is not supported (absolute only)")
    return BertConfig.hf(
        vocab_size=hf_config.vocab_size, hidden=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers, heads=hf_config.num_attention_heads,
        intermediate=hf_config.intermediate_size, max_position=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size, layer_norm_eps=hf_config.layer_norm_eps,
        dropout=hf_config.hidden_dropout_prob, attn_dropout=hf_config.attention_probs_dropout_prob,
        emb_dropout=hf_config.hidden_dropout_prob, gelu=_GELU[act],
        pad_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
    )


def _rename(sd, embed, pattern, layer, leaf_of, name_of, error):
    """Rename a state dict: embedding keys through `embed`, per-layer keys matched by `pattern`
    (groups: layer index, module, leaf) through `layer` and `leaf_of`, composed by `name_of`."""
    out = {}
    for name, t in sd.items():
        if name in embed:
            out[embed[name]] = t
            continue
        m = re.match(pattern, name)
        if not m or m.group(2) not in layer:
            raise KeyError(error.format(name=name))
        i, mod, leaf = m.groups()
        target = layer[mod]
        out[name_of(i, target, leaf_of(target, leaf))] = t
    return out


def hf_to_fastbert_state_dict(sd):
    """Rename a BertModel state dict (optionally prefixed 'bert.') to fastbert's names."""
    keys = {(name[5:] if name.startswith("bert.") else name): t for name, t in sd.items()}
    keys = {k: t for k, t in keys.items() if not _IGNORED.match(k)}
    return _rename(keys, _EMBED, r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", _LAYER,
                   lambda target, leaf: _norm_leaf(leaf) if target.endswith("norm") else _leaf(leaf),
                   lambda i, target, leaf: f"transformer_blocks.{i}.{target}.{leaf}",
                   "unexpected HF BERT parameter {name!r}")


def fastbert_to_hf_state_dict(sd):
    """Inverse of hf_to_fastbert_state_dict (names of a BertModel without pooler)."""
    embed, layer = {v: k for k, v in _EMBED.items()}, {v: k for k, v in _LAYER.items()}
    return _rename(sd, embed, r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias|a_2|b_2)$", layer,
                   lambda target, leaf: {"a_2": "weight", "b_2": "bias"}.get(leaf, leaf),
                   lambda i, target, leaf: f"encoder.layer.{i}.{target}.{leaf}",
                   "parameter {name!r} has no HF BertModel counterpart")


def from_hf(hf_model, unpad="auto") -> Encoder:
    """A fastbert Encoder (preset "hf") with the weights of a transformers BertModel, or a ModernEncoder
    (preset "modernbert") of a ModernBertModel (fastbert.models.hf_modernbert).

    Its forward takes transformers' keyword names, input_ids, token_type_ids=, attention_mask= (1 for
    real tokens, 0 for padding) and position_ids=, or the same four positionally in that order, and
    matches BertModel(...).last_hidden_state at real tokens (zeros at padding when it unpads). To
    keep the transformers model itself (its class, heads and outputs), use fastbert.patch_hf instead.
    """
    if getattr(hf_model.config, "model_type", None) == "modernbert":
        from . import hf_modernbert

        return hf_modernbert.from_hf(hf_model, unpad)
    model = Encoder(config_from_hf(hf_model.config), unpad=unpad)
    model.load_state_dict(hf_to_fastbert_state_dict(hf_model.state_dict()), strict=True)
    p = next(hf_model.parameters())
    return model.to(p.device, p.dtype)  # the source model's device and dtype


def to_hf(model: Encoder):
    """A transformers.BertModel (no pooler) with the weights of a fastbert Encoder of preset "hf", or a
    ModernBertModel with those of a ModernEncoder."""
    import transformers

    cfg = model.config
    if cfg.preset == "modernbert":
        from . import hf_modernbert

        return hf_modernbert.to_hf(model)
    if cfg.preset != "hf":
        raise ValueError(f"to_hf needs an encoder of preset 'hf' or 'modernbert', this one is {cfg.preset!r}")
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_position, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout, pad_token_id=cfg.pad_id,
        hidden_act="gelu" if cfg.gelu == "none" else "gelu_new",
    )
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False)
    missing, unexpected = hf.load_state_dict(fastbert_to_hf_state_dict(model.state_dict()), strict=False)
    missing = [k for k in missing if not _IGNORED.match(k)]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: missing {missing}, unexpected {unexpected}")
    return hf
