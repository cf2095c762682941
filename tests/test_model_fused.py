"""The whole fast encoder on its fused path against the reference encoder (same weights).

tests/test_model.py checks fastbert against bert_pytorch and transformers on the default CPU path
(the reference ops). This file runs the path CUDA tensors take: the Triton LayerNorm (with fused
dropout + residual), bias+GELU and attention kernels, and the unpadded varlen encoder. On CUDA the
compiled kernels run; without CUDA the kernels run in the Triton interpreter (conftest sets
TRITON_INTERPRET=1, the `triton_backend` fixture routes CPU tensors to them). Tiny models keep the
interpreter fast: 2 layers, hidden 64, 2 heads (head dim 32, a tuned size), batches with padding.
Tolerances: fp32 outputs 2e-5; gradients 1e-4 of the largest gradient of each tensor (at least 2e-6
absolute: the key bias's true gradient is zero, softmax ignores a per-query constant, so what is
compared there is the rounding left in a sum of ~50 per-token key gradients; 1e-6 failed about one
random batch in ten, on the per-op path and the fused block alike, at 1.1-1.2e-6).
"""

import os

import pytest
import torch
from harness import saved_activations

import fastbert
from fastbert.reference.model import BertConfig
from fastbert.reference.model import Encoder as ReferenceEncoder
from fastbert.train.heads import PretrainModel

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERP), reason="needs CUDA or TRITON_INTERPRET=1")
VOCAB, HIDDEN, LAYERS, HEADS = 100, 64, 2, 2


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    yield


def config(preset, dropout=0.0):
    if preset == "hf":
        return BertConfig.hf(VOCAB, HIDDEN, LAYERS, HEADS, 2 * HIDDEN, dropout=dropout, attn_dropout=dropout,
                             emb_dropout=dropout)
    return BertConfig.bert_pytorch(VOCAB, HIDDEN, LAYERS, HEADS, dropout=dropout, attn_dropout=dropout,
                                   emb_dropout=dropout)


def pair(preset, dropout=0.0, unpad="auto"):
    """(reference encoder, fast encoder) with the same random weights, on DEVICE."""
    cfg = config(preset, dropout)
    ref = ReferenceEncoder(cfg)
    with torch.no_grad():  # biases and norms off their init values, so every parameter matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast = fastbert.Encoder(cfg, unpad=unpad)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(DEVICE), fast.to(DEVICE)


def batch(preset, rows=4, seq=13, seed=None):
    """Right-padded ids (every row keeps >= 1 token, one row full), segments and, for hf, the mask."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    lengths = torch.randint(1, seq + 1, (rows,), generator=g)
    lengths[0] = seq
    real = torch.arange(seq)[None, :] < lengths[:, None]
    ids = torch.randint(1, VOCAB, (rows, seq), generator=g) * real
    second = torch.arange(seq)[None, :] >= (lengths[:, None] + 1) // 2
    if preset == "hf":
        seg, mask = second.long(), real.long()
    else:
        seg, mask = (1 + second.long()) * real, None
    return tuple(None if t is None else t.to(DEVICE) for t in (ids, seg, mask, real))


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
@pytest.mark.parametrize("unpad", [True, False])
def test_eval_output_matches_reference(preset, unpad):
    ref, fast = pair(preset, unpad=unpad)
    ids, seg, mask, real = batch(preset)
    ref.eval()
    fast.eval()
    with torch.no_grad():
        want = ref(ids, seg, mask)
        got = fast(ids, seg, mask)
    assert got.shape == want.shape
    assert (got - want)[real].abs().max() <= 2e-5
    if unpad:
        assert torch.all(got[~real] == 0), "the unpadded path leaves zeros at padding positions"


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_training_gradients_match_reference(preset):
    """Train mode with dropout 0: the fused forward and backward give the reference's gradients."""
    ref, fast = pair(preset)
    ids, seg, mask, real = batch(preset)
    w = torch.randn(*ids.shape, HIDDEN, device=DEVICE) * real[..., None]  # loss on real tokens only
    ref.train()
    fast.train()
    (ref(ids, seg, mask) * w).sum().backward()
    (fast(ids, seg, mask) * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g = ref_params[name].grad
        if g is None:
            continue
        assert p.grad is not None, name
        err = float((p.grad - g).abs().max())
        assert err <= 1e-4 * max(float(g.abs().max()), 2e-2), (name, err)


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_training_with_dropout_is_seeded_and_finite(preset):
    """Fused dropout (attention probabilities, LayerNorm's dropout + residual, embeddings): the same
    seed gives the same outputs and gradients, another seed other ones, and eval mode none."""
    _, fast = pair(preset, dropout=0.1)
    ids, seg, mask, real = batch(preset, seed=1)

    def run(seed):
        fast.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = fast(ids, seg, mask)
        out.square().sum().backward()
        return out.detach(), fast.transformer_blocks[0].attention.linear_layers[0].weight.grad.clone()

    fast.train()
    out1, grad1 = run(5)
    out2, grad2 = run(5)
    out3, _ = run(6)
    assert torch.isfinite(out1).all() and torch.isfinite(grad1).all()
    assert torch.equal(out1, out2) and torch.equal(grad1, grad2)
    assert not torch.equal(out1[real], out3[real])
    fast.eval()
    with torch.no_grad():
        clean = fast(ids, seg, mask)
    assert not torch.allclose(out1[real], clean[real])


def test_pretrain_model_loss_matches_reference_path(monkeypatch):
    """The pretraining model (sparse MLM head + NSP) on the fused encoder: same losses and accuracy
    counts as with the reference ops."""
    cfg = config("hf")
    torch.manual_seed(0)
    model = PretrainModel(cfg).to(DEVICE).eval()
    ids, seg, mask, real = batch("hf", seed=2)
    flat_real = real.reshape(-1).nonzero().squeeze(1)
    pos = flat_real[torch.randperm(flat_real.numel(), device=DEVICE)[:7]].sort().values
    labels = ids.reshape(-1).index_select(0, pos)
    with torch.no_grad():
        fused = model(ids, seg, pos, labels)
        monkeypatch.setenv("FASTBERT_BACKEND", "reference")
        reference = model(ids, seg, pos, labels)
    mlm, correct, nsp = fused
    mlm_ref, correct_ref, nsp_ref = reference
    assert torch.isfinite(mlm) and abs(float(mlm) - float(mlm_ref)) <= 1e-4 * max(1.0, abs(float(mlm_ref)))
    assert int(correct) == int(correct_ref)
    assert (nsp - nsp_ref).abs().max() <= 2e-5


def test_torch_compile_matches_eager():
    """torch.compile of the fused encoder (custom ops traced, a graph break at the unpadding's
    host-side max length) gives eager's outputs and gradients. aot_eager keeps the test short; the
    inductor backend was checked the same way by hand (tiny model, CPU: equal outputs)."""
    _, fast = pair("hf")
    ids, seg, mask, real = batch("hf", seed=4)
    fast.train()
    compiled = torch.compile(fast, backend="aot_eager")
    results = []
    for model in (compiled, fast):
        fast.zero_grad(set_to_none=True)
        out = model(ids, seg, mask)
        (out * real[..., None]).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (out_c, grads_c), (out_e, grads_e) = results
    assert (out_c - out_e)[real].abs().max() <= 1e-5
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():
        assert (grads_c[name] - g).abs().max() <= 1e-5 * max(1.0, float(g.abs().max())), name


def test_saved_activations_scale_with_real_tokens():
    """What the fused path keeps for the backward (issue 7's memory claim): no [S x S] attention
    matrix (nor any tensor with two sequence-length dims), and, per real token and layer, at most
    q, k, v, the attention output, the block input, both norms' sums, the FFN input (8 x N values)
    plus the FFN pre-activation and activation (2 x FFN), with two rows of headroom for the
    embedding and the per-row statistics. Padding positions cost nothing: the layers run unpadded."""
    seq = 48  # differs from HIDDEN and the FFN width, so a [.., S, S] tensor is recognisable
    _, fast = pair("hf", dropout=0.1)
    fast.train()
    ids, seg, mask, real = batch("hf", rows=4, seq=seq, seed=3)
    saved = saved_activations(fast, lambda: fast(ids, seg, mask))
    assert all(shape.count(seq) < 2 for shape, _ in saved.values()), sorted(saved.values())
    tokens = int(real.sum())
    assert tokens < 0.8 * real.numel()  # the batch has padding
    ffn = config("hf").intermediate
    budget = (LAYERS * (8 * HIDDEN + 2 * ffn) + 2 * HIDDEN) * 4 * tokens  # fp32 bytes
    total = sum(nbytes for _, nbytes in saved.values())
    assert total <= budget, (total, budget)


def test_pretrain_model_under_autocast():
    """Mixed dtypes on the fused path, as pretraining on a GPU runs them: fp32 parameters and embedding
    output, half-precision activations from the linears (bf16 on CUDA; fp16 in the interpreter, whose
    bf16 dot products are wrong). Loss within 2% of the fp32 loss, finite gradients everywhere."""
    half = torch.bfloat16 if CUDA else torch.float16
    torch.manual_seed(0)
    model = PretrainModel(config("hf")).to(DEVICE).train()
    ids, seg, mask, real = batch("hf", seed=5)
    pos = real.reshape(-1).nonzero().squeeze(1)[::3]
    labels = ids.reshape(-1).index_select(0, pos)
    losses = []
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=half, enabled=amp):
            mlm, _, nsp = model(ids, seg, pos, labels)
            loss = mlm / pos.numel() - nsp[:, 0].mean()
        loss.backward()
        losses.append(float(loss.detach()))
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert abs(losses[1] - losses[0]) <= 0.02 * abs(losses[0]), losses


def test_activation_checkpointing_reproduces_dropout():
    """--checkpoint-activations recomputes each block in the backward: the fused ops must draw the same
    dropout masks again (their seeds come from torch's generators, which checkpoint restores), so the
    gradients equal those of the run without checkpointing."""
    from fastbert.train.pretrain import _enable_activation_checkpointing

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)  # the same weights both times
        _, fast = pair("bert_pytorch", dropout=0.1)
        if checkpointed:
            _enable_activation_checkpointing(fast)
        fast.train()
        ids, seg, mask, real = batch("bert_pytorch", seed=6)
        torch.manual_seed(11)
        (fast(ids, seg, mask) * real[..., None]).square().sum().backward()
        grads.append({n: p.grad for n, p in fast.named_parameters() if p.grad is not None})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys()
    for name, g in plain.items():
        assert torch.allclose(recomputed[name], g, rtol=1e-5, atol=1e-6), name
