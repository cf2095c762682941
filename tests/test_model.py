"""fastbert's encoder against its independent peers: the bert_pytorch package and transformers.

Eval mode (dropout off), fp32, random ids with padding; tolerances 1e-5 absolute.
"""

import pytest
import torch
import transformers

import fastbert
from fastbert.reference.model import BertConfig
from fastbert.reference.model import Encoder as ReferenceEncoder

try:  # a missing bert_pytorch skips its comparisons (the GPU machine has it only as a carried wheel)
    import bert_pytorch.model as bp
except ImportError:
    bp = None
needs_bert_pytorch = pytest.mark.skipif(bp is None, reason="bert_pytorch is not installed")

BP_CONFIGS = [  # (vocab, hidden, layers, heads, seq)
    (100, 96, 2, 3, 17),
    (257, 64, 3, 4, 1),
    (50, 32, 1, 2, 31),
    (1000, 128, 2, 8, 64),
]


def random_batch(vocab, batch, seq, pad_tail=True):
    """Ids in [1, vocab) with right padding (0) on some rows; every row keeps >= 1 real token."""
    x = torch.randint(1, vocab, (batch, seq))
    seg = torch.randint(1, 3, (batch, seq))
    if pad_tail and seq > 1:
        for b in range(1, batch):
            n = int(torch.randint(1, seq + 1, ()))
            x[b, n:] = 0
            seg[b, n:] = 0
    return x, seg


@needs_bert_pytorch
@pytest.mark.parametrize("vocab,hidden,layers,heads,seq", BP_CONFIGS)
def test_bert_matches_bert_pytorch_both_ways(vocab, hidden, layers, heads, seq):
    theirs = bp.BERT(vocab, hidden, layers, heads).eval()
    ours = fastbert.BERT(vocab, hidden, layers, heads).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, seg = random_batch(vocab, 4, seq)
    with torch.no_grad():
        err = (ours(x, seg) - theirs(x, seg)).abs().max().item()
    assert err <= 1e-5, err

    # reverse: fresh fastbert weights into bert_pytorch
    ours2 = fastbert.BERT(vocab, hidden, layers, heads).eval()
    theirs.load_state_dict(ours2.state_dict(), strict=True)
    with torch.no_grad():
        err = (ours2(x, seg) - theirs(x, seg)).abs().max().item()
    assert err <= 1e-5, err


@needs_bert_pytorch
def test_bertlm_matches_bert_pytorch():
    vocab = 300
    theirs = bp.BERTLM(bp.BERT(vocab, 64, 2, 4), vocab).eval()
    ours = fastbert.BERTLM(fastbert.BERT(vocab, 64, 2, 4), vocab).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, seg = random_batch(vocab, 3, 23)
    with torch.no_grad():
        (n1, m1), (n2, m2) = ours(x, seg), theirs(x, seg)
    assert (n1 - n2).abs().max() <= 1e-5
    assert (m1 - m2).abs().max() <= 1e-5


def test_unpadded_path_matches_padded_on_real_tokens():
    vocab = 120
    model = fastbert.BERT(vocab, 64, 2, 4).eval()
    x, seg = random_batch(vocab, 5, 29)
    with torch.no_grad():
        model.unpad = False
        dense = model(x, seg)
        model.unpad = True
        packed = model(x, seg)
    real = x > 0
    assert (dense - packed)[real].abs().max() <= 1e-5
    assert torch.all(packed[~real] == 0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_from_hf_matches_transformers(attn, act):
    cfg = transformers.BertConfig(vocab_size=211, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                                  intermediate_size=160, max_position_embeddings=64, hidden_act=act,
                                  layer_norm_eps=1e-12, attn_implementation=attn)
    hf = transformers.BertModel(cfg).eval()
    ours = fastbert.from_hf(hf).eval()
    x = torch.randint(1, 211, (4, 37))
    types = torch.randint(0, 2, (4, 37))
    mask = torch.ones_like(x)
    mask[1, 20:] = 0
    mask[3, 3:] = 0
    with torch.no_grad():
        a = hf(input_ids=x, token_type_ids=types, attention_mask=mask).last_hidden_state
        b = ours(x, types, mask)
    real = mask.bool()
    assert (a - b)[real].abs().max() <= 1e-5
    # and back: to_hf gives a BertModel with identical outputs
    hf2 = fastbert.to_hf(ours).eval()
    with torch.no_grad():
        c = hf2(input_ids=x, token_type_ids=types, attention_mask=mask).last_hidden_state
    assert (a - c)[real].abs().max() <= 1e-6


def test_hf_without_mask_or_token_types():
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    hf = transformers.BertModel(cfg).eval()
    ours = fastbert.from_hf(hf).eval()
    x = torch.randint(0, 99, (2, 11))
    with torch.no_grad():
        assert (hf(input_ids=x).last_hidden_state - ours(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("preset", ["bert_pytorch", "hf"])
def test_gradients_match_reference_model(preset):
    cfg = (BertConfig.bert_pytorch(150, 64, 2, 4, dropout=0.0, attn_dropout=0.0, emb_dropout=0.0)
           if preset == "bert_pytorch" else
           BertConfig.hf(150, 64, 2, 4, 128, dropout=0.0, attn_dropout=0.0, emb_dropout=0.0))
    ref = ReferenceEncoder(cfg).double()
    fast = fastbert.Encoder(cfg, unpad=False).double()
    fast.load_state_dict(ref.state_dict())
    x, seg = random_batch(150, 3, 19)
    seg = seg.clamp(max=cfg.type_vocab_size - 1)
    mask = (x > 0).long() if preset == "hf" else None
    w = torch.randn(3, 19, 64, dtype=torch.float64)
    (ref(x, seg, mask) * w).sum().backward()
    (fast(x, seg, mask) * w).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g = ref_grads[name].grad
        assert p.grad is not None, name
        assert torch.allclose(p.grad, g, atol=1e-10, rtol=1e-8), name


@needs_bert_pytorch
def test_bert_pytorch_trainer_runs_with_fastbert():
    """Existing bert_pytorch training code runs unchanged with fastbert.BERT swapped in."""
    from bert_pytorch.trainer import BERTTrainer

    vocab = 60
    x, seg = random_batch(vocab, 8, 16)
    labels = torch.where(torch.rand(x.shape) < 0.15, x, torch.zeros_like(x))
    data = [{"bert_input": x[i:i + 4], "segment_label": seg[i:i + 4], "bert_label": labels[i:i + 4],
             "is_next": torch.randint(0, 2, (4,))} for i in (0, 4)]
    trainer = BERTTrainer(fastbert.BERT(vocab, 32, 1, 2), vocab, train_dataloader=data, with_cuda=False,
                          log_freq=100)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train(0)
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_all_padding_row_is_finite():
    model = fastbert.BERT(50, 32, 2, 2).eval()
    x, seg = random_batch(50, 3, 9)
    x[1] = 0
    seg[1] = 0
    for unpad in (False, True):
        model.unpad = unpad
        with torch.no_grad():
            assert torch.isfinite(model(x, seg)).all()


class TestBadInput:
    model = fastbert.BERT(40, 32, 1, 2, max_position=16).eval()

    def call(self, x, seg=None):
        if seg is None:
            seg = torch.ones_like(x)
        return self.model(x, seg)

    def test_token_id_too_large(self):
        with pytest.raises(ValueError, match="token id out of range.*vocab_size is 40"):
            self.call(torch.tensor([[1, 2, 40]]))

    def test_negative_token_id(self):
        with pytest.raises(ValueError, match="token id out of range"):
            self.call(torch.tensor([[1, -1, 3]]))

    def test_segment_id_out_of_range(self):
        with pytest.raises(ValueError, match="segment id out of range"):
            self.call(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 3]]))

    def test_sequence_longer_than_position_table(self):
        with pytest.raises(ValueError, match="exceeds the position table"):
            self.call(torch.ones(1, 17, dtype=torch.long))

    def test_float_ids(self):
        with pytest.raises(TypeError, match="int64/int32"):
            self.call(torch.ones(1, 4))

    def test_mismatched_shapes(self):
        with pytest.raises(ValueError, match="segment ids shape"):
            self.call(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))

    def test_one_dimensional_ids(self):
        with pytest.raises(ValueError, match=r"\[batch, seq\]"):
            self.call(torch.ones(4, dtype=torch.long))

    def test_empty_batch(self):
        with pytest.raises(ValueError, match="empty batch"):
            self.call(torch.ones(0, 4, dtype=torch.long))

    def test_bad_preset_and_heads(self):
        with pytest.raises(ValueError, match="preset"):
            BertConfig(10, preset="roberta")
        with pytest.raises(ValueError, match="not divisible"):
            fastbert.BERT(10, hidden=30, attn_heads=4)


@needs_bert_pytorch
def test_gradients_match_bert_pytorch_including_padding_rows():
    vocab = 90
    theirs = bp.BERT(vocab, 64, 2, 4).double().eval()  # eval: no dropout; autograd still works
    ours = fastbert.BERT(vocab, 64, 2, 4).double().eval()
    ours.load_state_dict(theirs.state_dict())
    x, seg = random_batch(vocab, 3, 21)
    w = torch.randn(3, 21, 64, dtype=torch.float64)
    (theirs(x, seg) * w).sum().backward()
    ours.unpad = False
    (ours(x, seg) * w).sum().backward()
    their_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, their_grads[name].grad, atol=1e-9, rtol=1e-7), name
    assert torch.all(ours.embedding.token.weight.grad[0] == 0)  # padding_idx rows get no gradient
    assert torch.all(ours.embedding.segment.weight.grad[0] == 0)
