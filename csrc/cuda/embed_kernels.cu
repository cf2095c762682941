// CUDA kernels of fastbert::embedding_gather (torch-free: raw pointers and cudaStream_t; the torch
// glue is glue.cpp). Math and shapes as in embed.cpp and kernels.h:
//   forward   out[t] = dropout(LN(tok[ids[t]] + pos[pid(t)] + seg[sids[t]]))      t in [0, T)
//   backward  g = dout * keep / (1 - p); xhat = (x - mean) * rstd
//             dx = rstd * (g*w - mean_n(g*w) - xhat * mean_n(g*w*xhat)); dw = sum_t g*xhat; db = sum_t g
//             dtok[v] = sum_{ids[t] = v} dx[t] (and likewise for positions and segments)
// Layout: one warp per token row, lanes over the hidden dim in aligned packs of VEC elements
// (16-byte loads for 16-bit tables), accumulation in fp32 (fp64 for fp64 tables). Ids outside their
// table set a device-side error flag (read back by the glue, which raises) and are never read.
// Every reduction has a fixed order, so all outputs are deterministic except the optional atomic
// scatter (scatter_add_atomic_cuda).
#include "cuda_common.cuh"
#include "../philox.h"

namespace fastbert {
namespace {

constexpr int kWarps = 4;  // rows per block of the forward / LN-backward kernels

// pid(t) and sid(t), or an error code when an id is outside its table.
__device__ __forceinline__ int row_ids(const EmbedParams& p, int64_t t, int64_t* id, int64_t* pid,
                                       int64_t* sid) {
  const int64_t s = t % p.seq;
  *id = p.ids[t];
  *pid = p.pos_ids ? p.pos_ids[(t / p.seq) * p.pos_row_stride + s] : s;
  *sid = p.seg_ids ? p.seg_ids[t] : 0;
  if (*id < 0 || *id >= p.vocab) return kBadTokenId;
  if (*pid < 0 || *pid >= p.n_pos) return kBadPositionId;
  if (p.seg_ids && (*sid < 0 || *sid >= p.n_seg)) return kBadSegmentId;
  return kOk;
}

// Dropout keep bit of element e (see kernels.h): Philox word e % 4 of counter e / 4. Consecutive
// elements share a Philox call; `cache` holds the last group.
struct KeepMask {
  uint64_t group = ~uint64_t(0);
  Philox4 words;
  __device__ __forceinline__ bool keep(const EmbedParams& p, int64_t e) {
    const uint64_t g = static_cast<uint64_t>(e) >> 2;
    if (g != group) {
      words = philox_at(p.seed, p.offset, g);
      group = g;
    }
    return static_cast<uint64_t>(philox_word(words, e & 3)) < p.keep_threshold;
  }
};

// x[0..VEC) = tok + pos (+ seg) at pack v of the row.
template <typename T, int VEC, typename A>
__device__ __forceinline__ void gather_pack(const EmbedParams& p, int64_t id, int64_t pid, int64_t sid,
                                            int64_t v, A* x) {
  using P = Pack<T, VEC>;
  const int64_t nv = p.hidden / VEC;
  const P a = reinterpret_cast<const P*>(p.tok)[id * nv + v];
  const P b = reinterpret_cast<const P*>(p.pos)[pid * nv + v];
#pragma unroll
  for (int j = 0; j < VEC; ++j) x[j] = to_acc(a.v[j]) + to_acc(b.v[j]);
  if (p.seg_ids) {
    const P c = reinterpret_cast<const P*>(p.seg)[sid * nv + v];
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] += to_acc(c.v[j]);
  }
}

// Pointers: tok [V, N], pos [P, N], seg [G, N], ln_w/ln_b [N], out [T, N] of T; mean/rstd [T] of A.
// Shared memory (LN only): kWarps rows of N accumulators, element j of pack v at xs[j * nv + v] so
// that the 32 lanes of a warp touch 32 consecutive words (no bank conflicts).
template <typename T, int VEC, bool LN>
__global__ void __launch_bounds__(kWarps * 32) embed_forward_kernel(const EmbedParams p) {
  using A = typename Acc<T>::type;
  using P = Pack<T, VEC>;
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= p.tokens) return;  // no block-level barrier below
  const int64_t N = p.hidden, nv = N / VEC;
  int64_t id, pid, sid;
  const int code = row_ids(p, t, &id, &pid, &sid);
  if (code != kOk) {
    if (lane == 0) report(p.error, code);
    return;
  }
  A* xs = reinterpret_cast<A*>(smem_raw) + warp * N;
  P* out = reinterpret_cast<P*>(p.out) + t * nv;
  KeepMask mask;
  const A scale = static_cast<A>(p.drop_scale);
  auto store = [&](int64_t v, const A* y) {
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A val = y[j];
      if (p.dropout) val = mask.keep(p, t * N + v * VEC + j) ? val * scale : A(0);
      o.v[j] = Cast<T>::from(val);
    }
    out[v] = o;
  };
  A sum = 0;
  for (int64_t v = lane; v < nv; v += 32) {
    A x[VEC];
    gather_pack<T, VEC>(p, id, pid, sid, v, x);
    if (LN) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xs[j * nv + v] = x[j];
        sum += x[j];
      }
    } else {
      store(v, x);
    }
  }
  if (!LN) return;
  const A mean = warp_sum(sum) / static_cast<A>(N);
  A sq = 0;
  for (int64_t v = lane; v < nv; v += 32) {  // each lane reads back the packs it wrote
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = xs[j * nv + v] - mean;
      sq += d * d;
    }
  }
  const A rstd = A(1) / sqrt(warp_sum(sq) / static_cast<A>(N) + static_cast<A>(p.eps));
  if (lane == 0) {
    static_cast<A*>(p.mean)[t] = mean;
    static_cast<A*>(p.rstd)[t] = rstd;
  }
  const P* w = reinterpret_cast<const P*>(p.ln_w);
  const P* b = reinterpret_cast<const P*>(p.ln_b);
  for (int64_t v = lane; v < nv; v += 32) {
    const P wv = w[v], bv = b[v];
    A y[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = (xs[j * nv + v] - mean) * rstd * to_acc(wv.v[j]) + to_acc(bv.v[j]);
    store(v, y);
  }
}

// dx [T, N] (T, rounded like eager's LayerNorm backward output) from grad [T, N] (T) through
// dropout and LayerNorm; per-block partial sums of g*xhat and g over kLnRowsPerChunk rows into
// ln_partial [chunks, 2, N] (A). Shared memory (LN): kWarps x 2 x N accumulators, each column owned
// by one lane of each warp (no atomics), element j of pack v at [j * nv + v] (no bank conflicts).
template <typename T, int VEC, bool LN>
__global__ void __launch_bounds__(kWarps * 32) embed_backward_dx_kernel(const EmbedBackwardParams q) {
  using A = typename Acc<T>::type;
  using P = Pack<T, VEC>;
  extern __shared__ unsigned char smem_raw[];
  const EmbedParams& p = q.fwd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t N = p.hidden, nv = N / VEC;
  A* pw = reinterpret_cast<A*>(smem_raw) + warp * 2 * N;
  A* pb = pw + N;
  if (LN) {
    for (int64_t v = lane; v < nv; v += 32) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) pw[j * nv + v] = pb[j * nv + v] = A(0);
    }
  }
  const A scale = static_cast<A>(p.drop_scale);
  const P* w = reinterpret_cast<const P*>(p.ln_w);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kLnRowsPerChunk;
  const int64_t t1 = t0 + kLnRowsPerChunk < p.tokens ? t0 + kLnRowsPerChunk : p.tokens;
  for (int64_t t = t0 + warp; t < t1; t += kWarps) {
    const P* g = reinterpret_cast<const P*>(q.grad) + t * nv;
    P* dx = static_cast<P*>(q.dx) + t * nv;
    int64_t id, pid, sid;
    const bool ok = row_ids(p, t, &id, &pid, &sid) == kOk;  // checked by the forward; never read out of range
    KeepMask mask;
    auto load_g = [&](int64_t v, A* gd) {
      const P gv = g[v];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gd[j] = to_acc(gv.v[j]);
        if (p.dropout) gd[j] = mask.keep(p, t * N + v * VEC + j) ? gd[j] * scale : A(0);
      }
    };
    if (!LN || !ok) {
      for (int64_t v = lane; v < nv; v += 32) {
        A gd[VEC];
        load_g(v, gd);
        P o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = Cast<T>::from(ok ? gd[j] : A(0));
        dx[v] = o;
      }
      continue;
    }
    const A mu = static_cast<const A*>(p.mean)[t], rs = static_cast<const A*>(p.rstd)[t];
    A s1 = 0, s2 = 0;
    for (int64_t v = lane; v < nv; v += 32) {
      A gd[VEC], x[VEC];
      load_g(v, gd);
      gather_pack<T, VEC>(p, id, pid, sid, v, x);
      const P wv = w[v];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xhat = (x[j] - mu) * rs;
        pw[j * nv + v] += gd[j] * xhat;
        pb[j * nv + v] += gd[j];
        const A dxhat = gd[j] * to_acc(wv.v[j]);
        s1 += dxhat;
        s2 += dxhat * xhat;
      }
    }
    s1 = warp_sum(s1) / static_cast<A>(N);
    s2 = warp_sum(s2) / static_cast<A>(N);
    mask = KeepMask();
    for (int64_t v = lane; v < nv; v += 32) {  // second pass re-reads the (cached) rows
      A gd[VEC], x[VEC];
      load_g(v, gd);
      gather_pack<T, VEC>(p, id, pid, sid, v, x);
      const P wv = w[v];
      P o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xhat = (x[j] - mu) * rs;
        o.v[j] = Cast<T>::from(rs * (gd[j] * to_acc(wv.v[j]) - s1 - xhat * s2));
      }
      dx[v] = o;
    }
  }
  if (!LN) return;
  __syncthreads();
  A* partial = static_cast<A*>(q.ln_partial) + static_cast<int64_t>(blockIdx.x) * 2 * N;
  const A* base = reinterpret_cast<const A*>(smem_raw);
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t at = (n % VEC) * nv + n / VEC;  // the [j * nv + v] slot of column n
    A sw = 0, sb = 0;
    for (int k = 0; k < kWarps; ++k) {
      sw += base[k * 2 * N + at];
      sb += base[k * 2 * N + N + at];
    }
    partial[n] = sw;
    partial[N + n] = sb;
  }
}

// grad_w[n] = sum_c partial[c][0][n], grad_b[n] = sum_c partial[c][1][n], chunks in order.
template <typename T>
__global__ void ln_param_grad_kernel(const typename Acc<T>::type* partial, int64_t chunks, int64_t N,
                                     T* grad_w, T* grad_b) {
  using A = typename Acc<T>::type;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  A sw = 0, sb = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    sw += partial[c * 2 * N + n];
    sb += partial[c * 2 * N + N + n];
  }
  grad_w[n] = Cast<T>::from(sw);
  grad_b[n] = Cast<T>::from(sb);
}

// One warp per sorted position i; the warp at the start of a run of equal keys sums the run's rows
// src[perm[j]] (in sorted, i.e. stable token, order) and writes out[key]. src [T, N] (S), out [R, N].
// Columns go in blocks of 32 * kPacks packs; within a block each lane keeps kPacks packs of
// accumulators in registers and, row after row, issues kPacks independent loads.
constexpr int kPacks = 8;

template <typename S, typename T, int VEC>
__global__ void segment_rows_sum_kernel(const S* src, const int64_t* keys, const int64_t* perm, int64_t n_rows,
                                        int64_t N, int64_t R, int64_t padding_idx, T* out) {
  using A = typename Acc<T>::type;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n_rows) return;
  const int64_t key = keys[i];
  if ((i > 0 && keys[i - 1] == key) || key == padding_idx || key < 0 || key >= R) return;
  int64_t end = i + 1;
  while (end < n_rows && keys[end] == key) ++end;
  const int64_t nv = N / VEC;
  using PS = Pack<S, VEC>;
  using PT = Pack<T, VEC>;
  for (int64_t v0 = 0; v0 < nv; v0 += 32 * kPacks) {
    A acc[kPacks][VEC];
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[u][j] = A(0);
    }
    for (int64_t k = i; k < end; ++k) {
      const PS* row = reinterpret_cast<const PS*>(src) + perm[k] * nv;
#pragma unroll
      for (int u = 0; u < kPacks; ++u) {
        const int64_t v = v0 + lane + 32 * u;
        if (v < nv) {
          const PS x = row[v];
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[u][j] += to_acc(x.v[j]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
      const int64_t v = v0 + lane + 32 * u;
      if (v < nv) {
        PT o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = Cast<T>::from(acc[u][j]);
        reinterpret_cast<PT*>(out)[key * nv + v] = o;
      }
    }
  }
}

// One warp per token: acc_out[idx[t]] += src[t] with atomics. acc_out [R, N] of A.
template <typename S, typename A>
__global__ void scatter_add_atomic_kernel(const S* src, const int64_t* idx, int64_t n_rows, int64_t N, int64_t R,
                                          int64_t padding_idx, A* acc_out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (t >= n_rows) return;
  const int64_t key = idx[t];
  if (key == padding_idx || key < 0 || key >= R) return;
  for (int64_t n = threadIdx.x % 32; n < N; n += 32) {
    atomicAdd(acc_out + key * N + n, static_cast<A>(to_acc(src[t * N + n])));
  }
}

// out[s, n] = sum_b src[b, s, n]: one thread per (s, n), b in order. src [B, S, N], out [>= S, N].
template <typename S, typename T>
__global__ void column_sum_kernel(const S* src, int64_t B, int64_t seq, int64_t N, T* out) {
  using A = typename Acc<T>::type;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t s = blockIdx.y;
  if (n >= N) return;
  A acc = 0;
  for (int64_t b = 0; b < B; ++b) acc += to_acc(src[(b * seq + s) * N + n]);
  out[s * N + n] = Cast<T>::from(acc);
}

// Stage 1 of a small-table gradient: block (chunk, column block) sums its kSmallTableChunk rows per
// table row in shared memory acc[G][blockDim] (thread-owned columns) into partial [chunks, G, N].
template <typename S, typename A>
__global__ void small_table_partial_kernel(const S* src, const int64_t* idx, int64_t n_rows, int64_t N,
                                           int64_t G, A* partial) {
  extern __shared__ unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);
  const int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t g = 0; g < G; ++g) acc[g * blockDim.x + threadIdx.x] = A(0);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kSmallTableChunk;
  const int64_t t1 = t0 + kSmallTableChunk < n_rows ? t0 + kSmallTableChunk : n_rows;
  if (n < N) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = idx[t];
      if (g >= 0 && g < G) acc[g * blockDim.x + threadIdx.x] += to_acc(src[t * N + n]);
    }
    for (int64_t g = 0; g < G; ++g) partial[(blockIdx.x * G + g) * N + n] = acc[g * blockDim.x + threadIdx.x];
  }
}

// Stage 2: out[g, n] = sum over chunks in order (padding row left zero).
template <typename T>
__global__ void small_table_finish_kernel(const typename Acc<T>::type* partial, int64_t chunks, int64_t G,
                                          int64_t N, int64_t padding_idx, T* out) {
  using A = typename Acc<T>::type;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= G * N || e / N == padding_idx) return;
  A acc = 0;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * G * N + e];
  out[e] = Cast<T>::from(acc);
}

// Widest pack such that N and every pointer allow it: 16 bytes of T, else 1 element.
template <typename T>
int pack_width(int64_t N, std::initializer_list<const void*> ptrs) {
  const int vec = 16 / static_cast<int>(sizeof(T));
  if (vec <= 1 || N % vec != 0) return 1;
  for (const void* q : ptrs) {
    if (!aligned(q, 16)) return 1;
  }
  return vec;
}

}  // namespace

void embed_forward_cuda(const EmbedParams& p, cudaStream_t stream) {
  if (p.tokens == 0) return;
  // Deliberate twin of the launch in embed_backward_dx_cuda: one template instance per (vector
  // width, LayerNorm) pair, picked at run time.
  FB_DISPATCH_DTYPE(p.dtype, T, {
    using A = typename Acc<T>::type;
    const int vec = pack_width<T>(p.hidden, {p.tok, p.pos, p.seg, p.ln_w, p.ln_b, p.out});
    const bool ln = p.ln_w != nullptr;
    const size_t smem = ln ? kWarps * p.hidden * sizeof(A) : 0;
    const unsigned grid = ceil_div(p.tokens, kWarps);
    constexpr int kVec = 16 / sizeof(T) > 1 ? 16 / sizeof(T) : 1;
    if (vec == kVec && ln) {
      embed_forward_kernel<T, kVec, true><<<grid, kWarps * 32, smem, stream>>>(p);
    } else if (vec == kVec) {
      embed_forward_kernel<T, kVec, false><<<grid, kWarps * 32, 0, stream>>>(p);
    } else if (ln) {
      embed_forward_kernel<T, 1, true><<<grid, kWarps * 32, smem, stream>>>(p);
    } else {
      embed_forward_kernel<T, 1, false><<<grid, kWarps * 32, 0, stream>>>(p);
    }
  });
}

void embed_backward_dx_cuda(const EmbedBackwardParams& q, cudaStream_t stream) {
  const EmbedParams& p = q.fwd;
  if (p.tokens == 0) return;
  // Deliberate twin of the launch in embed_forward_cuda (see there).
  FB_DISPATCH_DTYPE(p.dtype, T, {
    using A = typename Acc<T>::type;
    const int vec = pack_width<T>(p.hidden, {p.tok, p.pos, p.seg, p.ln_w, q.grad});
    const bool ln = p.ln_w != nullptr;
    const size_t smem = ln ? kWarps * 2 * p.hidden * sizeof(A) : 0;
    const unsigned grid = ceil_div(p.tokens, kLnRowsPerChunk);
    constexpr int kVec = 16 / sizeof(T) > 1 ? 16 / sizeof(T) : 1;
    if (vec == kVec && ln) {
      embed_backward_dx_kernel<T, kVec, true><<<grid, kWarps * 32, smem, stream>>>(q);
    } else if (vec == kVec) {
      embed_backward_dx_kernel<T, kVec, false><<<grid, kWarps * 32, 0, stream>>>(q);
    } else if (ln) {
      embed_backward_dx_kernel<T, 1, true><<<grid, kWarps * 32, smem, stream>>>(q);
    } else {
      embed_backward_dx_kernel<T, 1, false><<<grid, kWarps * 32, 0, stream>>>(q);
    }
    if (ln) {
      ln_param_grad_kernel<T><<<ceil_div(p.hidden, 256), 256, 0, stream>>>(
          static_cast<const A*>(q.ln_partial), grid, p.hidden, static_cast<T*>(q.grad_ln_w),
          static_cast<T*>(q.grad_ln_b));
    }
  });
}

void segment_rows_sum_cuda(const void* src, bool src_is_acc, const int64_t* sorted_keys, const int64_t* perm,
                           int64_t n_rows, int64_t N, int64_t R, int64_t padding_idx, void* out, DType dtype,
                           cudaStream_t stream) {
  if (n_rows == 0) return;
  const unsigned grid = ceil_div(n_rows, kWarps);
  FB_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    // packs of 4 elements (16 bytes of fp32 source) when the sizes and pointers allow
    const bool v4 = N % 4 == 0 && aligned(src, 4 * (src_is_acc ? sizeof(A) : sizeof(T))) &&
                    aligned(out, 4 * sizeof(T));
    if (src_is_acc) {
      const A* s = static_cast<const A*>(src);
      if (v4) {
        segment_rows_sum_kernel<A, T, 4><<<grid, kWarps * 32, 0, stream>>>(s, sorted_keys, perm, n_rows, N, R,
                                                                          padding_idx, static_cast<T*>(out));
      } else {
        segment_rows_sum_kernel<A, T, 1><<<grid, kWarps * 32, 0, stream>>>(s, sorted_keys, perm, n_rows, N, R,
                                                                          padding_idx, static_cast<T*>(out));
      }
    } else {
      const T* s = static_cast<const T*>(src);
      if (v4) {
        segment_rows_sum_kernel<T, T, 4><<<grid, kWarps * 32, 0, stream>>>(s, sorted_keys, perm, n_rows, N, R,
                                                                          padding_idx, static_cast<T*>(out));
      } else {
        segment_rows_sum_kernel<T, T, 1><<<grid, kWarps * 32, 0, stream>>>(s, sorted_keys, perm, n_rows, N, R,
                                                                          padding_idx, static_cast<T*>(out));
      }
    }
  });
}

void scatter_add_atomic_cuda(const void* src, bool src_is_acc, const int64_t* idx, int64_t n_rows, int64_t N,
                             int64_t R, int64_t padding_idx, void* acc_out, DType dtype, cudaStream_t stream) {
  if (n_rows == 0) return;
  const unsigned grid = ceil_div(n_rows, kWarps);
  FB_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    if (src_is_acc) {
      scatter_add_atomic_kernel<A, A><<<grid, kWarps * 32, 0, stream>>>(
          static_cast<const A*>(src), idx, n_rows, N, R, padding_idx, static_cast<A*>(acc_out));
    } else {
      scatter_add_atomic_kernel<T, A><<<grid, kWarps * 32, 0, stream>>>(
          static_cast<const T*>(src), idx, n_rows, N, R, padding_idx, static_cast<A*>(acc_out));
    }
  });
}

void column_sum_cuda(const void* src, bool src_is_acc, int64_t B, int64_t S, int64_t N, void* out, DType dtype,
                     cudaStream_t stream) {
  if (B * S == 0) return;
  const dim3 grid(ceil_div(N, 256), static_cast<unsigned>(S));
  FB_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    if (src_is_acc) {
      column_sum_kernel<A, T><<<grid, 256, 0, stream>>>(static_cast<const A*>(src), B, S, N, static_cast<T*>(out));
    } else {
      column_sum_kernel<T, T><<<grid, 256, 0, stream>>>(static_cast<const T*>(src), B, S, N, static_cast<T*>(out));
    }
  });
}

void small_table_sum_cuda(const void* src, bool src_is_acc, const int64_t* idx, int64_t n_rows, int64_t N,
                          int64_t G, int64_t padding_idx, void* partial, void* out, DType dtype,
                          cudaStream_t stream) {
  if (n_rows == 0) return;
  constexpr int kThreads = 128;
  const int64_t chunks = ceil_div(n_rows, kSmallTableChunk);
  const dim3 grid(static_cast<unsigned>(chunks), ceil_div(N, kThreads));
  FB_DISPATCH_DTYPE(dtype, T, {
    using A = typename Acc<T>::type;
    const size_t smem = G * kThreads * sizeof(A);
    A* part = static_cast<A*>(partial);
    if (src_is_acc) {
      small_table_partial_kernel<A, A><<<grid, kThreads, smem, stream>>>(static_cast<const A*>(src), idx, n_rows,
                                                                         N, G, part);
    } else {
      small_table_partial_kernel<T, A><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(src), idx, n_rows,
                                                                         N, G, part);
    }
    small_table_finish_kernel<T><<<ceil_div(G * N, 256), 256, 0, stream>>>(part, chunks, G, N, padding_idx,
                                                                          static_cast<T*>(out));
  });
}

}  // namespace fastbert
