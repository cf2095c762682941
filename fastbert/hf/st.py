"""sentence-transformers models in place: patch_hf / unpatch_hf of a SentenceTransformer.

    st = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    fastbert.patch_hf(st)      # its transformers model patched; encode() and training unpadded
    fastbert.unpatch_hf(st)    # back to stock

A SentenceTransformer is a torch Sequential of modules; its Transformer module holds the transformers
model (`.model`), patched here as patch_hf patches any model. With fastbert's attention in place, the
Transformer module is also switched to sentence-transformers' own flattened input path, the one it
takes for FlashAttention-2: a batch of texts is tokenized without padding into one [1, T] sequence with
cu_seq_lens (transformers' DataCollatorWithFlattening), the patched encoder runs it varlen with no host
sync, and the Pooling module (FastPooling) reduces the flat tokens per sequence with one
fastbert.ops.segment_pool per pooling mode (mean, max, cls; the others keep sentence-transformers' own
flat pooling), so no padded [B, S, hidden] tensor is ever built. sentence-transformers (>= 6.2) gates
that path on flash attention; the same preconditions are checked here with "fastbert" in its place,
and `unpad_inputs=False` on the module is honoured (padded batches, still unpadded inside the encoder).
"""

import torch
from torch import nn

from fastbert import ops

_STATE = "_fastbert_st_state"  # the module's flattening attributes before patch_hf, for unpatch_hf
_FLAT_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}


def is_sentence_transformer(model) -> bool:
    return isinstance(model, nn.Sequential) and type(model).__module__.startswith("sentence_transformers")


def transformer_modules(model):
    """The modules of a SentenceTransformer that hold a transformers model (`.model`)."""
    from transformers import PreTrainedModel

    return [m for m in model if isinstance(getattr(m, "model", None), PreTrainedModel)]


def _can_flatten(module) -> bool:
    """sentence-transformers' own preconditions for flattened inputs, flash attention aside."""
    if module.__dict__.get("_unpad_inputs", getattr(module, "unpad_inputs", None)) is False:
        return False
    config = getattr(module, "modality_config", None) or {}
    return (getattr(module, "transformer_task", None) in ("feature-extraction", "fill-mask")
            and "text" in config and getattr(module, "backend", None) == "torch"
            and all(params.get("method") == "forward" for params in config.values())
            and getattr(module.model, "is_backend_compatible", lambda: False)()
            and hasattr(module, "_infer_flatten_position_offset") and hasattr(module, "can_flatten_inputs"))


def _flatten(module):
    from transformers import DataCollatorWithFlattening

    params = getattr(module, "model_forward_params", None)
    module.__dict__[_STATE] = (module.can_flatten_inputs, getattr(module, "data_collator", None),
                               None if params is None else set(params),
                               getattr(module, "_flatten_position_offset", 0))
    if module.can_flatten_inputs:  # already flattening (flash attention before patching)
        return
    module.data_collator = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True,
                                                      return_position_ids=True)
    if params is not None:
        module.model_forward_params = params | _FLAT_KWARGS
    module._flatten_position_offset = module._infer_flatten_position_offset()  # RoBERTa-family positions
    module.can_flatten_inputs = True


def _unflatten(module):
    state = module.__dict__.pop(_STATE, None)
    if state is None:
        return
    module.can_flatten_inputs, collator, params, offset = state
    if collator is None:
        module.__dict__.pop("data_collator", None)
    else:
        module.data_collator = collator
    if params is not None:
        module.model_forward_params = params
    module._flatten_position_offset = offset


_POOL_MODES = frozenset({"mean", "max", "cls"})


def _pooling_forward(self, features, **kwargs):
    """FastPooling.forward: Pooling.forward on a flattened batch ([1, T, hidden] tokens, cu_seq_lens_q)
    as one fastbert.ops.segment_pool per mode; anything else (padded batches, other modes, excluded
    prompts) takes the stock forward."""
    cu = features.get("cu_seq_lens_q")
    tokens = features.get("token_embeddings")
    modes = (self.pooling_mode,) if isinstance(self.pooling_mode, str) else tuple(self.pooling_mode)
    if (cu is None or not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[0] != 1
            or not set(modes) <= _POOL_MODES or "cls_token_embeddings" in features
            or (not self.include_prompt and features.get("prompt_length"))):
        return self._fastbert_stock.forward(self, features, **kwargs)
    flat, cu = tokens[0], cu.to(torch.int32)
    pooled = [ops.segment_pool(flat, cu, mode) for mode in modes]
    features["sentence_embedding"] = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)
    return features


def _pooling_classes():
    """(stock Pooling, FastPooling): built at first use (sentence-transformers is optional)."""
    global FastPooling
    from sentence_transformers.sentence_transformer.modules import Pooling

    if "FastPooling" not in globals():
        # a direct subclass (a mixin base would change the instance layout of this ABC-derived class)
        attrs = {"__module__": __name__, "__qualname__": "FastPooling", "_fastbert_stock": Pooling,
                 "forward": _pooling_forward}
        FastPooling = type("FastPooling", (Pooling,), attrs)
    return Pooling, FastPooling


def __getattr__(name):  # pickle finds FastPooling here before any patch_hf of this process built it
    if name == "FastPooling":
        return _pooling_classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch(model, patch_model, **flags):
    """patch_model (fastbert.hf.patch_hf) on each transformers model inside the SentenceTransformer."""
    found = transformer_modules(model)
    if not found:
        raise ValueError(f"patch_hf: the {type(model).__name__} holds no transformers model")
    unpatch(model)
    for module in found:
        patch_model(module.model, **flags)
        if module.model.config._attn_implementation == "fastbert" and flags.get("unpad", True) \
                and _can_flatten(module):
            _flatten(module)
    stock, fused = _pooling_classes()
    for module in model:
        if type(module) is stock:
            module.__class__ = fused
    return model


def unpatch(model):
    """Undo patch on a SentenceTransformer: its Transformer modules' flattening and its pooling."""
    stock, fused = _pooling_classes()
    for module in model:
        if type(module) is fused:
            module.__class__ = stock
    for module in transformer_modules(model):
        _unflatten(module)
