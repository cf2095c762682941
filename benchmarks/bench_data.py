"""The pretraining data path: batches of MLM + NSP examples per second, fastbert vs bert_pytorch.

Both providers read the same corpus, the embedded one (fastbert/data/corpus.txt.gz), and deliver
ROWS sequences of at most SEQ tokens with masked ids, labels, segments and is_next on the device:
  fastbert      PretrainData.step_batches on the memory-mapped shard (vectorised numpy collation of
                length-grouped [CLS] A [SEP] B [SEP] rows), copy to the device, fastbert.ops.mlm_mask
                there (the C++/CUDA op).
  bert_pytorch  bert_pytorch.dataset.BERTDataset (on_memory) over the same corpus written in its
                `A \\t B` format (consecutive sentences of a document), with a bert_pytorch WordVocab
                built on it: ROWS __getitem__ calls (Python per-token masking), default_collate, copy
                to the device. Skipped when bert_pytorch is not installed.
Tokenizing and vocabulary building happen once in the fixture, outside the timing (fastbert keeps its
tokenized shard on disk; BERTDataset tokenizes per item, which is part of its data path).
On CPU both providers run on one thread, as a DataLoader worker does (torch sets 1 thread in its
workers): the comparison is per CPU core, and it keeps OpenMP's thread wake-up (milliseconds on an
oversubscribed machine) out of a millisecond-sized batch.
extra_info: sequences_per_s and tokens_per_s (non-padding) at the median. The issue's target is
fastbert >= 10x bert_pytorch in sequences/s on CPU.
"""

import gzip

import numpy as np
import pytest
import torch
from _util import devices, run

import fastbert.ops as ops
from fastbert.train.data import PretrainData, cached_shard
from fastbert.train.pretrain import DEFAULT_CORPUS
from fastbert.train.vocab import train_vocab

DEVICE = devices()[0]
ROWS, SEQ = 256, 128


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    vocab = train_vocab([DEFAULT_CORPUS], vocab_size=8000, progress=False)
    shard = cached_shard(DEFAULT_CORPUS, vocab, str(root / "cache"), progress=False)
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        docs = [d.splitlines() for d in f.read().split("\n\n")]
    tab = root / "corpus.tab.txt"
    with open(tab, "w", encoding="utf-8") as f:
        for d in docs:
            f.writelines(f"{a}\t{b}\n" for a, b in zip(d, d[1:]) if a.strip() and b.strip())
    return vocab, shard, str(tab)


@pytest.fixture
def one_cpu_thread():
    if DEVICE != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("provider", ["fastbert", "bert_pytorch"])
def test_data_path(benchmark, corpora, provider, one_cpu_thread):
    benchmark.group = f"pretraining data path: {ROWS} sequences of <= {SEQ} tokens, {DEVICE}"
    vocab, shard, tab = corpora
    if provider == "fastbert":
        data = PretrainData(shard, SEQ, ROWS, 1, seed=0, cls_id=vocab.cls_id, sep_id=vocab.sep_id)
        data.plan(0)  # the epoch's pairing and length grouping: once per epoch, not per batch
        special = (vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        state = {"step": 0}

        def fn():
            mb = data.step_batches(0, state["step"] % data.steps_per_epoch)[0]
            state["step"] += 1
            ids = torch.from_numpy(mb["input_ids"]).to(DEVICE, non_blocking=True)
            seg = torch.from_numpy(mb["segment_ids"]).to(DEVICE, non_blocking=True)
            nxt = torch.from_numpy(mb["is_next"]).to(DEVICE, non_blocking=True)
            masked, labels = ops.mlm_mask(ids, len(vocab), vocab.mask_id, vocab.pad_id, special,
                                          generator=gen)
            return masked, labels, seg, nxt
    else:
        ds_mod = pytest.importorskip("bert_pytorch.dataset")
        with open(tab, encoding="utf-8") as f:
            wv = ds_mod.WordVocab(f, max_size=8000, min_freq=1)
        dataset = ds_mod.BERTDataset(tab, wv, seq_len=SEQ, on_memory=True)
        rng = np.random.default_rng(0)
        collate = torch.utils.data.default_collate

        def fn():
            items = [dataset[int(i)] for i in rng.integers(0, len(dataset), ROWS)]
            batch = collate(items)
            return tuple(batch[k].to(DEVICE, non_blocking=True)
                         for k in ("bert_input", "bert_label", "segment_label", "is_next"))
    out = run(benchmark, fn, DEVICE)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["sequences_per_s"] = ROWS / median
        benchmark.extra_info["tokens_per_s"] = int((out[0] != 0).sum()) / median
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
