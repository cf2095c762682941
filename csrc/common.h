// Argument checking and parameter packing shared by the CPU ops and the CUDA glue, on the LibTorch
// stable ABI (torch/csrc/stable, torch/headeronly; TORCH_TARGET_VERSION 2.10, set by setup.py): the
// built extension calls libtorch only through its C shim, so one build loads under every torch >= 2.10.
//
// Errors: the stable ABI cannot raise c10's typed errors. FB_CHECK_VALUE throws std::invalid_argument,
// which torch's Python binding turns into ValueError; FB_CHECK_TYPE throws fastbert::TypeError, a
// std::invalid_argument too (so also ValueError) whose message starts with "TypeError: " so that a
// Python caller can tell; the Python wrappers check dtypes themselves and raise TypeError first.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace fastbert {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// ---- errors -------------------------------------------------------------------------------------

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

struct TypeError : std::invalid_argument {
  explicit TypeError(const std::string& msg) : std::invalid_argument("TypeError: " + msg) {}
};

#define FB_CHECK_VALUE(cond, ...) \
  if (!(cond)) throw std::invalid_argument(::fastbert::cat(__VA_ARGS__))
#define FB_CHECK_TYPE(cond, ...) \
  if (!(cond)) throw ::fastbert::TypeError(::fastbert::cat(__VA_ARGS__))

// "[3, 37]", as Python prints a shape.
inline std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << '[';
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << ']';
  return s.str();
}

inline std::string dtype_str(ScalarType t) { return torch::headeronly::toString(t); }

inline std::string device_str(const Tensor& t) {
  const auto dev = t.device();
  std::string s = dev.type() == torch::headeronly::DeviceType::CUDA ? "cuda"
                  : dev.type() == torch::headeronly::DeviceType::CPU ? "cpu"
                                                                     : "device";
  return dev.index() >= 0 ? s + ":" + std::to_string(dev.index()) : s;
}

// ---- tensors ------------------------------------------------------------------------------------

// A new tensor of `dtype` on the device of `like`.
inline Tensor new_empty(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}
inline Tensor new_zeros(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_zeros(like, sizes, dtype);
}
inline std::vector<int64_t> sizes_of(const Tensor& t) {
  std::vector<int64_t> s(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) s[d] = t.size(d);
  return s;
}
inline bool same_sizes(const Tensor& a, const Tensor& b) { return sizes_of(a) == sizes_of(b); }

// contiguous, int64 copy of an index tensor (no copy when it already is one)
inline Tensor as_long(const Tensor& t) {
  return torch::stable::contiguous(torch::stable::to(t, ScalarType::Long));
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// ---- dtype dispatch -----------------------------------------------------------------------------

template <typename T>
struct AccType {
  using type = float;  // fp32 accumulation for fp32, fp16, bf16
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t_of = typename AccType<T>::type;

// f(T{}) with T the C++ type of a floating tensor dtype.
template <typename F>
void dispatch_floating(ScalarType t, const char* name, F&& f) {
  switch (t) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Double: f(double{}); break;
    case ScalarType::Half: f(Half{}); break;
    case ScalarType::BFloat16: f(BFloat16{}); break;
    default:
      FB_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64, got ", dtype_str(t));
  }
}

inline DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Double: return DType::kFloat64;
    default:
      FB_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64, got ",
                    dtype_str(t.scalar_type()));
  }
  return DType::kFloat32;
}

inline ScalarType acc_type(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// ---- checks -------------------------------------------------------------------------------------

inline void check_index_tensor(const Tensor& t, const char* name) {
  FB_CHECK_TYPE(t.scalar_type() == ScalarType::Long || t.scalar_type() == ScalarType::Int, name,
                " must be int64 or int32, got ", dtype_str(t.scalar_type()));
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* name) {
  FB_CHECK_VALUE(t.device() == ref.device(), name, " is on ", device_str(t), " but input_ids is on ",
                 device_str(ref));
}

// uint64 threshold of probability p in [0, 1]: a 32-bit word w is "below p" when w < threshold.
inline uint64_t prob_threshold(double p) {
  const double scaled = std::nearbyint(p * 4294967296.0);
  if (scaled <= 0) return 0;
  if (scaled >= 4294967296.0) return uint64_t(1) << 32;
  return static_cast<uint64_t>(scaled);
}

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Holds the checked (contiguous, int64-index) tensors of one embedding call and their pointers.
struct EmbedArgs {
  Tensor ids, tok, pos;
  OptTensor pos_ids, seg_ids, seg, ln_w, ln_b;
  EmbedParams p;
  int64_t batch = 0;
};

inline EmbedArgs embed_args(const Tensor& input_ids, const Tensor& token_weight, const Tensor& position_weight,
                            const OptTensor& segment_ids, const OptTensor& segment_weight,
                            const OptTensor& position_ids, const OptTensor& ln_weight, const OptTensor& ln_bias,
                            double eps, double dropout_p, int64_t seed, int64_t offset) {
  EmbedArgs a;
  check_index_tensor(input_ids, "input_ids");
  FB_CHECK_VALUE(input_ids.dim() == 2, "input_ids must be [batch, seq], got shape ", shape_str(input_ids));
  FB_CHECK_VALUE(token_weight.dim() == 2, "token_weight must be [vocab, hidden], got shape ",
                 shape_str(token_weight));
  FB_CHECK_VALUE(position_weight.dim() == 2, "position_weight must be [positions, hidden], got shape ",
                 shape_str(position_weight));
  const DType dt = to_dtype(token_weight, "token_weight");
  const ScalarType st = token_weight.scalar_type();
  const int64_t B = input_ids.size(0), S = input_ids.size(1), N = token_weight.size(1);
  FB_CHECK_VALUE(N > 0, "hidden size must be positive, token_weight has shape ", shape_str(token_weight));
  FB_CHECK_VALUE(token_weight.size(0) > 0, "token_weight has no rows");
  FB_CHECK_TYPE(position_weight.scalar_type() == st, "position_weight dtype ",
                dtype_str(position_weight.scalar_type()), " != token_weight dtype ", dtype_str(st));
  FB_CHECK_VALUE(position_weight.size(1) == N, "position_weight hidden size ", position_weight.size(1),
                 " != token_weight hidden size ", N);
  check_same_device(token_weight, input_ids, "token_weight");
  check_same_device(position_weight, input_ids, "position_weight");
  a.ids = as_long(input_ids);
  a.tok = torch::stable::contiguous(token_weight);
  a.pos = torch::stable::contiguous(position_weight);
  a.batch = B;
  EmbedParams& p = a.p;
  p.tokens = B * S;
  p.seq = S;
  p.hidden = N;
  p.vocab = token_weight.size(0);
  p.n_pos = position_weight.size(0);
  p.dtype = dt;
  if (given(position_ids)) {
    const Tensor& pi = *position_ids;
    check_index_tensor(pi, "position_ids");
    check_same_device(pi, input_ids, "position_ids");
    const bool row = pi.dim() == 1 && pi.size(0) == S;
    const bool full = pi.dim() == 2 && pi.size(0) == B && pi.size(1) == S;
    FB_CHECK_VALUE(row || full, "position_ids must be [seq] or [batch, seq] = [", B, ", ", S, "], got shape ",
                   shape_str(pi));
    a.pos_ids = as_long(pi);
    p.pos_ids = ptr<const int64_t>(*a.pos_ids);
    p.pos_row_stride = full ? S : 0;
  } else {
    FB_CHECK_VALUE(S <= p.n_pos, "sequence length ", S, " exceeds the position table (", p.n_pos, " rows)");
  }
  const bool has_seg_ids = given(segment_ids);
  const bool has_seg = given(segment_weight);
  FB_CHECK_VALUE(!has_seg_ids || has_seg, "segment_ids given without segment_weight");
  if (has_seg_ids) {
    const Tensor& si = *segment_ids;
    const Tensor& sw = *segment_weight;
    check_index_tensor(si, "segment_ids");
    check_same_device(si, input_ids, "segment_ids");
    check_same_device(sw, input_ids, "segment_weight");
    FB_CHECK_VALUE(same_sizes(si, input_ids), "segment_ids shape ", shape_str(si), " != input_ids shape ",
                   shape_str(input_ids));
    FB_CHECK_VALUE(sw.dim() == 2 && sw.size(1) == N && sw.size(0) > 0, "segment_weight must be [segments, ", N,
                   "], got shape ", shape_str(sw));
    FB_CHECK_TYPE(sw.scalar_type() == st, "segment_weight dtype ", dtype_str(sw.scalar_type()),
                  " != token_weight dtype ", dtype_str(st));
    a.seg_ids = as_long(si);
    a.seg = torch::stable::contiguous(sw);
    p.seg_ids = ptr<const int64_t>(*a.seg_ids);
    p.seg = a.seg->data_ptr();
    p.n_seg = sw.size(0);
  }
  const bool has_w = given(ln_weight);
  const bool has_b = given(ln_bias);
  FB_CHECK_VALUE(has_w == has_b, "ln_weight and ln_bias must be given together");
  if (has_w) {
    const std::array<std::pair<const Tensor*, const char*>, 2> params{
        {{&*ln_weight, "ln_weight"}, {&*ln_bias, "ln_bias"}}};
    for (const auto& [t, name] : params) {
      FB_CHECK_VALUE(t->dim() == 1 && t->size(0) == N, name, " must be [", N, "], got shape ", shape_str(*t));
      FB_CHECK_TYPE(t->scalar_type() == st, name, " dtype ", dtype_str(t->scalar_type()),
                    " != token_weight dtype ", dtype_str(st));
      check_same_device(*t, input_ids, name);
    }
    a.ln_w = torch::stable::contiguous(*ln_weight);
    a.ln_b = torch::stable::contiguous(*ln_bias);
    p.ln_w = a.ln_w->data_ptr();
    p.ln_b = a.ln_b->data_ptr();
    FB_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  }
  p.eps = eps;
  FB_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    p.dropout = true;
    p.keep_threshold = prob_threshold(1.0 - dropout_p);
    p.drop_scale = 1.0 / (1.0 - dropout_p);
    p.seed = static_cast<uint64_t>(seed);
    p.offset = static_cast<uint64_t>(offset);
  }
  p.ids = ptr<const int64_t>(a.ids);
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
inline MlmParams mlm_args(const Tensor& ids, const Tensor& special, const OptTensor& word_starts,
                          int64_t vocab_size, int64_t mask_id, int64_t ignore_index, int64_t seed, int64_t offset,
                          int64_t choose_threshold, int64_t mask_threshold, int64_t random_threshold,
                          int64_t max_predictions) {
  check_index_tensor(ids, "input_ids");
  FB_CHECK_VALUE(ids.dim() == 2, "input_ids must be [batch, seq], got shape ", shape_str(ids));
  FB_CHECK_TYPE(special.scalar_type() == ScalarType::Long, "special ids must be int64");
  FB_CHECK_VALUE(special.dim() == 1, "special ids must be 1-D");
  check_same_device(special, ids, "special ids");
  FB_CHECK_VALUE(vocab_size > 0 && vocab_size < (int64_t(1) << 32), "vocab_size must be in [1, 2^32), got ",
                 vocab_size);
  FB_CHECK_VALUE(mask_id >= 0 && mask_id < vocab_size, "mask_id ", mask_id, " is outside [0, ", vocab_size, ")");
  const int64_t two32 = int64_t(1) << 32;
  for (int64_t th : {choose_threshold, mask_threshold, random_threshold}) {
    FB_CHECK_VALUE(th >= 0 && th <= two32, "probability thresholds must be in [0, 2^32], got ", th);
  }
  FB_CHECK_VALUE(mask_threshold + random_threshold <= two32, "replace probabilities sum above 1");
  if (given(word_starts)) {
    FB_CHECK_TYPE(word_starts->scalar_type() == ScalarType::Bool, "word_starts must be bool, got ",
                  dtype_str(word_starts->scalar_type()));
    FB_CHECK_VALUE(same_sizes(*word_starts, ids), "word_starts shape ", shape_str(*word_starts),
                   " != input_ids shape ", shape_str(ids));
    check_same_device(*word_starts, ids, "word_starts");
  }
  MlmParams p;
  p.rows = ids.size(0);
  p.seq = ids.size(1);
  p.ids_int32 = ids.scalar_type() == ScalarType::Int;
  p.n_special = special.numel();
  FB_CHECK_VALUE(p.n_special < vocab_size || random_threshold == 0,
                 "every id is special: no id left for random replacement");
  p.vocab = vocab_size;
  p.mask_id = mask_id;
  p.ignore_index = ignore_index;
  if (p.ids_int32) {
    FB_CHECK_VALUE(ignore_index >= INT32_MIN && ignore_index <= INT32_MAX, "ignore_index does not fit int32 ids");
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
