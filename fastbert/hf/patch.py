"""patch_hf / unpatch_hf: fastbert's fused ops inside a transformers BERT-family model, in place.

    model = fastbert.patch_hf(model)      # same class, parameters, state_dict keys and outputs
    model = fastbert.unpatch_hf(model)    # back to the stock forwards (bit-identical outputs)

What each flag replaces is in fastbert.hf.modules (the fused forwards) and fastbert.hf.attention (the
attention implementation "fastbert"). The model keeps its class (transformers keys its output
capture on it); patched submodules become instances of subclasses of their stock classes.
"""

import copy
import warnings

import torch
from torch import nn

from . import compat, modernbert, st  # noqa: F401  (modernbert registers its parts in FUSED / ROLE)
from .attention import NAME, register
from .modules import FAMILY_NAMES, FUSED, ROLE

_PREV_ATTN = "_fastbert_prev_attn_implementation"
_HOOK = "_fastbert_labels_hook"
_ENCODERS = "_fastbert_encoders"
_CONFIGS = {}  # stock config class -> its subclass that lets output_attentions run with "fastbert"


def _config_class(cls):
    """A subclass of the config class whose output_attentions may be set under attn_implementation
    "fastbert" (its attention then returns the eager weights), where transformers refuses it for
    every implementation but eager. Same __name__ (reprs, saved configs); pickled by its qualname."""
    if cls in _CONFIGS.values():
        return cls
    sub = _CONFIGS.get(cls)
    if sub is None:
        prop = cls.output_attentions

        def set_output_attentions(self, value):
            if value and self._attn_implementation == NAME:
                self._output_attentions = value
            else:
                prop.fset(self, value)

        def validate_output_attentions(self):
            if self._attn_implementation != NAME:
                super(sub, self).validate_output_attentions()

        name = "Fast" + cls.__name__
        attrs = {"__module__": __name__, "__qualname__": name,
                 "output_attentions": property(prop.fget, set_output_attentions)}
        if hasattr(cls, "validate_output_attentions"):
            attrs["validate_output_attentions"] = validate_output_attentions
        sub = type(cls.__name__, (cls,), attrs)
        _CONFIGS[cls] = sub
        globals()[name] = sub
    return sub


def _own_config(model):
    """Give model (and each submodule holding the same config object) a copy of its config of the
    subclass above, so patching leaves the caller's config, and models built from it later, as they
    were."""
    old = model.config
    new = copy.deepcopy(old)
    new.__class__ = _config_class(type(old))
    for module in model.modules():
        if module.__dict__.get("config") is old:
            module.__dict__["config"] = new


def _stock_config(model):
    config = getattr(model, "config", None)
    for stock, sub in _CONFIGS.items():
        if type(config) is sub:
            config.__class__ = stock


def _labels_hook(model, args, kwargs):
    """Before each forward of a patched model: whether per-token labels (other than -100) sit at padding
    positions, as a device tensor for the encoder's one host sync (it then keeps the padded layout, so
    the loss is stock's)."""
    if torch.compiler.is_compiling():  # compiled models keep the padded layout: nothing to hand over
        return
    labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
    if args:
        bound = compat.bind(type(model).forward, args, kwargs)
        if bound is not None:
            labels, mask = bound.get("labels"), bound.get("attention_mask")
    if (isinstance(labels, torch.Tensor) and isinstance(mask, torch.Tensor) and labels.shape == mask.shape
            and not labels.is_floating_point()):
        flag = ((labels != -100) & (mask == 0)).any()
        for encoder in model.__dict__.get(_ENCODERS, ()):
            encoder.__dict__["_fastbert_labels_at_padding"] = flag


def _check_model(model, fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a transformers model (torch.nn.Module), got {type(model).__name__}")


def reads_padding(model) -> bool:
    """True for heads whose loss reads padding positions: *ForQuestionAnswering takes a softmax over every
    position, padding included, so zeros there (the unpadded layout) would change its loss."""
    return type(model).__name__.endswith("ForQuestionAnswering")


def patch_hf(model, *, attention=True, layer_norm=True, bias_gelu=True, embeddings=True, unpad=True):
    """Run fastbert's fused ops inside a transformers BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA,
    DistilBERT or ModernBERT model (any head class; ModernBERT: fastbert.hf.modernbert); returns model.

    attention   sets the model's attention implementation to "fastbert" (model.set_attn_implementation):
                fastbert.ops.attention on padded or packed batches; causal/decoder use, 4D masks,
                cross-attention and output_attentions=True keep transformers' own attention
    layer_norm  dropout + residual add + LayerNorm after the attention and the FFN in one op
    bias_gelu   the FFN's bias + GELU in one op (gelu, gelu_new, gelu_fast, gelu_pytorch_tanh; other
                activations keep the stock module)
    embeddings  word + position + token-type gather, LayerNorm and dropout in one op
    unpad       with attention: a padded batch is unpadded once after the embeddings, every layer runs
                on the real tokens (varlen attention), outputs are scattered back to [B, S, hidden] with
                zeros at padding positions (no loss reads them); packed batches run varlen.
                *ForQuestionAnswering keeps the padded layout (its span softmax reads padding positions)
    A sentence_transformers.SentenceTransformer: its transformers model is patched, and its Transformer
    module takes sentence-transformers' flattened (unpadded) input path (fastbert.hf.st).
    Submodules that are not plain nn.Linear / nn.LayerNorm / nn.Embedding / nn.Dropout (PEFT/LoRA
    wrappers, quantized layers) keep the stock path. Patching a patched model re-applies the flags.
    """
    _check_model(model, "patch_hf")
    compat.check_version()
    if st.is_sentence_transformer(model):
        return st.patch(model, patch_hf, attention=attention, layer_norm=layer_norm, bias_gelu=bias_gelu,
                        embeddings=embeddings, unpad=unpad)
    unpatch_hf(model)
    config = getattr(model, "config", None)
    stock_model = hasattr(model, "set_attn_implementation") and config is not None
    # a model built with eager attention or with output_attentions set keeps its attention (it returns
    # the weights); everything else is fused
    if attention and stock_model and (config._attn_implementation == "eager" or config.output_attentions):
        attention = False
    wanted = {"layer_norm": layer_norm, "bias_gelu": bias_gelu, "embeddings": embeddings,
              "unpad": unpad and attention and not reads_padding(model)}
    found = [(module, FUSED[type(module)]) for module in model.modules() if type(module) in FUSED]
    if not found:
        raise ValueError(
            f"patch_hf: {type(model).__name__} has none of the modules fastbert patches (the families "
            f"{', '.join(FAMILY_NAMES)}: any of their heads, or a model holding one)")
    if attention and not stock_model:
        raise TypeError(f"patch_hf(attention=True) needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    encoders = []
    for module, fused in found:
        if wanted[ROLE[fused]]:
            module.__class__ = fused
            if ROLE[fused] == "unpad":
                encoders.append(module)
    if encoders:
        model.__dict__[_ENCODERS] = encoders
        model.__dict__[_HOOK] = model.register_forward_pre_hook(_labels_hook, with_kwargs=True).id
    if attention:
        register()
        _own_config(model)
        previous = model.config._attn_implementation
        if previous != NAME:
            model.set_attn_implementation(NAME)
            if model.config._attn_implementation != NAME:
                warnings.warn(f"patch_hf: {type(model).__name__} did not accept "
                              f"attn_implementation={NAME!r}; its attention stays stock", stacklevel=2)
            else:
                setattr(model, _PREV_ATTN, previous)
    return model


def unpatch_hf(model):
    """Undo patch_hf: stock classes and the previous attention implementation back; returns model."""
    _check_model(model, "unpatch_hf")
    if st.is_sentence_transformer(model):
        st.unpatch(model)
        for module in st.transformer_modules(model):
            unpatch_hf(module.model)
        return model
    for module in model.modules():
        stock = getattr(type(module), "_fastbert_stock", None)
        if stock is not None and FUSED.get(stock) is type(module):
            module.__class__ = stock
    hook = model.__dict__.pop(_HOOK, None)
    if hook is not None:
        model._forward_pre_hooks.pop(hook, None)
        getattr(model, "_forward_pre_hooks_with_kwargs", {}).pop(hook, None)
    model.__dict__.pop(_ENCODERS, None)
    previous = getattr(model, _PREV_ATTN, None)
    if previous is not None:
        if model.config._attn_implementation == NAME:
            model.set_attn_implementation(previous)
        delattr(model, _PREV_ATTN)
    _stock_config(model)
    return model


def is_patched(model) -> bool:
    """True when any submodule of model runs a fastbert forward or its attention is "fastbert"."""
    return (getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME
            or any(type(m) in ROLE for m in model.modules()))
