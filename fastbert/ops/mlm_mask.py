"""mlm_mask(input_ids, vocab_size, mask_id, ...) -> (masked_ids, labels[, positions]). See reference."""

from fastbert.reference import ops as ref


def mlm_mask(input_ids, vocab_size, mask_id, pad_id=0, special_ids=(), mask_prob=0.15,
             replace_probs=(0.8, 0.1, 0.1), ignore_index=0, generator=None, word_starts=None,
             max_predictions=None, return_positions=False):
    return ref.mlm_mask(input_ids, vocab_size, mask_id, pad_id, special_ids, mask_prob, replace_probs,
                        ignore_index, generator, word_starts, max_predictions, return_positions)
