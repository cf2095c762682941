"""Packed, static pretraining batches: whole examples in a fixed token budget, kept apart.

A padded batch spends compute on padding: the embedded corpus's sentence pairs average 37 tokens, so
rows padded to 128 are 71% padding (length-grouped batches padded to their longest row, as PretrainData
builds them, 10%, at the price of batches sorted by length). Packing puts whole examples back to back
into T token slots instead, and variable-length attention keeps them apart, so no token attends across
examples and the result is the padded model's, token for token ("sequence packing without cross-
contamination": Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination:
Accelerating Large Language Models without Impacting Performance", arXiv:2107.02027, which reports
about 2x on Wikipedia BERT pretraining).

What one pack (a `PackedBatch`) holds, with T tokens, R sequence slots and P prediction slots fixed
for a run, so that every tensor has the same shape on every step:

    input_ids     [T] int64  examples `[CLS] A [SEP] B [SEP]` back to back, then pad_id
    segment_ids   [T] int64  each example's own segments; 0 on padding
    position_ids  [T] int64  position inside its example (0 on padding)
    cu_seqlens    [R+1] int32 (0, l0, l0+l1, ...): the examples, then the padding split into runs of at
                             most max_seqlen tokens (attention needs every token in a sequence; the
                             padding attends only to padding and no loss reads it), then zero-length
                             sequences up to R
    cls_index     [R] int64  flat position of each example's [CLS] (0 for the other slots)
    nsp_labels    [R] int64  each example's own next-sentence label; IGNORE_INDEX for the other slots
    mlm_positions [P] int64  flat positions of the masked tokens (0 for unused slots)
    mlm_labels    [P] int64  their original ids; IGNORE_INDEX for unused slots
    max_seqlen    int        fixed by the run (the model's seq_len), not the longest example
and host-side counts (examples, real tokens, masked tokens, sum of squared lengths), known without
reading anything back from the device: the loss normalisers and the FLOP count come from them.

Every index is computed here, on the CPU, in the data pipeline; `PackedBatch.to(device)` copies the
tensors through pinned memory with non_blocking=True. The model takes the pack directly
(`Encoder.forward_packed`, `PackedPretrain`), so forward, loss and backward make no device-to-host
sync and the step can be captured in a CUDA graph (fastbert.train.graphs).

Which examples share a pack: best-fit decreasing over a window of examples (`plan_packs`). Krell et al.
design histogram-based packers for packs of one maximum sequence length; here a pack is a whole step's
budget, many sequence lengths, where best fit leaves little room (below). Give R room: zero-length
slots cost almost nothing (an attention program that exits, a row of the NSP gather), while too few
slots leave tokens empty. Measured on the embedded corpus's sentence pairs (mean 37 tokens) with T =
8192: R = 136 fills 44% of the tokens, R = 256 88%, R = 512 97% (216 examples per pack); T / 16 is a
safe default.

    packed = PackedPretrainData(data, tokens=8192, max_seqs=512, max_predictions=1536, ...)
    step_model = PackedPretrain(model)               # model: a fastbert.train.heads.PretrainModel
    for batch in packed.step_batches(epoch, step):   # CPU PackedBatch objects, masked
        mlm_sum, mlm_hits, nsp_sum, nsp_hits = step_model(*batch.to("cuda").inputs())
(fastbert.train.graphs.packed_pretrain_step wraps the whole step: loss, backward, optimizer.)
"""

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of an unused NSP or MLM slot (F.cross_entropy's default ignore_index)


@dataclass
class PackedBatch:
    """One pack (see the module docstring for each field)."""

    input_ids: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cls_index: torch.Tensor
    nsp_labels: torch.Tensor
    mlm_positions: torch.Tensor
    mlm_labels: torch.Tensor
    max_seqlen: int
    n_examples: int = 0
    n_tokens: int = 0
    n_masked: int = 0
    sum_len2: int = 0

    TENSORS = ("input_ids", "segment_ids", "position_ids", "cu_seqlens", "cls_index", "nsp_labels",
               "mlm_positions", "mlm_labels")

    def inputs(self):
        """The model's arguments: the eight tensors in TENSORS order, then max_seqlen."""
        return (*(getattr(self, n) for n in self.TENSORS), self.max_seqlen)

    @property
    def shapes(self):
        return {n: tuple(getattr(self, n).shape) for n in self.TENSORS}

    def to(self, device, non_blocking=True):
        """The pack on `device`; CPU tensors are pinned first when the target is CUDA, so the copies
        are asynchronous (the host does not wait for them)."""
        device = torch.device(device)
        moved = {}
        for n in self.TENSORS:
            t = getattr(self, n)
            if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            moved[n] = t.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self):
        return replace(self, **{n: getattr(self, n).pin_memory() for n in self.TENSORS})

    def copy_(self, other):
        """Copy another pack of the same shapes into this one's tensors (static buffers of a CUDA
        graph); host counts are taken over too."""
        if other.shapes != self.shapes or other.max_seqlen != self.max_seqlen:
            raise ValueError(f"pack shapes differ: {other.shapes}, max_seqlen {other.max_seqlen} vs "
                             f"{self.shapes}, max_seqlen {self.max_seqlen}")
        for n in self.TENSORS:
            getattr(self, n).copy_(getattr(other, n), non_blocking=True)
        for f in fields(self):
            if f.name.startswith(("n_", "sum_")):
                setattr(self, f.name, getattr(other, f.name))
        return self


def _padding_runs(pad, max_seqlen):
    """Lengths of the runs of at most max_seqlen tokens the trailing padding is split into."""
    full, rest = divmod(int(pad), max_seqlen)
    return [max_seqlen] * full + ([rest] if rest else [])


def slots_needed(lengths, tokens, max_seqlen):
    """Sequence slots a pack of examples with these lengths uses: the examples and the padding runs."""
    pad = tokens - int(np.sum(lengths))
    return len(lengths) + len(_padding_runs(pad, max_seqlen))


def plan_packs(lengths, tokens, max_seqs, max_seqlen):
    """Best-fit decreasing: a list of index arrays, one per pack, covering every example once.

    Examples are taken longest first; each goes into the open pack with the least room that still
    takes it (tokens and a sequence slot, counting the slots its padding runs will need), else into a
    new pack. lengths [n] int; every length must be in [1, max_seqlen].
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_seqlen):
        raise ValueError(f"example lengths must lie in [1, max_seqlen={max_seqlen}], got "
                         f"[{lengths.min()}, {lengths.max()}]")
    if max_seqlen > tokens:
        raise ValueError(f"max_seqlen {max_seqlen} exceeds the pack's {tokens} tokens")
    if max_seqs < 2:
        raise ValueError(f"max_seqs={max_seqs}: a pack needs a slot for an example and one for padding")
    order = np.argsort(-lengths, kind="stable")
    free = np.empty(0, dtype=np.int64)  # room left in each open pack
    count = np.empty(0, dtype=np.int64)  # examples in each
    members = []
    for i in order:
        n = lengths[i]
        room = free - n
        # slots after adding: count + 1 examples and ceil(room / max_seqlen) padding runs
        ok = (room >= 0) & (count + 1 + -(-room // max_seqlen) <= max_seqs)
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmin(room[ok])])
            free[j] -= n
            count[j] += 1
            members[j].append(int(i))
        else:
            free = np.append(free, tokens - n)
            count = np.append(count, 1)
            members.append([int(i)])
    return [np.array(sorted(m), dtype=np.int64) for m in members]


def pack_rows(input_ids, segment_ids, is_next, *, tokens, max_seqs, max_seqlen, max_predictions,
              lengths=None, mlm_labels=None, ignore_index=0, pad_id=0, vocab_size=None,
              type_vocab_size=None):
    """One PackedBatch from the rows of a right-padded batch, one example per row.

    input_ids, segment_ids [n, W] int (numpy or CPU tensors); is_next [n]; lengths [n] (default: the
    count of ids != pad_id per row); mlm_labels [n, W] with ignore_index at unmasked tokens (the
    labels of fastbert.ops.mlm_mask on the same rows), or None for a pack without MLM targets (mask
    it later with `mask_pack`). vocab_size / type_vocab_size: when given, ids are checked here, on the
    CPU, so the model need not read them back from the device. Raises ValueError when the rows do not
    fit (tokens, slots, prediction slots).
    """
    ids = np.asarray(input_ids)
    seg = np.asarray(segment_ids)
    nxt = np.asarray(is_next).astype(np.int64).reshape(-1)
    if ids.ndim != 2 or seg.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and segment_ids {seg.shape} must be the same [n, W]")
    n, width = ids.shape
    if nxt.shape != (n,):
        raise ValueError(f"is_next has shape {nxt.shape}, expected ({n},)")
    lens = (ids != pad_id).sum(1) if lengths is None else np.asarray(lengths, dtype=np.int64)
    if lens.shape != (n,) or (n and (lens.min() < 1 or lens.max() > min(width, max_seqlen))):
        raise ValueError(f"example lengths must lie in [1, min(W={width}, max_seqlen={max_seqlen})], got "
                         f"{lens.tolist()}")
    used = int(lens.sum())
    if used > tokens:
        raise ValueError(f"{n} examples of {used} tokens do not fit in a pack of {tokens} tokens")
    runs = _padding_runs(tokens - used, max_seqlen)
    if n + len(runs) > max_seqs:
        raise ValueError(f"{n} examples and {len(runs)} padding runs need {n + len(runs)} sequence "
                         f"slots; the pack has max_seqs={max_seqs}")
    if vocab_size is not None and n and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id out of range: ids span [{ids.min()}, {ids.max()}], vocab_size is "
                         f"{vocab_size}")
    if type_vocab_size is not None and n and (seg.min() < 0 or seg.max() >= type_vocab_size):
        raise ValueError(f"segment id out of range: ids span [{seg.min()}, {seg.max()}], the segment "
                         f"table has {type_vocab_size} rows")
    real = np.arange(width)[None, :] < lens[:, None]  # [n, W]
    flat_ids = np.full(tokens, pad_id, dtype=np.int64)
    flat_seg = np.zeros(tokens, dtype=np.int64)
    flat_pos = np.zeros(tokens, dtype=np.int64)
    flat_ids[:used] = ids[real]
    flat_seg[:used] = seg[real]
    flat_pos[:used] = np.broadcast_to(np.arange(width), (n, width))[real]
    seq_lens = np.concatenate([lens, np.array(runs, dtype=np.int64)])
    cu = np.full(max_seqs + 1, tokens, dtype=np.int32)
    cu[0] = 0
    cu[1:len(seq_lens) + 1] = np.cumsum(seq_lens)
    cls_index = np.zeros(max_seqs, dtype=np.int64)
    cls_index[:n] = cu[:n]
    nsp = np.full(max_seqs, IGNORE_INDEX, dtype=np.int64)
    nsp[:n] = nxt
    positions = np.zeros(max_predictions, dtype=np.int64)
    labels = np.full(max_predictions, IGNORE_INDEX, dtype=np.int64)
    n_masked = 0
    if mlm_labels is not None:
        lab = np.asarray(mlm_labels)
        if lab.shape != ids.shape:
            raise ValueError(f"mlm_labels {lab.shape} must match input_ids {ids.shape}")
        flat_lab = lab[real]
        chosen = np.flatnonzero(flat_lab != ignore_index)
        n_masked = len(chosen)
        if n_masked > max_predictions:
            raise ValueError(f"{n_masked} masked tokens exceed the pack's max_predictions={max_predictions}")
        positions[:n_masked] = chosen
        labels[:n_masked] = flat_lab[chosen]
    t = torch.from_numpy
    return PackedBatch(t(flat_ids), t(flat_seg), t(flat_pos), t(cu), t(cls_index), t(nsp), t(positions),
                       t(labels), int(max_seqlen), n_examples=n, n_tokens=used, n_masked=n_masked,
                       sum_len2=int((lens.astype(np.int64) ** 2).sum()))


def mask_pack(batch, vocab_size, mask_id, special_ids=(), pad_id=0, mask_prob=0.15,
              replace_probs=(0.8, 0.1, 0.1), generator=None):
    """BERT's MLM corruption of a CPU pack (fastbert.ops.mlm_mask on its [1, T] ids), filling its
    prediction slots. At most len(mlm_positions) tokens are chosen (max_predictions of the one row).
    Returns a new PackedBatch; the chosen positions are found on the CPU."""
    from fastbert.ops import mlm_mask

    if batch.input_ids.device.type != "cpu":
        raise ValueError("mask_pack runs in the data pipeline, on CPU packs (before .to(device))")
    slots = batch.mlm_positions.numel()
    masked, labels, pos = mlm_mask(batch.input_ids[None], vocab_size, mask_id, pad_id, special_ids,
                                   mask_prob=mask_prob, replace_probs=replace_probs, ignore_index=0,
                                   generator=generator, max_predictions=slots, return_positions=True)
    n = pos.numel()
    positions = torch.zeros(slots, dtype=torch.int64)
    lab = torch.full((slots,), IGNORE_INDEX, dtype=torch.int64)
    positions[:n] = pos
    lab[:n] = batch.input_ids[pos]
    return replace(batch, input_ids=masked[0].contiguous(), mlm_positions=positions, mlm_labels=lab,
                   n_masked=n)


class PackedPretrainData:
    """Packs of one run's pretraining examples (fastbert.train.data.PretrainData), masked on the CPU.

    Each epoch takes every example of the PretrainData epoch plan (the same [CLS] A [SEP] B [SEP]
    examples with their own NSP labels, the same truncation), shuffles them, and packs windows of
    `window` examples with `plan_packs`. A step is `micro_batches` packs (gradient accumulation, or
    one per rank under torchrun). steps_per_epoch comes from epoch 0's plan less 2%; other epochs pack
    their examples into nearly the same count, and a shortfall raises.
    """

    def __init__(self, data, tokens, max_seqs, max_predictions, vocab_size, mask_id, special_ids=(),
                 pad_id=0, mask_prob=0.15, micro_batches=1, window=4096, type_vocab_size=None):
        if tokens < data.seq_len:
            raise ValueError(f"tokens={tokens} is smaller than one example (seq_len {data.seq_len})")
        self.data, self.tokens, self.max_seqs = data, int(tokens), int(max_seqs)
        self.max_predictions, self.vocab_size, self.mask_id = int(max_predictions), vocab_size, mask_id
        self.special_ids, self.pad_id, self.mask_prob = tuple(special_ids), pad_id, mask_prob
        self.micro_batches, self.window, self.type_vocab_size = micro_batches, window, type_vocab_size
        self.max_seqlen = data.seq_len
        self._cache = (None, None)
        n_packs = len(self.plan(0))
        self.steps_per_epoch = int(n_packs * 0.98) // micro_batches
        if self.steps_per_epoch == 0:
            raise ValueError(f"the corpus fills {n_packs} packs of {tokens} tokens, fewer than one step of "
                             f"{micro_batches}; use fewer tokens per pack")

    def plan(self, epoch):
        """(packs: list of example-index arrays, the PretrainData epoch arrays)."""
        if self._cache[0] == epoch:
            return self._cache[1][0]
        a_start, la, b_start, lb, is_next, _ = self.data.plan(epoch)
        lengths = self.data.lengths(la, lb)
        order = np.random.default_rng([self.data.seed, epoch, 12]).permutation(len(lengths))
        packs = []
        for s in range(0, len(order), self.window):
            idx = order[s:s + self.window]
            packs += [idx[p] for p in plan_packs(lengths[idx], self.tokens, self.max_seqs, self.max_seqlen)]
        self._cache = (epoch, (packs, (a_start, la, b_start, lb, is_next)))
        return packs

    def step_batches(self, epoch, step, rank=0, world=1):
        """The packs (CPU PackedBatch, masked) of one optimizer step for one rank."""
        if self.micro_batches % world:
            raise ValueError(f"micro_batches={self.micro_batches} is not divisible by world size {world}")
        packs = self.plan(epoch)
        a_start, la, b_start, lb, is_next = self._cache[1][1]
        if (step + 1) * self.micro_batches > len(packs):
            raise RuntimeError(f"epoch {epoch} packs into {len(packs)} packs, fewer than step {step} needs")
        per_rank = self.micro_batches // world
        out = []
        for k in range(rank * per_rank, (rank + 1) * per_rank):
            idx = packs[step * self.micro_batches + k]
            rows = self.data.collate(a_start[idx], la[idx], b_start[idx], lb[idx], is_next[idx])
            pack = pack_rows(rows["input_ids"], rows["segment_ids"], rows["is_next"], tokens=self.tokens,
                             max_seqs=self.max_seqs, max_seqlen=self.max_seqlen,
                             max_predictions=self.max_predictions,
                             lengths=self.data.lengths(la[idx], lb[idx]),
                             pad_id=self.pad_id, vocab_size=self.vocab_size,
                             type_vocab_size=self.type_vocab_size)
            gen = torch.Generator().manual_seed(((self.data.seed * 1_000_003 + epoch) * 1_000_003 + step)
                                                * 4099 + k)
            out.append(mask_pack(pack, self.vocab_size, self.mask_id, self.special_ids, self.pad_id,
                                 self.mask_prob, generator=gen))
        return out


class PackedPretrain(nn.Module):
    """A fastbert.train.heads.PretrainModel on packed batches (wrap it in DDP like the model itself).

    forward(*batch.inputs()) -> (mlm_loss_sum fp32, mlm_hits int64, nsp_loss_sum fp32, nsp_hits int64),
    all device scalars (the NSP pair zeros for a model without NSP, ModernBERT): sums over the pack's
    used slots (unused slots carry IGNORE_INDEX), so the step divides by the host-side counts
    (n_masked, n_examples) without reading anything back.
    The MLM head projects the P prediction slots (the sparse head's work, with padded slots).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, segment_ids, position_ids, cu_seqlens, cls_index, nsp_labels,
                mlm_positions, mlm_labels, max_seqlen):
        m = self.model
        seg = segment_ids if m.nsp else None  # MLM only (ModernBERT): no token types
        h = m.bert.forward_packed(input_ids, seg, position_ids, cu_seqlens, max_seqlen)  # [T, N]
        if m.nsp:
            cls = h.index_select(0, cls_index)  # [R, N]
            if m.hf:
                cls = torch.tanh(m.pooler(cls))
            nsp = F.log_softmax(m.next_sentence.linear(cls).float(), dim=-1)  # [R, 2]
            nsp_sum = F.nll_loss(nsp, nsp_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            nsp_hits = ((nsp.argmax(1) == nsp_labels) & (nsp_labels != IGNORE_INDEX)).sum()
        else:  # zeros on the device: the step's loss and sums keep their form
            nsp_sum = h.new_zeros((), dtype=torch.float32)
            nsp_hits = torch.zeros((), dtype=torch.int64, device=h.device)
        rows = m.mlm_rows(h.index_select(0, mlm_positions))  # [P, N]
        logits = m.mask_lm.linear(rows).float()  # [P, V]
        mlm_sum = F.cross_entropy(logits, mlm_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        mlm_hits = ((logits.argmax(1) == mlm_labels) & (mlm_labels != IGNORE_INDEX)).sum()
        return mlm_sum, mlm_hits, nsp_sum, nsp_hits


def step_counts(packs, device, world_packs=None):
    """(masked tokens, examples) of a step's packs as two device scalars, for normalising the loss.

    The counts are host integers (known when the packs were built), copied through pinned memory
    without a sync; under torchrun pass world_packs, the counts of every rank's packs summed (e.g. by
    an all-reduce of a CPU tensor), so every split over processes gives the same gradient."""
    masked = sum(p.n_masked for p in packs) if world_packs is None else world_packs[0]
    examples = sum(p.n_examples for p in packs) if world_packs is None else world_packs[1]
    t = torch.tensor([max(1, masked), max(1, examples)], dtype=torch.float32)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    t = t.to(device, non_blocking=True)
    return t[0], t[1]
