"""Pretraining data: corpus parsing (plain and tab), vocabularies, shard round trip, batches, masking."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from fastbert.ops import mlm_mask
from fastbert.train.data import (
    CorpusError,
    PretrainData,
    Shard,
    build_shard,
    cached_shard,
    detect_format,
    heldout_documents,
    iter_documents,
    truncate_pair,
)
from fastbert.train.vocab import SPECIALS, Vocab, VocabError, read_vocab, train_vocab

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EMBEDDED = os.path.join(os.path.dirname(__file__), "..", "fastbert", "data", "corpus.txt.gz")

PLAIN = """The quick brown fox jumps over the lazy dog.
A second sentence follows the first one.
The third sentence ends the first document.

Another document starts here with some words.
It has two sentences in total.

A last document holds three short sentences.
This is the middle one.
And this one closes the corpus.
"""


def _small_corpus(tmp_path, n_docs=60):
    """A plain corpus: the first n_docs documents of the embedded one."""
    with gzip.open(EMBEDDED, "rt", encoding="utf-8") as f:
        docs = f.read().split("\n\n")[:n_docs]
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path), [d.strip().splitlines() for d in docs]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    corpus, docs = _small_corpus(tmp)
    vocab = train_vocab([corpus], vocab_size=1500, progress=False)
    shard = build_shard(corpus, vocab, str(tmp / "shard"), progress=False)
    return corpus, docs, vocab, shard


def test_plain_corpus_parsing(tmp_path):
    p = tmp_path / "plain.txt"
    p.write_text(PLAIN)
    assert detect_format(str(p)) == "plain"
    docs = list(iter_documents(str(p)))
    assert [len(d) for d in docs] == [3, 2, 3]
    assert docs[1][0] == "Another document starts here with some words."
    # gzip is read transparently, blank-line runs and a missing final newline do not matter
    g = tmp_path / "plain.txt.gz"
    g.write_bytes(gzip.compress(("\n\n\n" + PLAIN.rstrip("\n")).encode()))
    assert list(iter_documents(str(g), "plain")) == docs


def test_tab_corpus_parsing(tmp_path):
    p = tmp_path / "tab.txt"
    p.write_text("Welcome to the jungle\tI can stay here all night\n\nYou can go there\tMe too\n")
    assert detect_format(str(p)) == "tab"
    assert list(iter_documents(str(p))) == [["Welcome to the jungle", "I can stay here all night"],
                                            ["You can go there", "Me too"]]
    bad = tmp_path / "bad.txt"
    bad.write_text("first\tsecond\nno tab on this line\n")
    with pytest.raises(CorpusError, match=r"bad.txt:2: no tab"):
        list(iter_documents(str(bad), "tab"))


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        detect_format(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CorpusError, match="empty"):
        detect_format(str(empty))


def test_vocab_files(tmp_path):
    good = list(SPECIALS) + ["the", "##s", "cat"]
    (tmp_path / "v.txt").write_text("\n".join(good) + "\n")
    v = read_vocab(str(tmp_path / "v.txt"))
    assert (v.pad_id, v.unk_id, v.cls_id, v.sep_id, v.mask_id) == (0, 1, 2, 3, 4)
    assert v.encode_batch(["The cats"]) == [[5, 7, 6]]
    (tmp_path / "nomask.txt").write_text("\n".join(t for t in good if t != "[MASK]"))
    with pytest.raises(VocabError, match=r"\[MASK\]"):
        read_vocab(str(tmp_path / "nomask.txt"))
    (tmp_path / "pad1.txt").write_text("\n".join(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]))
    with pytest.raises(VocabError, match=r"\[PAD\] must have id 0"):
        read_vocab(str(tmp_path / "pad1.txt"))
    with pytest.raises(VocabError, match="does not exist"):
        read_vocab(str(tmp_path / "missing.txt"))


def test_bert_pytorch_vocab_pickle(tmp_path):
    wv = pytest.importorskip("bert_pytorch.dataset.vocab")
    vocab = wv.WordVocab(["hello world", "hello there world"], max_size=None, min_freq=1)
    vocab.save_vocab(str(tmp_path / "vocab.pkl"))
    v = read_vocab(str(tmp_path / "vocab.pkl"))
    assert v.kind == "word" and len(v) == len(vocab)
    assert (v.pad_id, v.unk_id, v.sep_id, v.cls_id, v.mask_id) == (
        vocab.pad_index, vocab.unk_index, vocab.eos_index, vocab.sos_index, vocab.mask_index)
    assert v.encode_batch(["hello there unknownword"])[0] == [vocab.stoi["hello"], vocab.stoi["there"],
                                                              vocab.unk_index]
    # a pickle that is not a vocabulary
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump({"x": 1}, f)
    with pytest.raises(VocabError, match="no token list"):
        read_vocab(str(tmp_path / "other.pkl"))


def test_shard_round_trip(small, tmp_path):
    corpus, docs, vocab, shard = small
    assert shard.n_documents == len(docs)
    assert shard.n_sentences == sum(map(len, docs))
    flat = [s for d in docs for s in d]
    expected = vocab.encode_batch(flat)
    for i in range(0, len(flat), 7):
        np.testing.assert_array_equal(shard.sentence(i), expected[i])
    d = 3
    assert [list(x) for x in shard.document(d)] == vocab.encode_batch(docs[d])
    assert shard.tokens.dtype == np.uint16 and isinstance(shard.tokens, np.memmap)
    # the cache tokenizes once and reopens the same files
    a = cached_shard(corpus, vocab, str(tmp_path / "cache"), progress=False)
    mtime = os.path.getmtime(os.path.join(a.path, "tokens.bin"))
    b = cached_shard(corpus, vocab, str(tmp_path / "cache"), progress=False)
    assert a.path == b.path and os.path.getmtime(os.path.join(b.path, "tokens.bin")) == mtime
    np.testing.assert_array_equal(np.asarray(Shard(a.path).tokens), np.asarray(shard.tokens))


def test_truncate_pair():
    la, lb = truncate_pair(np.array([100, 100, 10, 3]), np.array([10, 100, 100, 4]), 50)
    assert la.tolist() == [40, 25, 10, 3] and lb.tolist() == [10, 25, 40, 4]


def _check_rows(data, vocab, mbs, rows, plan):
    a_start, la, b_start, lb, is_next, _ = plan
    tokens = np.asarray(data.shard.tokens)
    bs = data.batch_size
    for k, mb in enumerate(mbs):
        ids, seg = mb["input_ids"], mb["segment_ids"]
        assert ids.shape[0] == bs and ids.shape[1] <= data.seq_len and ids.shape[1] % 8 == 0
        for r, e in enumerate(rows[k * bs:(k + 1) * bs]):
            sa = tokens[a_start[e]:a_start[e] + la[e]]
            sb = tokens[b_start[e]:b_start[e] + lb[e]]
            row = [vocab.cls_id, *sa, vocab.sep_id, *sb, vocab.sep_id]
            n = len(row)
            assert n <= data.seq_len
            assert ids[r, :n].tolist() == row and (ids[r, n:] == 0).all()
            assert seg[r, :n].tolist() == [1] * (len(sa) + 2) + [2] * (len(sb) + 1)
            assert (seg[r, n:] == 0).all()
            assert mb["is_next"][r] == is_next[e]


def _sentence_at(data, token_offset):
    return int(np.searchsorted(data.offs, token_offset, side="right") - 1)


def test_sentence_pairs(small):
    corpus, docs, vocab, shard = small
    data = PretrainData(shard, 64, batch_size=8, micro_batches=4, seed=3, cls_id=vocab.cls_id,
                        sep_id=vocab.sep_id, segments=(1, 2), pairs="sentence")
    plan = data.plan(0)
    a_start, la, b_start, lb, is_next, batches = plan
    assert 0.4 < is_next.mean() < 0.6
    a = np.array([_sentence_at(data, x) for x in a_start])
    b = np.array([_sentence_at(data, x) for x in b_start])
    assert (data.offs[a] == a_start).all() and (data.offs[b] == b_start).all()  # whole sentences
    assert (b[is_next] == a[is_next] + 1).all()  # true next: the following sentence
    assert (data.doc_of[b[~is_next]] != data.doc_of[a[~is_next]]).all()  # random: another document
    full = data.lens[a] + data.lens[b] <= 61
    assert (la[full] == data.lens[a][full]).all() and (lb[full] == data.lens[b][full]).all()
    mbs = data.step_batches(0, 1)
    assert len(mbs) == 4
    _check_rows(data, vocab, mbs, batches[1], plan)
    # ranks take consecutive micro-batches of the same global batch
    r0, r1 = data.step_batches(0, 1, rank=0, world=2), data.step_batches(0, 1, rank=1, world=2)
    for x, y in zip(r0 + r1, mbs):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    # length grouping pads less than random batches would
    lengths = la + lb + 3
    grouped = sum(int(lengths[batches[s][k * 8:(k + 1) * 8]].max()) * 8 for s in range(data.steps_per_epoch)
                  for k in range(4))
    rng = np.random.default_rng(0)
    rand = rng.permutation(len(lengths))[: data.steps_per_epoch * 32].reshape(-1, 8)
    assert grouped < 0.8 * lengths[rand].max(1).sum() * 8
    # another epoch, another order and other pairs
    assert not np.array_equal(data.plan(1)[0], a_start)


def test_packed_pairs(small):
    corpus, docs, vocab, shard = small
    seq = 64
    data = PretrainData(shard, seq, batch_size=8, micro_batches=2, seed=5, cls_id=vocab.cls_id,
                        sep_id=vocab.sep_id, segments=(1, 2), pairs="packed")
    plan = data.plan(0)
    a_start, la, b_start, lb, is_next, batches = plan
    _check_rows(data, vocab, data.step_batches(0, 2), batches[2], plan)
    a = np.array([_sentence_at(data, x) for x in a_start])
    assert (data.offs[a] == a_start).all()  # A starts at a sentence
    # a true B starts right after A's last sentence, in A's document
    nxt = np.nonzero(is_next & (la > 0))[0]
    b = np.array([_sentence_at(data, x) for x in b_start[nxt]])
    assert (data.offs[b] == b_start[nxt]).all() and (data.doc_of[b] == data.doc_of[a[nxt]]).all()
    a_full = data.offs[b] - a_start[nxt]  # A's untruncated length: whole sentences up to B
    assert (la[nxt] <= a_full).all()
    neg = np.nonzero(~is_next)[0]
    bn = np.array([_sentence_at(data, x) for x in b_start[neg]])
    assert (data.doc_of[bn] != data.doc_of[a[neg]]).all()
    # packing fills the sequences: more tokens per example than single-sentence pairs
    sent = PretrainData(shard, seq, 8, 2, seed=5, cls_id=vocab.cls_id, sep_id=vocab.sep_id)
    sp = sent.plan(0)
    assert (la + lb).mean() > max(1.3 * (sp[1] + sp[3]).mean(), 0.85 * (seq - 3))
    assert (la + lb + 3 <= seq).all()
    # every epoch the same chunks (so steps per epoch stay fixed), split at other boundaries
    p1 = data.plan(1)
    assert len(p1[0]) == len(a_start) and not np.array_equal(np.sort(p1[1]), np.sort(la))
    with pytest.raises(ValueError, match="pairs"):
        PretrainData(shard, seq, 8, pairs="chunks")


def test_heldout_documents():
    held = heldout_documents(1172, 0.05)
    assert held.sum() == 58  # floor(1172 * 0.05)
    gaps = np.diff(np.nonzero(held)[0])
    assert gaps.min() >= 19 and gaps.max() <= 21  # spread evenly, not a block at one end
    assert not heldout_documents(10, 0.0).any() and not heldout_documents(10, 0.05).any()
    with pytest.raises(ValueError, match="fraction"):
        heldout_documents(10, 1.0)


@pytest.mark.parametrize("pairs", ["sentence", "packed"])
def test_heldout_split_keeps_documents_apart(small, pairs):
    """Training pairs, including the random B of negative pairs, come only from training documents;
    the held-out set only from held-out documents; together they cover the corpus."""
    corpus, docs, vocab, shard = small
    held = heldout_documents(shard.n_documents, 0.2)
    train = PretrainData(shard, 64, 4, seed=1, cls_id=vocab.cls_id, sep_id=vocab.sep_id, pairs=pairs,
                         documents=~held)
    test = PretrainData(shard, 64, 1, seed=0, cls_id=vocab.cls_id, sep_id=vocab.sep_id, pairs=pairs,
                        documents=held)
    full = PretrainData(shard, 64, 4, seed=1, cls_id=vocab.cls_id, sep_id=vocab.sep_id, pairs=pairs)
    assert train.n_examples + test.n_examples == full.n_examples
    for data, allowed in ((train, ~held), (test, held)):
        for epoch in range(3):
            a_start, la, b_start, lb, is_next, _ = data.plan(epoch)
            for starts in (a_start, b_start):
                sent = np.searchsorted(data.offs, starts, side="right") - 1
                assert allowed[data.doc_of[sent]].all()
    rows = sum(len(b["input_ids"]) for b in test.all_batches(16))
    assert rows == test.n_examples  # every held-out pair, none left over
    with pytest.raises(ValueError, match="documents has shape"):
        PretrainData(shard, 64, 4, documents=held[:-1])


@pytest.mark.parametrize("device", DEVICES)
def test_masking_on_batch(small, device):
    corpus, docs, vocab, shard = small
    data = PretrainData(shard, 64, batch_size=32, micro_batches=1, seed=0, cls_id=vocab.cls_id,
                        sep_id=vocab.sep_id)
    special = (vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id)
    chosen, candidates = 0, 0
    for step in range(4):
        mb = data.step_batches(0, step)[0]
        ids = torch.from_numpy(mb["input_ids"]).to(device)
        gen = torch.Generator(device=device).manual_seed(step)
        masked, labels, pos = mlm_mask(ids, len(vocab), vocab.mask_id, vocab.pad_id, special,
                                       generator=gen, return_positions=True)
        assert masked.device.type == device and pos.device.type == device
        flat_ids, flat_lab, flat_out = ids.view(-1), labels.view(-1), masked.view(-1)
        is_special = torch.zeros(len(vocab), dtype=torch.bool, device=device)
        is_special[[vocab.pad_id, *special]] = True
        assert not is_special[flat_ids[pos]].any()
        assert torch.equal(flat_lab[pos], flat_ids[pos])
        keep = torch.ones_like(flat_ids, dtype=torch.bool)
        keep[pos] = False
        assert torch.equal(flat_out[keep], flat_ids[keep])
        assert (flat_lab[keep] == 0).all()
        chosen += pos.numel()
        candidates += int((~is_special[flat_ids]).sum())
        again = mlm_mask(ids, len(vocab), vocab.mask_id, vocab.pad_id, special,
                         generator=torch.Generator(device=device).manual_seed(step), return_positions=True)
        assert torch.equal(again[0], masked) and torch.equal(again[2], pos)
    assert 0.12 < chosen / candidates < 0.18


def test_vocab_training_specials(small):
    vocab = small[2]
    assert vocab.tokens[:5] == list(SPECIALS) and len(vocab) <= 1500
    round_trip = Vocab.from_dict(vocab.to_dict())
    assert round_trip.fingerprint() == vocab.fingerprint()
