"""Pretraining data: corpus parsing, memory-mapped token shards and length-grouped NSP batches.

Corpus formats
  "tab"    bert_pytorch's: `sentence A \\t sentence B` per line; each line is a two-sentence document.
  "plain"  one sentence per line, a blank line between documents.
  "auto"   "tab" when the first non-empty line holds a tab, else "plain".
Files ending in .gz are read through gzip. Text is UTF-8: check_text_file refuses, naming the file
and what it found, a binary file (a known format's signature, or a NUL byte), text in another
encoding, a file named .gz that is not gzip-compressed and a compressed one that is not named .gz;
a bad byte or a damaged gzip stream later in the file is a CorpusError at its line.

Shard (a directory, written once, then memory-mapped; a corpus larger than RAM streams from disk)
  tokens.bin        all sentences' token ids back to back, uint16 (int32 when the vocab needs it)
  sent_offsets.npy  int64 [n_sentences + 1]: sentence s is tokens[sent_offsets[s]:sent_offsets[s+1]]
  doc_offsets.npy   int64 [n_documents + 1]: document d holds sentences doc_offsets[d]:doc_offsets[d+1]
  meta.json         counts, dtype, format, vocab fingerprint, source file size and mtime
Tokenizing runs in chunks through the Rust tokenizer (encode_batch), with a tqdm bar over the bytes.

Examples (PretrainData)
  pairs="sentence" (bert_pytorch's; default for the tab format): A is a sentence that has a successor
  in its document. pairs="packed" (Google BERT's; default for plain text): A is the first part of a
  chunk of consecutive sentences of about seq_len - 3 tokens, split at a random sentence boundary.
  Each epoch (seeded by (seed, epoch)) shuffles the examples and draws is_next with probability 1/2:
  B is what follows A in its document when is_next, else sentences of another document. Pairs are
  truncated longest-first to seq_len - 3 and laid out as [CLS] A [SEP] B [SEP] with segments
  (seg_a, seg_b), padding 0.
  Batches group examples of similar length (sort inside windows of `group_window` global batches,
  then shuffle the batches), and each batch is padded only to its longest row (rounded up to 8).
  A global batch (one optimizer step) is `micro_batches` micro-batches of `batch_size` rows; with
  torchrun each rank takes its own consecutive micro-batches, so the examples of a step do not
  depend on the number of processes. Collation is vectorised numpy; masking happens later on the
  batch's device (fastbert.ops.mlm_mask).
  `documents` restricts a PretrainData to some documents (examples and negative B spans alike):
  pretraining holds out `heldout_documents(n, fraction)` and evaluates on them (all_batches).
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import zlib

import numpy as np


class CorpusError(ValueError):
    pass


# signatures of binary formats a corpus path may point at by mistake
_SIGNATURES = ((b"\x7fELF", "an ELF executable or shared library"), (b"\x89PNG", "a PNG image"),
               (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a zip archive (or a torch checkpoint)"),
               (b"%PDF", "a PDF document"), (b"\xfd7zXZ\x00", "xz-compressed data"),
               (b"BZh9", "bzip2-compressed data"), (b"\x93NUMPY", "a numpy array file"),
               (b"\x80\x02", "a Python pickle"), (b"\x80\x04", "a Python pickle"),
               (b"\x80\x05", "a Python pickle"), (b"SQLite format 3", "an SQLite database"))
_GZIP = b"\x1f\x8b"
_BAD_GZIP = (gzip.BadGzipFile, EOFError, zlib.error)


def _read_head(path, size):
    """The first `size` bytes of the file's text (decompressed when it is named .gz), checking the
    gzip naming both ways."""
    with open(path, "rb") as f:
        raw = f.read(size)
    gz = path.endswith(".gz")
    if gz and not raw.startswith(_GZIP):
        raise CorpusError(f"{path!r} is named .gz but is not gzip-compressed (it starts with {raw[:12]!r}); "
                          f"if it is plain text, rename it without .gz")
    if not gz and raw.startswith(_GZIP):
        raise CorpusError(f"{path!r} is gzip-compressed data but its name does not end in .gz; rename it "
                          f"to {os.path.basename(path)}.gz")
    if not gz:
        return raw
    try:
        with gzip.open(path, "rb") as f:
            return f.read(size)
    except _BAD_GZIP as e:
        raise CorpusError(f"{path!r} is a damaged gzip file ({type(e).__name__}: {e})") from e


def check_text_file(path, what="corpus file", head=1 << 16):
    """Raise CorpusError naming the file and what it holds unless its first `head` bytes are UTF-8
    text (see the module docstring)."""
    if not os.path.isfile(path):
        raise CorpusError(f"{what} {path!r} does not exist")
    data = _read_head(path, head)
    for magic, kind in _SIGNATURES:
        if data.startswith(magic):
            raise CorpusError(f"{what} {path!r} is not text: it is {kind} (it starts with {data[:8]!r})")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{what} {path!r} is not text: it has a NUL byte at offset {nul} (a binary file?)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(data) - 3 or e.reason != "unexpected end of data":  # not a character cut by `head`
            line = data.count(b"\n", 0, e.start) + 1
            raise CorpusError(f"{what} {path!r} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset "
                              f"{e.start} (line {line}) is {e.reason}; convert it to UTF-8 (for example "
                              f"iconv -f latin1 -t utf-8)") from None


def _open_text(path):
    if not os.path.isfile(path):
        raise CorpusError(f"corpus file {path!r} does not exist")
    raw = open(path, "rb")  # noqa: SIM115
    f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    return raw, io.TextIOWrapper(f, encoding="utf-8", errors="strict", newline=None)


@contextlib.contextmanager
def _reading(path, where):
    """Turn a decoding or decompression error while reading `path` into a CorpusError at where()."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path!r} is not UTF-8 text near line {where()}: {e.reason}; convert it to "
                          f"UTF-8") from None
    except _BAD_GZIP as e:
        raise CorpusError(f"{path!r} is a damaged gzip file near line {where()} ({type(e).__name__}: "
                          f"{e})") from None


def iter_lines(path):
    """Lines of a text file (gzip when it ends in .gz) without their newline."""
    raw, f = _open_text(path)
    n = [0]
    with raw, f, _reading(path, lambda: n[0] + 1):
        for line in f:
            n[0] += 1
            yield line.rstrip("\n").rstrip("\r")


def detect_format(path):
    for line in iter_lines(path):
        if line.strip():
            return "tab" if "\t" in line else "plain"
    raise CorpusError(f"corpus file {path!r} is empty")


def iter_documents(path, fmt="auto", _progress=None):
    """Documents of a corpus as lists of sentences (see the module docstring for the formats)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in ("tab", "plain"):
        raise CorpusError(f"corpus format {fmt!r}; expected 'tab', 'plain' or 'auto'")
    raw, f = _open_text(path)
    lineno = 0
    with raw, f, _reading(path, lambda: lineno + 1):
        doc = []
        for lineno, line in enumerate(f, 1):  # noqa: B007 (read by _reading's message)
            if _progress is not None and lineno % 4096 == 0:
                _progress(raw.tell())
            line = line.rstrip("\n").rstrip("\r")
            if fmt == "tab":
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise CorpusError(f"{path}:{lineno}: no tab in this line; the 'tab' format needs "
                                      f"`sentence A<TAB>sentence B` on every line: {line[:80]!r}")
                a, b = line.split("\t", 2)[:2]
                yield [a, b]
            elif line.strip():
                doc.append(line)
            elif doc:
                yield doc
                doc = []
        if doc:
            yield doc
        if _progress is not None:
            _progress(raw.tell())


def _source_key(path, fmt, vocab):
    st = os.stat(path)
    h = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{fmt}|"
                       f"{vocab.fingerprint()}".encode())
    return h.hexdigest()[:16]


def build_shard(corpus, vocab, out_dir, fmt="auto", chunk_sentences=8192, progress=True):
    """Tokenize `corpus` once into a shard directory `out_dir` (written to a temp dir, then renamed)."""
    from tqdm import tqdm

    if fmt == "auto":
        fmt = detect_format(corpus)
    dtype = np.uint16 if len(vocab) <= 65535 else np.int32
    tmp = out_dir.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    size = os.path.getsize(corpus)
    # progress=True shows the bar on a terminal (tqdm's disable=None), False never
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True)
    done = [0]

    def advance(pos):
        bar.update(pos - done[0])
        done[0] = pos

    sent_lens, doc_sizes, pending = [], [], []
    n_tokens = 0
    with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
        def flush():
            nonlocal n_tokens
            if not pending:
                return
            ids = vocab.encode_batch(pending)
            sent_lens.extend(len(x) for x in ids)
            flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=sum(map(len, ids)))
            out.write(flat.tobytes())
            n_tokens += flat.size
            pending.clear()

        for doc in iter_documents(corpus, fmt, _progress=advance):
            pending.extend(doc)
            doc_sizes.append(len(doc))
            if len(pending) >= chunk_sentences:
                flush()
        flush()
    bar.close()
    if not doc_sizes or n_tokens == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorpusError(f"corpus file {corpus!r} has no text")
    for name, sizes in (("sent_offsets.npy", sent_lens), ("doc_offsets.npy", doc_sizes)):
        np.save(os.path.join(tmp, name), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    meta = {"format": fmt, "dtype": np.dtype(dtype).name, "n_tokens": int(n_tokens),
            "n_sentences": len(sent_lens), "n_documents": len(doc_sizes), "vocab": vocab.fingerprint(),
            "vocab_size": len(vocab), "source": os.path.abspath(corpus)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return Shard(out_dir)


def cached_shard(corpus, vocab, cache_dir, fmt="auto", progress=True):
    """The shard of (corpus, format, vocab) under cache_dir, tokenizing only when it is not there."""
    if fmt == "auto":
        fmt = detect_format(corpus)
    path = os.path.join(cache_dir, "shard-" + _source_key(corpus, fmt, vocab))
    if os.path.isfile(os.path.join(path, "meta.json")):
        return Shard(path)
    os.makedirs(cache_dir, exist_ok=True)
    return build_shard(corpus, vocab, path, fmt, progress=progress)


class Shard:
    """A tokenized corpus on disk, memory-mapped."""

    def __init__(self, path):
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.path = path
        n = self.meta["n_tokens"]
        self.tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=self.meta["dtype"], mode="r",
                                shape=(n,))
        self.sent_offsets = np.load(os.path.join(path, "sent_offsets.npy"), mmap_mode="r")
        self.doc_offsets = np.load(os.path.join(path, "doc_offsets.npy"), mmap_mode="r")

    @property
    def n_sentences(self):
        return len(self.sent_offsets) - 1

    @property
    def n_documents(self):
        return len(self.doc_offsets) - 1

    def sentence(self, i):
        return np.asarray(self.tokens[self.sent_offsets[i]:self.sent_offsets[i + 1]])

    def document(self, d):
        return [self.sentence(s) for s in range(self.doc_offsets[d], self.doc_offsets[d + 1])]


def heldout_documents(n_documents, fraction):
    """bool [n_documents]: floor(n_documents * fraction) documents spread evenly over the corpus
    (document d when floor((d + 1) * fraction) > floor(d * fraction)); the same for every seed."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    d = np.arange(n_documents)
    return np.floor((d + 1) * fraction) > np.floor(d * fraction)


def truncate_pair(la, lb, total):
    """Longest-first truncation of two lengths to at most `total` together (vectorised)."""
    la2 = np.minimum(la, np.maximum(total // 2, total - lb))
    lb2 = np.minimum(lb, total - la2)
    return la2, lb2


class PretrainData:
    """NSP example pairs from a Shard, grouped by length into global batches (see module docstring).

    pairs="sentence": A is one sentence and B the next one (bert_pytorch's examples; the default for
    its tab format, where each line is such a pair). pairs="packed": each document is cut once into
    chunks of consecutive sentences of about seq_len - 3 tokens; every epoch splits each chunk at a
    random sentence boundary into A and B (B = the rest of the chunk when is_next, else a run of
    sentences from another document filling the remaining length), as Google's BERT builds its
    examples, so sequences are long and few tokens are padding.
    A and B are spans of tokens (sentences of a document are contiguous in the shard).
    nsp=False (MLM only, as ModernBERT): pairs="packed" examples are whole chunks, `[CLS] chunk [SEP]`
    (B empty, every chunk kept, one-sentence chunks too); pairs="sentence" keeps each line's A and B.
    is_next is 1 for every example then, and no negative pairs are drawn.
    """

    def __init__(self, shard, seq_len, batch_size, micro_batches=1, seed=0, cls_id=2, sep_id=3,
                 segments=(1, 2), group_window=64, pairs="sentence", documents=None, nsp=True):
        """documents: bool [n_documents], the documents this set draws from, both its examples and
        the random B sentences of its negative pairs (None: all)."""
        if seq_len < 8:
            raise ValueError(f"seq_len={seq_len} is too small (at least 8)")
        if pairs not in ("sentence", "packed"):
            raise ValueError(f"pairs={pairs!r}; expected 'sentence' or 'packed'")
        self.shard, self.seq_len, self.batch_size = shard, seq_len, batch_size
        self.micro_batches, self.seed, self.pairs, self.nsp = micro_batches, seed, pairs, nsp
        self.chunks = pairs == "packed" and not nsp  # whole chunks, no B
        self.cls_id, self.sep_id, self.segments, self.group_window = cls_id, sep_id, segments, group_window
        self.offs = np.asarray(shard.sent_offsets)  # [n_sent + 1] token offsets
        self.lens = np.diff(self.offs)
        docs = np.asarray(shard.doc_offsets)
        sizes = np.diff(docs)
        self.doc_of = np.repeat(np.arange(len(sizes)), sizes)  # [n_sent] document of each sentence
        self.doc_end = docs[1:][self.doc_of]  # [n_sent] first sentence after its document
        has_next = np.arange(shard.n_sentences) + 1 < self.doc_end
        if documents is None:
            documents = np.ones(len(sizes), dtype=bool)
        documents = np.asarray(documents, dtype=bool)
        if documents.shape != (len(sizes),):
            raise ValueError(f"documents has shape {documents.shape}; expected ({len(sizes)},)")
        allowed = documents[self.doc_of]  # [n_sent]
        self.pool = np.nonzero(allowed)[0]  # sentences that negative B spans may start at
        self.n_docs_used = int(documents.sum())
        if pairs == "sentence":
            self.first = np.nonzero(has_next)[0]  # A's sentence
            self.count = np.ones_like(self.first)
        else:
            # fixed chunks: a new chunk starts where the in-document token offset crosses a multiple
            # of the pair budget, or where a document starts
            budget = seq_len - (2 if self.chunks else 3)
            local = self.offs[:-1] - self.offs[docs[:-1]][self.doc_of]
            key = local // budget
            new = np.ones(shard.n_sentences, dtype=bool)
            new[1:] = (key[1:] != key[:-1]) | (self.doc_of[1:] != self.doc_of[:-1])
            first = np.nonzero(new)[0]
            count = np.diff(np.append(first, shard.n_sentences))
            keep = (count >= 2) | has_next[first]  # a one-sentence chunk borrows the next sentence
            if self.chunks:
                keep[:] = True  # no B to find: every chunk is an example
            self.first, self.count = first[keep], count[keep]
        inside = allowed[self.first]
        self.first, self.count = self.first[inside], self.count[inside]
        if len(self.first) == 0:
            what = "sentence" if self.chunks else "document with two sentences"
            raise CorpusError(f"the corpus has no {what} ({shard.meta['source']})")
        self.n_examples = len(self.first)
        self.global_batch = batch_size * micro_batches
        self.steps_per_epoch = self.n_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise CorpusError(f"the corpus makes {self.n_examples} sentence pairs, fewer than one global "
                              f"batch ({self.global_batch} = batch {batch_size} x {micro_batches} "
                              f"micro-batches); use a smaller batch")

    def _random_other(self, rng, a_sent):
        """A random sentence of the pool (this set's documents) in another document than each of a_sent's."""
        pool = self.pool
        total = len(pool)
        rand = pool[rng.integers(0, total, size=len(a_sent))]
        if self.n_docs_used > 1:
            for _ in range(100):  # resample draws that fell into A's own document
                bad = self.doc_of[rand] == self.doc_of[a_sent]
                if not bad.any():
                    break
                rand[bad] = pool[rng.integers(0, total, size=int(bad.sum()))]
            # whatever is still in A's document moves to the start of the next document of the pool
            bad = self.doc_of[rand] == self.doc_of[a_sent]
            rand[bad] = pool[np.searchsorted(pool, self.doc_end[rand[bad]]) % total]
        else:  # one document: a random sentence that is not A's successor
            rand = np.where(rand == a_sent + 1, pool[(np.searchsorted(pool, rand) + 2) % total], rand)
        return rand

    def _epoch_plan(self, epoch):
        """Token spans (a_start, a_len, b_start, b_len), is_next, and the order by global batch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_examples)
        first, count = self.first[order], self.count[order]
        n = len(first)
        is_next = rng.random(n) < 0.5
        if not self.nsp:
            is_next[:] = True
        if self.chunks:  # [CLS] chunk [SEP]: A the whole chunk, no B
            a_start = self.offs[first]
            la = np.minimum(self.offs[first + count] - a_start, self.seq_len - 2)
            lb = np.zeros_like(la)
            return a_start, la, a_start.copy(), lb, is_next, self._order(rng, la + 2)
        # A: sentences [first, first + k); k = 1 for sentence pairs and one-sentence chunks
        k = np.ones(n, dtype=np.int64)
        multi = count >= 2
        k[multi] = 1 + (rng.random(int(multi.sum())) * (count[multi] - 1)).astype(np.int64)
        offs = self.offs
        a_start = offs[first]
        a_len = offs[first + k] - a_start
        # true B: the rest of the chunk, or the next sentence
        b_end = np.where(multi, first + count, first + k + 1)
        b_start = offs[first + k].copy()
        b_len = offs[b_end] - b_start
        neg = np.nonzero(~is_next)[0]
        rand = self._random_other(rng, first[neg])
        room = np.maximum(1, self.seq_len - 3 - a_len[neg])
        if self.pairs == "sentence":
            room = self.lens[rand]
        b_start[neg] = offs[rand]
        b_len[neg] = np.minimum(room, offs[self.doc_end[rand]] - offs[rand])
        la, lb = truncate_pair(a_len, b_len, self.seq_len - 3)
        return a_start, la, b_start, lb, is_next, self._order(rng, la + lb + 3)

    def _order(self, rng, length):
        """The epoch's global batches [steps, global_batch]: examples sorted by length inside windows of
        group_window batches, the batches shuffled."""
        g = self.global_batch
        usable = self.steps_per_epoch * g
        idx = np.arange(usable)
        w = g * self.group_window
        for s in range(0, usable, w):  # sort by length inside each window
            seg = idx[s:s + w]
            idx[s:s + w] = seg[np.argsort(length[seg], kind="stable")]
        batches = idx.reshape(self.steps_per_epoch, g)
        return batches[rng.permutation(self.steps_per_epoch)]

    _plan_cache = (None, None)

    def plan(self, epoch):
        if self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._epoch_plan(epoch))
        return self._plan_cache[1]

    def step_batches(self, epoch, step, rank=0, world=1):
        """The micro-batches (dicts of numpy arrays) of one optimizer step for one rank."""
        if self.micro_batches % world:
            raise ValueError(f"micro_batches={self.micro_batches} is not divisible by world size {world}")
        a_start, la, b_start, lb, is_next, batches = self.plan(epoch)
        rows = batches[step]
        per_rank = self.micro_batches // world
        out = []
        for k in range(rank * per_rank, (rank + 1) * per_rank):
            idx = rows[k * self.batch_size:(k + 1) * self.batch_size]
            out.append(self.collate(a_start[idx], la[idx], b_start[idx], lb[idx], is_next[idx]))
            out[-1]["micro_index"] = k
        return out

    def all_batches(self, rows=32, epoch=0):
        """Every example of one epoch's draw (all of them, no batch left over), sorted by length, in
        batches of at most `rows`: for evaluation."""
        a_start, la, b_start, lb, is_next, _ = self.plan(epoch)
        order = np.argsort(la + lb, kind="stable")
        return [self.collate(a_start[i], la[i], b_start[i], lb[i], is_next[i])
                for i in np.array_split(order, -(-len(order) // rows))]

    @staticmethod
    def lengths(la, lb):
        """Tokens of each example: [CLS] A [SEP] B [SEP], or [CLS] A [SEP] where B is empty."""
        return la + lb + 2 + (lb > 0)

    def collate(self, a_start, la, b_start, lb, is_next):
        """[CLS] A [SEP] B [SEP] rows ([CLS] A [SEP] where B is empty) padded to the longest (rounded up
        to 8, at most seq_len)."""
        length = self.lengths(la, lb)
        width = int(min(self.seq_len, -(-int(length.max()) // 8) * 8))
        pos = np.arange(width)[None, :]
        la_, lb_ = la[:, None], lb[:, None]
        in_a = (pos >= 1) & (pos <= la_)
        in_b = (pos >= la_ + 2) & (pos < la_ + 2 + lb_)
        src = np.where(in_a, a_start[:, None] + pos - 1,
                       np.where(in_b, b_start[:, None] + pos - la_ - 2, 0))
        ids = np.where(in_a | in_b, np.asarray(self.shard.tokens[src.ravel()]).reshape(src.shape), 0)
        ids = ids.astype(np.int64)
        ids[:, 0] = self.cls_id
        rows = np.arange(len(la))
        ids[rows, la + 1] = self.sep_id
        two = lb > 0
        ids[rows[two], (la + lb + 2)[two]] = self.sep_id
        seg = np.where(pos <= la_ + 1, self.segments[0], self.segments[1])
        seg = np.where(pos < length[:, None], seg, 0)
        return {"input_ids": ids, "segment_ids": seg.astype(np.int64), "is_next": is_next.astype(np.int64)}
