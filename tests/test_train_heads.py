"""The sparse MLM head (gather masked rows, chunked linear + cross-entropy) against the dense head."""

import pytest
import torch
import torch.nn.functional as F

from fastbert.reference.model import BertConfig
from fastbert.train.heads import PretrainModel, linear_cross_entropy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,v,chunk", [(1, 8, 11, 4), (37, 16, 101, 8), (130, 24, 257, 1000)])
def test_linear_cross_entropy_matches_torch(device, m, n, v, chunk):
    h = torch.randn(m, n, device=device, requires_grad=True)
    w = torch.randn(v, n, device=device, requires_grad=True)
    b = torch.randn(v, device=device, requires_grad=True)
    y = torch.randint(0, v, (m,), device=device)
    loss, hits = linear_cross_entropy(h, w, b, y, chunk=chunk)
    ref_logits = F.linear(h, w, b)
    ref = F.cross_entropy(ref_logits, y, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    assert int(hits) == int((ref_logits.argmax(1) == y).sum())
    go = torch.rand((), device=device) + 0.5  # a non-unit incoming gradient
    grads = torch.autograd.grad(loss * go, (h, w, b))
    refs = torch.autograd.grad(ref * go, (h, w, b))
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast of the chunked head: CUDA only")
def test_linear_cross_entropy_bf16_autocast():
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    b = torch.randn(1000, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (300,), device="cuda")
    ref = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, b, y, chunk=128)
        plain = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")
    assert (loss - ref).abs() <= 2 * (plain - ref).abs() + 1e-2 * ref.abs()
    g = torch.autograd.grad(loss, w)[0]
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_linear_cross_entropy_errors():
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["bert_pytorch", "hf"])
def test_sparse_head_equals_dense_head(device, preset):
    vocab = 97
    make = BertConfig.hf if preset == "hf" else BertConfig.bert_pytorch
    cfg = make(vocab, 32, 2, 4, dropout=0.0, **({"attn_dropout": 0.0, "emb_dropout": 0.0}
                                                   if preset == "hf" else {}))
    cfg = cfg.with_(attn_dropout=0.0, emb_dropout=0.0)
    torch.manual_seed(0)
    sparse = PretrainModel(cfg, sparse=True, chunk=7).to(device)
    dense = PretrainModel(cfg, sparse=False).to(device)
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(5, vocab, (3, 19), device=device)
    ids[1, 12:] = 0  # padding
    seg = torch.ones_like(ids) if preset == "bert_pytorch" else torch.zeros_like(ids)
    seg[ids == 0] = 0
    pos = torch.tensor([0, 3, 5, 19 + 2, 19 + 11, 38 + 4, 38 + 18], device=device)
    labels = torch.randint(5, vocab, (7,), device=device)
    out_s = sparse(ids, seg, pos, labels)
    out_d = dense(ids, seg, pos, labels)
    torch.testing.assert_close(out_s[0], out_d[0], rtol=1e-5, atol=1e-5)
    assert int(out_s[1]) == int(out_d[1])
    torch.testing.assert_close(out_s[2], out_d[2])
    (out_s[0] + out_s[2].sum()).backward()
    (out_d[0] + out_d[2].sum()).backward()
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bert_pytorch_heads_keep_bertlm_names():
    cfg = BertConfig.bert_pytorch(50, 16, 1, 2)
    keys = set(PretrainModel(cfg).state_dict())
    assert {"next_sentence.linear.weight", "mask_lm.linear.weight", "mask_lm.linear.bias"} <= keys
    assert all(k.split(".")[0] in ("bert", "next_sentence", "mask_lm") for k in keys)
    hf = PretrainModel(BertConfig.hf(50, 16, 1, 2))
    assert hf.mask_lm.linear.weight is hf.bert.embedding.token.weight  # tied as in BertForPreTraining


@pytest.mark.parametrize("preset", ["bert_pytorch", "hf"])
def test_padding_does_not_change_the_loss(preset):
    make = BertConfig.hf if preset == "hf" else BertConfig.bert_pytorch
    cfg = make(60, 16, 1, 2, dropout=0.0).with_(attn_dropout=0.0, emb_dropout=0.0)
    model = PretrainModel(cfg).eval()
    ids = torch.randint(5, 60, (2, 9))
    seg = torch.ones_like(ids)
    pos = torch.tensor([1, 4, 9 + 2])
    labels = torch.randint(5, 60, (3,))
    padded = torch.nn.functional.pad(ids, (0, 7))
    pseg = torch.nn.functional.pad(seg, (0, 7))
    ppos = torch.tensor([1, 4, 16 + 2])
    with torch.no_grad():
        a = model(ids, seg, pos, labels)
        b = model(padded, pseg, ppos, labels)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-5)
