"""mlm_mask on a [256, 512] int64 batch: fastbert's C++/CUDA op against what people use.

Providers:
  fastbert            fastbert.ops.mlm_mask (torch.ops.fastbert.mlm_mask; Philox, one pass)
  reference           fastbert.reference.ops.mlm_mask: vectorised PyTorch (rand, where, gather)
  bert_pytorch_loop   bert_pytorch's BERTDataset.random_word: the per-token Python loop of the
                      original data pipeline, called on the same tokens (as strings, one sentence per
                      row) with a stand-in vocab object; a faithful copy of the loop when the package
                      is absent. CPU only (it is a CPU data-loader path, there is nothing to put on a
                      GPU).
Same sizes on CPU and CUDA (the issue's target is fastbert >= 100x the loop on CPU). bytes_moved per
token: ids read (8) + masked ids and labels written (8 + 8) + the chosen mask (1).
"""

import random

import pytest
import torch
from _util import devices, run

import fastbert.ops as ops
from fastbert.reference import ops as ref

DEVICE = devices()[0]
ROWS, SEQ, VOCAB = 256, 512, 30522
PAD, CLS, SEP, MASK, UNK = 0, 101, 102, 103, 100
SPECIAL = (CLS, SEP, MASK, UNK)


class _Vocab:
    """What random_word reads from bert_pytorch's WordVocab: stoi, mask_index, unk_index, len()."""

    def __init__(self, size):
        self.stoi = {str(i): i for i in range(size)}
        self.mask_index = MASK
        self.unk_index = UNK
        self._size = size

    def __len__(self):
        return self._size


class _Dataset:
    def __init__(self, size):
        self.vocab = _Vocab(size)


def _copy_of_random_word(self, sentence):
    """bert_pytorch 0.0.1a4 dataset.BERTDataset.random_word, line for line."""
    tokens = sentence.split()
    output_label = []
    for i, token in enumerate(tokens):
        prob = random.random()
        if prob < 0.15:
            prob /= 0.15
            if prob < 0.8:
                tokens[i] = self.vocab.mask_index
            elif prob < 0.9:
                tokens[i] = random.randrange(len(self.vocab))
            else:
                tokens[i] = self.vocab.stoi.get(token, self.vocab.unk_index)
            output_label.append(self.vocab.stoi.get(token, self.vocab.unk_index))
        else:
            tokens[i] = self.vocab.stoi.get(token, self.vocab.unk_index)
            output_label.append(0)
    return tokens, output_label


def _random_word():
    try:
        from bert_pytorch.dataset.dataset import BERTDataset

        return BERTDataset.random_word, "bert_pytorch"
    except Exception:  # noqa: BLE001
        return _copy_of_random_word, "copy"


def _batch(device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(999, VOCAB, (ROWS, SEQ), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(SEQ // 2, SEQ + 1, (ROWS,), generator=g)
    col = torch.arange(SEQ)
    ids[col[None] == lengths[:, None] - 1] = SEP
    ids[col[None] >= lengths[:, None]] = PAD
    return ids.to(device)


@pytest.mark.parametrize("provider", ["fastbert", "reference", "bert_pytorch_loop"])
def test_mlm_mask(benchmark, provider):
    benchmark.group = f"mlm_mask [{ROWS}, {SEQ}] int64 {DEVICE}"
    ids = _batch(DEVICE)
    gen = torch.Generator(device=DEVICE if provider == "reference" else "cpu").manual_seed(1)
    if provider == "fastbert":
        def fn():
            return ops.mlm_mask(ids, VOCAB, MASK, PAD, SPECIAL, generator=gen)
    elif provider == "reference":
        def fn():
            return ref.mlm_mask(ids, VOCAB, MASK, PAD, SPECIAL, generator=gen)
    else:
        if DEVICE != "cpu":
            pytest.skip("bert_pytorch's random_word is a per-token Python loop on CPU; timed on CPU runs")
        random_word, source = _random_word()
        benchmark.extra_info["random_word"] = source
        dataset = _Dataset(VOCAB)
        sentences = [" ".join(map(str, row)) for row in ids.tolist()]
        random.seed(0)

        def fn():
            return [random_word(dataset, s) for s in sentences]
    out = run(benchmark, fn, DEVICE, bytes_moved=ROWS * SEQ * 25, tokens=ROWS * SEQ)
    if provider == "fastbert":
        chosen = (out[1] != 0).sum().item() / (ids != PAD).sum().item()
        benchmark.extra_info["chosen_fraction"] = chosen
