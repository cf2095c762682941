// CPU implementation of fastbert::embedding_gather and its backward (schemas in fastbert.cpp).
//
// Forward, per token t = b * S + s (parallel over tokens):
//   x = tok[ids[t]] + pos[pid(t)] + seg[sids[t]]           (accumulated in fp32, fp64 for fp64)
//   y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(var_biased + eps)   (when ln_weight is given)
//   out = y * keep / (1 - p)                                (dropout, Philox keep mask, see philox.h)
// Backward, with g = dout * keep / (1 - p) and xhat = (x - mean) * rstd:
//   dw = sum_t g * xhat, db = sum_t g,
//   dx = rstd * (g*w - mean_n(g*w) - xhat * mean_n(g*w*xhat))     (LayerNorm backward)
//   dtok[v] = sum_{t: ids[t] = v} dx[t], likewise dpos, dseg; padding rows get no gradient.
// Every reduction runs in a fixed order independent of the thread count, so the CPU op is
// deterministic: the table gradients are a counting sort by row (CSR) then a per-row sum in token
// order; the LN parameter gradients are per-chunk partial sums added in chunk order.
// Threads: torch's intra-op pool through the stable ABI's parallel_for (torch.set_num_threads governs it).
#include <algorithm>
#include <vector>

#include "common.h"
#include "philox.h"

namespace fastbert {
namespace {

int64_t position_of(const EmbedParams& p, int64_t t) {
  const int64_t s = t % p.seq;
  return p.pos_ids ? p.pos_ids[(t / p.seq) * p.pos_row_stride + s] : s;
}

// Raises ValueError naming the first id outside its table.
void check_ids_cpu(const EmbedParams& p) {
  for (int64_t t = 0; t < p.tokens; ++t) {
    const int64_t id = p.ids[t];
    FB_CHECK_VALUE(id >= 0 && id < p.vocab, "input_ids out of range: id ", id, " at flat position ", t,
                      " is outside [0, ", p.vocab, ")");
    const int64_t pid = position_of(p, t);
    FB_CHECK_VALUE(pid >= 0 && pid < p.n_pos, "position_ids out of range: position ", pid,
                      " at flat position ", t, " is outside [0, ", p.n_pos, ")");
    if (p.seg_ids) {
      const int64_t sid = p.seg_ids[t];
      FB_CHECK_VALUE(sid >= 0 && sid < p.n_seg, "segment_ids out of range: segment id ", sid,
                        " at flat position ", t, " is outside [0, ", p.n_seg, ")");
    }
  }
}

// Dropout keep bit of element e: Philox word e % 4 of counter e / 4; consecutive elements share a
// Philox call through the cache.
struct KeepMask {
  uint64_t group = ~uint64_t(0);
  Philox4 words{};
  bool keep(const EmbedParams& p, int64_t e) {
    const uint64_t g = static_cast<uint64_t>(e) >> 2;
    if (g != group) {
      words = philox_at(p.seed, p.offset, g);
      group = g;
    }
    return static_cast<uint64_t>(philox_word(words, e & 3)) < p.keep_threshold;
  }
};

// x[0..N) = tok[ids[t]] + pos[pid(t)] (+ seg[sids[t]])
template <typename scalar_t, typename acc_t>
inline void gather_row(const EmbedParams& p, int64_t t, acc_t* x) {
  const int64_t N = p.hidden;
  const scalar_t* tr = static_cast<const scalar_t*>(p.tok) + p.ids[t] * N;
  const scalar_t* pr = static_cast<const scalar_t*>(p.pos) + position_of(p, t) * N;
  for (int64_t n = 0; n < N; ++n) x[n] = static_cast<acc_t>(tr[n]) + static_cast<acc_t>(pr[n]);
  if (p.seg_ids) {
    const scalar_t* sr = static_cast<const scalar_t*>(p.seg) + p.seg_ids[t] * N;
    for (int64_t n = 0; n < N; ++n) x[n] += static_cast<acc_t>(sr[n]);
  }
}

// sum over i < n of f(i) with 8 partial sums (lanes), so the compiler vectorises the loop (a single
// running sum cannot be reordered); the order depends only on n, not on the thread count.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, F f) {
  constexpr int kLanes = 8;
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += f(i + l);
  }
  acc_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  for (; i < n; ++i) total += f(i);
  return total;
}

template <typename scalar_t>
void forward_impl(const EmbedParams& p) {
  using acc_t = acc_t_of<scalar_t>;
  const int64_t N = p.hidden;
  const auto* w = static_cast<const scalar_t*>(p.ln_w);
  const auto* bias = static_cast<const scalar_t*>(p.ln_b);
  auto* out = static_cast<scalar_t*>(p.out);
  auto* mean_out = static_cast<acc_t*>(p.mean);
  auto* rstd_out = static_cast<acc_t*>(p.rstd);
  const int64_t grain = std::max<int64_t>(1, 16384 / N);
  torch::stable::parallel_for(0, p.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(N);
    for (int64_t t = begin; t < end; ++t) {
      gather_row<scalar_t, acc_t>(p, t, x.data());
      if (w) {
        const acc_t* xs = x.data();
        const acc_t mean = lane_sum<acc_t>(N, [xs](int64_t n) { return xs[n]; }) / N;
        const acc_t sq = lane_sum<acc_t>(N, [xs, mean](int64_t n) { return (xs[n] - mean) * (xs[n] - mean); });
        const acc_t rstd = acc_t(1) / std::sqrt(sq / N + static_cast<acc_t>(p.eps));
        mean_out[t] = mean;
        rstd_out[t] = rstd;
        for (int64_t n = 0; n < N; ++n) {
          x[n] = (x[n] - mean) * rstd * static_cast<acc_t>(w[n]) + static_cast<acc_t>(bias[n]);
        }
      }
      scalar_t* o = out + t * N;
      if (p.dropout) {
        const acc_t scale = static_cast<acc_t>(p.drop_scale);
        KeepMask mask;
        for (int64_t n = 0; n < N; ++n) {
          o[n] = static_cast<scalar_t>(mask.keep(p, t * N + n) ? x[n] * scale : acc_t(0));
        }
      } else {
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<scalar_t>(x[n]);
      }
    }
  });
}

// out[r] = sum over t with idx[t] == r (in increasing t) of src[t]; rows == padding_idx stay zero.
template <typename scalar_t, typename src_t, typename IdxFn>
void scatter_rows(const src_t* src, int64_t T, int64_t N, int64_t R, IdxFn idx, int64_t padding_idx,
                  scalar_t* out) {
  using acc_t = acc_t_of<scalar_t>;
  std::vector<int64_t> start(R + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) ++start[idx(t) + 1];
  for (int64_t r = 0; r < R; ++r) start[r + 1] += start[r];
  {
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) order[cursor[idx(t)]++] = t;
  }
  constexpr int64_t kCols = 64;
  const int64_t col_blocks = (N + kCols - 1) / kCols;
  torch::stable::parallel_for(0, R * col_blocks, 16, [&](int64_t begin, int64_t end) {
    acc_t acc[kCols];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / col_blocks;
      if (r == padding_idx || start[r] == start[r + 1]) continue;
      const int64_t n0 = (task % col_blocks) * kCols;
      const int64_t width = std::min(kCols, N - n0);
      for (int64_t c = 0; c < width; ++c) acc[c] = 0;
      for (int64_t j = start[r]; j < start[r + 1]; ++j) {
        const src_t* row = src + order[j] * N + n0;
        for (int64_t c = 0; c < width; ++c) acc[c] += static_cast<acc_t>(row[c]);
      }
      scalar_t* o = out + r * N + n0;
      for (int64_t c = 0; c < width; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

template <typename scalar_t>
std::array<Tensor, 5> backward_impl(EmbedArgs& a, const Tensor& grad, const Tensor& mean, const Tensor& rstd,
                                    int64_t padding_idx, int64_t seg_padding_idx, bool need_tok, bool need_pos,
                                    bool need_seg) {
  using acc_t = acc_t_of<scalar_t>;
  const EmbedParams& p = a.p;
  const int64_t T = p.tokens, N = p.hidden;
  const auto* g = ptr<const scalar_t>(grad);
  const bool ln = p.ln_w != nullptr;
  const ScalarType st = a.tok.scalar_type();
  const Tensor empty = new_empty(a.tok, {0}, st);
  Tensor grad_w = empty, grad_b = empty, dx;
  const acc_t* dxp = nullptr;
  if (ln || p.dropout) {
    dx = new_empty(a.tok, {T, N}, acc_type(st));
    auto* dxw = ptr<acc_t>(dx);
    const int64_t chunks = (T + kLnRowsPerChunk - 1) / kLnRowsPerChunk;
    std::vector<acc_t> partial(ln ? chunks * 2 * N : 0, acc_t(0));
    const auto* w = static_cast<const scalar_t*>(p.ln_w);
    const acc_t* mp = ln ? ptr<const acc_t>(mean) : nullptr;
    const acc_t* rp = ln ? ptr<const acc_t>(rstd) : nullptr;
    const acc_t scale = static_cast<acc_t>(p.drop_scale);
    torch::stable::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> x(N), gd(N);
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* pw = ln ? partial.data() + c * 2 * N : nullptr;
        const int64_t t_end = std::min(T, (c + 1) * kLnRowsPerChunk);
        for (int64_t t = c * kLnRowsPerChunk; t < t_end; ++t) {
          const scalar_t* gr = g + t * N;
          acc_t* d = dxw + t * N;
          KeepMask mask;
          for (int64_t n = 0; n < N; ++n) {
            gd[n] = static_cast<acc_t>(gr[n]);
            if (p.dropout) gd[n] = mask.keep(p, t * N + n) ? gd[n] * scale : acc_t(0);
          }
          if (!ln) {
            for (int64_t n = 0; n < N; ++n) d[n] = gd[n];
            continue;
          }
          gather_row<scalar_t, acc_t>(p, t, x.data());
          const acc_t mu = mp[t], rs = rp[t];
          for (int64_t n = 0; n < N; ++n) {
            const acc_t xhat = (x[n] - mu) * rs;
            x[n] = xhat;
            pw[n] += gd[n] * xhat;
            pw[N + n] += gd[n];
          }
          const acc_t* xh = x.data();
          const acc_t* gg = gd.data();
          const acc_t s1 = lane_sum<acc_t>(N, [gg, w](int64_t n) { return gg[n] * static_cast<acc_t>(w[n]); }) / N;
          const acc_t s2 =
              lane_sum<acc_t>(N, [gg, w, xh](int64_t n) { return gg[n] * static_cast<acc_t>(w[n]) * xh[n]; }) / N;
          for (int64_t n = 0; n < N; ++n) {
            d[n] = rs * (gd[n] * static_cast<acc_t>(w[n]) - s1 - x[n] * s2);
          }
        }
      }
    });
    if (ln) {
      grad_w = new_empty(a.tok, {N}, st);
      grad_b = new_empty(a.tok, {N}, st);
      auto* gw = ptr<scalar_t>(grad_w);
      auto* gb = ptr<scalar_t>(grad_b);
      torch::stable::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          acc_t sw = 0, sb = 0;
          for (int64_t c = 0; c < chunks; ++c) {
            sw += partial[c * 2 * N + n];
            sb += partial[c * 2 * N + N + n];
          }
          gw[n] = static_cast<scalar_t>(sw);
          gb[n] = static_cast<scalar_t>(sb);
        }
      });
    }
    dxp = dxw;
  }
  auto scatter = [&](Tensor& out, int64_t R, auto idx, int64_t pad) {
    out = new_zeros(a.tok, {R, N}, st);
    if (dxp) {
      scatter_rows(dxp, T, N, R, idx, pad, ptr<scalar_t>(out));
    } else {
      scatter_rows(g, T, N, R, idx, pad, ptr<scalar_t>(out));
    }
  };
  Tensor gt = empty, gp = empty, gs = empty;
  if (need_tok) scatter(gt, p.vocab, [&](int64_t t) { return p.ids[t]; }, padding_idx);
  if (need_pos) scatter(gp, p.n_pos, [&](int64_t t) { return position_of(p, t); }, -1);
  if (need_seg && p.seg_ids) scatter(gs, p.n_seg, [&](int64_t t) { return p.seg_ids[t]; }, seg_padding_idx);
  return {gt, gp, gs, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> embedding_gather_cpu(
    Tensor input_ids, Tensor token_weight, Tensor position_weight, OptTensor segment_ids,
    OptTensor segment_weight, OptTensor position_ids, OptTensor ln_weight, OptTensor ln_bias, double eps,
    double dropout_p, int64_t seed, int64_t offset, int64_t /*padding_idx*/, int64_t /*segment_padding_idx*/,
    bool /*deterministic*/) {
  EmbedArgs a = embed_args(input_ids, token_weight, position_weight, segment_ids, segment_weight,
                           position_ids, ln_weight, ln_bias, eps, dropout_p, seed, offset);
  check_ids_cpu(a.p);
  const int64_t T = a.p.tokens;
  const ScalarType st = a.tok.scalar_type();
  Tensor out = new_empty(a.tok, {a.batch, a.p.seq, a.p.hidden}, st);
  Tensor mean = new_empty(a.tok, {a.p.ln_w ? T : 0}, acc_type(st));
  Tensor rstd = new_empty(a.tok, {a.p.ln_w ? T : 0}, acc_type(st));
  a.p.out = out.data_ptr();
  a.p.mean = mean.data_ptr();
  a.p.rstd = rstd.data_ptr();
  dispatch_floating(st, "token_weight", [&](auto tag) { forward_impl<decltype(tag)>(a.p); });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> embedding_gather_backward_cpu(
    Tensor grad, Tensor input_ids, Tensor token_weight, Tensor position_weight, OptTensor segment_ids,
    OptTensor segment_weight, OptTensor position_ids, OptTensor ln_weight, OptTensor ln_bias, Tensor mean,
    Tensor rstd, double dropout_p, int64_t seed, int64_t offset, int64_t padding_idx, int64_t segment_padding_idx,
    bool need_token, bool need_position, bool need_segment, bool /*deterministic: the CPU op always is*/) {
  EmbedArgs a = embed_args(input_ids, token_weight, position_weight, segment_ids, segment_weight,
                           position_ids, ln_weight, ln_bias, 0.0, dropout_p, seed, offset);
  check_ids_cpu(a.p);
  FB_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == a.batch && grad.size(1) == a.p.seq &&
                     grad.size(2) == a.p.hidden,
                 "grad must be [", a.batch, ", ", a.p.seq, ", ", a.p.hidden, "], got ", shape_str(grad));
  FB_CHECK_TYPE(grad.scalar_type() == token_weight.scalar_type(), "grad dtype ", dtype_str(grad.scalar_type()),
                " != table dtype ", dtype_str(token_weight.scalar_type()));
  if (a.p.ln_w) {
    FB_CHECK_VALUE(mean.numel() == a.p.tokens && rstd.numel() == a.p.tokens,
                   "mean/rstd must hold one value per token");
  }
  const Tensor g = torch::stable::contiguous(grad);
  const Tensor m = torch::stable::contiguous(mean), r = torch::stable::contiguous(rstd);
  std::array<Tensor, 5> res;
  dispatch_floating(a.tok.scalar_type(), "token_weight", [&](auto tag) {
    res = backward_impl<decltype(tag)>(a, g, m, r, padding_idx, segment_padding_idx, need_token, need_position,
                                       need_segment);
  });
  return {res[0], res[1], res[2], res[3], res[4]};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("embedding_gather", TORCH_BOX(&embedding_gather_cpu));
  m.impl("embedding_gather_backward", TORCH_BOX(&embedding_gather_backward_cpu));
}

}  // namespace fastbert
