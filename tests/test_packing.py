"""Packed static batches (fastbert.train.packing, Encoder.forward_packed) against the padded path.

The padded path is the ground truth: the same examples, masked the same way, as a right-padded
[B, S] batch through PretrainModel. The packed step must give the same loss sums, hit counts and
gradients, on the CPU path and on the fused path (Triton kernels, interpreted without a GPU), with
every tensor the same shape whatever the examples' lengths, no host sync and no graph break under
torch.compile(fullgraph=True). Tiny models keep the interpreter fast.
"""

import os
import sys

import numpy as np
import pytest
import torch

from fastbert.ops import mlm_mask
from fastbert.reference.model import BertConfig
from fastbert.train.heads import PretrainModel
from fastbert.train.packing import (
    IGNORE_INDEX,
    PackedPretrain,
    PackedPretrainData,
    pack_rows,
    plan_packs,
    slots_needed,
)

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if CUDA else "cpu"
VOCAB, HIDDEN, LAYERS, HEADS = 97, 64, 2, 2
CLS, SEP, MASK = 2, 3, 4
fused_only = pytest.mark.skipif(not (CUDA or INTERP), reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(params=["native", "fused"])
def path(request, monkeypatch):
    """The CPU path (torch's ops, reference varlen attention) or the fused path (Triton kernels)."""
    if request.param == "fused":
        if not (CUDA or INTERP):
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        if not CUDA:
            monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    return request.param


def config(preset, dropout=0.0):
    # the embedding's dropout stays off: its seed is drawn on the host (fastbert/ops/_rng.py)
    kw = dict(dropout=dropout, attn_dropout=dropout, emb_dropout=0.0, max_position=64)
    if preset == "hf":
        return BertConfig.hf(VOCAB, HIDDEN, LAYERS, HEADS, 2 * HIDDEN, **kw)
    if preset == "modernbert":  # a window narrower than the packs' sequences: the local layer's band is live
        return BertConfig.modernbert(VOCAB, HIDDEN, LAYERS, HEADS, 2 * HIDDEN, local_window=6, **kw)
    return BertConfig.bert_pytorch(VOCAB, HIDDEN, LAYERS, HEADS, **kw)


def model(preset, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    m = PretrainModel(config(preset, dropout))
    with torch.no_grad():  # biases and norms off their init values, so every parameter matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def examples(rows, width, preset, rng, min_len=5):
    """Right-padded [CLS] A [SEP] B [SEP] rows of random lengths, their segments and NSP labels."""
    lengths = rng.integers(min_len, width + 1, rows)
    ids = np.zeros((rows, width), dtype=np.int64)
    seg = np.zeros((rows, width), dtype=np.int64)
    s0, s1 = (0, 1) if preset == "hf" else (1, 2)
    for r, n in enumerate(lengths):
        a = int(rng.integers(1, n - 3))  # tokens of A
        ids[r, :n] = rng.integers(5, VOCAB, n)
        ids[r, 0], ids[r, a + 1], ids[r, n - 1] = CLS, SEP, SEP
        seg[r, :n] = s0
        seg[r, a + 2:n] = s1
    return ids, seg, rng.integers(0, 2, rows), lengths


def masked(ids, seed):
    """fastbert.ops.mlm_mask on the padded rows: (masked ids, labels with 0 at unmasked tokens)."""
    g = torch.Generator().manual_seed(seed)
    out, labels = mlm_mask(torch.from_numpy(ids), VOCAB, MASK, 0, (CLS, SEP, MASK), mask_prob=0.3,
                           generator=g)
    return out.numpy(), labels.numpy()


def padded_losses(m, ids, seg, nxt, labels):
    """The padded path, as fastbert pretrain runs it: sparse MLM head on the masked positions, NSP."""
    ids, seg, nxt, labels = (torch.from_numpy(np.asarray(a)).to(DEVICE) for a in (ids, seg, nxt, labels))
    pos = (labels.reshape(-1) != 0).nonzero().squeeze(1)
    mlm_sum, mlm_hits, nsp = m(ids, seg, pos, labels.reshape(-1).index_select(0, pos))
    nsp_sum = torch.nn.functional.nll_loss(nsp.float(), nxt, reduction="sum")
    return mlm_sum, mlm_hits, nsp_sum, (nsp.argmax(1) == nxt).sum()


def grads(m):
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def test_pack_layout():
    """Each example sits whole at its cu_seqlens offset with its own segments, positions, [CLS] index
    and NSP label; padding runs are at most max_seqlen; unused slots are zero-length / ignored."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    ids, seg, nxt, lengths = examples(7, 23, "hf", rng)
    tokens, slots, preds = int(lengths.sum()) + 41, 12, 9
    labels = np.where(rng.random(ids.shape) < 0.05, ids, 0) * (ids > 4)
    p = pack_rows(ids, seg, nxt, tokens=tokens, max_seqs=slots, max_seqlen=23, max_predictions=preds,
                  mlm_labels=labels)
    assert p.shapes == {"input_ids": (tokens,), "segment_ids": (tokens,), "position_ids": (tokens,),
                        "cu_seqlens": (slots + 1,), "cls_index": (slots,), "nsp_labels": (slots,),
                        "mlm_positions": (preds,), "mlm_labels": (preds,)}
    cu = p.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == tokens and all(b >= a for a, b in zip(cu, cu[1:]))
    assert p.cu_seqlens.dtype == torch.int32
    for r, n in enumerate(lengths):
        lo = cu[r]
        assert cu[r + 1] - lo == n
        assert p.input_ids[lo:lo + n].tolist() == ids[r, :n].tolist()
        assert p.segment_ids[lo:lo + n].tolist() == seg[r, :n].tolist()
        assert p.position_ids[lo:lo + n].tolist() == list(range(n))
        assert int(p.cls_index[r]) == lo and int(p.input_ids[lo]) == CLS
        assert int(p.nsp_labels[r]) == nxt[r]
    runs = np.diff(cu[len(lengths):])
    assert runs.sum() == 41 and runs.max() <= 23  # the padding, in runs, then zero-length slots
    assert (p.input_ids[int(lengths.sum()):] == 0).all()
    assert (p.nsp_labels[len(lengths):] == IGNORE_INDEX).all()
    n = int((labels != 0).sum())
    assert p.n_masked == n and p.n_examples == 7 and p.n_tokens == int(lengths.sum())
    flat = p.input_ids[p.mlm_positions[:n]]
    assert torch.equal(flat, p.mlm_labels[:n]) and (p.mlm_labels[n:] == IGNORE_INDEX).all()


def test_plan_packs_covers_every_example_within_budget():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    lengths = rng.integers(1, 33, 300)
    for slots in (9, 64):  # sequence slots binding, then the token budget
        packs = plan_packs(lengths, tokens=128, max_seqs=slots, max_seqlen=32)
        seen = np.sort(np.concatenate(packs))
        assert np.array_equal(seen, np.arange(300))
        for p in packs:
            assert lengths[p].sum() <= 128 and slots_needed(lengths[p], 128, 32) <= slots
    # token-bound: no more packs than filling them in order (next fit), and at most one in 20 wasted
    next_fit, room = 1, 128
    for n in lengths:
        if n > room:
            next_fit, room = next_fit + 1, 128
        room -= n
    assert len(packs) <= next_fit
    assert len(packs) <= 1.05 * lengths.sum() / 128 + 1


def test_bad_input_raises():
    rng = np.random.default_rng(0)
    ids, seg, nxt, lengths = examples(4, 16, "hf", rng)
    kw = dict(tokens=64, max_seqs=8, max_seqlen=16, max_predictions=4)
    with pytest.raises(ValueError, match="do not fit"):
        pack_rows(ids, seg, nxt, **{**kw, "tokens": int(lengths.sum()) - 1})
    with pytest.raises(ValueError, match="slots"):
        pack_rows(ids, seg, nxt, **{**kw, "max_seqs": 4, "tokens": int(lengths.sum()) + 16})
    with pytest.raises(ValueError, match="token id out of range"):
        pack_rows(ids, seg, nxt, **kw, vocab_size=5)
    with pytest.raises(ValueError, match="max_predictions"):
        pack_rows(ids, seg, nxt, **kw, mlm_labels=ids)
    with pytest.raises(ValueError, match="lengths"):
        plan_packs([3, 40], tokens=64, max_seqs=4, max_seqlen=32)
    enc = model("hf").bert
    p = pack_rows(ids, seg, nxt, **kw)
    with pytest.raises(ValueError, match="max_seqlen"):
        enc.forward_packed(p.input_ids, p.segment_ids, p.position_ids, p.cu_seqlens, 100)
    with pytest.raises(ValueError, match="cu_seqlens"):
        enc.forward_packed(p.input_ids, p.segment_ids, p.position_ids, p.cu_seqlens.long(), 16)
    with pytest.raises(ValueError, match=r"position_ids must be \[T\]"):
        enc.forward_packed(p.input_ids, p.segment_ids, p.position_ids[:-1], p.cu_seqlens, 16)


@pytest.mark.parametrize("preset", ["hf", "bert_pytorch"])
def test_packed_equals_padded(preset, path):
    """Loss sums, hit counts and every parameter gradient of a packed step equal the padded path's
    on the same masked examples (two packs' worth: one padded batch, split over two packs)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    ids, seg, nxt, lengths = examples(6, 19, preset, rng)
    ids, labels = masked(ids, int(rng.integers(0, 2**31)))
    m = model(preset).to(DEVICE).train()
    padded = padded_losses(m, ids, seg, nxt, labels)
    (padded[0] + padded[2]).backward()
    padded = [t.detach() for t in padded]
    want = grads(m)
    m.zero_grad(set_to_none=True)
    step = PackedPretrain(m)
    got = [torch.zeros((), device=DEVICE) for _ in range(4)]
    for rows in (slice(0, 3), slice(3, 6)):  # two packs, gradients accumulated
        p = pack_rows(ids[rows], seg[rows], nxt[rows], tokens=64, max_seqs=6, max_seqlen=19,
                      max_predictions=20, mlm_labels=labels[rows], vocab_size=VOCAB).to(DEVICE)
        out = step(*p.inputs())
        (out[0] + out[2]).backward()
        got = [a + b.detach() for a, b in zip(got, out)]
    for name, a, b in zip(("mlm", "mlm hits", "nsp", "nsp hits"), got, padded):
        assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(b))), (name, float(a), float(b))
    have = grads(m)
    assert have.keys() == want.keys()
    for name, g in want.items():
        err = float((have[name] - g).abs().max())
        assert err <= 1e-4 * max(float(g.abs().max()), 1e-2), (name, err)


class _Shard:
    """A tokenized corpus in memory with the attributes PretrainData reads (documents of sentences)."""

    def __init__(self, rng, docs=12):
        sizes = rng.integers(2, 9, docs)  # sentences per document
        lens = rng.integers(2, 14, int(sizes.sum()))  # tokens per sentence
        self.tokens = rng.integers(5, VOCAB, int(lens.sum())).astype(np.uint16)
        self.sent_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_sentences, self.n_documents = len(lens), docs
        self.meta = {"source": "memory"}


def test_packed_pretrain_data():
    """The pipeline's packs hold the epoch's examples, each whole and once, as PretrainData builds
    them (same tokens, segments, NSP label), masked on the CPU within the fixed prediction slots."""
    from fastbert.train.data import PretrainData

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    data = PretrainData(_Shard(rng), seq_len=32, batch_size=2, seed=3, cls_id=CLS, sep_id=SEP,
                        segments=(0, 1), pairs="sentence")
    packed = PackedPretrainData(data, tokens=96, max_seqs=12, max_predictions=24, vocab_size=VOCAB,
                                mask_id=MASK, special_ids=(CLS, SEP, MASK), micro_batches=2,
                                type_vocab_size=2)
    a_start, la, b_start, lb, is_next, _ = data.plan(1)
    want = {}
    for i in range(len(la)):
        row = data.collate(a_start[i:i + 1], la[i:i + 1], b_start[i:i + 1], lb[i:i + 1], is_next[i:i + 1])
        n = int(la[i] + lb[i] + 3)
        key = tuple(row["input_ids"][0, :n].tolist())
        want[key] = want.get(key, []) + [(tuple(row["segment_ids"][0, :n].tolist()), int(is_next[i]))]
    seen = 0
    for step in range(packed.steps_per_epoch):
        for p in packed.step_batches(1, step):
            assert p.shapes["input_ids"] == (96,) and p.shapes["cu_seqlens"] == (13,)
            assert 0 < p.n_masked <= 24 and (p.mlm_labels[p.n_masked:] == IGNORE_INDEX).all()
            ids = p.input_ids.clone()
            ids[p.mlm_positions[:p.n_masked]] = p.mlm_labels[:p.n_masked]  # undo the masking
            assert not set(p.mlm_labels[:p.n_masked].tolist()) & {0, CLS, SEP, MASK}
            cu = p.cu_seqlens.tolist()
            for r in range(p.n_examples):
                key = tuple(ids[cu[r]:cu[r + 1]].tolist())
                entry = (tuple(p.segment_ids[cu[r]:cu[r + 1]].tolist()), int(p.nsp_labels[r]))
                assert entry in want.get(key, []), (step, r)
                want[key].remove(entry)
                seen += 1
    left = packed.plan(1)[packed.steps_per_epoch * 2:]  # the packs past the epoch's last step
    assert seen + sum(len(p) for p in left) == len(la)


# --- item 5 of issue 12: the packed step on the fused path has static shapes and no host sync ---

SYNCS = ("item", "tolist", "cpu", "nonzero", "__int__", "__float__", "__bool__")


class HostSyncError(RuntimeError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """Tensor.item, tolist, cpu, nonzero (and int(), float(), bool() of a tensor, which read a value
    the same way) raise while `armed`; on a GPU each is a device-to-host sync. Exempt: calls made by
    Triton's interpreter, which runs the kernels on the host (on a GPU those are launches)."""
    state = {"armed": False}

    def allowed(tensor):
        return f"{os.sep}triton{os.sep}" in sys._getframe(2).f_code.co_filename

    def guard(name, original):
        def call(self, *args, **kwargs):
            if state["armed"] and not allowed(self):
                raise HostSyncError(f"Tensor.{name} during the packed step")
            return original(self, *args, **kwargs)
        return call

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    nonzero = torch.nonzero

    def torch_nonzero(t, *args, **kwargs):
        if state["armed"] and not allowed(t):
            raise HostSyncError("torch.nonzero during the packed step")
        return nonzero(t, *args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", torch_nonzero)
    return state


def packed_step_inputs(preset, seed, min_len=5, width=19):
    rng = np.random.default_rng(seed)
    ids, seg, nxt, _ = examples(3, width, preset, rng, min_len=min_len)
    ids, labels = masked(ids, seed)
    return pack_rows(ids, seg, nxt, tokens=64, max_seqs=8, max_seqlen=19, max_predictions=20,
                     mlm_labels=labels, vocab_size=VOCAB).to(DEVICE)


def train_step(step, pack, optimizer):
    """Forward, loss (normalised by the pack's host-side counts), backward, clipping, AdamW."""
    mlm_sum, mlm_hits, nsp_sum, nsp_hits = step(*pack.inputs())
    loss = mlm_sum / max(1, pack.n_masked) + nsp_sum / max(1, pack.n_examples)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(step.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return loss.detach(), mlm_hits, nsp_hits


@fused_only
@pytest.mark.parametrize("preset", ["hf", "modernbert"])
def test_packed_step_makes_no_host_sync(no_host_sync, monkeypatch, preset):
    """A whole training step (forward, loss, backward, clipping, fused AdamW) on the fused path, with
    dropout in attention, LayerNorm and bias+GELU or GeGLU (seeds drawn on the device), while every value
    read-back raises: it runs, and gives the loss and parameters of the same step unguarded. ModernBERT:
    MLM only, each layer one fused node with rotary embeddings and a sliding window."""
    if not CUDA:
        monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    layers = sys.modules["fastbert.ops.modern_block"]
    forward, fused = layers._forward, []
    monkeypatch.setattr(layers, "_forward", lambda *a, **k: fused.append(1) or forward(*a, **k))
    seed = int(torch.randint(0, 2**31, ()))
    pack = packed_step_inputs("hf", seed)
    results = []
    for armed in (False, True):
        step = PackedPretrain(model(preset, dropout=0.1)).to(DEVICE).train()
        opt = torch.optim.AdamW(step.parameters(), lr=1e-3, fused=True)  # capturable on CUDA
        torch.manual_seed(seed)
        no_host_sync["armed"] = armed
        try:
            loss = train_step(step, pack, opt)[0]
        finally:
            no_host_sync["armed"] = False
        results.append((loss, [p.detach().clone() for p in step.parameters()]))
    (loss0, params0), (loss1, params1) = results
    assert len(fused) == (2 * LAYERS if preset == "modernbert" else 0)  # every ModernBERT layer one node
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    with pytest.raises(HostSyncError):  # the guard does catch a read-back
        no_host_sync["armed"] = True
        try:
            loss0.item()
        finally:
            no_host_sync["armed"] = False


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op with the shapes (and dtypes) of its tensor arguments and results."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        shapes = tuple((tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out


@fused_only
@pytest.mark.parametrize("preset", ["bert_pytorch", "modernbert"])
def test_packed_steps_have_the_same_shapes_at_every_op(monkeypatch, preset):
    """Two packs of very different example lengths (3 long examples; 3 short ones and more padding):
    the forward and backward run the same ops on the same shapes, so a CUDA graph or a compiled
    graph captured on one replays the other."""
    if not CUDA:
        monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    seed = int(torch.randint(0, 2**31, ()))
    packs = [packed_step_inputs("bert_pytorch", seed, min_len=17),
             packed_step_inputs("bert_pytorch", seed + 1, min_len=5, width=8)]
    assert packs[0].n_tokens >= 51 and packs[1].n_tokens <= 24
    step = PackedPretrain(model(preset)).to(DEVICE).train()
    with torch.no_grad():  # a warm-up forward, as before a capture: ModernBERT builds its rotary tables once
        step(*packs[0].inputs())
    traces = []
    for pack in packs:
        step.zero_grad(set_to_none=True)
        with _Shapes() as rec:
            out = step(*pack.inputs())
            (out[0] + out[2]).backward()
        traces.append(rec.ops)
    assert len(traces[0]) > 50
    assert traces[0] == traces[1]


@fused_only
def test_packed_step_compiles_without_graph_breaks(monkeypatch):
    """torch.compile(fullgraph=True, dynamic=False) of the packed forward and loss on the fused path:
    no graph break (fullgraph raises on one), the loss and gradients of eager mode, and one
    compilation serving a second pack of other lengths."""
    if not CUDA:
        monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    torch._dynamo.reset()
    seed = int(torch.randint(0, 2**31, ()))
    packs = [packed_step_inputs("hf", seed, min_len=17), packed_step_inputs("hf", seed + 1, width=8)]
    step = PackedPretrain(model("hf")).to(DEVICE).train()

    def loss_of(*inputs):
        mlm_sum, _, nsp_sum, _ = step(*inputs)
        return mlm_sum + nsp_sum

    compiled = torch.compile(loss_of, fullgraph=True, dynamic=False, backend="aot_eager")
    counts = torch._dynamo.utils.counters
    counts.clear()
    results = []
    for fn in (compiled, loss_of):
        step.zero_grad(set_to_none=True)
        loss = fn(*packs[0].inputs())
        loss.backward()
        results.append((loss.detach(), grads(step)))
    (lc, gc), (le, ge) = results
    assert abs(float(lc) - float(le)) <= 1e-5 * max(1.0, abs(float(le)))
    assert gc.keys() == ge.keys()
    for name, g in ge.items():
        assert (gc[name] - g).abs().max() <= 1e-5 * max(1.0, float(g.abs().max())), name
    lc, le = compiled(*packs[1].inputs()), loss_of(*packs[1].inputs())  # grad mode on: the same guards
    lc, le = float(lc.detach()), float(le.detach())
    assert abs(lc - le) <= 1e-5 * max(1.0, abs(le))
    assert counts["stats"]["unique_graphs"] == 1, dict(counts["stats"])  # no recompilation
    assert not counts["graph_break"], dict(counts["graph_break"])
