"""The reference ops against torch's own ops, and float64 gradcheck of each."""

import pytest
import torch
import torch.nn.functional as F

from fastbert.reference import ops as ref


def rand(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def test_layer_norm_standard_matches_torch():
    x, w, b = rand(7, 33), rand(33), rand(33)
    assert torch.allclose(ref.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (33,), w, b, 1e-5), atol=1e-12)


def test_layer_norm_bert_pytorch_matches_package():
    LayerNorm = pytest.importorskip("bert_pytorch.model.utils").LayerNorm

    ln = LayerNorm(48).double()
    with torch.no_grad():
        ln.a_2.normal_()
        ln.b_2.normal_()
    x = rand(5, 48)
    assert torch.allclose(ref.layer_norm(x, ln.a_2, ln.b_2, 1e-6, variant="bert_pytorch"), ln(x), atol=1e-12)


def test_layer_norm_residual_returns_sum():
    x, r, w, b = rand(3, 16), rand(3, 16), rand(16), rand(16)
    y, s = ref.layer_norm(x, w, b, 1e-5, residual=r)
    assert torch.equal(s, x + r)
    assert torch.allclose(y, F.layer_norm(x + r, (16,), w, b, 1e-5), atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_matches_torch(approximate):
    x, b = rand(6, 40), rand(40)
    want = F.gelu(x + b, approximate=approximate)
    assert torch.allclose(ref.bias_gelu(x, b, approximate), want, atol=1e-12)


def test_attention_matches_sdpa_with_padding():
    q, k, v = (torch.randn(3, 13, 4, 16) for _ in range(3))
    pad = torch.zeros(3, 13, dtype=torch.bool)
    pad[1, 5:] = True
    out = ref.attention(q, k, v, key_padding_mask=pad)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=~pad[:, None, None, :]).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-5)


def test_attention_all_masked_rows_are_zero_and_varlen_agrees():
    q, k, v = (torch.randn(2, 6, 2, 8) for _ in range(3))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1] = True
    pad[0, 4:] = True
    out = ref.attention(q, k, v, key_padding_mask=pad)
    assert torch.all(out[1] == 0)
    packed = ref.attention(q[0, :4], k[0, :4], v[0, :4], cu_seqlens=torch.tensor([0, 4]), max_seqlen=4)
    assert torch.allclose(packed, out[0, :4], atol=1e-6)


def test_embed_matches_embedding_sum():
    ids, seg = torch.randint(0, 30, (2, 9)), torch.randint(0, 3, (2, 9))
    tok, pos, sg = torch.randn(30, 8), torch.randn(16, 8), torch.randn(3, 8)
    want = F.embedding(ids, tok) + pos[:9] + F.embedding(seg, sg)
    assert torch.allclose(ref.embed(ids, tok, pos, seg, sg), want)


def test_gradcheck_reference_ops():
    x, r, w, b = rand(3, 10), rand(3, 10), rand(10), rand(10)
    for variant in ("standard", "bert_pytorch"):
        assert torch.autograd.gradcheck(
            lambda x, r, w, b, variant=variant: ref.layer_norm(x, w, b, 1e-5, residual=r, variant=variant),
            (x, r, w, b))
    for form in ("none", "tanh"):
        gelu = lambda x, b, form=form: ref.bias_gelu(x, b, form)  # noqa: E731
        assert torch.autograd.gradcheck(gelu, (rand(4, 6), rand(6)))
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    assert torch.autograd.gradcheck(lambda q, k, v: ref.attention(q, k, v, key_padding_mask=pad),
                                    (rand(2, 5, 2, 4), rand(2, 5, 2, 4), rand(2, 5, 2, 4)))
    ids, seg = torch.randint(0, 7, (2, 4)), torch.randint(0, 2, (2, 4))
    assert torch.autograd.gradcheck(
        lambda t, p, s, lw, lb: ref.embed(ids, t, p, seg, s, ln_weight=lw, ln_bias=lb, eps=1e-5),
        (rand(7, 5), rand(6, 5), rand(2, 5), rand(5), rand(5)))


def test_reference_mlm_mask_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (200, 500))
    ids[:, 0] = 2
    masked, labels = ref.mlm_mask(ids, 1000, mask_id=4, special_ids=(1, 2, 3, 4), generator=g)
    chosen = labels != 0
    assert abs(chosen.float().mean().item() * 500 / 499 - 0.15) < 0.003
    assert not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen])
    frac_mask = (masked[chosen] == 4).float().mean().item()
    frac_same = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_same - 0.1) < 0.01
