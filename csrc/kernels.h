// Torch-free description of fastbert's C++/CUDA kernels: parameter structs on raw pointers and the
// CUDA launchers. Included by the CPU code, by the CUDA kernels (csrc/cuda/*.cu, which nvcc compiles
// without torch) and by the thin torch glue (csrc/cuda/glue.cpp).
//
// Shapes: B batch, S sequence, T = B * S tokens, N hidden, V token rows, P position rows, G segment
// rows. All index arrays are int64 and contiguous; tables are row-major [rows, N].
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastbert {

constexpr int kLnRowsPerChunk = 128;  // rows per LN-backward chunk (fixes the partial count)

// Floating dtypes of the embedding tables. Acc (accumulation) type: float, or double for kFloat64.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Error codes a kernel (or the CPU loop) reports through `error` (first one wins).
enum ErrorCode : int {
  kOk = 0,
  kBadTokenId = 1,     // an id outside [0, V) (embed) or [0, vocab) (mlm_mask)
  kBadPositionId = 2,  // a position id outside [0, P)
  kBadSegmentId = 3,   // a segment id outside [0, G)
};

// out[t] = dropout(LN(tok[ids[t]] + pos[pid(t)] + seg[sids[t]]))
//   pid(t) = pos_ids[b * pos_row_stride + s] when pos_ids, else s   (t = b * S + s)
struct EmbedParams {
  int64_t tokens = 0;  // T
  int64_t seq = 0;     // S
  int64_t hidden = 0;  // N
  int64_t vocab = 0, n_pos = 0, n_seg = 0;  // V, P, G
  const int64_t* ids = nullptr;      // [T]
  const int64_t* pos_ids = nullptr;  // [B, S] (pos_row_stride = S) or [S] (stride 0), or null
  int64_t pos_row_stride = 0;
  const int64_t* seg_ids = nullptr;  // [T] or null (then no segment table)
  const void* tok = nullptr;         // [V, N]
  const void* pos = nullptr;         // [P, N]
  const void* seg = nullptr;         // [G, N] or null
  const void* ln_w = nullptr;        // [N] or null (then no LayerNorm)
  const void* ln_b = nullptr;        // [N]
  void* out = nullptr;               // [T, N] forward output
  void* mean = nullptr;              // [T] acc type, written by forward when LN, read by backward
  void* rstd = nullptr;              // [T] acc type
  double eps = 1e-12;
  // dropout: element e = t * N + n is kept when philox_at(seed, offset, e / 4).v[e % 4] < keep_threshold
  bool dropout = false;
  uint64_t keep_threshold = 0;  // round((1 - p) * 2^32)
  double drop_scale = 1.0;      // 1 / (1 - p)
  uint64_t seed = 0, offset = 0;
  DType dtype = DType::kFloat32;
  int* error = nullptr;  // device (or host) flag, 0 when every id was in range
};

// Backward of EmbedParams' forward. grad [T, N] is dL/dout (table dtype).
struct EmbedBackwardParams {
  EmbedParams fwd;                // the forward's inputs; fwd.out unused
  const void* grad = nullptr;     // [T, N]
  void* dx = nullptr;             // [T, N] table dtype: dL/d(sum before LN), when LN or dropout
  void* ln_partial = nullptr;     // [n_chunks, 2, N] acc type, per-chunk sums of g*xhat and g
  int64_t n_chunks = 0;
  void* grad_ln_w = nullptr;      // [N] table dtype
  void* grad_ln_b = nullptr;      // [N]
};

#if defined(FASTBERT_WITH_CUDA) || defined(__CUDACC__)
}  // namespace fastbert
#include <cuda_runtime.h>
namespace fastbert {

// Forward: one warp per token row.
void embed_forward_cuda(const EmbedParams& p, cudaStream_t stream);

// LN/dropout backward: writes p.dx (acc type) and, with LN, p.ln_partial then grad_ln_w/grad_ln_b.
void embed_backward_dx_cuda(const EmbedBackwardParams& p, cudaStream_t stream);

// Deterministic segmented row sum: out[key[i]] = sum over the run of equal keys of src[perm[j]],
// keys sorted ascending (stable), rows equal to padding_idx (>= 0) or outside [0, R) skipped.
// src [T, N] (table dtype, or acc type when src_is_acc), out [R, N] table dtype, zero-initialised.
void segment_rows_sum_cuda(const void* src, bool src_is_acc, const int64_t* sorted_keys,
                           const int64_t* perm, int64_t T, int64_t N, int64_t R, int64_t padding_idx,
                           void* out, DType dtype, cudaStream_t stream);

// Non-deterministic scatter-add: acc_out[idx[t]] += src[t] with atomics (acc type [R, N]).
void scatter_add_atomic_cuda(const void* src, bool src_is_acc, const int64_t* idx, int64_t T,
                             int64_t N, int64_t R, int64_t padding_idx, void* acc_out, DType dtype,
                             cudaStream_t stream);

// out[s] = sum_b src[b * S + s] (default position ids). out [S, N] table dtype.
void column_sum_cuda(const void* src, bool src_is_acc, int64_t B, int64_t S, int64_t N, void* out,
                     DType dtype, cudaStream_t stream);

// Small tables (G <= kSmallTableRows): out[g] = sum_{t: idx[t] == g} src[t] in two deterministic
// stages through `partial` [ceil(T / kSmallTableChunk), G, N] acc type.
constexpr int kSmallTableRows = 32;
constexpr int kSmallTableChunk = 512;
void small_table_sum_cuda(const void* src, bool src_is_acc, const int64_t* idx, int64_t T, int64_t N,
                          int64_t G, int64_t padding_idx, void* partial, void* out, DType dtype,
                          cudaStream_t stream);

// mlm_mask, see MlmParams: one block per row with mlm_mask_smem_bytes(S) of shared memory
// (at most 48 KiB: S <= kMlmMaxSeqCuda).
struct MlmParams;
constexpr int64_t kMlmMaxSeqCuda = 3072;
size_t mlm_mask_smem_bytes(int64_t seq);
void mlm_mask_cuda(const MlmParams& p, cudaStream_t stream);
#endif

// BERT's masked-LM corruption of ids [B, S] (int64 or int32), row by row:
//   words of token t (mlm_common.h): w0 = choose_word(t); w1, w2 = action_words(t).v[1], .v[2].
//   word start ws(t): the last s' <= s of the row with word_starts set (column 0 when none, or
//   every token its own word without word_starts). A token is a candidate when not special; it is
//   chosen when w0(ws(t)) < choose_threshold. With max_predictions >= 0 the chosen words of a row are
//   taken in increasing (w0, start) order while the running count of chosen tokens stays
//   <= max_predictions (a prefix: the first word that does not fit ends the row).
//   chosen: w1 < mask_threshold -> mask_id; < mask_threshold + random_threshold -> the
//   scale_to(w2, vocab - n_special)-th non-special id; else unchanged.
struct MlmParams {
  int64_t rows = 0, seq = 0;
  bool ids_int32 = false;
  const void* ids = nullptr;            // [B, S]
  const uint8_t* word_starts = nullptr; // [B, S] or null
  const int64_t* special = nullptr;     // [K] sorted unique special ids (pad included)
  int64_t n_special = 0;
  int64_t vocab = 0, mask_id = 0, ignore_index = 0;
  uint64_t seed = 0, offset = 0;
  uint64_t choose_threshold = 0, mask_threshold = 0, random_threshold = 0;
  int64_t max_predictions = -1;
  void* out = nullptr;         // [B, S] ids dtype
  void* labels = nullptr;      // [B, S] ids dtype
  uint8_t* chosen = nullptr;   // [B, S] bool
  int* error = nullptr;
};

}  // namespace fastbert
