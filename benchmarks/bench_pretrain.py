"""The pretraining step as users run it: padded, packed, packed + CUDA graphs, against HF and bert_pytorch.

One optimizer step of MLM + NSP pretraining (forward, loss, backward, AdamW) on the same examples
for every provider, so every provider processes the same real tokens:
  fastbert-padded       fastbert.train.heads.PretrainModel (preset "hf") on the right-padded batch
                        (fused ops, the encoder unpads inside, sparse MLM head), eager
  fastbert-packed       the same model on the examples packed into fixed token slots
                        (fastbert.train.packing: Encoder.forward_packed, no host sync), eager
  fastbert-packed-graph the packed step captured whole in a CUDA graph (fastbert.train.graphs:
                        capturable fused AdamW, clipping off, replayed each round); CUDA only
  hf-sdpa               transformers.BertForPreTraining, attn_implementation="sdpa", its own loss, eager
  hf-sdpa-compile       the same under torch.compile (CUDA only: compiling on the CPU takes minutes)
  bert_pytorch          bert_pytorch.model.BERTLM(BERT) with NLLLoss(ignore_index=0), as its trainer
Variants:
  full       every example SEQ tokens long (no padding: packing cannot help; it measures the step)
  realistic  example lengths drawn from the embedded stdlib corpus's sentence pairs ([CLS] A [SEP] B [SEP]
             of consecutive sentences, fastbert.train.data.PretrainData pairs="sentence", WordPiece
             vocabulary of 8000 trained on it; mean about 37 tokens), clipped to SEQ; the padded
             providers get the rows padded to the batch's longest (rounded up to 8, as PretrainData
             collates), the packed ones the same examples back to back
Sizes. CUDA: BERT-base (vocab 30522, hidden 768, 12 layers, 12 heads), seq 128, batch 64, fp32 weights
under bf16 autocast, fused AdamW. CPU: vocab 1000, hidden 128, 2 layers, seq 64, batch 8, fp32.
Token ids are random; 15% of the real tokens are masked (fastbert.reference mlm_mask, fixed seed).
tokens/s counts real tokens only; TFLOP/s counts the model FLOPs of the real tokens
(fastbert.train.pretrain.flops_per_step: encoder matmuls, attention over each example's own length,
MLM head on the masked rows), the same for every provider, so ratios of TFLOP/s are speed ratios;
extra_info "mfu" divides by the device's bf16 peak (PEAK_BF16_TFLOPS, when the device is known).
The issue's acceptance (issue 12) on a GPU: fastbert-packed-graph >= 1.5x hf-sdpa and >= 3x
bert_pytorch in tokens/s on the realistic variant, MFU >= 50%.
"""

import numpy as np
import pytest
import torch
from _util import devices, run, training_step

from fastbert.reference import ops as ref_ops
from fastbert.reference.model import BertConfig
from fastbert.train.heads import PretrainModel
from fastbert.train.packing import PackedPretrain, pack_rows
from fastbert.train.pretrain import PEAK_BF16_TFLOPS, STDLIB_CORPUS, flops_per_step

DEVICE = devices()[0]
CUDA = DEVICE == "cuda"
if CUDA:
    VOCAB, HIDDEN, LAYERS, HEADS, SEQ, BATCH = 30522, 768, 12, 12, 128, 64
    AMP = torch.bfloat16
else:
    VOCAB, HIDDEN, LAYERS, HEADS, SEQ, BATCH = 1000, 128, 2, 2, 64, 8
    AMP = None
CLS, SEP, MASK = 2, 3, 4
PROVIDERS = ["fastbert-padded", "fastbert-packed", "fastbert-packed-graph", "hf-sdpa", "bert_pytorch",
             "hf-sdpa-compile"]


@pytest.fixture(scope="module")
def corpus_lengths(tmp_path_factory):
    """Lengths of the stdlib corpus's sentence-pair examples, in WordPiece tokens."""
    from fastbert.train.data import PretrainData, cached_shard
    from fastbert.train.vocab import train_vocab

    root = tmp_path_factory.mktemp("bench_pretrain")
    vocab = train_vocab([STDLIB_CORPUS], vocab_size=8000, progress=False)
    shard = cached_shard(STDLIB_CORPUS, vocab, str(root / "cache"), progress=False)
    data = PretrainData(shard, 512, 1, seed=0, cls_id=vocab.cls_id, sep_id=vocab.sep_id, pairs="sentence")
    _, la, _, lb, _, _ = data.plan(0)
    return la + lb + 3


def examples(variant, corpus_lengths):
    """Right-padded masked rows [B, W], segments (0/1), labels (0 = not masked), is_next, lengths."""
    g = torch.Generator().manual_seed(0)
    if variant == "full":
        lengths = np.full(BATCH, SEQ)
    else:
        rng = np.random.default_rng(0)
        lengths = np.minimum(rng.choice(corpus_lengths, BATCH), SEQ)
    width = int(min(SEQ, -(-int(lengths.max()) // 8) * 8))
    ids = torch.zeros(BATCH, width, dtype=torch.int64)
    seg = torch.zeros_like(ids)
    for r, n in enumerate(lengths.tolist()):
        a = max(1, (n - 3) // 2)
        ids[r, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        ids[r, 0], ids[r, a + 1], ids[r, n - 1] = CLS, SEP, SEP
        seg[r, a + 2:n] = 1
    masked, labels = ref_ops.mlm_mask(ids, VOCAB, MASK, 0, (1, CLS, SEP, MASK), generator=g)
    is_next = torch.randint(0, 2, (BATCH,), generator=g)
    return masked, seg, labels, is_next, lengths


def _hf_config(transformers):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                                   attn_implementation="sdpa")


def build(provider, masked, seg, labels, is_next, lengths):
    """(model, loss_fn of no arguments, or a graph step for fastbert-packed-graph)."""
    dev = [t.to(DEVICE) for t in (masked, seg, labels, is_next)]
    masked_d, seg_d, labels_d, next_d = dev
    torch.manual_seed(0)
    cfg = BertConfig.hf(VOCAB, HIDDEN, LAYERS, HEADS, 4 * HIDDEN, max_position=512)
    if provider == "fastbert-padded":
        model = PretrainModel(cfg).to(DEVICE)
        pos = (labels_d.reshape(-1) != 0).nonzero().squeeze(1)
        lab = labels_d.reshape(-1).index_select(0, pos)

        def loss_fn():
            mlm, _, nsp = model(masked_d, seg_d, pos, lab)
            return mlm / pos.numel() + torch.nn.functional.nll_loss(nsp, next_d)
        return model, loss_fn
    if provider.startswith("fastbert-packed"):
        model = PretrainModel(cfg).to(DEVICE)
        step = PackedPretrain(model)
        tokens = -(-int(lengths.sum()) // 64) * 64
        pack = pack_rows(masked.numpy(), seg.numpy(), is_next.numpy(), tokens=tokens, max_seqs=BATCH + 8,
                         max_seqlen=SEQ, max_predictions=-(-int((labels != 0).sum()) // 8) * 8,
                         lengths=lengths, mlm_labels=labels.numpy(), vocab_size=VOCAB).to(DEVICE)
        n_masked, n_examples = float(pack.n_masked), float(pack.n_examples)

        def loss_fn(*inputs):
            mlm_sum, _, nsp_sum, _ = step(*(inputs or pack.inputs()))
            return mlm_sum / n_masked + nsp_sum / n_examples
        return model, (loss_fn, pack)
    if provider.startswith("hf-sdpa"):
        transformers = pytest.importorskip("transformers")
        model = transformers.BertForPreTraining(_hf_config(transformers)).to(DEVICE)
        hf_labels = torch.where(labels_d == 0, torch.full_like(labels_d, -100), labels_d)
        mask = (masked_d != 0).long()
        fwd = torch.compile(model) if provider.endswith("compile") else model

        def loss_fn():
            return fwd(input_ids=masked_d, token_type_ids=seg_d, attention_mask=mask, labels=hf_labels,
                       next_sentence_label=next_d).loss
        return model, loss_fn
    bp = pytest.importorskip("bert_pytorch.model")
    model = bp.BERTLM(bp.BERT(VOCAB, HIDDEN, LAYERS, HEADS), VOCAB).to(DEVICE)
    bp_seg = (seg_d + 1) * (masked_d != 0)  # bert_pytorch's segments are 1 and 2 (0 is padding)
    nll = torch.nn.NLLLoss(ignore_index=0)

    def loss_fn():
        nsp, mlm = model(masked_d, bp_seg)
        return nll(mlm.float().transpose(1, 2), labels_d) + torch.nn.functional.nll_loss(nsp.float(), next_d)
    return model, loss_fn


@pytest.mark.parametrize("variant", ["realistic", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pretrain(benchmark, request, provider, variant):
    benchmark.group = (f"pretraining step, {variant} lengths (MLM + NSP, AdamW): hidden {HIDDEN}, "
                       f"{LAYERS} layers, seq {SEQ}, batch {BATCH}, {'bf16 autocast' if AMP else 'fp32'}, "
                       f"{DEVICE}")
    if not CUDA and (provider.endswith("graph") or provider.endswith("compile")):
        pytest.skip("CUDA only (CUDA graphs need a GPU; compiling the baseline takes minutes on a CPU)")
    lengths_src = request.getfixturevalue("corpus_lengths") if variant == "realistic" else None
    masked, seg, labels, is_next, lengths = examples(variant, lengths_src)
    model, loss_fn = build(provider, masked, seg, labels, is_next, lengths)
    model.train()
    amp = dict(device_type=DEVICE, dtype=AMP or torch.bfloat16, enabled=AMP is not None)
    if provider == "fastbert-packed-graph":
        from fastbert.train.graphs import GraphedTrainStep

        fn, pack = loss_fn
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-4, device=DEVICE), capturable=True,
                                fused=True)
        graphed = GraphedTrainStep(lambda *inputs: (fn(*inputs), {}), opt, autocast=AMP)

        def step():
            graphed([pack.inputs()])
    else:
        if isinstance(loss_fn, tuple):
            loss_fn = loss_fn[0]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA or None)
        step = training_step(loss_fn, opt, amp)

    cfg = BertConfig.hf(VOCAB, HIDDEN, LAYERS, HEADS, 4 * HIDDEN)
    tokens = int(lengths.sum())
    n_masked = int((labels != 0).sum())
    flops = flops_per_step(cfg, tokens, int((lengths.astype(np.int64) ** 2).sum()), n_masked)
    if CUDA and provider == "fastbert-packed-graph":
        torch.cuda.set_sync_debug_mode("warn")  # a sync in the replayed step would print a warning
    try:
        loss = run(benchmark, step, DEVICE, flops=flops, tokens=tokens)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
    info = benchmark.extra_info
    info.update(provider=provider, variant=variant, real_tokens=tokens, padded_slots=int(masked.numel()),
                padding_frac=1 - tokens / masked.numel())
    if loss is not None:
        info["loss"] = float(loss.detach())
    if CUDA and info.get("tflops"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            info["mfu"] = info["tflops"] / peak
