"""The fused eager block (fastbert.ops.block): a whole transformer block (post-LN hf, pre-LN
bert_pytorch) as one autograd node.

Against the per-op path (FASTBERT_FUSED_BLOCK=0: each op through its FusedOp) and the reference
encoder (fastbert.reference, pure PyTorch), same weights: outputs and every parameter gradient on
packed varlen input and on dense padded input, several sizes, dropout 0, fp32. With dropout: the
block equals the per-op ops composed by hand with the seeds the block draws (so the backward
regenerates the forward's masks), is reproducible from torch.manual_seed and differs across calls,
and activation checkpointing reproduces its gradients. Also: what it saves scales with the real
tokens, where it does not apply it returns None (the per-op path runs), and torch.compile traces the
per-op path with no graph break. Kernels: compiled on CUDA, the Triton interpreter on CPU.
"""

import importlib
import os

import pytest
import torch
from harness import saved_activations

import fastbert
from fastbert.ops import block as fused
from fastbert.reference.model import BertConfig
from fastbert.reference.model import Encoder as ReferenceEncoder

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERP), reason="needs CUDA or TRITON_INTERPRET=1")
VOCAB = 100


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.setenv("FASTBERT_POISON", "1")  # an element a kernel does not write shows as NaN
    monkeypatch.delenv("FASTBERT_FUSED_BLOCK", raising=False)
    yield


@pytest.fixture
def count_fused(monkeypatch):
    """{"n": number of fused block forwards} (fastbert.ops.block._forward_post and _forward_pre)."""
    calls = {"n": 0}

    def spy(forward):
        def counted(*args):
            calls["n"] += 1
            return forward(*args)

        return counted

    for name in ("_forward_post", "_forward_pre"):
        monkeypatch.setattr(fused, name, spy(getattr(fused, name)))
    return calls


def config(hidden=64, heads=2, ffn=128, layers=2, dropout=0.0, preset="hf"):
    if preset == "hf":
        return BertConfig.hf(VOCAB, hidden, layers, heads, ffn, dropout=dropout, attn_dropout=dropout,
                             emb_dropout=dropout, max_position=64)
    return BertConfig.bert_pytorch(VOCAB, hidden, layers, heads, dropout=dropout, attn_dropout=dropout,
                                   emb_dropout=dropout)


def models(cfg, seed=0):
    """(reference encoder, fast encoder), the same random weights (off their init values)."""
    torch.manual_seed(seed)
    ref = ReferenceEncoder(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast = fastbert.Encoder(cfg)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(DEVICE).train(), fast.to(DEVICE).train()


def packed(lengths, slots=None, seed=0):
    """A packed batch: ids, segments, positions [T], cu_seqlens, max_seqlen; T = slots (>= the sum of
    lengths: the rest is one last sequence of filler, as fastbert.train.packing leaves it) and a
    zero-length sequence where lengths has a 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = list(lengths)
    total = sum(lengths)
    if slots is not None and slots > total:
        lengths.append(slots - total)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    tokens = int(cu[-1])
    ids = torch.randint(1, VOCAB, (tokens,), generator=g)
    seg = torch.randint(0, 2, (tokens,), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ids.to(DEVICE), seg.to(DEVICE), pos.to(DEVICE), cu.to(DEVICE), max(lengths)


def run(model, inputs, weight, packed_mode=True):
    """(output, {name: gradient}) of sum(model(inputs) * weight)."""
    model.zero_grad(set_to_none=True)
    out = model.forward_packed(*inputs) if packed_mode else model(*inputs)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(got, want, what):
    out_g, grads_g = got
    out_w, grads_w = want
    assert (out_g - out_w).abs().max() <= 2e-5 * max(1.0, float(out_w.abs().max())), what
    assert grads_g.keys() == grads_w.keys(), what
    for name, g in grads_w.items():
        err = float((grads_g[name] - g).abs().max())
        assert err <= 1e-4 * max(float(g.abs().max()), 1e-2), (what, name, err)


SIZES = [  # preset, hidden, heads, ffn, sequence lengths of the pack (0: an empty sequence), slots
    ("hf", 64, 2, 128, (7, 13, 0, 13, 1), 40),
    ("hf", 32, 4, 64, (16, 3, 9), 28),  # head dim 8
    ("hf", 128, 2, 256, (5, 30), 35),  # head dim 64, a sequence longer than the kernels' blocks
    ("bert_pytorch", 64, 2, 256, (7, 13, 0, 13, 1), 40),  # pre-LN (bert_pytorch's FFN is 4 x hidden)
    ("bert_pytorch", 32, 4, 128, (16, 3, 9), 28),
]


@pytest.mark.parametrize("preset,hidden,heads,ffn,lengths,slots", SIZES)
def test_packed_matches_per_op_and_reference(preset, hidden, heads, ffn, lengths, slots, count_fused,
                                             monkeypatch):
    ref, fast = models(config(hidden, heads, ffn, preset=preset))
    inputs = packed(lengths, slots, seed=hidden)
    weight = torch.randn(slots, hidden, device=DEVICE)
    got = run(fast, inputs, weight)
    assert count_fused["n"] == 2  # both layers took the fused block
    monkeypatch.setenv("FASTBERT_FUSED_BLOCK", "0")
    per_op = run(fast, inputs, weight)
    assert count_fused["n"] == 2
    want = run(ref, inputs, weight)
    assert torch.isfinite(got[0]).all()
    assert_close(got, per_op, "per-op")
    assert_close(got, want, "reference")


@pytest.mark.parametrize("preset,hidden,heads,ffn", [("hf", 64, 2, 128), ("hf", 32, 4, 64),
                                                    ("bert_pytorch", 64, 2, 256)])
def test_dense_and_unpadded_match_reference(preset, hidden, heads, ffn, count_fused):
    """Encoder.forward: a batch without padding runs the block on [B, S, N] (dense attention; hf, whose
    key mask is None then); a padded batch is unpadded to varlen [T, N] (max_seqlen the padded
    length)."""
    ref, fast = models(config(hidden, heads, ffn, preset=preset))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g).to(DEVICE)
    seg = torch.randint(0, 2, (3, 11), generator=g).to(DEVICE)
    mask = (torch.arange(11)[None, :] < torch.tensor([11, 4, 8])[:, None]).long().to(DEVICE)
    for attention_mask in (None, mask):
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else mask.bool()
        weight = torch.randn(3, 11, hidden, device=DEVICE) * real[..., None]
        before = count_fused["n"]
        got = run(fast, (ids, seg, attention_mask), weight, packed_mode=False)
        assert count_fused["n"] == before + 2
        want = run(ref, (ids, seg, attention_mask), weight, packed_mode=False)
        got = (got[0][real], got[1])
        want = (want[0][real], want[1])
        assert_close(got, want, f"mask {attention_mask is not None}")


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_autocast_matches_per_op(preset, count_fused, monkeypatch):
    """Under autocast (fp16 here: the interpreter's bf16 dot products are wrong; bf16 on CUDA) the
    block casts as autocast's linears do (fp32 parameters and residual stream, half-precision
    projections): the per-op path's outputs, and its gradients within a few fp16 ulps (the Q/K/V
    gradients are one mm over the three, not three)."""
    half = torch.bfloat16 if CUDA else torch.float16
    _, fast = models(config(preset=preset))
    inputs = packed((7, 13, 0, 13, 1), 40)
    weight = torch.randn(40, 64, device=DEVICE)
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv("FASTBERT_FUSED_BLOCK", mode)
        fast.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=half):
            out = fast.forward_packed(*inputs)
            (out.float() * weight).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in fast.named_parameters()}))
    assert count_fused["n"] == 2
    (out_f, grads_f), (out_p, grads_p) = results
    assert out_f.dtype == out_p.dtype == torch.float32
    assert (out_f - out_p).abs().max() <= 2 * torch.finfo(half).eps * max(1.0, float(out_p.abs().max()))
    for name, g in grads_p.items():
        assert grads_f[name].dtype == g.dtype == torch.float32, name
        err = float((grads_f[name] - g).abs().max())
        assert err <= 4 * torch.finfo(half).eps * max(1.0, float(g.abs().max())), (name, err)


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_eval_and_no_grad(preset, grad_mode, count_fused):
    """Without autograd the block writes no LayerNorm sums and sends lse and the statistics to one
    scratch buffer: the reference's outputs, varlen and dense (FASTBERT_POISON is on: a row left
    unwritten shows as NaN)."""
    ref, fast = models(config(preset=preset, ffn=256 if preset == "bert_pytorch" else 128))
    ref.eval()
    fast.eval()
    inputs = packed((9, 12, 0, 3), 24)
    blk, blk_ref = fast.transformer_blocks[0], ref.transformer_blocks[0]
    x = torch.randn(3, 10, 64, device=DEVICE)
    context = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    with context():
        got, want = fast.forward_packed(*inputs), ref.forward_packed(*inputs)
        dense, dense_want = blk(x, None, None, None), blk_ref(x, None, None, None)
    assert count_fused["n"] == 3
    assert (got - want).abs().max() <= 2e-5
    assert (dense - dense_want).abs().max() <= 2e-5


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_no_grad_dropout_matches_autograd_forward(preset, count_fused):
    """In training mode under no_grad (dropout on, nothing saved) the block gives the output of the
    autograd forward with the same seed: the same masks, the same math."""
    _, fast = models(config(dropout=0.2, layers=1, preset=preset,
                            ffn=256 if preset == "bert_pytorch" else 128))
    blk = fast.transformer_blocks[0]
    _, _, _, cu, max_seqlen = packed((9, 14, 0, 5), 32)
    x = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    torch.manual_seed(5)
    with_grad = blk(x, None, cu, max_seqlen).detach()
    torch.manual_seed(5)
    with torch.no_grad():
        without = blk(x, None, cu, max_seqlen)
    assert count_fused["n"] == 2
    assert torch.isfinite(without).all()
    assert torch.equal(with_grad, without)


def _block_parts(blk, x):
    """What composing blk by hand takes: the op modules of attention, bias+GELU and LayerNorm
    (fastbert.ops' attributes of these names are the op functions), its config, attention, feed-forward,
    both norms, dropout p and the [T, heads, head_dim] shape of q, k, v for the tokens x."""
    att_op, gelu_op, ln_op = (importlib.import_module(f"fastbert.ops.{name}")
                              for name in ("attention", "bias_gelu", "layer_norm"))
    cfg = blk.cfg
    return (att_op, gelu_op, ln_op, cfg, blk.attention, blk.feed_forward, blk.input_sublayer.norm,
            blk.output_sublayer.norm, blk.dropout.p, (x.shape[0], cfg.heads, cfg.head_dim))


def hand_composed_block(blk, x, cu, max_seqlen, seeds):
    """The post-LN block from the per-op FusedOps, given the block's seeds [LN1, LN2, attention seed,
    attention offset] (fastbert.ops.block's order)."""
    att_op, gelu_op, ln_op, cfg, att, ff, n1, n2, p, shape = _block_parts(blk, x)
    q, k, v = (lin(x).view(shape) for lin in att.linear_layers)
    o = att_op.fused_attention(q, k, v, dropout_p=cfg.attn_dropout, cu_seqlens=cu, max_seqlen=max_seqlen,
                               rng=seeds[2:4])
    a = att.output_linear(o.reshape(x.shape))
    h = ln_op._OP(a, n1.a_2, n1.b_2, x, seeds[0:1], n1.eps, False, p)[0]
    f = gelu_op._OP(torch.nn.functional.linear(h, ff.w_1.weight), ff.w_1.bias, None, cfg.gelu, 0.0)
    return ln_op._OP(ff.w_2(f), n2.a_2, n2.b_2, h, seeds[1:2], n2.eps, False, p)[0]


def hand_composed_pre_ln_block(blk, x, cu, max_seqlen, seeds):
    """bert_pytorch's pre-LN block from the per-op FusedOps and torch's dropout, given the block's
    seeds [LN2, attention seed, offset, FFN]; the last two dropouts draw after them, as in the block."""
    att_op, gelu_op, ln_op, cfg, att, ff, n1, n2, p, shape = _block_parts(blk, x)
    y1 = ln_op._OP(x, n1.a_2, n1.b_2, None, None, n1.eps, True, 0.0)[0]
    q, k, v = (lin(y1).view(shape) for lin in att.linear_layers)
    o = att_op.fused_attention(q, k, v, dropout_p=cfg.attn_dropout, cu_seqlens=cu, max_seqlen=max_seqlen,
                               rng=seeds[1:3])
    a = att.output_linear(o.reshape(x.shape))
    y2, h = ln_op._OP(a, n2.a_2, n2.b_2, x, seeds[0:1], n2.eps, True, p)[:2]
    f = gelu_op._OP(torch.nn.functional.linear(y2, ff.w_1.weight), ff.w_1.bias, seeds[3:4], cfg.gelu, p)
    u = torch.native_dropout(ff.w_2(f), p, True)[0]
    return torch.native_dropout(h + u, p, True)[0]


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_dropout_masks_match_hand_composed_ops(preset, count_fused):
    """With dropout, the block equals the per-op kernels composed by hand with the seeds it drew (one
    torch.randint of 4 per block: hf [LN1, LN2, attention's (seed, offset)], bert_pytorch [LN2,
    attention's pair, FFN], then torch's two dropouts), outputs and gradients: the backward
    regenerates the forward's masks."""
    _, fast = models(config(dropout=0.2, layers=1, preset=preset,
                            ffn=256 if preset == "bert_pytorch" else 128))
    blk = fast.transformer_blocks[0]
    ids, seg, pos, cu, max_seqlen = packed((9, 14, 0, 5), 32)
    x0 = torch.randn(32, 64, device=DEVICE)
    weight = torch.randn(32, 64, device=DEVICE)
    results = []
    for mode in ("fused", "hand"):
        blk.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        torch.manual_seed(7)
        if mode == "fused":
            y = blk(x, None, cu, max_seqlen)
        else:
            seeds = torch.randint(0, 2**62, (4,), dtype=torch.int64, device=DEVICE)
            compose = hand_composed_block if preset == "hf" else hand_composed_pre_ln_block
            y = compose(blk, x, cu, max_seqlen, seeds)
        (y * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in blk.named_parameters()}
        grads["input"] = x.grad
        results.append((y.detach(), grads))
    assert count_fused["n"] == 1
    clean = blk.eval()(x0, None, cu, max_seqlen).detach()
    assert not torch.allclose(results[0][0], clean)  # dropout did drop
    assert_close(results[0], results[1], "hand-composed")


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_dropout_seeded_and_fresh_per_call(preset):
    _, fast = models(config(dropout=0.1, preset=preset))
    inputs = packed((12, 7, 10), 32)
    weight = torch.randn(32, 64, device=DEVICE)

    def step(seed):
        if seed is not None:
            torch.manual_seed(seed)
        return run(fast, inputs, weight)

    a, b, c, d = step(3), step(3), step(4), step(None)
    assert torch.isfinite(a[0]).all() and all(torch.isfinite(g).all() for g in a[1].values())
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(a[1][n], b[1][n]) for n in a[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(c[0], d[0])


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_activation_checkpointing_reproduces_gradients(preset):
    """torch.utils.checkpoint recomputes the block in the backward: the block's seed draw is replayed
    (checkpoint restores the generators), so the gradients equal those without checkpointing."""
    from fastbert.train.pretrain import _enable_activation_checkpointing

    inputs = packed((12, 7, 10), 32)
    weight = torch.randn(32, 64, device=DEVICE)
    results = []
    for checkpointed in (False, True):
        _, fast = models(config(dropout=0.1, preset=preset))
        if checkpointed:
            _enable_activation_checkpointing(fast)
        torch.manual_seed(11)
        results.append(run(fast, inputs, weight))
    assert torch.equal(results[0][0], results[1][0])
    for name, g in results[0][1].items():
        assert torch.allclose(results[1][1][name], g, rtol=1e-5, atol=1e-6), name


def test_saved_activations_scale_with_real_tokens(count_fused):
    """What the fused block keeps for the backward: per token and layer at most the block input, qkv,
    the attention output, both norms' sums, the FFN input (8 x N values), the FFN pre-activation and
    activation (2 x FFN), plus two rows of headroom for the embedding and per-row statistics; no
    tensor with two sequence-length dimensions; no concatenated weight."""
    cfg = config(dropout=0.1)
    _, fast = models(cfg)
    tokens = 40
    ids, seg, pos, cu, max_seqlen = packed((13, 27), tokens)
    saved = saved_activations(fast, lambda: fast.forward_packed(ids, seg, pos, cu, max_seqlen))
    assert count_fused["n"] == cfg.n_layers
    assert all(shape.count(27) < 2 for shape, _ in saved.values()), sorted(saved.values())
    assert not any(shape == (3 * cfg.hidden, cfg.hidden) for shape, _ in saved.values())
    budget = (cfg.n_layers * (8 * cfg.hidden + 2 * cfg.intermediate) + 2 * cfg.hidden) * 4 * tokens
    total = sum(nbytes for _, nbytes in saved.values())
    assert total <= budget, (total, budget)


def test_where_it_does_not_apply(count_fused, monkeypatch):
    """None (the per-op path) under autocast for a half-precision block, with a key padding mask, for
    another dtype, without max_seqlen, with FASTBERT_FUSED_BLOCK=0 and on the reference backend;
    the fused block records what it ran in last_choices()."""
    x = torch.randn(10, 64, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    _, fast = models(config())
    blk = fast.transformer_blocks[0]
    assert fused.fused_block(blk, x, None, cu, 6) is not None
    choices = fastbert.ops.last_choices()
    assert all(choices[op, x.device.type] == "triton" for op in ("attention", "layer_norm", "bias_gelu"))
    pad = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    assert fused.fused_block(blk, x.view(2, 5, 64), pad) is None
    assert fused.fused_block(blk, x.double(), None, cu, 6) is None
    assert fused.fused_block(blk, x, None, cu, None) is None  # max_seqlen unknown: needs a sync
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # autocast takes fp32 blocks only
        assert fused.fused_block(blk.half(), x.half(), None, cu, 6) is None
    blk.float()
    monkeypatch.setenv("FASTBERT_FUSED_BLOCK", "0")
    assert fused.fused_block(blk, x, None, cu, 6) is None
    monkeypatch.setenv("FASTBERT_FUSED_BLOCK", "1")
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    assert fused.fused_block(blk, x, None, cu, 6) is None
    assert count_fused["n"] == 1


def test_torch_compile_runs_the_per_op_path(count_fused):
    """torch.compile(fullgraph=True) of the packed encoder traces the per-op custom ops (the fused
    block steps aside while compiling): no graph break, eager's outputs and gradients."""
    torch._dynamo.reset()
    _, fast = models(config())
    inputs = packed((9, 12, 3), 28)
    weight = torch.randn(28, 64, device=DEVICE)

    def loss(*args):
        return (fast.forward_packed(*args) * weight).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=False, backend="aot_eager")
    results = []
    for fn in (compiled, loss):
        fast.zero_grad(set_to_none=True)
        value = fn(*inputs)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in fast.named_parameters()}))
    assert count_fused["n"] == 2  # the eager run only
    (lc, gc), (le, ge) = results
    assert abs(float(lc) - float(le)) <= 1e-5 * max(1.0, abs(float(le)))
    for name, g in ge.items():
        assert (gc[name] - g).abs().max() <= 1e-5 * max(1.0, float(g.abs().max())), name


def test_fast_apply_is_function_apply():
    """fastbert.ops._fused.fast_apply (Function.apply without its Python wrapper): the same result and
    gradient outside functorch transforms; inside one it is Function.apply itself (here: functorch's
    error for a Function without setup_context, as Function.apply gives)."""
    from fastbert.ops._fused import fast_apply

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    apply = fast_apply(Twice)
    x = torch.randn(3, requires_grad=True)
    apply((0,), x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    for fn in (Twice.apply, lambda t: apply((0,), t)):
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.grad(lambda t, f=fn: f(t).sum())(torch.randn(3))
