"""patch_hf on transformers' ModernBERT: every head class against the stock model of the same weights.

The helpers and tolerance of tests/test_hf_patch.py (1e-5 relative; outputs at real tokens, losses,
sequence-level logits and every parameter gradient), a deepcopy made before patching, fresh random ids
with right padding, dropout 0, fp32. The tiny config has global and local (sliding-window) layers
(layer types full, sliding, full: global_attn_every_n_layers=2) and a window of 2 (local_attention 4)
that sequences of 11-13 tokens exceed, so the window changes the numbers (checked). Then left padding,
labels at padding, MaskedLM with sparse_prediction, packed batches, the flags, persistence and undo
(bit-identical stock outputs after unpatch_hf), and the Triton path (interpreter) for two heads.
"""

import copy
import io

import pytest
import torch
import transformers
from test_hf_inputs import left_padded
from test_hf_patch import (
    assert_close,
    assert_grads_close,
    check_saved_copies,
    check_undo,
    compare_models,
    eval_pair,
    fused_device,
    labels_for,
    to,
)

import fastbert
import fastbert.hf.modernbert as mb
from fastbert.hf import is_patched, patch_hf, unpatch_hf

modeling = pytest.importorskip("transformers.models.modernbert.modeling_modernbert")
if mb._ATTENTION is None:
    pytest.skip(f"transformers {transformers.__version__}'s ModernBERT is the older layout (the model unpads "
                "itself for flash-attn, its attention takes qkv and sliding_window_mask): patch_hf leaves it "
                "stock", allow_module_level=True)

VOCAB, HIDDEN, SEQ, BATCH = 64, 32, 11, 3
HEADS = ["ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification",
         "ModernBertForTokenClassification", "ModernBertForQuestionAnswering", "ModernBertForMultipleChoice"]
HEADS = [n for n in HEADS if hasattr(transformers, n)]


def mb_config(**kw):
    args = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=2, global_attn_every_n_layers=2, local_attention=4,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                sep_token_id=2, num_labels=3, attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0,
                classifier_dropout=0.0)
    args.update(kw)
    return transformers.ModernBertConfig(**args)


def batch(cfg, rows=BATCH, seq=SEQ, lengths=None):
    lengths = lengths or [seq] + [int(n) for n in torch.randint(3, seq, (rows - 1,))]
    ids = torch.randint(3, cfg.vocab_size, (rows, seq))
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids[mask == 0] = cfg.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


def build(name, device="cpu", cfg=None, **patch_kw):
    cfg = cfg or mb_config(num_labels=2 if name.endswith("QuestionAnswering") else 3)
    torch.manual_seed(1)
    stock = getattr(transformers, name)(cfg).to(device).train()  # dropout 0: the training forwards
    patched = patch_hf(copy.deepcopy(stock), **patch_kw)
    return cfg, stock, patched


def inputs_for(name, cfg, left=False):
    if name.endswith("ForMultipleChoice"):
        flat = batch(cfg, rows=4)
        flat = left_padded(flat) if left else flat
        return {k: v.view(2, 2, -1) for k, v in flat.items()}, {"labels": torch.randint(0, 2, (2,))}
    inputs = batch(cfg)
    inputs = left_padded(inputs) if left else inputs
    return inputs, labels_for(name, cfg, inputs)


def run(name, device="cpu", left=False, cfg=None, **patch_kw):
    cfg, stock, patched = build(name, device, cfg, **patch_kw)
    inputs, labels = inputs_for(name, cfg, left)
    compare_models(stock, patched, to(inputs, device), to(labels, device))
    return stock, patched


class Calls:
    """Counts the fused encoder runs and the fused attentions (fastbert.hf.modernbert)."""

    def __init__(self, monkeypatch):
        self.runs, self.attends, self.fused = [], [], []
        run_, attend, fused = mb._ModelMixin._fastbert_run, mb._attend, mb._fused_layer
        monkeypatch.setattr(mb._ModelMixin, "_fastbert_run",
                            lambda model, *a, **k: self.runs.append(1) or run_(model, *a, **k))
        monkeypatch.setattr(mb, "_attend", lambda *a, **k: self.attends.append(1) or attend(*a, **k))

        def fused_layer(*a, **k):  # a layer as one autograd node (fastbert.ops.modern_block), or None
            out = fused(*a, **k)
            if out is not None:
                self.fused.append(1)
            return out
        monkeypatch.setattr(mb, "_fused_layer", fused_layer)

    def every_layer_fused(self):
        """Every layer of every fused run took the fused path: as one node, or op by op."""
        return self.runs and len(self.attends) + len(self.fused) == 3 * len(self.runs)


@pytest.fixture
def calls(monkeypatch):
    return Calls(monkeypatch)


def test_the_window_and_both_layer_types_occur():
    cfg = mb_config()
    assert set(cfg.layer_types) == {"full_attention", "sliding_attention"}
    _, stock, _ = build("ModernBertModel")
    wide = copy.deepcopy(stock)
    wide.config.local_attention = 64  # the same weights, a window wider than the sequence
    for layer in wide.layers:
        if layer.attn.sliding_window is not None:
            layer.attn.sliding_window = 33
    inputs = batch(cfg, lengths=[SEQ, SEQ, SEQ])
    with torch.no_grad():
        a, b = stock(**inputs).last_hidden_state, wide(**inputs).last_hidden_state
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("name", HEADS)
def test_every_head_matches_stock(name, calls):
    stock, patched = run(name)
    assert isinstance(patched, type(stock)) and is_patched(patched)
    assert list(patched.state_dict()) == list(stock.state_dict())
    if name.endswith("ForQuestionAnswering"):  # its span softmax reads padding: the padded layout
        assert not calls.runs
    else:
        assert calls.every_layer_fused() and not calls.fused  # CPU: op by op (no Triton)


@pytest.mark.parametrize("name", ["ModernBertForSequenceClassification", "ModernBertForMaskedLM"])
def test_every_head_matches_stock_fused(name, monkeypatch, calls):
    device = fused_device(monkeypatch)
    fastbert.ops._dispatch._last.clear()
    run(name, device)
    assert calls.every_layer_fused() and len(calls.fused) == 3 * len(calls.runs)  # each layer one node
    chosen = fastbert.ops.last_choices()
    for op in ("rotary", "attention", "geglu", "layer_norm"):
        assert chosen[op, torch.device(device).type] == fastbert.ops._dispatch.TRITON, (op, chosen)


@pytest.mark.parametrize("name", ["ModernBertForSequenceClassification", "ModernBertForMultipleChoice",
                                  "ModernBertForTokenClassification", "ModernBertModel"])
def test_left_padding_matches_stock(name, calls):
    cfg, stock, patched = build(name)
    inputs, labels = inputs_for(name, cfg, left=True)
    compare_models(stock, patched, inputs, labels)
    assert not calls.runs  # row 0 starts with padding: the padded layout, stock values everywhere
    with torch.no_grad():
        key = "logits" if name != "ModernBertModel" else "last_hidden_state"
        ours, ref = getattr(patched(**inputs), key), getattr(stock(**inputs), key)
    assert_close(ours, ref, "every position")


VARIANTS = {"biases": dict(norm_bias=True, attention_bias=True, mlp_bias=True),
            "tanh_gelu": dict(hidden_activation="gelu_pytorch_tanh"), "silu": dict(hidden_activation="silu"),
            "every_3": dict(global_attn_every_n_layers=3, num_hidden_layers=4, local_attention=6)}


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_config_variants(variant, calls):
    run("ModernBertForMaskedLM", cfg=mb_config(**variant))
    assert calls.runs  # silu: the MLP keeps its stock module, the rest is fused


def test_mean_pooling_classifier():
    run("ModernBertForSequenceClassification", cfg=mb_config(classifier_pooling="mean"))


def test_labels_at_padding_keep_the_padded_layout(calls):
    cfg, stock, patched = build("ModernBertForTokenClassification")
    inputs = batch(cfg)
    labels = {"labels": torch.randint(0, 3, inputs["input_ids"].shape)}  # padding positions labelled too
    real = torch.ones_like(inputs["attention_mask"])
    compare_models(stock, patched, inputs, labels, real=real)
    assert not calls.runs


@pytest.mark.parametrize("fused", [False, True])
def test_masked_lm_sparse_prediction(fused, monkeypatch, calls):
    device = fused_device(monkeypatch) if fused else "cpu"
    cfg = mb_config(sparse_prediction=True)
    _, stock, patched = build("ModernBertForMaskedLM", device, cfg)
    inputs = batch(cfg)
    mask = inputs["attention_mask"]
    unmasked = (mask == 0) | (torch.rand(mask.shape) < 0.6)
    labels = torch.randint(0, VOCAB, mask.shape).masked_fill(unmasked, -100)
    labels[0, 0] = 5
    outs = []
    for model in (stock, patched):
        model.zero_grad(set_to_none=True)
        out = model(**to(inputs, device), labels=labels.to(device))
        out.loss.backward()
        outs.append(out)
    assert outs[0].logits.shape[0] == int((labels != -100).sum())  # only the masked tokens
    assert_close(outs[1].logits, outs[0].logits, "sparse logits")
    assert_close(outs[1].loss, outs[0].loss, "loss")
    assert_grads_close(stock, patched)
    assert calls.runs


def test_no_padding_eval_and_return_dict_false(calls):
    cfg, stock, patched = build("ModernBertModel")
    stock.eval()
    patched.eval()
    inputs = batch(cfg, lengths=[SEQ] * BATCH)
    with torch.no_grad():
        ref = stock(**inputs).last_hidden_state
        assert_close(patched(**inputs).last_hidden_state, ref, "dense")
        assert_close(patched(input_ids=inputs["input_ids"]).last_hidden_state, ref, "no mask")
        out = patched(**inputs, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1
        assert_close(out[0], ref, "tuple")
    assert len(calls.runs) == 3


def test_inputs_embeds_matches_stock_and_input_ids(calls):
    cfg, stock, patched = build("ModernBertForTokenClassification")
    inputs, labels = inputs_for("ModernBertForTokenClassification", cfg)
    ids = inputs.pop("input_ids")
    embeds = {"inputs_embeds": patched.get_input_embeddings()(ids).detach()}
    compare_models(stock, patched, {**inputs, **embeds}, labels)
    assert calls.runs
    with torch.no_grad():  # zeros at padding either way, as the unpadded input_ids path gives
        assert torch.equal(patched(**inputs, **embeds).logits, patched(input_ids=ids, **inputs).logits)


def test_padded_row_equals_sequence_alone():
    cfg, _, model = build("ModernBertModel")
    model.eval()
    lengths = [13, 5, 9]
    inputs = batch(cfg, seq=13, lengths=lengths)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
        for b, n in enumerate(lengths):
            alone = model(input_ids=inputs["input_ids"][b:b + 1, :n]).last_hidden_state
            assert_close(out[b, :n], alone[0], f"row {b}")
            assert not out[b, n:].any()  # zeros at padding positions


def test_packed_batch_runs_varlen_per_sequence(calls):
    cfg, _, model = build("ModernBertModel")
    model.eval()
    seqs = [torch.randint(3, VOCAB, (n,)) for n in (7, 4, 9)]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=position_ids).last_hidden_state[0]
        start = 0
        for s in seqs:
            alone = model(input_ids=s[None]).last_hidden_state[0]
            assert_close(out[start:start + len(s)], alone, "packed sequence")
            start += len(s)
        # positions that are not a packing (nor arange) take the stock path
        odd = position_ids + 1
        stock_like = model(input_ids=ids, position_ids=odd).last_hidden_state
    assert len(calls.runs) == 4
    unpatch_hf(model)
    with torch.no_grad():
        assert_close(stock_like, model(input_ids=ids, position_ids=odd).last_hidden_state, "odd positions")


@pytest.mark.parametrize("flash_kwargs,fused", [(False, False), (True, False), (True, True)])
def test_flattening_collator_batches(flash_kwargs, fused, calls, monkeypatch):
    device = fused_device(monkeypatch) if fused else "cpu"
    cfg, _, model = build("ModernBertForMaskedLM", device)
    model.eval()
    seqs = [torch.randint(3, VOCAB, (n,)) for n in (6, 10, 3)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    packed = to(collator([{"input_ids": s.tolist()} for s in seqs]), device)
    seqs = [s.to(device) for s in seqs]
    assert ("cu_seq_lens_q" in packed) == flash_kwargs
    with torch.no_grad():
        out = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
        start = 0
        for s in seqs:
            assert_close(out[start:start + len(s)], model(input_ids=s[None]).logits[0], "packed sequence")
            start += len(s)
    assert len(calls.runs) == 4


@pytest.mark.parametrize("flags", [dict(unpad=False), dict(layer_norm=False), dict(bias_gelu=False),
                                   dict(embeddings=False), dict(attention=False)])
def test_flags(flags, calls):
    stock, patched = run("ModernBertForTokenClassification", **flags)
    roles = {mb.ROLE[type(m)] for m in patched.modules() if type(m) in mb.ROLE}
    off = {"unpad"} if "attention" in flags else set(flags)  # unpad needs the attention
    assert roles == {"unpad", "layer_norm", "bias_gelu", "embeddings"} - off
    if "unpad" in flags or "attention" in flags:
        assert not calls.runs
    else:
        assert calls.runs
        # a layer whose parts are stock runs as a module on the unpadded tokens (varlen, windowed)
        assert len(calls.attends) == (0 if "layer_norm" in flags else 3)


@pytest.mark.parametrize("fused", [False, True])
def test_hooked_layer_and_gradient_checkpointing(fused, calls, monkeypatch):
    device = fused_device(monkeypatch) if fused else "cpu"
    cfg, stock, patched = build("ModernBertForMaskedLM", device)
    seen = []
    patched.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    inputs, labels = (to(t, device) for t in inputs_for("ModernBertForMaskedLM", cfg))
    compare_models(stock, patched, inputs, labels)
    # the hooked (local) layer ran as its module, varlen; the other two on the fused path (CPU: op by op,
    # the Triton path: each as one node)
    assert seen and len(calls.attends) + len(calls.fused) == 2 and len(calls.fused) == (2 if fused else 0)
    calls.attends.clear()
    calls.fused.clear()
    stock.gradient_checkpointing_enable()
    patched.gradient_checkpointing_enable()
    compare_models(stock, patched, inputs, labels)
    assert calls.runs and not calls.attends


def test_output_hidden_states_and_attentions_as_stock(calls):
    cfg, stock, patched = build("ModernBertModel")
    inputs = batch(cfg)
    eager = copy.deepcopy(stock)
    eager.set_attn_implementation("eager")  # stock sdpa returns no weights; patched returns eager's
    with torch.no_grad():
        for kw in (dict(output_hidden_states=True), dict(output_attentions=True)):
            ours = patched(**inputs, **kw)
            ref = (stock if "output_hidden_states" in kw else eager)(**inputs, **kw)
            key = "hidden_states" if "output_hidden_states" in kw else "attentions"
            assert len(getattr(ours, key)) == len(getattr(ref, key))
            for a, b in zip(getattr(ours, key), getattr(ref, key), strict=True):
                assert_close(a, b, key)
    assert not calls.runs


def test_persistence_and_undo(tmp_path):
    cfg = mb_config()
    inputs = batch(cfg)
    stock, patched, ref, want = eval_pair(transformers.ModernBertForSequenceClassification, cfg, inputs)
    assert type(patched) is type(stock)  # the head keeps its class; its .model is the fused subclass
    assert type(patched.model).__name__ == "ModernBertModel"
    check_saved_copies(patched, inputs, ref, want, tmp_path)
    check_undo(stock, patched, inputs, ref)


def test_base_model_save_pretrained_names_the_stock_architecture(tmp_path):
    _, stock, patched = build("ModernBertModel")
    patched.save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["ModernBertModel"]
    reloaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is type(stock)
    inputs = batch(stock.config)
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(patched) and is_patched(loaded)
    with torch.no_grad():
        want = patched(**inputs).last_hidden_state
        assert torch.equal(loaded(**inputs).last_hidden_state, want)
        unpatch_hf(patched)
        assert type(patched) is type(stock) and not is_patched(patched)
        assert torch.equal(patched(**inputs).last_hidden_state, stock(**inputs).last_hidden_state)


def test_attn_implementation_fastbert_alone_matches_stock():
    """attn_implementation="fastbert" without patch_hf: the global layers' padding mask and the local
    layers' window (transformers' sliding_window keyword; their 4D band mask on padded batches) as stock."""
    cfg = mb_config()
    torch.manual_seed(1)
    stock = transformers.ModernBertModel(cfg).eval()
    ours = copy.deepcopy(stock)
    ours.set_attn_implementation("fastbert")
    assert ours.config._attn_implementation == "fastbert" and not isinstance(ours, mb._ModelMixin)
    inputs = batch(cfg)
    with torch.no_grad():
        assert_close(ours(**inputs).last_hidden_state, stock(**inputs).last_hidden_state, "padded")
        seqs = [torch.randint(3, VOCAB, (n,)) for n in (9, 5)]
        flat = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
            [{"input_ids": s.tolist()} for s in seqs])
        out = ours(input_ids=flat["input_ids"], position_ids=flat["position_ids"],
                   **{k: flat[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        for s, part in zip(seqs, out.last_hidden_state[0].split([9, 5]), strict=True):
            assert_close(part, stock(input_ids=s[None]).last_hidden_state[0], "varlen, windowed")


def test_torch_compile_fullgraph_keeps_the_padded_layout(calls):
    cfg, stock, patched = build("ModernBertForSequenceClassification")
    stock.eval()
    patched.eval()
    inputs = batch(cfg)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)  # dynamo traces it without a break
    with torch.no_grad():
        assert_close(compiled(**inputs).logits, stock(**inputs).logits, "compiled")
    assert not calls.runs  # the token count is data-dependent: the stock forward on the fused parts
