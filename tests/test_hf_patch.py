"""fastbert inside transformers models: patch_hf / unpatch_hf and attn_implementation="fastbert".

Every check compares a patched model with the stock transformers model of the same weights (a deepcopy
made before patching), on fresh random ids with right padding, dropout 0, fp32. On padded batches the
unpadded encoder returns zeros at padding positions where stock computes values no loss reads, so
per-token outputs are compared at real tokens; losses, sequence-level logits and every parameter
gradient are compared whole. Tolerance: 1e-5 relative to the largest magnitude of the stock tensor
(gradients also get an absolute 1e-6 of the model's largest gradient: some are zero in exact
arithmetic, the key bias for one, and are pure roundoff on both sides). The fused path (Triton
kernels in the interpreter) runs on tiny models (hidden 32, 2 layers); *ForQuestionAnswering keeps the
padded layout, so its logits are compared at every position.
"""

import copy
import io
import os

import pytest
import torch
import transformers
from torch import nn

import fastbert
from fastbert.hf import is_patched, patch_hf, unpatch_hf

VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ, BATCH = 64, 32, 2, 2, 64, 11, 3
CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def fused_device(monkeypatch):
    """Route fastbert.ops to the Triton kernels; returns the device to run on: CUDA where there is a GPU,
    else CPU tensors in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    if not (CUDA or INTERP):
        pytest.skip("the fused path needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    device = "cuda" if CUDA else "cpu"
    assert fastbert.ops.use_triton(torch.empty(1, device=device))
    return device


def to(tree, device):
    """Tensors of a dict (or a tensor) moved to device."""
    if isinstance(tree, dict):
        return {k: to(v, device) for k, v in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree


def config(family="bert", **kw):
    cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
    args = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, type_vocab_size=2,
                pad_token_id=0 if family == "bert" else 1)
    kw.setdefault("num_labels", 3)
    args.update(kw)
    return cls(**args)


def lengths_for(batch, seq):
    """Row 0 full, the others random lengths in [2, seq)."""
    return [seq] + [int(n) for n in torch.randint(2, seq, (batch - 1,))]


def padded_batch(cfg, batch=BATCH, seq=SEQ, lengths=None):
    lengths = lengths or lengths_for(batch, seq)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq))
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids[mask == 0] = cfg.pad_token_id
    types = torch.randint(0, 2, (batch, seq)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def labels_for(name, cfg, inputs):
    mask = inputs["attention_mask"]
    batch = mask.shape[0]
    lengths = mask.sum(-1)
    tokens = torch.randint(0, cfg.vocab_size, mask.shape).masked_fill(mask == 0, -100)
    if name.endswith("ForPreTraining"):
        return {"labels": tokens, "next_sentence_label": torch.randint(0, 2, (batch,))}
    if name.endswith("ForMaskedLM"):
        return {"labels": tokens}
    if name.endswith("ForSequenceClassification") or name.endswith("ForMultipleChoice"):
        return {"labels": torch.randint(0, 3 if "Sequence" in name else mask.shape[1], (batch,))}
    if name.endswith("ForTokenClassification"):
        return {"labels": torch.randint(0, 3, mask.shape).masked_fill(mask == 0, -100)}
    if name.endswith("ForQuestionAnswering"):
        start = (torch.rand(batch) * lengths).long()
        return {"start_positions": start, "end_positions": torch.minimum(start + 1, lengths - 1)}
    return {}


def loss_of(out, real, weights):
    if getattr(out, "loss", None) is not None:
        return out.loss
    h = out.last_hidden_state * real[..., None]  # base model: a fixed projection
    pooled = getattr(out, "pooler_output", None)  # ELECTRA and DistilBERT have no pooler
    pooled = 0.0 if pooled is None else pooled.sum()
    return (h * weights).sum() + pooled


def assert_close(ours, ref, what, tol=1e-5, atol=0.0):
    """max |ours - ref| <= tol * max |ref| + atol."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    ours, ref = ours.detach(), ref.detach()
    diff, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    rel = diff / max(scale, 1e-30)
    assert diff <= tol * scale + atol, f"{what}: max error {diff:.3g}, {rel:.3g} relative > {tol}"


def primary(out):
    for key in ("logits", "prediction_logits", "start_logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return key, getattr(out, key)
    raise AssertionError(f"no output to compare in {type(out).__name__}")


def compare_models(stock, patched, inputs, labels, tol=1e-5, real=None):
    """Forward + backward of both; loss, outputs at real tokens and every gradient within tol.
    real: [B, S] real-token mask (default: inputs["attention_mask"])."""
    real = inputs["attention_mask"] if real is None else real
    torch.manual_seed(0)
    weights = torch.randn(HIDDEN).to(real.device)
    outs = []
    for model in (stock, patched):
        model.zero_grad(set_to_none=True)
        out = model(**inputs, **labels)
        loss_of(out, real, weights).backward()
        outs.append(out)
    (ref, ours) = outs
    assert_close(loss_of(ours, real, weights), loss_of(ref, real, weights), "loss", tol)
    key, ref_logits = primary(ref)
    ours_logits = getattr(ours, key)
    if ref_logits.shape[:2] == real.shape:  # per token ([B, S, ...]; QA start logits [B, S])
        keep = real.bool()
        assert_close(ours_logits[keep], ref_logits[keep], key, tol)
    else:
        assert_close(ours_logits, ref_logits, key, tol)
    assert_grads_close(stock, patched, tol)


def assert_grads_close(stock, patched, tol=1e-5):
    stock_params = dict(stock.named_parameters())
    # gradients that are zero in exact arithmetic (key bias, QA output bias: a softmax ignores a constant)
    # are roundoff on both sides: an absolute 1e-6 of the model's largest gradient on top of 1e-5 relative
    atol = 1e-6 * max(q.grad.abs().max().item() for q in stock_params.values() if q.grad is not None)
    checked = 0
    for name, p in patched.named_parameters():
        q = stock_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert_close(p.grad, q.grad, f"grad {name}", tol, atol)
        checked += 1
    assert checked > 10


def stock_and_patched(cls, cfg, device="cpu", **patch_kw):
    torch.manual_seed(1)
    stock = cls(cfg).to(device)
    patched = patch_hf(copy.deepcopy(stock), **patch_kw)
    return stock, patched


BERT_HEADS = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
              "BertForTokenClassification", "BertForQuestionAnswering", "BertForMultipleChoice",
              "BertForNextSentencePrediction"]
ROBERTA_HEADS = ["RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
                 "RobertaForTokenClassification", "RobertaForQuestionAnswering", "RobertaForMultipleChoice"]


def run_head(name, device="cpu"):
    family = "roberta" if name.startswith("Roberta") else "bert"
    cfg = config(family, num_labels=2 if name.endswith("QuestionAnswering") else 3)
    stock, patched = stock_and_patched(getattr(transformers, name), cfg, device)
    stock.train()  # dropout is 0: train mode exercises the training forwards
    patched.train()
    if name.endswith("ForMultipleChoice"):
        flat = padded_batch(cfg, batch=2 * 2)
        inputs = {k: v.view(2, 2, -1) for k, v in flat.items()}
        labels = {"labels": torch.randint(0, 2, (2,))}
        compare_models(stock, patched, to(inputs, device), to(labels, device))
        return
    inputs = padded_batch(cfg)
    if name.endswith("NextSentencePrediction"):
        labels = {"labels": torch.randint(0, 2, (BATCH,))}
    else:
        labels = labels_for(name, cfg, inputs)
    compare_models(stock, patched, to(inputs, device), to(labels, device))


@pytest.mark.parametrize("name", BERT_HEADS + ROBERTA_HEADS)
def test_every_head_matches_stock(name):
    run_head(name)


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "BertForMaskedLM",
                                  "RobertaForTokenClassification", "BertForMultipleChoice"])
def test_every_head_matches_stock_fused(name, monkeypatch):
    run_head(name, fused_device(monkeypatch))


def test_question_answering_keeps_the_padded_layout():
    cfg = config(num_labels=2)
    stock, patched = stock_and_patched(transformers.BertForQuestionAnswering, cfg)
    assert type(patched.bert.encoder) is transformers.models.bert.modeling_bert.BertEncoder
    inputs = padded_batch(cfg)
    with torch.no_grad():  # every position, padding included, as stock
        assert_close(patched(**inputs).start_logits, stock(**inputs).start_logits, "start logits")


def test_patch_keeps_class_params_and_keys():
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertForMaskedLM, cfg)
    assert type(patched) is transformers.BertForMaskedLM
    assert list(patched.state_dict()) == list(stock.state_dict())
    for (n1, p1), (n2, p2) in zip(stock.named_parameters(), patched.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert patched.config._attn_implementation == "fastbert"
    mb = transformers.models.bert.modeling_bert
    layer = patched.bert.encoder.layer[0]
    assert isinstance(layer.attention.output, mb.BertSelfOutput) and type(layer.attention.output) is not \
        mb.BertSelfOutput
    assert isinstance(patched.bert.embeddings, mb.BertEmbeddings)
    assert is_patched(patched) and not is_patched(stock)


@pytest.mark.parametrize("family,fused", [("bert", False), ("roberta", False), ("bert", True)])
def test_padded_row_equals_sequence_alone(family, fused, monkeypatch):
    device = fused_device(monkeypatch) if fused else "cpu"
    cfg = config(family)
    _, model = stock_and_patched(transformers.AutoModel.from_config(cfg).__class__, cfg, device)
    model.eval()
    inputs = to(padded_batch(cfg, batch=3, seq=13, lengths=[13, 5, 9]), device)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
        for b, n in enumerate([13, 5, 9]):
            alone = model(input_ids=inputs["input_ids"][b:b + 1, :n],
                          token_type_ids=inputs["token_type_ids"][b:b + 1, :n]).last_hidden_state
            assert_close(out[b, :n], alone[0], f"row {b}")
            assert not out[b, n:].any()  # the unpadded encoder scatters zeros to padding


def test_unpad_false_keeps_padded_layout_and_stock_values():
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertModel, cfg, unpad=False)
    inputs = padded_batch(cfg)
    with torch.no_grad():
        assert_close(patched(**inputs).last_hidden_state, stock(**inputs).last_hidden_state, "all positions")


def packed(cfg, seqs, flash_kwargs):
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    return collator([{"input_ids": s.tolist()} for s in seqs])


@pytest.mark.parametrize("flash_kwargs,fused", [(False, False), (True, False), (True, True)])
def test_packed_batch_runs_varlen_without_cross_contamination(flash_kwargs, fused, monkeypatch):
    device = fused_device(monkeypatch) if fused else "cpu"
    cfg = config()
    stock, model = stock_and_patched(transformers.BertModel, cfg, device)
    seqs = [torch.randint(3, VOCAB, (n,)) for n in (7, 3, 10)]
    batch = to(packed(cfg, seqs, flash_kwargs), device)
    seqs = [to(s, device) for s in seqs]
    assert batch["input_ids"].shape == (1, 20) and "attention_mask" not in batch
    batch.pop("labels", None)
    with torch.no_grad():
        out = model(**batch).last_hidden_state[0]
        start = 0
        for s in seqs:
            alone = stock(input_ids=s[None]).last_hidden_state[0]
            assert_close(out[start:start + len(s)], alone, f"packed sequence at {start}")
            start += len(s)
    # the attention implementation alone (no patch_hf) honours the packing too
    plain = copy.deepcopy(stock)
    plain.set_attn_implementation("fastbert")
    with torch.no_grad():
        out2 = plain(**batch).last_hidden_state[0]
    assert_close(out2[7:10], stock(input_ids=seqs[1][None]).last_hidden_state[0], "attention only")


def test_attn_implementation_registered_and_mask_honoured(tmp_path):
    import fastbert.hf  # noqa: F401 - registers "fastbert"

    cfg = config()
    torch.manual_seed(2)
    stock = transformers.BertModel(cfg).eval()
    stock.save_pretrained(tmp_path)
    inputs = padded_batch(cfg, lengths=[SEQ, 4, 7])
    with torch.no_grad():
        ref = stock(**inputs).last_hidden_state
        loaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="fastbert").eval()
        built = transformers.BertModel._from_config(cfg, attn_implementation="fastbert").eval()
        built.load_state_dict(stock.state_dict())
        switched = copy.deepcopy(stock)
        switched.set_attn_implementation("fastbert")
        for model in (loaded, built, switched):
            assert model.config._attn_implementation == "fastbert"
            out = model(**inputs).last_hidden_state
            # attention alone keeps the padded layout: every position equals sdpa's, padding included
            # (the padding mask reached the attention)
            assert_close(out, ref, "attn_implementation='fastbert'")
        # and a padded row equals the row alone (the mask was not silently dropped)
        alone = switched(input_ids=inputs["input_ids"][1:2, :4],
                         token_type_ids=inputs["token_type_ids"][1:2, :4]).last_hidden_state
        assert_close(switched(**inputs).last_hidden_state[1, :4], alone[0], "row alone")


def test_register_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    import fastbert.hf as fhf

    fhf.register()
    fhf.register()
    assert AttentionInterface._global_mapping["fastbert"] is fhf.fastbert_attention
    assert AttentionMaskInterface._global_mapping["fastbert"] is fhf.fastbert_mask


@pytest.mark.parametrize("cross_len,fused", [(None, False), (7, False), (SEQ, False), (SEQ, True)])
def test_decoder_and_cross_attention_match_stock(cross_len, fused, monkeypatch):
    # cross-attention over keys as long as the queries runs fastbert's padded attention
    device = fused_device(monkeypatch) if fused else "cpu"
    kw = {"is_decoder": True}
    if cross_len is not None:
        kw["add_cross_attention"] = True
    cfg = config(**kw)
    stock, patched = stock_and_patched(transformers.BertLMHeadModel, cfg, device)
    inputs = padded_batch(cfg)
    labels = {"labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}
    if cross_len is not None:
        torch.manual_seed(3)
        inputs["encoder_hidden_states"] = torch.randn(BATCH, cross_len, HIDDEN)
        enc_mask = torch.ones(BATCH, cross_len, dtype=torch.long)
        enc_mask[1, cross_len // 2:] = 0
        inputs["encoder_attention_mask"] = enc_mask
    compare_models(stock, patched, to(inputs, device), to(labels, device))


def test_custom_4d_mask_and_inputs_embeds_take_the_stock_path():
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertModel, cfg)
    inputs = padded_batch(cfg)
    # a 4D boolean mask (True = attend) that is not a padding pattern: each query sees a window
    pos = torch.arange(SEQ)
    window = (pos[:, None] - pos[None, :]).abs() <= 3
    mask4d = window[None, None].expand(BATCH, 1, SEQ, SEQ) & inputs["attention_mask"].bool()[:, None, None, :]
    custom = dict(inputs, attention_mask=mask4d)
    compare_models(stock, patched, custom, {}, real=inputs["attention_mask"])
    with torch.no_grad():
        assert_close(patched(**custom).last_hidden_state, stock(**custom).last_hidden_state, "4D mask, all")
        embeds = stock.embeddings.word_embeddings(inputs["input_ids"])
        by_embeds = dict(inputs, inputs_embeds=embeds, input_ids=None)
        got, want = patched(**by_embeds).last_hidden_state, stock(**by_embeds).last_hidden_state
        keep = inputs["attention_mask"].bool()
        assert_close(got[keep], want[keep], "inputs_embeds")


def test_decoder_with_cache_matches_stock():
    cfg = config(is_decoder=True)
    stock, patched = stock_and_patched(transformers.BertLMHeadModel, cfg)
    stock.eval()
    patched.eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        a = stock(ids, use_cache=True)
        b = patched(ids, use_cache=True)
        nxt = torch.randint(3, VOCAB, (2, 1))
        a2 = stock(nxt, cache=a.cache, use_cache=True) if hasattr(a, "cache") else \
            stock(nxt, past_key_values=a.past_key_values, use_cache=True)
        b2 = patched(nxt, cache=b.cache, use_cache=True) if hasattr(b, "cache") else \
            patched(nxt, past_key_values=b.past_key_values, use_cache=True)
    assert_close(b.logits, a.logits, "prefill")
    assert_close(b2.logits, a2.logits, "step")


def test_output_hidden_states_and_attentions_as_stock():
    cfg = config()
    torch.manual_seed(4)
    stock = transformers.BertModel._from_config(cfg, attn_implementation="eager").eval()
    patched = patch_hf(copy.deepcopy(stock))
    inputs = padded_batch(cfg)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = stock(**inputs, output_hidden_states=True, output_attentions=True)
        out = patched(**inputs, output_hidden_states=True, output_attentions=True)
        assert len(out.attentions) == len(ref.attentions) == LAYERS
        for a, b in zip(ref.attentions, out.attentions, strict=True):
            assert_close(b, a, "attentions")
        only_states = patched(**inputs, output_hidden_states=True)  # unpadded: scattered back
        assert only_states.attentions is None
    for outs in (out, only_states):
        assert len(outs.hidden_states) == len(ref.hidden_states) == LAYERS + 1
        assert_close(outs.hidden_states[0], ref.hidden_states[0], "embedding output")  # whole, as stock
        for i, (a, b) in enumerate(zip(ref.hidden_states, outs.hidden_states, strict=True)):
            assert b.shape == a.shape
            assert_close(b[keep], a[keep], f"hidden_states[{i}]")
    assert torch.equal(only_states.hidden_states[-1], only_states.last_hidden_state)


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_checkpointing_matches_stock(fused, monkeypatch):
    device = fused_device(monkeypatch) if fused else "cpu"
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertForSequenceClassification, cfg, device)
    for m in (stock, patched):
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x
            m.activation_checkpointing_enable({"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        assert all(layer.gradient_checkpointing for layer in m.bert.encoder.layer)
    labels = {"labels": torch.randint(0, 3, (BATCH,))}
    compare_models(stock, patched, to(padded_batch(cfg), device), to(labels, device))


def compile_and_count(model, inputs):
    """torch.compile(fullgraph=True) through a recording aot_eager backend: (output, op names)."""
    import torch._dynamo

    torch._dynamo.reset()
    ops = set()

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function":
                ops.add(str(node.target))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(**inputs)
    return out, ops


@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_fullgraph(fused, monkeypatch):
    device = fused_device(monkeypatch) if fused else "cpu"
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertForSequenceClassification, cfg, device)
    patched.train()
    stock.train()
    inputs = to(padded_batch(cfg, batch=2, seq=8), device)
    labels = torch.randint(0, 3, (2,)).to(device)
    out, ops = compile_and_count(patched, dict(inputs, labels=labels))  # fullgraph: a break raises
    out.loss.backward()
    ref = stock(**inputs, labels=labels)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, "compiled logits")
    assert_grads_close(stock, patched)
    assert any("fastbert.embedding_gather" in o for o in ops), sorted(ops)
    if fused:
        for op in ("fastbert.layer_norm_fwd", "fastbert.bias_gelu_fwd", "fastbert.attention_fwd"):
            assert any(op in o for o in ops), (op, sorted(ops))


def eval_pair(cls, cfg, inputs, seed=5):
    """(stock, patched, stock logits, patched logits) of a cls(cfg) in eval mode, the logits within
    1e-5."""
    torch.manual_seed(seed)
    stock = cls(cfg).eval()
    patched = patch_hf(copy.deepcopy(stock))
    with torch.no_grad():
        ref, want = stock(**inputs).logits, patched(**inputs).logits
    assert_close(want, ref, "patched")
    return stock, patched, ref, want


def check_undo(stock, patched, inputs, ref):
    """unpatch_hf(patched) gives back the stock classes, attention implementation and logits (ref),
    bit-identical."""
    unpatch_hf(patched)
    assert not is_patched(patched)
    assert patched.config._attn_implementation == stock.config._attn_implementation
    assert all(type(a) is type(b) for a, b in zip(stock.modules(), patched.modules(), strict=True))
    with torch.no_grad():
        assert torch.equal(patched(**inputs).logits, ref)  # bit-identical stock outputs


def check_saved_copies(patched, inputs, ref, want, tmp_path):
    """A deepcopy and a torch.save/torch.load of a patched model stay patched and give its logits
    (want) exactly; its save_pretrained checkpoint reloads (from_pretrained, eval) as a plain
    transformers model with the stock logits (ref). Returns the reloaded model."""
    clone = copy.deepcopy(patched)
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    patched.save_pretrained(tmp_path)
    reloaded = type(patched).from_pretrained(tmp_path).eval()
    assert not is_patched(reloaded)  # a checkpoint is plain transformers; patch again after loading
    with torch.no_grad():
        for model, what in ((clone, "deepcopy"), (loaded, "torch.load")):
            assert is_patched(model), what
            assert torch.equal(model(**inputs).logits, want), what
        assert torch.equal(reloaded(**inputs).logits, ref)
    return reloaded


def test_persistence_and_undo(tmp_path):
    cfg = config()
    inputs = padded_batch(cfg)
    stock, patched, ref, want = eval_pair(transformers.BertForSequenceClassification, cfg, inputs)

    reloaded = check_saved_copies(patched, inputs, ref, want, tmp_path)
    assert set(reloaded.state_dict()) == set(stock.state_dict())
    with torch.no_grad():
        assert torch.equal(patch_hf(reloaded)(**inputs).logits, want)

    check_undo(stock, patched, inputs, ref)


class LoraLinear(nn.Linear):
    """A stand-in for a PEFT wrapper: a subclass of nn.Linear that adds a low-rank update."""

    def __init__(self, base):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.a = nn.Parameter(torch.randn(4, base.in_features) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, 4) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.a.t() @ self.b.t()


def test_wrapped_linear_keeps_stock_path():
    cfg = config()
    torch.manual_seed(6)
    stock = transformers.BertModel(cfg)
    for layer in stock.encoder.layer:
        layer.intermediate.dense = LoraLinear(layer.intermediate.dense)
        layer.output.dense = LoraLinear(layer.output.dense)
    patched = patch_hf(copy.deepcopy(stock))
    inputs = padded_batch(cfg)
    compare_models(stock, patched, inputs, {})
    assert patched.encoder.layer[0].intermediate.dense.a.grad is not None


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu"])
def test_activations(act):
    cfg = config(hidden_act=act)
    stock, patched = stock_and_patched(transformers.BertForTokenClassification, cfg)
    inputs = padded_batch(cfg)
    compare_models(stock, patched, inputs, labels_for("ForTokenClassification", cfg, inputs))


def test_flags_select_what_is_patched():
    cfg = config()
    _, patched = stock_and_patched(transformers.BertModel, cfg, attention=False, bias_gelu=False)
    mb = transformers.models.bert.modeling_bert
    assert patched.config._attn_implementation != "fastbert"
    assert type(patched.encoder) is mb.BertEncoder  # unpad needs the fastbert attention
    assert type(patched.encoder.layer[0].intermediate) is mb.BertIntermediate
    assert type(patched.encoder.layer[0].output) is not mb.BertOutput
    patch_hf(patched)  # re-patching applies the new flags
    assert type(patched.encoder) is not mb.BertEncoder
    assert patched.config._attn_implementation == "fastbert"
    unpatch_hf(patched)
    assert patched.config._attn_implementation == "sdpa"


def test_bad_input():
    with pytest.raises(TypeError, match="patch_hf expects"):
        patch_hf("bert")
    with pytest.raises(ValueError, match="none of the modules fastbert patches.*DistilBERT"):
        patch_hf(nn.Linear(3, 3))


def test_import_fastbert_does_not_import_transformers():
    import subprocess
    import sys

    # a source-tree checkout maps fastbert.kernels in the repository-root conftest: the child process
    # loads it too (it is not importable, and not needed, when an installed fastbert is tested)
    code = ("try:\n    import conftest  # noqa: F401\nexcept ImportError:\n    pass\n"
            "import sys, fastbert; assert 'transformers' not in sys.modules; "
            "f = fastbert.patch_hf; assert 'transformers' in sys.modules; print(f.__module__)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "fastbert.hf.patch"


def test_encoders_that_reuse_bert_modules():
    """DPR's encoders hold a transformers BertModel: the same classes, patched the same way."""
    cfg = transformers.DPRConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=40,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, projection_dim=16)
    stock, patched = stock_and_patched(transformers.DPRQuestionEncoder, cfg)
    assert patched.question_encoder.bert_model.config._attn_implementation == "fastbert"
    inputs = padded_batch(config())
    inputs.pop("token_type_ids")
    with torch.no_grad():
        assert_close(patched(**inputs).pooler_output, stock(**inputs).pooler_output, "DPR pooled output")


def test_dropout_in_training_and_eval_equals_stock():
    cfg = config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    stock, patched = stock_and_patched(transformers.BertModel, cfg)
    inputs = padded_batch(cfg)
    keep = inputs["attention_mask"].bool()
    patched.train()
    torch.manual_seed(7)
    first = patched(**inputs).last_hidden_state
    second = patched(**inputs).last_hidden_state
    assert torch.isfinite(first).all() and not torch.allclose(first[keep], second[keep])
    stock.eval()
    patched.eval()
    with torch.no_grad():
        got, want = patched(**inputs).last_hidden_state, stock(**inputs).last_hidden_state
    assert_close(got[keep], want[keep], "eval")


def test_an_all_padding_row_does_not_disturb_the_others():
    """A row that is all padding starts with padding, so the batch keeps the padded layout."""
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertModel, cfg)
    inputs = padded_batch(cfg, lengths=[SEQ, 0, 5])
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        got, want = patched(**inputs).last_hidden_state, stock(**inputs).last_hidden_state
    assert torch.isfinite(got).all()
    assert_close(got[keep], want[keep], "rows with tokens")


@pytest.mark.parametrize("how", ["autocast", "weights"])
def test_bf16(how):
    """bf16 (under autocast, or bf16 weights): patched within bf16 rounding of stock, finite grads."""
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertForSequenceClassification, cfg)
    if how == "weights":
        stock, patched = stock.to(torch.bfloat16), patched.to(torch.bfloat16)
    inputs = padded_batch(cfg)
    labels = torch.randint(0, 3, (BATCH,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        ref = stock(**inputs, labels=labels)
        out = patched(**inputs, labels=labels)
    assert out.logits.dtype == ref.logits.dtype
    assert_close(out.logits.float(), ref.logits.float(), f"bf16 {how} logits", tol=2e-2)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in patched.parameters() if p.grad is not None)


@pytest.mark.parametrize("selection", [[1, -1], 2, [0]])
def test_selected_hidden_states_as_stock(selection):
    """output_hidden_states given as indices: the same entries present (others None), scattered back."""
    cfg = config()
    stock, patched = stock_and_patched(transformers.BertModel, cfg)
    inputs = padded_batch(cfg)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = stock(**inputs, output_hidden_states=selection).hidden_states
        out = patched(**inputs, output_hidden_states=selection).hidden_states
    assert [h is None for h in out] == [h is None for h in ref]
    for i, (a, b) in enumerate(zip(ref, out, strict=True)):
        if a is not None:
            assert b.shape == a.shape
            assert_close(b[keep], a[keep], f"hidden_states[{i}]")
