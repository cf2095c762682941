"""fastbert.ops.mlm_mask (torch.ops.fastbert.mlm_mask): statistics over 1e6 tokens, exact labels,
special ids never chosen nor drawn, determinism per generator state, whole-word masking, the
per-row cap, bad inputs, and (with CUDA) CPU == CUDA bit for bit."""

import pytest
import torch

import fastbert.ops as ops
from fastbert import _ext

pytestmark = pytest.mark.skipif(not _ext.has_op("mlm_mask"),
                                reason=f"fastbert._C not built: {_ext.load_error}")

CUDA_OP = torch.cuda.is_available() and _ext.has_cuda()
DEVICES = ["cpu"] + (["cuda"] if CUDA_OP else [])
VOCAB, PAD, CLS, SEP, MASK = 30522, 0, 101, 102, 103
SPECIAL = (CLS, SEP, MASK)


def batch(rows, seq, seed=0, device="cpu", dtype=torch.int64):
    """[CLS] tokens [SEP] with a random amount of padding at the end of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, VOCAB, (rows, seq), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=g)
    col = torch.arange(seq)
    ids[col[None] == (lengths[:, None] - 1)] = SEP
    ids[col[None] >= lengths[:, None]] = PAD
    return ids.to(device=device, dtype=dtype)


def call(ids, generator=None, **kw):
    return ops.mlm_mask(ids, VOCAB, MASK, PAD, SPECIAL, generator=generator, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_1e6_tokens(device):
    ids = batch(512, 2048, device=device)  # 1,048,576 tokens
    out, labels, positions = call(ids, torch.Generator().manual_seed(1), return_positions=True)
    ids, out, labels, positions = ids.cpu(), out.cpu(), labels.cpu(), positions.cpu()
    special = (ids == PAD) | (ids == CLS) | (ids == SEP) | (ids == MASK)
    chosen = torch.zeros(ids.numel(), dtype=torch.bool)
    chosen[positions] = True
    chosen = chosen.view_as(ids)
    assert not (chosen & special).any(), "a special or padding token was chosen"
    frac = chosen.sum().item() / (~special).sum().item()
    assert abs(frac - 0.15) < 0.002, f"chosen fraction {frac}"
    assert torch.equal(labels, torch.where(chosen, ids, torch.zeros_like(ids)))
    assert torch.equal(out[~chosen], ids[~chosen])
    o, x = out[chosen], ids[chosen]
    masked = (o == MASK).float().mean().item()
    kept = (o == x).float().mean().item()
    replaced = ((o != MASK) & (o != x)).float().mean().item()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01, (
        masked, replaced, kept)
    rand = o[(o != MASK) & (o != x)]
    assert rand.min() >= 0 and rand.max() < VOCAB
    assert not torch.isin(rand, torch.tensor([PAD, *SPECIAL])).any(), "random replacement drew a special id"
    assert rand.unique().numel() > 0.5 * min(rand.numel(), VOCAB) * 0.5  # spread over the vocab


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_advancing(device):
    ids = batch(16, 128, device=device)
    a = call(ids, torch.Generator().manual_seed(5))
    b = call(ids, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g = torch.Generator().manual_seed(5)
    first, second = call(ids, g), call(ids, g)
    assert torch.equal(first[0], a[0])
    assert not torch.equal(first[1], second[1]), "successive calls gave the same mask"
    torch.manual_seed(0)
    c = call(ids)
    d = call(ids)  # default generator advanced
    assert not torch.equal(c[1], d[1])
    torch.manual_seed(0)
    assert torch.equal(call(ids)[1], c[1])


@pytest.mark.parametrize("device", DEVICES)
def test_int32_ignore_index_and_probabilities(device):
    ids = batch(64, 256, device=device, dtype=torch.int32)
    out, labels = call(ids, torch.Generator().manual_seed(2), ignore_index=-100)
    assert out.dtype == labels.dtype == torch.int32
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    out64, labels64 = call(ids.long(), torch.Generator().manual_seed(2), ignore_index=-100)
    assert torch.equal(out64, out.long()) and torch.equal(labels64, labels.long())
    # all chosen, all masked
    out, labels = call(ids, mask_prob=1.0, replace_probs=(1.0, 0.0, 0.0))
    special = torch.isin(ids, torch.tensor([PAD, *SPECIAL], device=device, dtype=ids.dtype))
    assert (out[~special] == MASK).all() and torch.equal(out[special], ids[special])
    out, labels = call(ids, mask_prob=0.0)
    assert torch.equal(out, ids) and (labels == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_whole_word_masking(device):
    ids = batch(128, 256, seed=3, device=device)
    g = torch.Generator().manual_seed(4)
    starts = torch.rand(ids.shape, generator=g) < 0.6
    starts[:, 0] = True
    starts = starts.to(device)
    out, labels = call(ids, torch.Generator().manual_seed(9), word_starts=starts)
    ids, labels, starts = ids.cpu(), labels.cpu(), starts.cpu()
    special = torch.isin(ids, torch.tensor([PAD, *SPECIAL]))
    chosen = (labels != 0)
    word = torch.cumsum(starts.long(), 1)  # word number within the row
    # every non-special piece of a word shares the chosen flag of the word
    key = word + torch.arange(ids.shape[0])[:, None] * 10**6
    k, c = key[~special], chosen[~special]
    per_word_max = torch.zeros(key.max() + 1, dtype=torch.long).scatter_reduce(0, k, c.long(), "amax")
    per_word_min = torch.ones(key.max() + 1, dtype=torch.long).scatter_reduce(0, k, c.long(), "amin")
    assert torch.equal(per_word_max[k], per_word_min[k])
    words = torch.unique(k)
    frac = per_word_max[words].float().mean().item()
    assert abs(frac - 0.15) < 0.02, f"word fraction {frac}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("whole_word", [False, True])
def test_max_predictions(device, whole_word):
    ids = batch(64, 512, seed=6, device=device)
    starts = None
    if whole_word:
        starts = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5).to(device)
    free = call(ids, torch.Generator().manual_seed(8), word_starts=starts, mask_prob=0.3)[1] != 0
    capped = call(ids, torch.Generator().manual_seed(8), word_starts=starts, mask_prob=0.3,
                  max_predictions=20)[1] != 0
    assert not (capped & ~free).any(), "the cap chose a token the uncapped call did not"
    per_row = capped.sum(1)
    assert (per_row <= 20).all()
    if not whole_word:
        assert torch.equal(per_row, free.sum(1).clamp(max=20))
    else:
        assert (per_row >= 20 - 8).float().mean() > 0.9  # words are short: rows fill nearly up to the cap
    assert (call(ids, max_predictions=0)[1] == 0).all()


def test_return_positions_and_reference_backend(monkeypatch):
    ids = batch(8, 64)
    out, labels, pos = call(ids, torch.Generator().manual_seed(1), return_positions=True)
    assert torch.equal(pos, (labels.view(-1) != 0).nonzero().squeeze(1))
    monkeypatch.setenv("FASTBERT_BACKEND", "reference")
    out, labels = call(batch(64, 512), torch.Generator().manual_seed(1))
    frac = (labels != 0).float().mean().item()
    assert 0.09 < frac < 0.15


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    ids = batch(4, 32, device=device)
    with pytest.raises(TypeError, match="int64 or int32"):
        call(ids.float())
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        call(ids[0])
    bad = ids.clone()
    bad[2, 3] = VOCAB
    with pytest.raises(ValueError, match="input_ids out of range"):
        call(bad)
    bad[2, 3] = -5
    with pytest.raises(ValueError, match="input_ids out of range"):
        call(bad)
    with pytest.raises(ValueError, match="mask_id"):
        ops.mlm_mask(ids, VOCAB, VOCAB)
    with pytest.raises(ValueError, match="special_ids"):
        ops.mlm_mask(ids, VOCAB, MASK, special_ids=(VOCAB + 1,))
    with pytest.raises(ValueError, match="replace_probs"):
        call(ids, replace_probs=(0.8, 0.1, 0.2))
    with pytest.raises(ValueError, match="mask_prob"):
        call(ids, mask_prob=1.5)
    with pytest.raises(ValueError, match="word_starts shape"):
        call(ids, word_starts=torch.ones(4, 31, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="word_starts must be a bool"):
        call(ids, word_starts=torch.ones(4, 32, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="max_predictions"):
        call(ids, max_predictions=-1)
    with pytest.raises(TypeError, match="generator"):
        call(ids, generator=5)


def test_opcheck():
    ids = batch(4, 16)
    args = (ids, torch.tensor([0, 101, 102, 103]), None, VOCAB, MASK, 0, 1, 2, 2**32 // 7, 2**31, 2**29, 3)
    torch.library.opcheck(torch.ops.fastbert.mlm_mask.default, args)


@pytest.mark.skipif(not CUDA_OP, reason="needs CUDA and fastbert._C built with CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("options", [{}, {"word_starts": True}, {"max_predictions": 20},
                                     {"word_starts": True, "max_predictions": 20}])
def test_cpu_cuda_bit_identical(dtype, options):
    ids = batch(96, 512, seed=11, dtype=dtype)
    kw = dict(options)
    if kw.get("word_starts"):
        kw["word_starts"] = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.7
    cpu = call(ids, torch.Generator().manual_seed(21), return_positions=True, **kw)
    if "word_starts" in kw:
        kw["word_starts"] = kw["word_starts"].cuda()
    gpu = call(ids.cuda(), torch.Generator().manual_seed(21), return_positions=True, **kw)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    # a CUDA generator drives the same stream when its state gives the same draws
    gen = torch.Generator(device="cuda").manual_seed(3)
    first = call(ids.cuda(), gen)
    assert not torch.equal(first[1], call(ids.cuda(), gen)[1])


# ---- the op against its written rules (csrc/philox.h, csrc/mlm_common.h), in plain Python -------
M32 = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC 2011) on Python ints: 4 counter words, 2 key words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def _spec_mlm_mask(ids, special, vocab, mask_id, ignore, seed, offset, t_choose, t_mask, t_rand):
    """mlm_mask's simple path (no word starts, no cap) from its documented rules."""
    def words(position):
        counter = (position & M32, position >> 32, offset & M32, offset >> 32)
        return _philox4x32_10(counter, (seed & M32, seed >> 32))

    non_special = [v for v in range(vocab) if v not in special]
    out, labels = [], []
    for t, token in enumerate(ids):
        chosen = token not in special and words(t // 4)[t % 4] < t_choose
        if not chosen:
            out.append(token)
            labels.append(ignore)
            continue
        _, w1, w2, _ = words(t | 1 << 63)
        if w1 < t_mask:
            out.append(mask_id)
        elif w1 < t_mask + t_rand:
            out.append(non_special[(w2 * len(non_special)) >> 32])
        else:
            out.append(token)
        labels.append(token)
    return out, labels


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("rows,seq", [(3, 67), (1, 5), (5, 128)])
def test_cpu_op_follows_the_philox_rules(dtype, rows, seq):
    """Every token of the CPU op equals the rules evaluated in plain Python (the CUDA kernel is held
    to the CPU op bit for bit by test_cpu_cuda_bit_identical). Odd lengths cover the tokens that do
    not fill a Philox group of 4; a high choose rate makes the replacement rules run often."""
    vocab, mask_id, ignore = 211, 4, -100
    special = (0, 1, 2, 3, 4)
    g = torch.Generator().manual_seed(rows * 1000 + seq)
    ids = torch.randint(0, vocab, (rows, seq), generator=g, dtype=torch.int64).to(dtype)
    seed, offset = 0x1234_5678_9ABC_DEF0 + seq, 0x0FED_CBA9 * rows
    t_choose, t_mask, t_rand = int(0.6 * 2**32), int(0.5 * 2**32), int(0.3 * 2**32)
    out, labels, chosen = torch.ops.fastbert.mlm_mask(
        ids, torch.tensor(special), None, vocab, mask_id, ignore, seed, offset, t_choose, t_mask, t_rand, -1)
    want_out, want_labels = _spec_mlm_mask(ids.reshape(-1).tolist(), set(special), vocab, mask_id, ignore,
                                           seed, offset, t_choose, t_mask, t_rand)
    assert out.reshape(-1).tolist() == want_out
    assert labels.reshape(-1).tolist() == want_labels
    assert chosen.reshape(-1).tolist() == [lab != ignore for lab in want_labels]
    assert 0.4 < chosen.float().mean() < 0.8
