"""fastbert.train.graphs: the CUDA-graph training step helper.

Without CUDA: the helper refuses to capture with a clear error, its eager mode equals a hand-written
training loop (gradient accumulation, clipping, AdamW, LR schedule), the on-device schedule equals
fastbert.train.optim.warmup_linear, and metrics accumulate on the device until read. With CUDA (these
tests are skipped elsewhere, and have not run in this repository yet): graph replay equals eager for
20 steps of the packed BERT step, no host sync under torch.cuda.set_sync_debug_mode("error"), and
dropout draws new masks on every replay.
"""

import numpy as np
import pytest
import torch

from fastbert.reference.model import BertConfig
from fastbert.train.graphs import GraphedTrainStep, packed_pretrain_step, warmup_linear_lr
from fastbert.train.heads import PretrainModel
from fastbert.train.optim import warmup_linear
from fastbert.train.packing import IGNORE_INDEX, PackedPretrain, pack_rows, step_counts

CUDA = torch.cuda.is_available()
VOCAB = 101
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def packed_model(device, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig.hf(VOCAB, 64, 2, 2, 128, dropout=dropout, attn_dropout=dropout, emb_dropout=dropout,
                        max_position=64)
    return PackedPretrain(PretrainModel(cfg)).to(device).train()


def pack(rng, device, tokens=96, seq=24):
    """A pack of random [CLS] A [SEP] B [SEP] examples with a few masked tokens."""
    rows = []
    while sum(rows) + seq <= tokens - 8 or not rows:
        rows.append(int(rng.integers(6, seq + 1)))
    ids = np.zeros((len(rows), seq), dtype=np.int64)
    seg = np.zeros_like(ids)
    for r, n in enumerate(rows):
        ids[r, :n] = rng.integers(5, VOCAB, n)
        ids[r, 0], ids[r, n // 2], ids[r, n - 1] = 2, 3, 3
        seg[r, n // 2 + 1:n] = 1
    labels = np.where((rng.random(ids.shape) < 0.2) & (ids > 4), ids, 0)
    masked = np.where(labels > 0, 4, ids)
    return pack_rows(masked, seg, rng.integers(0, 2, len(rows)), tokens=tokens, max_seqs=12, max_seqlen=seq,
                     max_predictions=32, mlm_labels=labels).to(device)


def loss_fn(model):
    """Loss per micro-batch normalised by step-wide counts that come in as device tensors."""
    def f(*args):
        *inputs, max_seqlen, n_masked, n_examples = args
        mlm_sum, mlm_hits, nsp_sum, nsp_hits = model(*inputs, max_seqlen)
        return mlm_sum / n_masked + nsp_sum / n_examples, {"mlm_hits": mlm_hits, "nsp_hits": nsp_hits}
    return f


def shared_counts(packs, device):
    n_masked = sum(int((p.mlm_labels != IGNORE_INDEX).sum()) for p in packs)
    n_examples = sum(int((p.nsp_labels != IGNORE_INDEX).sum()) for p in packs)
    return (torch.tensor(float(n_masked), device=device), torch.tensor(float(n_examples), device=device))


def test_capture_needs_cuda():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if CUDA:
        with pytest.raises(RuntimeError, match="parameters on a CUDA device"):
            GraphedTrainStep(lambda x: (model(x).sum(), {}), opt)
    else:
        with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device.*enabled=False"):
            GraphedTrainStep(lambda x: (model(x).sum(), {}), opt)


def test_bad_arguments():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="tensor lr"):
        GraphedTrainStep(lambda x: (model(x).sum(), {}), opt, lr_schedule=warmup_linear_lr(1e-3, 2),
                         enabled=False)
    step = GraphedTrainStep(lambda x: (model(x).sum(), {}), opt, accumulation=2, enabled=False)
    with pytest.raises(ValueError, match="got 1 micro-batches, accumulation is 2"):
        step([(torch.randn(4, 3),)])
    with pytest.raises(ValueError, match="accumulation must be"):
        GraphedTrainStep(lambda x: (model(x).sum(), {}), opt, accumulation=0, enabled=False)


@pytest.mark.parametrize("total", [None, 9])
def test_device_schedule_equals_warmup_linear(total):
    lr = warmup_linear_lr(3e-4, warmup=4, total=total)
    ref = warmup_linear(4, total)
    for s in range(13):
        got = float(lr(torch.tensor(s)))
        assert abs(got - 3e-4 * ref(s)) <= 1e-6 * 3e-4, (s, got, ref(s))


def test_eager_step_equals_a_hand_written_loop():
    """enabled=False: the helper's step (2 micro-batches, clipping, fused AdamW with a tensor lr, the
    schedule on the device) gives the parameters and summed metrics of a plain loop with LambdaLR."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    steps = [[pack(rng, "cpu"), pack(rng, "cpu")] for _ in range(4)]
    peak, warm, total = 2e-3, 2, 6

    model = packed_model("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(peak), fused=True)
    helper = GraphedTrainStep(loss_fn(model), opt, accumulation=2, max_grad_norm=0.5,
                              lr_schedule=warmup_linear_lr(peak, warm, total), enabled=False)
    for packs in steps:
        helper([p.inputs() for p in packs], shared=shared_counts(packs, "cpu"))
    metrics = helper.read_metrics()
    assert helper.read_metrics() == {"loss": 0.0, "mlm_hits": 0.0, "nsp_hits": 0.0}  # reset on read

    ref = packed_model("cpu")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=peak, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, warmup_linear(warm, total))
    f = loss_fn(ref)
    loss_sum = hits = 0.0
    for packs in steps:
        counts = shared_counts(packs, "cpu")
        for p in packs:
            loss, m = f(*p.inputs(), *counts)
            loss.backward()
            loss_sum += float(loss.detach())
            hits += float(m["mlm_hits"])
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        sched.step()
        ref_opt.zero_grad()
    assert abs(metrics["loss"] - loss_sum) <= 1e-5 * abs(loss_sum)
    assert metrics["mlm_hits"] == hits
    # atol: the key bias's true gradient is zero (softmax ignores a per-query constant), so Adam
    # turns rounding noise into steps of either sign; every other update is about lr = 1e-3
    moved = 0.0
    for (name, a), b, c in zip(model.named_parameters(), ref.parameters(), packed_model("cpu").parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        moved = max(moved, float((b - c).detach().abs().max()))
    assert moved > 1e-3


def _cuda_run(graphed, dropout=0.0, steps=20, dtype=torch.bfloat16):
    rng = np.random.default_rng(0)
    batches = [[pack(rng, "cuda")] for _ in range(steps)]
    model = packed_model("cuda", dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True,
                            fused=True)
    helper = GraphedTrainStep(loss_fn(model), opt, max_grad_norm=1.0,
                              lr_schedule=warmup_linear_lr(1e-3, 5, steps), autocast=dtype, enabled=graphed)
    losses = []
    torch.manual_seed(1)
    for i, packs in enumerate(batches):
        counts = shared_counts(packs, "cuda")
        if graphed and i >= helper.warmup + 1:  # replays: nothing may read back from the device
            torch.cuda.set_sync_debug_mode("error")
        try:
            helper([p.inputs() for p in packs], shared=counts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses.append(helper.read_metrics()["loss"])
    return losses


@needs_cuda
def test_graph_replay_equals_eager_on_cuda():
    """20 packed steps, dropout 0, bf16: the graphed run's losses equal the eager run's (1e-3
    relative), and the replays make no host sync."""
    eager = _cuda_run(False)
    graphed = _cuda_run(True)
    for i, (a, b) in enumerate(zip(graphed, eager)):
        assert abs(a - b) <= 1e-3 * abs(b), (i, a, b)


@needs_cuda
def test_eager_packed_step_makes_no_sync_on_cuda():
    """The eager packed step (forward, loss, backward, clipping, capturable AdamW) under sync debug
    mode "error": any device-to-host sync raises."""
    rng = np.random.default_rng(1)
    model = packed_model("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True,
                            fused=True)
    helper = GraphedTrainStep(loss_fn(model), opt, max_grad_norm=1.0, enabled=False)
    packs = [pack(rng, "cuda")]
    counts = shared_counts(packs, "cuda")
    helper([p.inputs() for p in packs], shared=counts)  # first step: lazy state
    torch.cuda.set_sync_debug_mode("error")
    try:
        helper([p.inputs() for p in packs], shared=counts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_replays_draw_new_dropout_masks():
    """With dropout, the same batch replayed twice gives two different losses (the graph advances the
    CUDA generator), and finite ones."""
    rng = np.random.default_rng(2)
    model = packed_model("cuda", dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.0, device="cuda"), capturable=True,
                            fused=True)
    helper = GraphedTrainStep(loss_fn(model), opt, warmup=2)
    packs = [pack(rng, "cuda")]
    counts = shared_counts(packs, "cuda")
    losses = []
    for _ in range(5):
        helper([p.inputs() for p in packs], shared=counts)
        losses.append(helper.read_metrics()["loss"])
    assert all(np.isfinite(losses))
    assert losses[3] != losses[4]  # two replays


def test_packed_pretrain_step_sums():
    """packed_pretrain_step (eager): the summed metrics are the packs' loss sums and hit counts, and
    the loss is normalised by the step-wide counts of step_counts."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    packs = [pack(rng, "cpu"), pack(rng, "cpu")]
    model = packed_model("cpu").model  # the PretrainModel
    with torch.no_grad():
        outs = [PackedPretrain(model)(*p.inputs()) for p in packs]
    masked, examples = step_counts(packs, "cpu")
    assert float(masked) == sum(p.n_masked for p in packs)
    assert float(examples) == sum(p.n_examples for p in packs)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    step = packed_pretrain_step(model, opt, accumulation=2)
    step(packs, shared=(masked, examples))
    got = step.read_metrics()
    for i, name in enumerate(("mlm", "mlm_hit", "nsp", "nsp_hit")):
        want = sum(float(o[i]) for o in outs)
        assert abs(got[name] - want) <= 1e-5 * max(1.0, abs(want)), name
    want = sum(float(o[0]) / float(masked) + float(o[2]) / float(examples) for o in outs)
    assert abs(got["loss"] - want) <= 1e-5 * want
