// CPU implementation of fastbert::mlm_mask (schema in fastbert.cpp, rules in kernels.h MlmParams).
// Parallel over rows; every random word comes from Philox keyed by (seed, offset, flat position), so
// the result does not depend on the thread count and equals the CUDA kernel's bit for bit.
#include <algorithm>
#include <vector>

#include "common.h"
#include "mlm_common.h"
#include "philox.h"

namespace fastbert {
namespace {

// Special ids as a bitmap over the vocabulary (a bit test per token instead of a search).
struct SpecialSet {
  std::vector<uint64_t> bits;
  SpecialSet(const int64_t* special, int64_t k, int64_t vocab) : bits((vocab + 63) / 64, 0) {
    for (int64_t i = 0; i < k; ++i) bits[special[i] >> 6] |= uint64_t(1) << (special[i] & 63);
  }
  bool has(int64_t id) const { return (bits[id >> 6] >> (id & 63)) & 1; }
};

// The chosen-token path (about 15% of tokens) kept out of line so the per-token loop stays small.
template <typename index_t>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
// Deliberate twin of the write loop in csrc/cuda/mlm_mask_kernels.cu (the same rule on the GPU).
void write_token(const MlmParams& p, int64_t t, int64_t id, bool chosen, index_t* out, index_t* labels) {
  p.chosen[t] = chosen;
  if (!chosen) {
    out[t] = static_cast<index_t>(id);
    labels[t] = static_cast<index_t>(p.ignore_index);
    return;
  }
  const Philox4 d = action_words(p.seed, p.offset, t);
  out[t] = static_cast<index_t>(mlm_replacement(id, d.v[1], d.v[2], p.mask_threshold, p.random_threshold,
                                                p.mask_id, p.vocab, p.special, p.n_special));
  labels[t] = static_cast<index_t>(id);
}

template <typename index_t>
void mlm_rows(const MlmParams& p) {
  const int64_t S = p.seq;
  const auto* ids = static_cast<const index_t*>(p.ids);
  auto* out = static_cast<index_t*>(p.out);
  auto* labels = static_cast<index_t*>(p.labels);
  const SpecialSet special(p.special, p.n_special, p.vocab);
  const bool simple = p.word_starts == nullptr && p.max_predictions < 0;
  torch::stable::parallel_for(0, p.rows, 1, [&](int64_t b0, int64_t b1) {
    if (simple) {  // one pass: each token on its own; parameters in locals (no reloads after stores)
      const uint64_t seed = p.seed, offset = p.offset, choose = p.choose_threshold;
      const auto ignore = static_cast<index_t>(p.ignore_index);
      uint8_t* chosen_out = p.chosen;
      auto token = [&](int64_t t, uint32_t w) {
        const int64_t id = ids[t];
        if (!special.has(id) && w < choose) {
          write_token(p, t, id, true, out, labels);
        } else {
          chosen_out[t] = 0;
          out[t] = static_cast<index_t>(id);
          labels[t] = ignore;
        }
      };
      int64_t t = b0 * S;
      const int64_t end = b1 * S;
      for (; t < end && (t & 3); ++t) token(t, choose_word(seed, offset, t));
      for (; t + 4 <= end; t += 4) {  // choose_word of 4 aligned tokens from one Philox call
        const Philox4 q = philox_at(seed, offset, static_cast<uint64_t>(t) >> 2);
        token(t, q.v[0]);
        token(t + 1, q.v[1]);
        token(t + 2, q.v[2]);
        token(t + 3, q.v[3]);
      }
      for (; t < end; ++t) token(t, choose_word(seed, offset, t));
      return;
    }
    std::vector<uint32_t> draw(S);
    std::vector<int64_t> start(S), count(S), words;
    std::vector<uint8_t> chosen(S), kept(S);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * S;
      int64_t word = 0;
      uint64_t group = ~uint64_t(0);
      Philox4 quad{};
      for (int64_t s = 0; s < S; ++s) {
        const uint64_t g = static_cast<uint64_t>(base + s) >> 2;
        if (g != group) {
          quad = philox_at(p.seed, p.offset, g);
          group = g;
        }
        draw[s] = philox_word(quad, (base + s) & 3);
        if (p.word_starts == nullptr || p.word_starts[base + s]) word = s;
        start[s] = word;
      }
      for (int64_t s = 0; s < S; ++s) {
        chosen[s] = !special.has(ids[base + s]) && draw[start[s]] < p.choose_threshold;
      }
      if (p.max_predictions >= 0) {
        std::fill(count.begin(), count.end(), 0);
        std::fill(kept.begin(), kept.end(), 0);
        words.clear();
        for (int64_t s = 0; s < S; ++s) {
          if (chosen[s] && count[start[s]]++ == 0) words.push_back(start[s]);
        }
        std::sort(words.begin(), words.end(),
                  [&](int64_t a, int64_t c) { return word_before(draw[a], a, draw[c], c); });
        int64_t running = 0;
        for (int64_t w : words) {  // the prefix of words (by draw) that fits the cap
          if (running + count[w] > p.max_predictions) break;
          running += count[w];
          kept[w] = 1;
        }
        for (int64_t s = 0; s < S; ++s) chosen[s] = chosen[s] && kept[start[s]];
      }
      for (int64_t s = 0; s < S; ++s) write_token(p, base + s, ids[base + s], chosen[s] != 0, out, labels);
    }
  });
}

template <typename index_t>
void check_ids(const Tensor& ids, int64_t vocab) {
  const auto* x = ptr<const index_t>(ids);
  const int64_t n = ids.numel();
  if (n == 0) return;
  index_t lo = x[0], hi = x[0];
  for (int64_t t = 1; t < n; ++t) {  // branch-free min/max first; the slow loop only on failure
    lo = std::min(lo, x[t]);
    hi = std::max(hi, x[t]);
  }
  if (lo >= 0 && static_cast<int64_t>(hi) < vocab) return;
  for (int64_t t = 0; t < n; ++t) {
    FB_CHECK_VALUE(x[t] >= 0 && x[t] < vocab, "input_ids out of range: id ", static_cast<int64_t>(x[t]),
                      " at flat position ", t, " is outside [0, ", vocab, ")");
  }
}

std::tuple<Tensor, Tensor, Tensor> mlm_mask_cpu(Tensor input_ids, Tensor special_ids, OptTensor word_starts,
                                                int64_t vocab_size, int64_t mask_id, int64_t ignore_index,
                                                int64_t seed, int64_t offset, int64_t choose_threshold,
                                                int64_t mask_threshold, int64_t random_threshold,
                                                int64_t max_predictions) {
  MlmParams p = mlm_args(input_ids, special_ids, word_starts, vocab_size, mask_id, ignore_index, seed, offset,
                         choose_threshold, mask_threshold, random_threshold, max_predictions);
  const Tensor ids = torch::stable::contiguous(input_ids);
  const Tensor special = torch::stable::contiguous(special_ids);
  const int64_t* sp = ptr<const int64_t>(special);
  for (int64_t i = 0; i < p.n_special; ++i) {
    FB_CHECK_VALUE(sp[i] >= 0 && sp[i] < vocab_size, "special id ", sp[i], " is outside [0, ", vocab_size, ")");
    FB_CHECK_VALUE(i == 0 || sp[i] > sp[i - 1], "special ids must be sorted and unique");
  }
  if (p.ids_int32) {
    check_ids<int32_t>(ids, vocab_size);
  } else {
    check_ids<int64_t>(ids, vocab_size);
  }
  // Deliberate twin of the CUDA op's set-up in csrc/cuda/glue.cpp (the same outputs, host buffers).
  OptTensor ws;
  if (given(word_starts)) {
    ws = torch::stable::contiguous(*word_starts);
    p.word_starts = ptr<const uint8_t>(*ws);
  }
  Tensor out = torch::stable::empty_like(ids);
  Tensor labels = torch::stable::empty_like(ids);
  Tensor chosen = new_empty(ids, sizes_of(ids), ScalarType::Bool);
  p.ids = ids.data_ptr();
  p.special = sp;
  p.out = out.data_ptr();
  p.labels = labels.data_ptr();
  p.chosen = ptr<uint8_t>(chosen);
  if (p.ids_int32) {
    mlm_rows<int32_t>(p);
  } else {
    mlm_rows<int64_t>(p);
  }
  return {out, labels, chosen};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastbert, CPU, m) { m.impl("mlm_mask", TORCH_BOX(&mlm_mask_cpu)); }

}  // namespace fastbert
