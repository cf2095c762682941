"""patch_hf / unpatch_hf: fastbert's fused ops inside a transformers BERT or RoBERTa model, in place.

    model = fastbert.patch_hf(model)      # same class, parameters, state_dict keys and outputs
    model = fastbert.unpatch_hf(model)    # back to the stock forwards (bit-identical outputs)

What each flag replaces is in fastbert.hf.modules (the fused forwards) and fastbert.hf.attention (the
attention implementation "fastbert"). The model keeps its class (transformers keys its output
capture on it); patched submodules become instances of subclasses of their stock classes.
"""

import warnings

from torch import nn

from .attention import NAME, register
from .modules import FUSED, ROLE

_PREV_ATTN = "_fastbert_prev_attn_implementation"


def _check_model(model, fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a transformers model (torch.nn.Module), got {type(model).__name__}")


def reads_padding(model) -> bool:
    """True for heads whose loss reads padding positions: *ForQuestionAnswering takes a softmax over every
    position, padding included, so zeros there (the unpadded layout) would change its loss."""
    return type(model).__name__.endswith("ForQuestionAnswering")


def patch_hf(model, *, attention=True, layer_norm=True, bias_gelu=True, embeddings=True, unpad=True):
    """Run fastbert's fused ops inside a transformers BERT/RoBERTa model (any head class); returns model.

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
    Submodules that are not plain nn.Linear / nn.LayerNorm / nn.Embedding / nn.Dropout (PEFT/LoRA
    wrappers, quantized layers) keep the stock path. Patching a patched model re-applies the flags.
    """
    _check_model(model, "patch_hf")
    unpatch_hf(model)
    wanted = {"layer_norm": layer_norm, "bias_gelu": bias_gelu, "embeddings": embeddings,
              "unpad": unpad and attention and not reads_padding(model)}
    found = 0
    for module in model.modules():
        fused = FUSED.get(type(module))
        if fused is None:
            continue
        found += 1
        if wanted[ROLE[fused]]:
            module.__class__ = fused
    if not found:
        raise ValueError(
            f"patch_hf: {type(model).__name__} has none of the BERT/RoBERTa modules fastbert patches "
            f"(supported: {', '.join(sorted(c.__name__ for c in FUSED))})")
    if attention:
        if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
            raise TypeError(f"patch_hf(attention=True) needs a transformers PreTrainedModel, got "
                            f"{type(model).__name__}")
        register()
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
    for module in model.modules():
        stock = getattr(type(module), "_fastbert_stock", None)
        if stock is not None and FUSED.get(stock) is type(module):
            module.__class__ = stock
    previous = getattr(model, _PREV_ATTN, None)
    if previous is not None:
        if model.config._attn_implementation == NAME:
            model.set_attn_implementation(previous)
        delattr(model, _PREV_ATTN)
    return model


def is_patched(model) -> bool:
    """True when any submodule of model runs a fastbert forward or its attention is "fastbert"."""
    return (getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME
            or any(type(m) in ROLE for m in model.modules()))
