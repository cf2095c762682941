// Per-token rules of mlm_mask shared by the CPU loop and the CUDA kernel (torch-free, integer only).
#pragma once

#include <cstdint>

#include "philox.h"

namespace fastbert {

// Random words of mlm_mask, two counter domains of one (seed, offset) Philox stream:
//   choose word of token t: word t % 4 of philox_at(seed, offset, t / 4)          (bit 63 clear)
//   action words of token t: words 1 and 2 of philox_at(seed, offset, t | 2^63)   (only if chosen)
// so a batch costs about T/4 + 0.15 T Philox calls.
constexpr uint64_t kActionDomain = uint64_t(1) << 63;

FB_HOST_DEVICE uint32_t choose_word(uint64_t seed, uint64_t offset, int64_t t) {
  return philox_word(philox_at(seed, offset, static_cast<uint64_t>(t) >> 2), t & 3);
}

FB_HOST_DEVICE Philox4 action_words(uint64_t seed, uint64_t offset, int64_t t) {
  return philox_at(seed, offset, static_cast<uint64_t>(t) | kActionDomain);
}

// True when id is in the sorted array special[0..k).
FB_HOST_DEVICE bool is_special(int64_t id, const int64_t* special, int64_t k) {
  int64_t lo = 0, hi = k;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (special[mid] < id) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < k && special[lo] == id;
}

// The j-th (0-based) id of [0, vocab) that is not special; special sorted unique in [0, vocab).
// Walking the specials in order, each one at or below the running answer pushes it up by one.
FB_HOST_DEVICE int64_t nth_non_special(int64_t j, const int64_t* special, int64_t k) {
  int64_t r = j;
  for (int64_t i = 0; i < k && special[i] <= r; ++i) ++r;
  return r;
}

// What a chosen token becomes, from its own action word w1 and random word w2.
FB_HOST_DEVICE int64_t mlm_replacement(int64_t id, uint32_t w1, uint32_t w2, uint64_t mask_threshold,
                                      uint64_t random_threshold, int64_t mask_id, int64_t vocab,
                                      const int64_t* special, int64_t k) {
  const uint64_t w = w1;
  if (w < mask_threshold) return mask_id;
  if (w < mask_threshold + random_threshold) {
    return nth_non_special(scale_to(w2, static_cast<uint32_t>(vocab - k)), special, k);
  }
  return id;
}

// Order of words for max_predictions: by draw, then by start column.
FB_HOST_DEVICE bool word_before(uint32_t draw_a, int64_t start_a, uint32_t draw_b, int64_t start_b) {
  return draw_a < draw_b || (draw_a == draw_b && start_a < start_b);
}

}  // namespace fastbert
