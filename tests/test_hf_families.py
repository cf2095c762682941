"""patch_hf on the families beyond BERT and RoBERTa: XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT.

Every head class of each family against the stock model of the same weights (a deepcopy made before
patching), with the helpers and tolerance of tests/test_hf_patch.py (1e-5 relative; outputs at real
tokens, losses, sequence-level logits and every gradient whole), on fresh random ids with right
padding, dropout 0, fp32; then left padding, the fused block per layer (counted), the patch flags, and
persistence and undo (bit-identical stock outputs after unpatch_hf). The fused path (Triton kernels in
the interpreter) runs one head per family.
"""

import copy
import io

import pytest
import torch
import transformers
from test_hf_inputs import left_padded
from test_hf_patch import (
    BATCH,
    FFN,
    HEADS,
    HIDDEN,
    LAYERS,
    SEQ,
    VOCAB,
    assert_close,
    compare_models,
    fused_device,
    labels_for,
    padded_batch,
    to,
)

import fastbert.hf.layers
from fastbert.hf import is_patched, patch_hf, unpatch_hf


def family_config(family, **kw):
    common = dict(vocab_size=VOCAB, max_position_embeddings=40, num_labels=3)
    if family == "distilbert":
        args = dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, dropout=0.0,
                    attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0, pad_token_id=0, **common)
        args.update(kw)
        return transformers.DistilBertConfig(**args)
    cls = {"xlm_roberta": transformers.XLMRobertaConfig, "camembert": transformers.CamembertConfig,
           "electra": transformers.ElectraConfig}[family]
    args = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                type_vocab_size=2, pad_token_id=1 if family != "electra" else 0, **common)
    if family == "electra":
        args.update(embedding_size=16, summary_last_dropout=0.0)  # != hidden: embeddings_project runs
    args.update(kw)
    return cls(**args)


HEADS_OF = {
    "xlm_roberta": ["XLMRobertaModel", "XLMRobertaForMaskedLM", "XLMRobertaForSequenceClassification",
                    "XLMRobertaForTokenClassification", "XLMRobertaForQuestionAnswering",
                    "XLMRobertaForMultipleChoice"],
    "camembert": ["CamembertModel", "CamembertForMaskedLM", "CamembertForSequenceClassification",
                  "CamembertForTokenClassification", "CamembertForQuestionAnswering",
                  "CamembertForMultipleChoice"],
    "electra": ["ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM",
                "ElectraForSequenceClassification", "ElectraForTokenClassification",
                "ElectraForQuestionAnswering", "ElectraForMultipleChoice"],
    "distilbert": ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
                   "DistilBertForTokenClassification", "DistilBertForQuestionAnswering",
                   "DistilBertForMultipleChoice"],
}
def classifier(family):
    return next(n for n in HEADS_OF[family] if n.endswith("ForSequenceClassification"))


CASES = [(family, name) for family, names in HEADS_OF.items() for name in names]


def batch_for(family, cfg, batch=BATCH, seq=SEQ):
    inputs = padded_batch(cfg, batch, seq)
    if family == "distilbert":
        del inputs["token_type_ids"]  # DistilBERT has no token types
    return inputs


def labels_of(name, cfg, inputs):
    mask = inputs["attention_mask"]
    if name == "ElectraForPreTraining":  # the discriminator: replaced (1) or original (0) per token
        return {"labels": torch.randint(0, 2, mask.shape).masked_fill(mask == 0, -100)}
    if name.endswith("ForMultipleChoice"):
        return {"labels": torch.randint(0, 2, (mask.shape[0],))}
    return labels_for(name, cfg, inputs)


def compare(stock, patched, inputs, labels):
    """compare_models of tests/test_hf_patch.py, skipped where the stock model itself fails."""
    try:
        with torch.no_grad():
            stock(**inputs, **labels)
    except IndexError as e:  # transformers 5.0's XLM-R/CamemBERT multiple choice read a pooler they lack
        pytest.skip(f"the stock {type(stock).__name__} fails on transformers {transformers.__version__}: {e}")
    compare_models(stock, patched, inputs, labels)


def build(name, family, device="cpu", **patch_kw):
    cfg = family_config(family, num_labels=2 if name.endswith("QuestionAnswering") else 3)
    torch.manual_seed(1)
    stock = getattr(transformers, name)(cfg).to(device).train()  # dropout 0: the training forwards
    patched = patch_hf(copy.deepcopy(stock), **patch_kw)
    return cfg, stock, patched


def run_case(family, name, device="cpu", left=False):
    cfg, stock, patched = build(name, family, device)
    if name.endswith("ForMultipleChoice"):
        flat = batch_for(family, cfg, batch=4)
        flat = left_padded(flat) if left else flat
        inputs = {k: v.view(2, 2, -1) for k, v in flat.items()}
    else:
        inputs = batch_for(family, cfg)
        inputs = left_padded(inputs) if left else inputs
    compare(stock, patched, to(inputs, device), to(labels_of(name, cfg, inputs), device))
    return stock, patched


@pytest.mark.parametrize("family,name", CASES, ids=[name for _, name in CASES])
def test_every_head_matches_stock(family, name):
    stock, patched = run_case(family, name)
    assert type(patched) is type(stock) and is_patched(patched)
    assert list(patched.state_dict()) == list(stock.state_dict())


@pytest.mark.parametrize("name", ["XLMRobertaForSequenceClassification", "CamembertForMaskedLM",
                                  "ElectraForPreTraining", "DistilBertForTokenClassification"])
def test_every_family_matches_stock_fused(name, monkeypatch):
    family = next(f for f, names in HEADS_OF.items() if name in names)
    run_case(family, name, fused_device(monkeypatch))


@pytest.mark.parametrize("name", ["XLMRobertaForSequenceClassification", "ElectraForSequenceClassification",
                                  "DistilBertForSequenceClassification", "CamembertForMultipleChoice"])
def test_left_padding_matches_stock(name):
    """The heads read position 0: a left-padded batch keeps the padded layout, stock's logits."""
    family = next(f for f, names in HEADS_OF.items() if name in names)
    run_case(family, name, left=True)


@pytest.fixture
def blocks(monkeypatch):
    """Counts fastbert.hf.layers' calls of the fused block."""
    calls = []
    real = fastbert.hf.layers.run_block

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastbert.hf.layers, "run_block", counting)
    return calls


@pytest.mark.parametrize("family", sorted(HEADS_OF))
def test_each_layer_runs_as_one_fused_block(family, blocks):
    name = classifier(family)
    cfg, stock, patched = build(name, family)
    inputs = batch_for(family, cfg)
    patched(**inputs)
    assert len(blocks) == LAYERS
    blocks.clear()
    patched = patch_hf(patched, layer_norm=False)  # the layer's parts are stock again: per-op path
    compare(stock, patched, inputs, labels_of(name, cfg, inputs))
    assert not blocks


@pytest.mark.parametrize("flags", [dict(unpad=False), dict(bias_gelu=False), dict(embeddings=False),
                                   dict(attention=False)])
def test_distilbert_flags(flags):
    cfg, stock, patched = build("DistilBertForMaskedLM", "distilbert", **flags)
    inputs = batch_for("distilbert", cfg)
    compare(stock, patched, inputs, labels_of("DistilBertForMaskedLM", cfg, inputs))


@pytest.mark.parametrize("family", sorted(HEADS_OF))
def test_persistence_and_undo(family, tmp_path):
    name = classifier(family)
    cfg, stock, patched = build(name, family)
    stock.eval()
    patched.eval()
    inputs = batch_for(family, cfg)
    with torch.no_grad():
        ref = stock(**inputs).logits
        want = patched(**inputs).logits
    assert_close(want, ref, "patched")
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    patched.save_pretrained(tmp_path)
    reloaded = getattr(transformers, name).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)
        assert torch.equal(copy.deepcopy(patched)(**inputs).logits, want)
        assert torch.equal(reloaded(**inputs).logits, ref)
    unpatch_hf(patched)
    assert not is_patched(patched)
    assert all(type(a) is type(b) for a, b in zip(stock.modules(), patched.modules(), strict=True))
    with torch.no_grad():
        assert torch.equal(patched(**inputs).logits, ref)


def test_distilbert_relu_and_chunked_ffn_keep_stock_modules(blocks):
    """Activations bias_gelu does not compute and a chunked FFN run the stock module, same values."""
    for kw in (dict(activation="relu"), dict(chunk_size_feed_forward=1)):
        cfg = family_config("distilbert", **kw)
        torch.manual_seed(2)
        stock = transformers.DistilBertForMaskedLM(cfg)
        patched = patch_hf(copy.deepcopy(stock))
        inputs = batch_for("distilbert", cfg)
        compare(stock, patched, inputs, labels_of("DistilBertForMaskedLM", cfg, inputs))
    assert not blocks


@pytest.mark.parametrize("family", sorted(HEADS_OF))
def test_attn_implementation_fastbert_without_patching(family):
    """attn_implementation="fastbert" alone (no patch_hf): the family's attention on fastbert.ops,
    the stock (sdpa) outputs at real tokens."""
    cls = getattr(transformers, HEADS_OF[family][0])  # the base model
    torch.manual_seed(4)
    ours = cls._from_config(family_config(family), attn_implementation="fastbert").eval()
    stock = cls._from_config(family_config(family), attn_implementation="sdpa").eval()
    stock.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "fastbert" and not is_patched(stock)
    inputs = batch_for(family, ours.config)
    with torch.no_grad():
        got, ref = (m(**inputs).last_hidden_state for m in (ours, stock))
    keep = inputs["attention_mask"].bool()
    assert_close(got[keep], ref[keep], f"{family} last_hidden_state")
