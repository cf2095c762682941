// CUDA kernel of fastbert::mlm_mask (torch-free). Rules in kernels.h (MlmParams); the CPU loop is
// mlm_mask.cpp and both take every random word from philox_at(seed, offset, flat position), with
// integer thresholds, so their outputs are identical bit for bit (random words: mlm_common.h).
//
// One block per row, one thread per token (threads stride over the row when S > blockDim); loads
// and stores of ids/labels are coalesced along the row. Shared memory holds per-column state for
// whole-word masking and the max_predictions cap:
//   draw[S] u32   choose word w0 of each column
//   start[S] i32  column of the word start of each column
//   count[S] i32  chosen tokens of the word starting at each column
//   flag[S] u8    word-start flag, then the chosen flag
//   kept[S] u8    word kept under the cap
// Ids outside [0, vocab) set the error flag (the glue raises ValueError); they are never used as
// addresses.
#include "cuda_common.cuh"
#include "../mlm_common.h"
#include "../philox.h"

namespace fastbert {
namespace {

constexpr int kMlmThreads = 256;

template <typename index_t>
__global__ void __launch_bounds__(kMlmThreads) mlm_mask_kernel(const MlmParams p) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t S = p.seq;
  uint32_t* draw = reinterpret_cast<uint32_t*>(smem_raw);
  int32_t* start = reinterpret_cast<int32_t*>(draw + S);
  int32_t* count = start + S;
  uint8_t* flag = reinterpret_cast<uint8_t*>(count + S);
  uint8_t* kept = flag + S;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * S;
  const auto* ids = static_cast<const index_t*>(p.ids);

  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const int64_t id = ids[base + s];
    if (id < 0 || id >= p.vocab) report(p.error, kBadTokenId);
    draw[s] = choose_word(p.seed, p.offset, base + s);
    flag[s] = p.word_starts ? p.word_starts[base + s] : 1;
    count[s] = 0;
    kept[s] = 0;
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    int64_t k = s;
    while (k > 0 && !flag[k]) --k;  // the word start at or before s (column 0 when none)
    start[s] = static_cast<int32_t>(k);
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const int64_t id = ids[base + s];
    const bool candidate = !is_special(id, p.special, p.n_special);
    flag[s] = candidate && draw[start[s]] < p.choose_threshold;  // now: chosen
  }
  __syncthreads();
  if (p.max_predictions >= 0) {
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      if (flag[s]) atomicAdd(&count[start[s]], 1);
    }
    __syncthreads();
    // a word is kept when the chosen tokens of all words before it (by draw, then column) plus its
    // own fit the cap: the same prefix as the CPU's sorted greedy loop
    for (int64_t w = threadIdx.x; w < S; w += blockDim.x) {
      if (count[w] == 0) continue;
      int64_t before = 0;
      for (int64_t u = 0; u < S; ++u) {
        if (count[u] > 0 && word_before(draw[u], u, draw[w], w)) before += count[u];
      }
      kept[w] = before + count[w] <= p.max_predictions;
    }
    __syncthreads();
  }
  auto* out = static_cast<index_t*>(p.out);
  auto* labels = static_cast<index_t*>(p.labels);
  // Deliberate twin of write_token in csrc/mlm_mask.cpp (the same rule on the CPU).
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const int64_t t = base + s;
    const int64_t id = ids[t];
    const bool chosen = flag[s] && (p.max_predictions < 0 || kept[start[s]]);
    p.chosen[t] = chosen;
    if (!chosen) {
      out[t] = static_cast<index_t>(id);
      labels[t] = static_cast<index_t>(p.ignore_index);
      continue;
    }
    const Philox4 d = action_words(p.seed, p.offset, t);
    out[t] = static_cast<index_t>(mlm_replacement(id, d.v[1], d.v[2], p.mask_threshold, p.random_threshold,
                                                  p.mask_id, p.vocab, p.special, p.n_special));
    labels[t] = static_cast<index_t>(id);
  }
}

}  // namespace

size_t mlm_mask_smem_bytes(int64_t seq) { return static_cast<size_t>(seq) * (4 + 4 + 4 + 1 + 1); }

void mlm_mask_cuda(const MlmParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.seq == 0) return;
  const size_t smem = mlm_mask_smem_bytes(p.seq);
  const int threads = p.seq < kMlmThreads ? static_cast<int>((p.seq + 31) / 32 * 32) : kMlmThreads;
  if (p.ids_int32) {
    mlm_mask_kernel<int32_t><<<static_cast<unsigned>(p.rows), threads, smem, stream>>>(p);
  } else {
    mlm_mask_kernel<int64_t><<<static_cast<unsigned>(p.rows), threads, smem, stream>>>(p);
  }
}

}  // namespace fastbert
