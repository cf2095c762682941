"""The in-place path on the inputs and configurations users bring: left padding, labels at padding
positions, torch.jit.trace, models built with eager attention or output_attentions, the caller's
config object, the fused block per layer and where it steps aside, unsupported transformers releases.

Each check compares a patched model with the stock model of the same weights (the helpers and the
tolerance of tests/test_hf_patch.py: 1e-5 relative), on fresh random ids.
"""

import copy
import warnings

import pytest
import torch
import transformers
from test_hf_patch import (
    BATCH,
    SEQ,
    assert_close,
    compare_models,
    config,
    fused_device,
    labels_for,
    padded_batch,
    stock_and_patched,
    to,
)
from torch import nn

import fastbert
from fastbert.hf import compat, patch_hf, unpatch_hf


def left_padded(inputs):
    """The same rows with their padding moved to the front (padding_side="left")."""
    out = {}
    lengths = inputs["attention_mask"].sum(-1)
    seq = inputs["attention_mask"].shape[-1]
    for key, value in inputs.items():
        rows = [torch.roll(row, int(seq - n)) for row, n in zip(value, lengths)]
        out[key] = torch.stack(rows)
    return out


HEADS_READING_POSITION_0 = ["BertForSequenceClassification", "BertForMultipleChoice",
                            "BertForNextSentencePrediction", "BertForPreTraining",
                            "RobertaForSequenceClassification", "BertModel"]


def left_padded_case(name, device="cpu"):
    family = "roberta" if name.startswith("Roberta") else "bert"
    cfg = config(family)
    stock, patched = stock_and_patched(getattr(transformers, name), cfg, device)
    stock.train()
    patched.train()
    if name.endswith("ForMultipleChoice"):
        flat = left_padded(padded_batch(cfg, batch=4))
        inputs = {k: v.view(2, 2, -1) for k, v in flat.items()}
        labels = {"labels": torch.randint(0, 2, (2,))}
        real = inputs["attention_mask"]
    else:
        inputs = left_padded(padded_batch(cfg))
        real = inputs["attention_mask"]
        labels = ({"labels": torch.randint(0, 2, (BATCH,))} if name.endswith("NextSentencePrediction")
                  else labels_for(name, cfg, inputs))
    assert not bool(real.reshape(-1, real.shape[-1])[:, 0].all())  # some row starts with padding
    compare_models(stock, patched, to(inputs, device), to(labels, device), real=to(real, device))


@pytest.mark.parametrize("name", HEADS_READING_POSITION_0)
def test_left_padding_gives_stock_outputs(name):
    """Poolers and classification heads read position 0, which is padding in a left-padded row: the
    batch keeps the padded layout, so logits, losses and gradients are stock's."""
    left_padded_case(name)


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "BertForNextSentencePrediction"])
def test_left_padding_gives_stock_outputs_fused(name, monkeypatch):
    left_padded_case(name, fused_device(monkeypatch))


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForTokenClassification"])
def test_labels_at_padding_positions_give_the_stock_loss(name):
    """Per-token labels that are not -100 at padding positions: the loss reads those positions, so the
    batch keeps the padded layout and the loss is stock's (and the usual -100 there still unpads)."""
    cfg = config()
    stock, patched = stock_and_patched(getattr(transformers, name), cfg)
    inputs = padded_batch(cfg)
    mask = inputs["attention_mask"]
    labels = torch.randint(0, 3, mask.shape)  # valid labels everywhere, padding included
    assert bool((mask == 0).any())
    stock_loss = stock(**inputs, labels=labels).loss
    patched_loss = patched(**inputs, labels=labels).loss
    assert_close(patched_loss, stock_loss, "loss with labels at padding")
    # positional arguments reach the check too
    assert_close(patched(inputs["input_ids"], mask, inputs["token_type_ids"], labels=labels).loss,
                 stock_loss, "positional call")
    ignored = labels.masked_fill(mask == 0, -100)
    assert_close(patched(**inputs, labels=ignored).loss, stock(**inputs, labels=ignored).loss,
                 "-100 at padding")


def test_jit_trace_traces_the_padded_layout():
    """torch.jit.trace records the padded layout (as torch.compile does): the trace passes its own
    check and runs a batch with another number of real tokens with stock's outputs."""
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertForSequenceClassification, cfg)
    stock.eval()
    patched.eval()
    first, second = padded_batch(cfg, lengths=[SEQ, 4, 7]), padded_batch(cfg, lengths=[SEQ, 9, 2])
    args = lambda b: (b["input_ids"], b["attention_mask"], b["token_type_ids"])  # noqa: E731
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(patched, args(first), strict=False)  # check_trace on by default
        got = traced(*args(second))
        want = stock(*args(second)).logits
    got = got["logits"] if isinstance(got, dict) else got[0]
    assert_close(got, want, "traced logits on another batch")


def test_eager_model_keeps_its_attention_and_its_weights():
    """A model built with attn_implementation="eager" keeps eager attention (and returns the weights);
    the other ops are fused and the outputs are stock's."""
    cfg = config()
    stock = transformers.BertModel._from_config(cfg, attn_implementation="eager")
    patched = patch_hf(copy.deepcopy(stock))
    assert patched.config._attn_implementation == "eager"
    assert type(patched.embeddings) is not type(stock.embeddings)  # the embeddings are fused
    inputs = padded_batch(cfg)
    ref = stock(**inputs, output_attentions=True)
    out = patched(**inputs, output_attentions=True)
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        assert_close(a, b, "attention weights")
    keep = inputs["attention_mask"].bool()
    assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], "last_hidden_state")


def test_output_attentions_config_is_respected_and_can_be_set_after_patching():
    cfg = config()
    built = transformers.BertModel(config(output_attentions=True, attn_implementation="eager"))
    assert patch_hf(built).config._attn_implementation == "eager"
    stock = transformers.BertModel._from_config(config(), attn_implementation="eager")
    patched = patch_hf(transformers.BertModel(cfg))
    patched.load_state_dict(stock.state_dict())
    assert patched.config._attn_implementation == fastbert.hf.NAME
    patched.config.output_attentions = True  # transformers refuses this for non-eager implementations
    inputs = padded_batch(cfg)
    out = patched(**inputs)
    ref = stock(**inputs, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == cfg.num_hidden_layers
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        assert_close(a, b, "attention weights")


def test_the_callers_config_is_left_unchanged():
    cfg = config()
    before = cfg.to_dict()
    model = transformers.BertModel(cfg)
    patch_hf(model)
    assert cfg._attn_implementation != fastbert.hf.NAME and cfg.to_dict() == before
    later = transformers.BertModel(cfg)
    assert not fastbert.is_patched(later) and later.config._attn_implementation == cfg._attn_implementation
    assert type(model.config).__name__ == type(cfg).__name__ and isinstance(model.config, type(cfg))
    unpatch_hf(model)
    assert type(model.config) is type(cfg)
    assert fastbert.is_patched is fastbert.hf.is_patched


def count_fused(model, monkeypatch):
    """How many layer calls ran fastbert.ops.block.run_block."""
    from fastbert.hf import layers

    calls = []
    original = layers.run_block

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(layers, "run_block", counting)
    return calls


@pytest.mark.parametrize("padding", ["right", "none", "left"])
def test_each_layer_runs_as_one_fused_block(padding, monkeypatch):
    """On the fused path every layer of a plain model is one run_block call (varlen on right padding,
    dense without padding); left padding keeps the padded layout (the per-op modules); outputs and
    gradients are stock's."""
    device = fused_device(monkeypatch)
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertForSequenceClassification, cfg, device)
    calls = count_fused(patched, monkeypatch)
    inputs = padded_batch(cfg, lengths=[SEQ] * BATCH if padding == "none" else None)
    if padding == "left":
        inputs = left_padded(inputs)
    labels = {"labels": torch.randint(0, 3, (BATCH,))}
    compare_models(stock, patched, to(inputs, device), to(labels, device))
    fused = sum(calls)
    assert fused == (0 if padding == "left" else cfg.num_hidden_layers), calls


def test_a_hooked_or_wrapped_layer_takes_the_module_path(monkeypatch):
    """A forward hook on a Linear, or a Linear replaced after patching, makes that layer run its
    modules (the hook fires, the wrapper's effect is kept); the others stay fused."""
    device = fused_device(monkeypatch)
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertModel, cfg, device)
    calls = count_fused(patched, monkeypatch)
    inputs = to(padded_batch(cfg), device)
    seen = []
    handle = patched.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        patched(**inputs)
    assert seen and calls.count(True) == cfg.num_hidden_layers - 1
    handle.remove()
    calls.clear()
    for model in (stock, patched):
        layer = model.encoder.layer[1].output
        layer.dense = nn.Sequential(layer.dense)  # same function, not a plain Linear
    with torch.no_grad():
        got, want = patched(**inputs).last_hidden_state, stock(**inputs).last_hidden_state
    keep = inputs["attention_mask"].bool()
    assert_close(got[keep], want[keep], "with a wrapped Linear")
    assert calls.count(True) == cfg.num_hidden_layers - 1


def test_unsupported_transformers_release_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(compat, "VERSION", (4, 57, 1))
    with pytest.raises(RuntimeError, match=r"supports transformers >=5.0, <6"):
        patch_hf(transformers.BertModel(config()))
    monkeypatch.setattr(compat, "VERSION", (5, 99, 0))
    monkeypatch.setattr(compat, "_warned", [])
    with pytest.warns(UserWarning, match="newer than the newest release it was tested with"):
        patch_hf(transformers.BertModel(config()))


def test_arguments_are_named_by_the_stock_signature():
    """compat.bind names a call by the stock forward's own parameters, whatever the release calls them."""

    class Stock:
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
            pass

    a = compat.bind(Stock.forward, ("h", "m"), {"past_key_values": "c", "position_ids": "p"})
    assert a == {"hidden_states": "h", "attention_mask": "m", "past_key_values": "c", "position_ids": "p"}
    assert compat.first(a, compat.CACHE) == "c"
    assert compat.bind(Stock.forward, ("h", "m", "c", "extra"), {}) is None  # not a call it knows
    assert compat.bind(Stock.forward, ("h",), {"hidden_states": "again"}) is None
