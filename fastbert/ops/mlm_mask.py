"""mlm_mask: BERT's masked-LM corruption of a batch on its own device (torch.ops.fastbert.mlm_mask).

    masked_ids, labels[, positions] = mlm_mask(input_ids, vocab_size, mask_id, pad_id=0,
        special_ids=(), mask_prob=0.15, replace_probs=(0.8, 0.1, 0.1), ignore_index=0,
        generator=None, word_starts=None, max_predictions=None, return_positions=False)

input_ids [B, S] int64/int32 on CPU or CUDA. Each token that is not special ({pad_id} and
special_ids: pass CLS/SEP/MASK there) is chosen with probability mask_prob; a chosen token becomes
mask_id with probability replace_probs[0], a uniformly random non-special id with replace_probs[1],
and stays with replace_probs[2]. labels [B, S] (dtype of input_ids) hold the original id at chosen
positions and ignore_index elsewhere (0 for bert_pytorch's NLLLoss(ignore_index=0), -100 for HF).
positions (return_positions=True) are the flat indices into input_ids.view(-1) of the chosen tokens,
ascending, for a sparse MLM head.

word_starts [B, S] bool: whole-word masking; every piece takes the draw of its word's first piece
(pieces before a row's first word start belong to a word starting at column 0).
max_predictions: cap of chosen tokens per row, as Google BERT's max_predictions_per_seq; chosen
words are kept in increasing order of their draw while the count stays within the cap.

Randomness: Philox keyed by (seed, offset, flat position) with seed and offset drawn from
`generator` (torch.default_generator when None), so one generator state gives the same output on CPU
and CUDA, bit for bit, and every call advances the generator. FASTBERT_BACKEND=reference (or a
fastbert._C that did not load) uses fastbert.reference.ops.mlm_mask, which has the same statistics
but a different random stream.
"""

import functools

import torch

from fastbert import _ext
from fastbert.reference import ops as ref

from ._dispatch import CPP, choose
from ._rng import philox_seed_offset

_OP = "mlm_mask"
_TWO32 = 2**32


def _threshold(p: float) -> int:
    return min(_TWO32, max(0, round(p * _TWO32)))


@functools.lru_cache(maxsize=64)
def _special_tensor(special: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(special, dtype=torch.int64, device=device)


def _check(input_ids, vocab_size, mask_id, pad_id, special_ids, mask_prob, replace_probs,
           word_starts, max_predictions):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    for name, value in (("mask_id", mask_id), ("pad_id", pad_id)):
        if not isinstance(value, int) or not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value!r} is outside [0, {vocab_size})")
    special = sorted({pad_id, *(int(s) for s in special_ids)})
    if special[0] < 0 or special[-1] >= vocab_size:
        raise ValueError(f"special_ids {list(special_ids)} must lie in [0, {vocab_size})")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
    if len(replace_probs) != 3 or min(replace_probs) < 0 or abs(sum(replace_probs) - 1.0) > 1e-6:
        raise ValueError(f"replace_probs must be 3 non-negative numbers summing to 1, got {replace_probs}")
    if replace_probs[1] > 0 and len(special) >= vocab_size:
        raise ValueError("every id is special: no id left for random replacement")
    if word_starts is not None:
        if not isinstance(word_starts, torch.Tensor) or word_starts.dtype != torch.bool:
            raise TypeError("word_starts must be a bool tensor")
        if word_starts.shape != input_ids.shape:
            raise ValueError(f"word_starts shape {tuple(word_starts.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if word_starts.device != input_ids.device:
            raise ValueError(f"word_starts is on {word_starts.device}, input_ids on {input_ids.device}")
    if max_predictions is not None and (not isinstance(max_predictions, int) or max_predictions < 0):
        raise ValueError(f"max_predictions must be a non-negative int or None, got {max_predictions!r}")
    return tuple(special)


def mlm_mask(input_ids, vocab_size, mask_id, pad_id=0, special_ids=(), mask_prob=0.15,
             replace_probs=(0.8, 0.1, 0.1), ignore_index=0, generator=None, word_starts=None,
             max_predictions=None, return_positions=False):
    special = _check(input_ids, vocab_size, mask_id, pad_id, special_ids, mask_prob, replace_probs,
                     word_starts, max_predictions)
    if choose("mlm_mask", input_ids) != CPP:
        return ref.mlm_mask(input_ids, vocab_size, mask_id, pad_id, special_ids, mask_prob,
                            replace_probs, ignore_index, generator, word_starts, max_predictions,
                            return_positions)
    seed, offset = philox_seed_offset(generator)
    p_mask, p_rand = replace_probs[0], replace_probs[1]
    t_mask = _threshold(p_mask)
    t_rand = min(_TWO32 - t_mask, _threshold(p_mask + p_rand) - t_mask)
    out, labels, chosen = torch.ops.fastbert.mlm_mask(
        input_ids, _special_tensor(special, input_ids.device), word_starts, vocab_size, mask_id,
        int(ignore_index), seed, offset, _threshold(mask_prob), t_mask, t_rand,
        -1 if max_predictions is None else max_predictions)
    if return_positions:
        return out, labels, chosen.view(-1).nonzero().squeeze(1)
    return out, labels


if _ext.has_op(_OP):
    @torch.library.register_fake(f"fastbert::{_OP}")
    def _fake(ids, special, word_starts, vocab, mask_id, ignore, seed, offset, t_choose, t_mask, t_rand,
              max_pred):
        return torch.empty_like(ids), torch.empty_like(ids), torch.empty_like(ids, dtype=torch.bool)
