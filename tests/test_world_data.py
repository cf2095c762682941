"""The demo's embedded data (fastbert/data/world, tools/build_world.py): reproducible, and built so that
the held-out rows need what only the unlabelled corpus says."""

import gzip
import importlib.util
import os

from fastbert.train import finetune, pretrain

ROOT = os.path.join(os.path.dirname(__file__), "..")
WORLD = os.path.join(ROOT, "fastbert", "data", "world")


def _builder():
    path = os.path.join(ROOT, "tools", "build_world.py")
    spec = importlib.util.spec_from_file_location("build_world", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nouns_of_sequence_rows(rows, nouns):
    out = set()
    for text, _, _ in rows:
        named = [w for w in text.split() if w in nouns]
        assert len(named) == 1, text
        out.add(named[0])
    return out


def test_shipped_files_are_what_the_builder_makes(tmp_path):
    _builder().main(["--out", str(tmp_path)])
    for name in sorted(os.listdir(WORLD)):
        assert (tmp_path / name).read_bytes() == open(os.path.join(WORLD, name), "rb").read(), name
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(WORLD))
    assert pretrain.DEFAULT_CORPUS == os.path.join(finetune.WORLD, "corpus.txt.gz")


def test_held_out_nouns_are_unseen_in_training_rows_but_in_the_corpus():
    bw = _builder()
    kind_of = {e: kind for kind in bw.KINDS for e in bw.nouns(kind)}
    nouns = set(kind_of)
    seq_train = finetune.read_sequence_file(finetune.DEFAULT_DATA["sequence"][0])
    seq_test = finetune.read_sequence_file(finetune.DEFAULT_DATA["sequence"][1])
    tag_train = finetune.read_token_file(finetune.DEFAULT_DATA["token"][0])
    tag_test = finetune.read_token_file(finetune.DEFAULT_DATA["token"][1])
    train_nouns = _nouns_of_sequence_rows(seq_train, nouns)
    test_nouns = _nouns_of_sequence_rows(seq_test, nouns)
    assert len(train_nouns) == 6 * bw.TRAIN_NOUNS and len(test_nouns) == 6 * (36 - bw.TRAIN_NOUNS)
    assert not train_nouns & test_nouns
    for text, _, label in seq_train + seq_test:  # the label is the named noun's kind
        assert label == kind_of[next(w for w in text.split() if w in nouns)]
    for sents, allowed in ((tag_train, train_nouns), (tag_test, test_nouns)):
        for words, tags in sents:
            for w, t in zip(words, tags):
                assert t == (kind_of[w].upper() if w in nouns else "O"), (w, t)
                assert w not in nouns or w in allowed, w
    # the task sentences are neutral: only the words of the templates every kind shares, and names
    neutral_words = {w for t in bw.NEUTRAL + bw.NEUTRAL_TWO for w in t.split()}
    task_words = {w for text, _, _ in seq_train + seq_test for w in text.split()}
    task_words |= {w for words, _ in tag_train + tag_test for w in words}
    assert task_words - nouns <= neutral_words | set(bw.NAMES)
    # every noun is written about in the unlabelled corpus
    with gzip.open(pretrain.DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        corpus_words = set(f.read().split())
    assert nouns <= corpus_words
