"""fastbert.ops.modern_block: a ModernBERT layer as one autograd node on the Triton path.

Against the per-op path (FASTBERT_FUSED_BLOCK=0: the same kernels op by op) and the fp64 reference
encoder: outputs and every parameter gradient, varlen (unpadded) and dense (no padding), with and
without biases; the no-grad forward; dropout (fixed seeds: the backward is the forward's derivative, and
a seed gives one result); and the cases where it must step aside. Kernels run in the interpreter on a
CPU (FASTBERT_BACKEND=triton), NaN-poisoned outputs.
"""

import sys

import pytest
import torch
from harness import DEVICES

import fastbert
from fastbert.reference.model import BertConfig
from fastbert.reference.modernbert import ModernEncoder as ReferenceModernEncoder

pytestmark = pytest.mark.skipif(not DEVICES, reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
mb = sys.modules["fastbert.ops.modern_block"]


def config(**kw):
    base = dict(max_position=64, local_window=6)
    base.update(kw)
    return BertConfig.modernbert(97, 32, 3, 2, 48, **base)


def models(device, **kw):
    """The fast encoder (fp32, on device) and the reference (fp64, CPU) with the same random weights."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    fast = fastbert.ModernEncoder(config(**kw))
    with torch.no_grad():  # norms and biases off their init values, so every parameter matters
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = ReferenceModernEncoder(fast.config)
    ref.load_state_dict(fast.state_dict())
    return fast.to(device), ref.double()


def inputs(padded=True):
    ids = torch.randint(1, 97, (3, 20))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 14:] = 0
        mask[2, 5:] = 0
    return ids * mask, mask


class Count:
    def __init__(self, monkeypatch):
        self.n = 0
        forward = mb._forward

        def counted(*a, **k):
            self.n += 1
            return forward(*a, **k)
        monkeypatch.setattr(mb, "_forward", counted)


def loss_and_grads(model, ids, mask, weights, device=None):
    model.zero_grad()
    out = model(ids.to(device or "cpu"), attention_mask=mask.to(device or "cpu"))
    (out * weights.to(out) * mask[..., None].to(out)).sum().backward()
    grads = {n: p.grad.detach().cpu().double() for n, p in model.named_parameters()}
    return out.detach().cpu().double(), grads


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [True, False], ids=["varlen", "dense"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_per_op_path_and_reference(triton_poisoned, monkeypatch, device, padded, bias):
    fast, ref = models(device, bias=bias, norm_bias=bias)
    ids, mask = inputs(padded)
    weights = torch.randn(*ids.shape, 32)
    count = Count(monkeypatch)
    out, grads = loss_and_grads(fast, ids, mask, weights, device)
    assert count.n == 3  # every layer as one node
    monkeypatch.setenv("FASTBERT_FUSED_BLOCK", "0")
    per_op, per_op_grads = loss_and_grads(fast, ids, mask, weights, device)
    assert count.n == 3  # the per-op path does not take it
    truth, truth_grads = loss_and_grads(ref, ids, mask, weights)
    real = mask.bool()
    assert rel(out[real], truth[real]) < 1e-5 and rel(per_op[real], truth[real]) < 1e-5
    assert rel(out[real], per_op[real]) < 1e-5
    if padded:  # the fast encoder unpads: zeros at padding
        assert (out[~real] == 0).all()
    assert grads.keys() == truth_grads.keys()
    for name, g in grads.items():
        assert truth_grads[name].abs().max() > 0, name
        assert rel(g, truth_grads[name]) < 1e-4, (name, rel(g, truth_grads[name]))
        assert rel(g, per_op_grads[name]) < 1e-4, name


@pytest.mark.parametrize("device", DEVICES)
def test_forward_packed_and_no_grad(triton_poisoned, monkeypatch, device):
    fast, _ = models(device)
    ids, mask = inputs()
    real = mask.bool()
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    count = Count(monkeypatch)
    with torch.no_grad():
        packed = fast.forward_packed(ids[real].to(device), None, None, cu, 20)
        padded = fast(ids.to(device), attention_mask=mask.to(device))
    assert count.n == 6
    with_grad = fast.forward_packed(ids[real].to(device), None, None, cu, 20)
    torch.testing.assert_close(packed, padded[real.to(device)], rtol=0, atol=0)
    torch.testing.assert_close(with_grad.detach(), packed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_backward_is_the_forwards_derivative(triton_poisoned, device):
    """With dropout in the attention, after Wo and in the GeGLU, a seed fixes the masks: the same seed
    gives the same output, another seed another one, and the gradient along a random direction equals
    the central difference of the loss (both at that seed)."""
    fast, _ = models(device, attn_dropout=0.2, dropout=0.2)
    fast.train()
    ids, mask = inputs()
    ids, mask = ids.to(device), mask.to(device)
    weights = torch.randn(*ids.shape, 32, device=device) * mask[..., None]
    params = [p for p in fast.parameters()]
    direction = [torch.randn_like(p) for p in params]

    def loss(seed):
        torch.manual_seed(seed)
        return (fast(ids, attention_mask=mask) * weights).sum()

    a, b = loss(1), loss(1)
    assert torch.equal(a, b) and not torch.equal(a, loss(2))
    fast.zero_grad()
    loss(1).backward()
    slope = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    eps = 1e-3
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d, alpha=eps)
        up = float(loss(1))
        for p, d in zip(params, direction):
            p.add_(d, alpha=-2 * eps)
        down = float(loss(1))
    assert abs((up - down) / (2 * eps) - slope) < 2e-2 * abs(slope) + 1e-3, (up, down, slope)


@pytest.mark.parametrize("device", DEVICES)
def test_steps_aside(triton_poisoned, monkeypatch, device):
    """The per-op path runs where the fused layer does not apply: a key padding mask (the reference
    layout, unpad=False), the reference backend, FASTBERT_FUSED_BLOCK=0, rotary tables that do not
    cover the head dim; run_modern_block returns None for them."""
    fast, _ = models(device)
    block = fast.transformer_blocks[1]
    tables = fast.rope_tables(device)
    x = torch.randn(12, 32, device=device)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    assert mb.modern_block(block, x, x.clone(), tables, None, cu, 7) is not None
    assert mb.modern_block(block, x[None], x[None].clone(), tables, torch.zeros(1, 12, dtype=torch.bool,
                                                                              device=device)) is None
    cos, sin = tables[True]
    no_weights = (None,) * 12
    assert mb.run_modern_block(x, None, no_weights, 2, cos, sin, None, 0.0, 0.0, 1e-5, 1e-5, "none", cu,
                               7) is None
    half = {k: (c[:, :4].contiguous(), s[:, :4].contiguous()) for k, (c, s) in tables.items()}
    assert mb.modern_block(block, x, x.clone(), half, None, cu, 7) is None
    assert mb.modern_block(block, x.double(), x.double(), tables, None, cu, 7) is None
    monkeypatch.setenv("FASTBERT_FUSED_BLOCK", "0")
    assert mb.modern_block(block, x, x.clone(), tables, None, cu, 7) is None
    monkeypatch.setenv("FASTBERT_FUSED_BLOCK", "1")
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert mb.modern_block(block, x, x.clone(), tables, None, cu, 7) is None


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_matches_per_op(triton_poisoned, monkeypatch, device):
    """Under autocast (fp16 in the interpreter, whose bf16 dot products are wrong; bf16 on CUDA) the layer
    casts as autocast's linears do (fp32 parameters and residual stream, half-precision projections):
    the per-op path's outputs and gradients within a few half-precision ulps."""
    half = torch.float16 if device == "cpu" else torch.bfloat16
    fast, _ = models(device, bias=True, norm_bias=True)
    ids, mask = inputs()
    real = mask.bool().to(device)
    lengths = mask.sum(1)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    flat = ids[mask.bool()].to(device)
    weight = torch.randn(flat.shape[0], 32, device=device)
    count = Count(monkeypatch)
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv("FASTBERT_FUSED_BLOCK", mode)
        fast.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=half):
            out = fast.forward_packed(flat, None, None, cu, 20)
            (out.float() * weight).sum().backward()
        results.append((out.detach().float(), {n: p.grad for n, p in fast.named_parameters()}))
    assert count.n == 3 and real.any()
    (out_f, grads_f), (out_p, grads_p) = results
    eps = torch.finfo(half).eps
    assert (out_f - out_p).abs().max() <= 4 * eps * max(1.0, float(out_p.abs().max()))
    for name, g in grads_p.items():
        assert grads_f[name].dtype == g.dtype == torch.float32, name
        err = float((grads_f[name] - g).abs().max())
        assert err <= 8 * eps * max(1.0, float(g.abs().max())), (name, err)
