"""fastbert.ops.embed (torch.ops.fastbert.embedding_gather) against an independent eager reference.

The reference is F.embedding (with the same padding_idx) + position rows + F.layer_norm: with fp32
tables and no LayerNorm the op adds in the same order and must match bit for bit; with LayerNorm it
matches to 1e-5; fp16/bf16 follow the error-ratio rule against an fp32 reference. Gradients are
checked against autograd through the reference and by gradcheck in float64.
"""

import pytest
import torch
import torch.nn.functional as F

import fastbert.ops as ops
from fastbert import _ext

pytestmark = pytest.mark.skipif(not _ext.has_op("embedding_gather"),
                                reason=f"fastbert._C not built: {_ext.load_error}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CUDA_OP = torch.cuda.is_available() and _ext.has_cuda()


def _devices_with_op():
    return [d for d in DEVICES if d == "cpu" or CUDA_OP]


def sample_inputs(device, dtype=torch.float32, batch=3, seq=37, hidden=50, vocab=101, positions=40,
                  segments=3, ln=True, position_ids=None, seed=0):
    """Fresh random tables (no zeros) and ids; padding id 0 and segment 0 appear in the ids."""
    g = torch.Generator().manual_seed(seed)

    def table(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ids[:, -3:] = 0  # padding at the end of every row
    sids = torch.randint(0, segments, (batch, seq), generator=g)
    kw = dict(token_weight=table(vocab, hidden), position_weight=table(positions, hidden),
              segment_ids=sids.to(device), segment_weight=table(segments, hidden))
    if ln:
        kw["ln_weight"] = (1 + 0.5 * torch.randn(hidden, generator=g)).to(device=device, dtype=dtype)
        kw["ln_bias"] = table(hidden)
    if position_ids == "row":
        kw["position_ids"] = torch.randperm(positions, generator=g)[:seq].to(device)
    elif position_ids == "full":
        kw["position_ids"] = torch.randint(0, positions, (batch, seq), generator=g).to(device)
    return ids.to(device), kw


def reference(input_ids, token_weight, position_weight, segment_ids=None, segment_weight=None,
              position_ids=None, ln_weight=None, ln_bias=None, eps=1e-12, padding_idx=None,
              segment_padding_idx=None):
    seq = input_ids.shape[1]
    pos = position_weight[:seq] if position_ids is None else position_weight[position_ids]
    x = F.embedding(input_ids, token_weight, padding_idx) + pos
    if segment_ids is not None:
        x = x + F.embedding(segment_ids, segment_weight, segment_padding_idx)
    if ln_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return x


def assert_grad_close(got, want, name):
    """fp32 gradients that are sums over many tokens (table rows, LayerNorm weight and bias): the
    summation order differs from the reference's, so the absolute tolerance scales with the largest
    gradient (its rounding error grows with the number of terms), not with each element."""
    atol = 1e-5 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=name)


def _grads(fn, ids, kw, grad_out, **extra):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in kw.items() if v.is_floating_point()}
    args = {**kw, **leaves}
    out = fn(ids, **args, **extra)
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("device", _devices_with_op())
@pytest.mark.parametrize("position_ids", [None, "row", "full"])
def test_forward_fp32_no_ln_bitwise(device, position_ids):
    ids, kw = sample_inputs(device, ln=False, position_ids=position_ids)
    out = torch.full((3, 37, 50), float("nan"), device=device)
    out.copy_(ops.embed(ids, **kw))
    assert torch.equal(out, reference(ids, **kw))


@pytest.mark.parametrize("device", _devices_with_op())
@pytest.mark.parametrize("hidden", [1, 50, 64, 768])
def test_forward_fp32_ln(device, hidden):
    ids, kw = sample_inputs(device, hidden=hidden, seq=17)
    torch.testing.assert_close(ops.embed(ids, **kw, eps=1e-12),
                               reference(ids, **kw, eps=1e-12), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", _devices_with_op())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ln", [False, True])
def test_forward_low_precision(device, dtype, ln):
    ids, kw = sample_inputs(device, dtype, ln=ln, hidden=64)
    ref32 = reference(ids, **{k: v.float() if v.is_floating_point() else v for k, v in kw.items()})
    err = (ops.embed(ids, **kw).float() - ref32).abs().max().item()
    eager = (reference(ids, **kw).float() - ref32).abs().max().item()
    assert err <= 2 * eager + 1e-3, f"{dtype}: error {err} vs eager {eager}"


@pytest.mark.parametrize("device", _devices_with_op())
@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("position_ids", [None, "full"])
def test_backward_fp32(device, ln, position_ids):
    ids, kw = sample_inputs(device, ln=ln, position_ids=position_ids)
    grad_out = torch.randn(3, 37, 50, device=device)
    pads = dict(padding_idx=0, segment_padding_idx=0)
    out, grads = _grads(ops.embed, ids, kw, grad_out, **pads)
    ref_out, ref_grads = _grads(reference, ids, kw, grad_out, **pads)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert_grad_close(grads[name], ref_grads[name], name)
    assert grads["token_weight"][0].abs().max() == 0  # padding row: no gradient
    assert grads["segment_weight"][0].abs().max() == 0


@pytest.mark.parametrize("device", _devices_with_op())
def test_backward_without_padding_idx_matches_indexing(device):
    ids, kw = sample_inputs(device, ln=False)
    grad_out = torch.randn(3, 37, 50, device=device)
    _, grads = _grads(ops.embed, ids, kw, grad_out)
    _, ref_grads = _grads(reference, ids, kw, grad_out)
    for name in grads:
        assert_grad_close(grads[name], ref_grads[name], name)
    assert grads["token_weight"][0].abs().max() > 0


@pytest.mark.parametrize("device", _devices_with_op())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_low_precision(device, dtype):
    ids, kw = sample_inputs(device, dtype, hidden=64)
    grad_out = torch.randn(3, 37, 64, device=device)
    kw32 = {k: v.float() if v.is_floating_point() else v for k, v in kw.items()}
    _, ref32 = _grads(reference, ids, kw32, grad_out)
    _, got = _grads(ops.embed, ids, kw, grad_out.to(dtype))
    _, eager = _grads(reference, ids, kw, grad_out.to(dtype))
    for name in got:
        err = (got[name].float() - ref32[name]).abs().max().item()
        base = (eager[name].float() - ref32[name]).abs().max().item()
        assert err <= 2 * base + 2e-2, f"{name} {dtype}: error {err} vs eager {base}"


@pytest.mark.parametrize("device", _devices_with_op())
@pytest.mark.parametrize("ln", [False, True])
def test_gradcheck_float64(device, ln):
    ids, kw = sample_inputs(device, torch.float64, batch=2, seq=5, hidden=6, vocab=7, positions=6,
                            segments=3, ln=ln, position_ids="full")
    names = [k for k, v in kw.items() if v.is_floating_point()]
    leaves = [kw[k].clone().requires_grad_(True) for k in names]

    def fn(*tables):
        # no padding_idx: a padding row is used by the forward but gets no gradient, by design
        return ops.embed(ids, **{**kw, **dict(zip(names, tables))}, eps=1e-5)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", _devices_with_op())
def test_dropout(device):
    ids, kw = sample_inputs(device, hidden=64, seq=64, batch=8, positions=64)
    p = 0.25
    clean = ops.embed(ids, **kw)
    g = torch.Generator().manual_seed(7)
    out = ops.embed(ids, **kw, dropout_p=p, generator=g)
    again = ops.embed(ids, **kw, dropout_p=p, generator=torch.Generator().manual_seed(7))
    other = ops.embed(ids, **kw, dropout_p=p, generator=g)  # generator advanced: a new mask
    assert torch.equal(out, again)
    assert not torch.equal(out, other)
    keep = out != 0
    assert abs(1 - keep.float().mean().item() - p) < 0.02
    torch.testing.assert_close(out[keep], clean[keep] / (1 - p), rtol=1e-5, atol=1e-5)
    # backward: the op's gradients equal the reference's with the same keep-mask
    grad_out = torch.randn_like(out)

    def ref_dropped(input_ids, **tables):
        return reference(input_ids, **tables) * keep / (1 - p)

    _, got = _grads(ops.embed, ids, kw, grad_out, dropout_p=p, generator=torch.Generator().manual_seed(7))
    _, want = _grads(ref_dropped, ids, kw, grad_out)
    for name in got:
        assert_grad_close(got[name], want[name], name)


@pytest.mark.parametrize("device", _devices_with_op())
def test_backward_deterministic(device):
    ids, kw = sample_inputs(device, ln=True, batch=8, seq=40, vocab=11)  # many repeated ids
    grad_out = torch.randn(8, 40, 50, device=device)
    first = _grads(ops.embed, ids, kw, grad_out)[1]
    second = _grads(ops.embed, ids, kw, grad_out)[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name
    loose = _grads(ops.embed, ids, kw, grad_out, deterministic=False)[1]
    for name in first:
        assert_grad_close(loose[name], first[name], name)


@pytest.mark.skipif(not CUDA_OP, reason="needs CUDA and fastbert._C built with CUDA kernels")
def test_cpu_cuda_dropout_identical():
    ids, kw = sample_inputs("cpu", hidden=64)
    cpu = ops.embed(ids, **kw, dropout_p=0.1, generator=torch.Generator().manual_seed(3))
    cuda = ops.embed(ids.cuda(), **{k: v.cuda() for k, v in kw.items()}, dropout_p=0.1,
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(cpu != 0, cuda.cpu() != 0)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", _devices_with_op())
def test_bad_inputs(device):
    ids, kw = sample_inputs(device, ln=True)
    bad = ids.clone()
    bad[1, 5] = 101
    with pytest.raises(ValueError, match="input_ids out of range"):
        ops.embed(bad, **kw)
    bad[1, 5] = -1
    with pytest.raises(ValueError, match="input_ids out of range"):
        ops.embed(bad, **kw)
    bad_seg = kw["segment_ids"].clone()
    bad_seg[0, 0] = 3
    with pytest.raises(ValueError, match="segment_ids out of range"):
        ops.embed(ids, **{**kw, "segment_ids": bad_seg})
    bad_pos = torch.full((3, 37), 40, device=device)
    with pytest.raises(ValueError, match="position_ids out of range"):
        ops.embed(ids, **kw, position_ids=bad_pos)
    with pytest.raises(TypeError, match="input_ids must be int64 or int32"):
        ops.embed(ids.float(), **kw)
    with pytest.raises(ValueError, match="segment_ids shape"):
        ops.embed(ids, **{**kw, "segment_ids": kw["segment_ids"][:, :5]})
    with pytest.raises(TypeError, match="position_weight dtype"):
        ops.embed(ids, **{**kw, "position_weight": kw["position_weight"].double()})
    with pytest.raises(ValueError, match="exceeds the position table"):
        ops.embed(ids, **{**kw, "position_weight": kw["position_weight"][:10]})
    with pytest.raises(ValueError, match="ln_weight must be"):
        ops.embed(ids, **{**kw, "ln_weight": kw["ln_weight"][:-1]})


def test_int32_ids_and_reference_backend(monkeypatch):
    ids, kw = sample_inputs("cpu", ln=False)
    torch.testing.assert_close(ops.embed(ids.int(), **kw), reference(ids, **kw), rtol=0, atol=0)
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    torch.testing.assert_close(ops.embed(ids, **kw), reference(ids, **kw), rtol=0, atol=0)


def test_opcheck():
    ids, kw = sample_inputs("cpu", batch=2, seq=5, hidden=8, vocab=9, positions=6, ln=True)
    tables = {k: v.requires_grad_(True) for k, v in kw.items() if v.is_floating_point()}
    args = (ids, tables["token_weight"], tables["position_weight"], kw["segment_ids"],
            tables["segment_weight"], None, tables["ln_weight"], tables["ln_bias"], 1e-12, 0.0, 0, 0, 0,
            -1, True)
    torch.library.opcheck(torch.ops.fastbert.embedding_gather.default, args)
