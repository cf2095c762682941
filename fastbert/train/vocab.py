"""Vocabularies: train a WordPiece vocabulary, or read a BERT vocab.txt or a bert_pytorch WordVocab pickle.

Every vocabulary becomes a `Vocab`: the token list (id = position), the ids of the special tokens
[PAD] (always 0), [UNK], [CLS], [SEP], [MASK], and a `tokenizers.Tokenizer` that turns text into ids
(WordPiece with BERT's normaliser for vocab.txt; whitespace words for a bert_pytorch pickle, whose
<pad>/<unk>/<sos>/<eos>/<mask> are read as [PAD]/[UNK]/[CLS]/[SEP]/[MASK]).
"""

import hashlib
import os
import pickle

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BERT_PYTORCH_SPECIALS = {"<pad>": "[PAD]", "<unk>": "[UNK]", "<sos>": "[CLS]", "<eos>": "[SEP]",
                          "<mask>": "[MASK]"}


class VocabError(ValueError):
    pass


class Vocab:
    """tokens: list[str]; kind: "wordpiece" (BERT vocab.txt rules) or "word" (whitespace words)."""

    def __init__(self, tokens, kind="wordpiece", lowercase=True):
        self.tokens = list(tokens)
        self.kind = kind
        self.lowercase = lowercase
        index = {}
        for i, t in enumerate(self.tokens):
            index.setdefault(t, i)
        missing = [s for s in SPECIALS if s not in index]
        if missing:
            raise VocabError(f"vocabulary lacks the special token(s) {missing}; a fastbert vocabulary "
                             f"needs all of {list(SPECIALS)} with [PAD] at id 0")
        if index["[PAD]"] != 0:
            raise VocabError(f"[PAD] must have id 0, it has id {index['[PAD]']}")
        self.index = index
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[s] for s in SPECIALS)
        self._tokenizer = None

    def __len__(self):
        return len(self.tokens)

    @property
    def special_ids(self):
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def fingerprint(self):
        h = hashlib.sha256(f"{self.kind}|{self.lowercase}|".encode())
        h.update("\n".join(self.tokens).encode())
        return h.hexdigest()[:16]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

            vocab = {t: i for t, i in self.index.items()}
            if self.kind == "wordpiece":
                tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
                tok.normalizer = normalizers.BertNormalizer(lowercase=self.lowercase)
                tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            else:
                tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
                tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            self._tokenizer = tok
        return self._tokenizer

    def encode_batch(self, texts):
        """list[str] -> list[list[int]] (no special tokens added)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_words(self, words):
        """Pieces of each word: list[str] -> list[list[int]] (for token classification)."""
        enc = self.tokenizer.encode_batch([[w] for w in words], is_pretokenized=True,
                                          add_special_tokens=False)
        return [e.ids or [self.unk_id] for e in enc]

    def save(self, path):
        """Write vocab.txt (one token per line) atomically."""
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(self.tokens) + "\n")
        os.replace(tmp, path)

    def to_dict(self):
        return {"tokens": self.tokens, "kind": self.kind, "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, d):
        return cls(d["tokens"], d["kind"], d["lowercase"])


class _Stub:
    """Stands for any class in a pickle (bert_pytorch's WordVocab), so reading it needs no import."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in ("collections",) and name in ("Counter", "OrderedDict", "defaultdict"):
            return super().find_class(module, name)
        if module == "builtins" and name in ("dict", "list", "set", "tuple", "int", "str"):
            return super().find_class(module, name)
        return _Stub


def read_vocab(path, lowercase=True):
    """A Vocab from vocab.txt (one token per line) or a bert_pytorch WordVocab pickle."""
    if not os.path.isfile(path):
        raise VocabError(f"vocabulary file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # pickle protocol 2+
        with open(path, "rb") as f:
            try:
                obj = _StubUnpickler(f).load()
            except Exception as e:  # noqa: BLE001
                raise VocabError(f"{path!r} is not a readable bert_pytorch vocab pickle: {e}") from e
        itos = getattr(obj, "itos", None)
        if not isinstance(itos, list) or not itos:
            raise VocabError(f"{path!r}: the pickle has no token list (itos); is it a bert_pytorch "
                             "WordVocab?")
        return Vocab([_BERT_PYTORCH_SPECIALS.get(t, t) for t in itos], kind="word", lowercase=False)
    try:
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as e:
        raise VocabError(f"vocabulary file {path!r} is neither a bert_pytorch pickle nor UTF-8 text "
                         f"(byte 0x{e.object[e.start]:02x} at offset {e.start} is {e.reason})") from None
    while tokens and tokens[-1] == "":
        tokens.pop()
    if not tokens:
        raise VocabError(f"vocabulary file {path!r} is empty")
    return Vocab(tokens, kind="wordpiece", lowercase=lowercase)


def train_vocab(files, vocab_size=8000, min_frequency=2, lowercase=True, progress=True):
    """Train a WordPiece vocabulary on text files (tab and gzip handled) with `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from .data import iter_lines

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIALS), show_progress=progress)

    def lines():
        for path in files:
            for line in iter_lines(path):
                for part in line.split("\t"):
                    if part.strip():
                        yield part

    tok.train_from_iterator(lines(), trainer=trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return Vocab(tokens, kind="wordpiece", lowercase=lowercase)
