"""Build fastbert's demo data: a generated corpus whose fine-tuning tasks need what only its
unlabelled text says.

    python tools/build_world.py [--out fastbert/data/world] [--seed 0]

Why a generated corpus. BERT's lesson is that masked-LM pretraining on unlabelled text gives a better
start for tasks with few labels. The demo must show it on a 2-core CPU in at most 10 minutes of
pretraining. On the real prose that ships with fastbert (the standard library's docstrings,
fastbert/data/corpus.txt.gz) a tiny model's masked LM stays on its unigram plateau in that budget and
fine-tuning from it did not beat fine-tuning from scratch (fastbert/train/SWEEP.md). This corpus is
built so that the knowledge a task needs is in the unlabelled text and not in the labelled rows, which
is the situation pretraining is for:

- 216 everyday nouns, 36 in each of six kinds (animal, food, instrument, tool, vehicle, plant).
- The corpus (corpus.txt.gz): one document per (noun, draw), ten per noun: sentences that say what
  the noun does or what is done with it, where, and what it is like ("the otter swam across the
  river .", "the violin was tuned before the show ."), some of them naming another noun of the same
  kind, with neutral sentences mixed in. No sentence states a kind by name.
- The tasks use neutral sentences only ("maria talked about the otter for a long time ."), which say
  nothing about the noun's kind. Their training rows name 12 nouns of each kind; their held-out rows
  name the other 24. A model fine-tuned from scratch has never seen a held-out noun and can only
  guess (chance is 1/6); a pretrained one has read about every noun.
  classify_train.tsv / classify_test.tsv  sentence -> kind of the noun it names
  tags_train.txt / tags_test.txt          CoNLL `word TAG`: each noun tagged with its kind, every
                                          other word O (one or two nouns per sentence)
Everything is deterministic given --seed; nothing is downloaded.
"""

import argparse
import gzip
import json
import os
import random

# the six kinds: 36 nouns each, what one does or what is done with it, where, what it is like (data:
# tools/world_kinds.json, in the order the builder draws from it)
KINDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "world_kinds.json")
with open(KINDS_FILE, encoding="utf-8") as _f:
    KINDS = json.load(_f)

NAMES = ("maria james anna peter lucy tom sara david emma leo nina oscar julia ben clara sam olga "
         "hugo alice ivan rosa felix mia karl lena paul ines omar eva noah").split()

# sentences that say what a noun of this kind is like ({e}: the noun, {f}: another of the same kind)
TELLING = [
    "the {e} {does} .",
    "yesterday the {e} {does} .",
    "{n} said the {e} {does} .",
    "at the {place} , the {e} {does} .",
    "{n} saw a {like} {e} at the {place} .",
    "the {e} was very {like} .",
    "{n} found the {e} at the {place} .",
    "like the {f} , the {e} {does} .",
    "the {e} and the {f} were both {like} .",
    "{n} prefers the {e} to the {f} .",
    "a {like} {e} {does} .",
    # the noun is the only cue: the masked LM must learn what the noun is to fill these
    "everyone at the {place} knew the {e} .",
    "the {e} was {like} .",
    "{n} said the {e} was {like} .",
    "it was a {like} {e} .",
    "{n} went to the {place} for the {e} .",
]
# sentences that say nothing about the noun's kind (in the corpus, and the only ones of the tasks)
NEUTRAL = [
    "{n} talked about the {e} for a long time .",
    "there was a {e} in the story .",
    "{n} thought about the {e} again .",
    "the book had a picture of a {e} .",
    "{n} wrote the word {e} on the board .",
    "we spoke about the {e} yesterday .",
    "{n} asked {m} about the {e} .",
    "the {e} was mentioned twice in the letter .",
    "{n} remembered the {e} from last year .",
    "{n} and {m} argued about the {e} .",
    "nobody knew much about the {e} .",
    "{n} drew a {e} in the notebook .",
]
NEUTRAL_TWO = [  # token task: two nouns
    "{n} talked about the {e} and the {f} .",
    "the story had a {e} and a {f} in it .",
    "{n} compared the {e} with the {f} .",
    "we spoke about the {e} and then about the {f} .",
    "{n} drew a {e} next to a {f} .",
    "the letter mentioned a {e} and a {f} .",
]
TRAIN_NOUNS = 12  # of the 36 per kind; the held-out rows name the other 24


def nouns(kind):
    return KINDS[kind]["nouns"].split()


def fill(rng, template, kind, e, f=None):
    k = KINDS[kind]
    n, m = rng.sample(NAMES, 2)
    return template.format(e=e, f=f or e, n=n, m=m, does=rng.choice(k["does"]),
                           place=rng.choice(k["places"]), like=rng.choice(k["like"]))


def document(rng, kind, e):
    others = [x for x in nouns(kind) if x != e]
    sents = []
    for _ in range(rng.randint(6, 10)):
        if rng.random() < 0.15:
            sents.append(fill(rng, rng.choice(NEUTRAL), kind, e))
        else:
            sents.append(fill(rng, rng.choice(TELLING), kind, e, rng.choice(others)))
    return sents


def split_nouns(rng):
    """{kind: (training nouns, held-out nouns)}."""
    out = {}
    for kind in KINDS:
        ns = nouns(kind)[:]
        rng.shuffle(ns)
        out[kind] = (sorted(ns[:TRAIN_NOUNS]), sorted(ns[TRAIN_NOUNS:]))
    return out


def classify_rows(rng, pool, per_noun):
    rows = []
    for kind, ns in pool.items():
        for e in ns:
            for t in rng.sample(NEUTRAL, per_noun):
                rows.append((fill(rng, t, kind, e), kind))
    rng.shuffle(rows)
    return rows


def tag_sentences(rng, pool, count):
    flat = [(kind, e) for kind, ns in pool.items() for e in ns]
    out = []
    for _ in range(count):
        (k1, e1), (k2, e2) = rng.sample(flat, 2)
        if rng.random() < 0.5:
            words = fill(rng, rng.choice(NEUTRAL), k1, e1).split()
            tags = {e1: k1}
        else:
            words = rng.choice(NEUTRAL_TWO).format(e=e1, f=e2, n=rng.choice(NAMES)).split()
            tags = {e1: k1, e2: k2}
        out.append([(w, tags[w].upper() if w in tags else "O") for w in words])
    return out


# the file formats fastbert's data sets share (tools/build_corpus.py writes its files with these too)
def write_corpus(path, docs):
    """corpus.txt.gz: one sentence a line, a blank line between documents (gzip without a timestamp)."""
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write("\n\n".join("\n".join(d) for d in docs).encode() + b"\n")


def corpus_summary(docs):
    """"D documents, S sentences, W words" of a corpus (documents as lists of sentences)."""
    words = sum(len(s.split()) for d in docs for s in d)
    return f"{len(docs)} documents, {sum(map(len, docs))} sentences, {words} words"


def write_tsv(path, rows):
    """Sequence classification: a `text<TAB>label` header row, then one (text, label) a line."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\tlabel\n")
        f.writelines(f"{s}\t{k}\n" for s, k in rows)


def write_tags(path, sents):
    """Token classification (CoNLL): `word TAG` a line, a blank line after each sentence."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join("\n".join(f"{w} {t}" for w, t in s) + "\n" for s in sents))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("fastbert", "data", "world"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-per-noun", type=int, default=10)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    for kind in KINDS:
        ns = nouns(kind)
        assert len(ns) == len(set(ns)) == 36, (kind, len(ns))
    every = [e for kind in KINDS for e in nouns(kind)]
    assert len(every) == len(set(every)), "a noun is in two kinds"
    docs = [document(rng, kind, e) for kind in KINDS for e in nouns(kind)
            for _ in range(args.docs_per_noun)]
    rng.shuffle(docs)
    os.makedirs(args.out, exist_ok=True)
    write_corpus(os.path.join(args.out, "corpus.txt.gz"), docs)
    split = split_nouns(rng)
    train = {k: v[0] for k, v in split.items()}
    test = {k: v[1] for k, v in split.items()}
    for name, rows in (("classify_train.tsv", classify_rows(rng, train, 8)),
                       ("classify_test.tsv", classify_rows(rng, test, 4))):
        write_tsv(os.path.join(args.out, name), rows)
    write_tags(os.path.join(args.out, "tags_train.txt"), tag_sentences(rng, train, 600))
    write_tags(os.path.join(args.out, "tags_test.txt"), tag_sentences(rng, test, 600))
    print(f"{corpus_summary(docs)}; classification 576 training rows (12 nouns per kind), 576 held-out "
          f"rows (24 other nouns per kind); tagging 600 + 600 sentences")


if __name__ == "__main__":
    main()
