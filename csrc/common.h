// Argument checking and parameter packing shared by the CPU ops and the CUDA glue.
// TORCH_CHECK_TYPE raises TypeError and TORCH_CHECK_VALUE raises ValueError in Python.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "kernels.h"

namespace fastbert {

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_index_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                   " must be int64 or int32, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but input_ids is on ",
                    ref.device());
}

// uint64 threshold of probability p in [0, 1]: a 32-bit word w is "below p" when w < threshold.
inline uint64_t prob_threshold(double p) {
  const double scaled = std::nearbyint(p * 4294967296.0);
  if (scaled <= 0) return 0;
  if (scaled >= 4294967296.0) return uint64_t(1) << 32;
  return static_cast<uint64_t>(scaled);
}

// Holds the checked (contiguous, int64-index) tensors of one embedding call and their pointers.
struct EmbedArgs {
  at::Tensor ids, tok, pos, pos_ids, seg_ids, seg, ln_w, ln_b;
  EmbedParams p;
  int64_t batch = 0;
};

inline EmbedArgs embed_args(const at::Tensor& input_ids, const at::Tensor& token_weight,
                            const at::Tensor& position_weight,
                            const c10::optional<at::Tensor>& segment_ids,
                            const c10::optional<at::Tensor>& segment_weight,
                            const c10::optional<at::Tensor>& position_ids,
                            const c10::optional<at::Tensor>& ln_weight,
                            const c10::optional<at::Tensor>& ln_bias, double eps, double dropout_p,
                            int64_t seed, int64_t offset) {
  EmbedArgs a;
  check_index_tensor(input_ids, "input_ids");
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "input_ids must be [batch, seq], got shape ", input_ids.sizes());
  TORCH_CHECK_VALUE(token_weight.dim() == 2, "token_weight must be [vocab, hidden], got shape ",
                    token_weight.sizes());
  TORCH_CHECK_VALUE(position_weight.dim() == 2, "position_weight must be [positions, hidden], got shape ",
                    position_weight.sizes());
  const DType dt = to_dtype(token_weight, "token_weight");
  const int64_t B = input_ids.size(0), S = input_ids.size(1), N = token_weight.size(1);
  TORCH_CHECK_VALUE(N > 0, "hidden size must be positive, token_weight has shape ", token_weight.sizes());
  TORCH_CHECK_VALUE(token_weight.size(0) > 0, "token_weight has no rows");
  TORCH_CHECK_TYPE(position_weight.scalar_type() == token_weight.scalar_type(), "position_weight dtype ",
                   position_weight.scalar_type(), " != token_weight dtype ", token_weight.scalar_type());
  TORCH_CHECK_VALUE(position_weight.size(1) == N, "position_weight hidden size ", position_weight.size(1),
                    " != token_weight hidden size ", N);
  check_same_device(token_weight, input_ids, "token_weight");
  check_same_device(position_weight, input_ids, "position_weight");
  a.ids = input_ids.to(at::kLong).contiguous();
  a.tok = token_weight.contiguous();
  a.pos = position_weight.contiguous();
  a.batch = B;
  EmbedParams& p = a.p;
  p.tokens = B * S;
  p.seq = S;
  p.hidden = N;
  p.vocab = token_weight.size(0);
  p.n_pos = position_weight.size(0);
  p.dtype = dt;
  if (position_ids.has_value() && position_ids->defined()) {
    const at::Tensor& pi = *position_ids;
    check_index_tensor(pi, "position_ids");
    check_same_device(pi, input_ids, "position_ids");
    const bool row = pi.dim() == 1 && pi.size(0) == S;
    const bool full = pi.dim() == 2 && pi.size(0) == B && pi.size(1) == S;
    TORCH_CHECK_VALUE(row || full, "position_ids must be [seq] or [batch, seq] = [", B, ", ", S,
                      "], got shape ", pi.sizes());
    a.pos_ids = pi.to(at::kLong).contiguous();
    p.pos_ids = a.pos_ids.data_ptr<int64_t>();
    p.pos_row_stride = full ? S : 0;
  } else {
    TORCH_CHECK_VALUE(S <= p.n_pos, "sequence length ", S, " exceeds the position table (",
                      p.n_pos, " rows)");
  }
  const bool has_seg_ids = segment_ids.has_value() && segment_ids->defined();
  const bool has_seg = segment_weight.has_value() && segment_weight->defined();
  TORCH_CHECK_VALUE(!has_seg_ids || has_seg, "segment_ids given without segment_weight");
  if (has_seg_ids) {
    const at::Tensor& si = *segment_ids;
    const at::Tensor& sw = *segment_weight;
    check_index_tensor(si, "segment_ids");
    check_same_device(si, input_ids, "segment_ids");
    check_same_device(sw, input_ids, "segment_weight");
    TORCH_CHECK_VALUE(si.sizes() == input_ids.sizes(), "segment_ids shape ", si.sizes(),
                      " != input_ids shape ", input_ids.sizes());
    TORCH_CHECK_VALUE(sw.dim() == 2 && sw.size(1) == N && sw.size(0) > 0,
                      "segment_weight must be [segments, ", N, "], got shape ", sw.sizes());
    TORCH_CHECK_TYPE(sw.scalar_type() == token_weight.scalar_type(), "segment_weight dtype ",
                     sw.scalar_type(), " != token_weight dtype ", token_weight.scalar_type());
    a.seg_ids = si.to(at::kLong).contiguous();
    a.seg = sw.contiguous();
    p.seg_ids = a.seg_ids.data_ptr<int64_t>();
    p.seg = a.seg.data_ptr();
    p.n_seg = sw.size(0);
  }
  const bool has_w = ln_weight.has_value() && ln_weight->defined();
  const bool has_b = ln_bias.has_value() && ln_bias->defined();
  TORCH_CHECK_VALUE(has_w == has_b, "ln_weight and ln_bias must be given together");
  if (has_w) {
    for (const at::Tensor* t : {&*ln_weight, &*ln_bias}) {
      const char* name = t == &*ln_weight ? "ln_weight" : "ln_bias";
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == N, name, " must be [", N, "], got shape ",
                        t->sizes());
      TORCH_CHECK_TYPE(t->scalar_type() == token_weight.scalar_type(), name, " dtype ", t->scalar_type(),
                       " != token_weight dtype ", token_weight.scalar_type());
      check_same_device(*t, input_ids, name);
    }
    a.ln_w = ln_weight->contiguous();
    a.ln_b = ln_bias->contiguous();
    p.ln_w = a.ln_w.data_ptr();
    p.ln_b = a.ln_b.data_ptr();
    TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  }
  p.eps = eps;
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    p.dropout = true;
    p.keep_threshold = prob_threshold(1.0 - dropout_p);
    p.drop_scale = 1.0 / (1.0 - dropout_p);
    p.seed = static_cast<uint64_t>(seed);
    p.offset = static_cast<uint64_t>(offset);
  }
  p.ids = a.ids.data_ptr<int64_t>();
  p.tok = a.tok.data_ptr();
  p.pos = a.pos.data_ptr();
  return a;
}

inline std::string embed_error_message(int code, const EmbedParams& p) {
  switch (code) {
    case kBadTokenId:
      return "input_ids out of range: every id must be in [0, " + std::to_string(p.vocab) + ")";
    case kBadPositionId:
      return "position_ids out of range: every position must be in [0, " + std::to_string(p.n_pos) + ")";
    case kBadSegmentId:
      return "segment_ids out of range: every segment id must be in [0, " + std::to_string(p.n_seg) + ")";
    default:
      return "unknown error " + std::to_string(code);
  }
}

// Checks of mlm_mask shared by CPU and CUDA; returns the MlmParams with pointers unset.
inline MlmParams mlm_args(const at::Tensor& ids, const at::Tensor& special,
                          const c10::optional<at::Tensor>& word_starts, int64_t vocab_size, int64_t mask_id,
                          int64_t ignore_index, int64_t seed, int64_t offset, int64_t choose_threshold,
                          int64_t mask_threshold, int64_t random_threshold, int64_t max_predictions) {
  check_index_tensor(ids, "input_ids");
  TORCH_CHECK_VALUE(ids.dim() == 2, "input_ids must be [batch, seq], got shape ", ids.sizes());
  TORCH_CHECK_TYPE(special.scalar_type() == at::kLong, "special ids must be int64");
  TORCH_CHECK_VALUE(special.dim() == 1, "special ids must be 1-D");
  check_same_device(special, ids, "special ids");
  TORCH_CHECK_VALUE(vocab_size > 0 && vocab_size < (int64_t(1) << 32), "vocab_size must be in [1, 2^32), got ",
                    vocab_size);
  TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < vocab_size, "mask_id ", mask_id, " is outside [0, ",
                    vocab_size, ")");
  const int64_t two32 = int64_t(1) << 32;
  for (int64_t th : {choose_threshold, mask_threshold, random_threshold}) {
    TORCH_CHECK_VALUE(th >= 0 && th <= two32, "probability thresholds must be in [0, 2^32], got ", th);
  }
  TORCH_CHECK_VALUE(mask_threshold + random_threshold <= two32, "replace probabilities sum above 1");
  if (word_starts.has_value() && word_starts->defined()) {
    TORCH_CHECK_TYPE(word_starts->scalar_type() == at::kBool, "word_starts must be bool, got ",
                     word_starts->scalar_type());
    TORCH_CHECK_VALUE(word_starts->sizes() == ids.sizes(), "word_starts shape ", word_starts->sizes(),
                      " != input_ids shape ", ids.sizes());
    check_same_device(*word_starts, ids, "word_starts");
  }
  MlmParams p;
  p.rows = ids.size(0);
  p.seq = ids.size(1);
  p.ids_int32 = ids.scalar_type() == at::kInt;
  p.n_special = special.numel();
  TORCH_CHECK_VALUE(p.n_special < vocab_size || random_threshold == 0,
                    "every id is special: no id left for random replacement");
  p.vocab = vocab_size;
  p.mask_id = mask_id;
  p.ignore_index = ignore_index;
  if (p.ids_int32) {
    TORCH_CHECK_VALUE(ignore_index >= INT32_MIN && ignore_index <= INT32_MAX,
                      "ignore_index does not fit int32 ids");
  }
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.choose_threshold = static_cast<uint64_t>(choose_threshold);
  p.mask_threshold = static_cast<uint64_t>(mask_threshold);
  p.random_threshold = static_cast<uint64_t>(random_threshold);
  p.max_predictions = max_predictions;
  return p;
}

}  // namespace fastbert
