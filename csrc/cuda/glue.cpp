// Torch glue of the CUDA ops, compiled only in CUDA builds (FASTBERT_WITH_CUDA): checks arguments
// (shared with the CPU ops, common.h), allocates outputs, launches the torch-free kernels of
// embed_kernels.cu / mlm_mask_kernels.cu on the current stream, and turns the device-side error
// flag into a ValueError (this reads one int back, so each call synchronises once).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "../kernels.h"

namespace fastbert {
namespace {

int read_error(const at::Tensor& flag) { return flag.item<int>(); }

void check_hidden(const EmbedParams& p, const at::Tensor& tok) {
  const int64_t acc_bytes = tok.scalar_type() == at::kDouble ? 8 : 4;
  // forward: 4 rows x N accumulators; LN backward: 4 rows x 2 x N, in 48 KiB of shared memory
  TORCH_CHECK_VALUE(p.hidden * acc_bytes * 8 <= 49152, "hidden size ", p.hidden,
                    " is too large for the CUDA embedding kernels (at most ", 49152 / (acc_bytes * 8), ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_gather_cuda(
    const at::Tensor& input_ids, const at::Tensor& token_weight, const at::Tensor& position_weight,
    const c10::optional<at::Tensor>& segment_ids, const c10::optional<at::Tensor>& segment_weight,
    const c10::optional<at::Tensor>& position_ids, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, double eps, double dropout_p, int64_t seed, int64_t offset,
    int64_t /*padding_idx*/, int64_t /*segment_padding_idx*/, bool /*deterministic*/) {
  const c10::cuda::CUDAGuard guard(input_ids.device());
  EmbedArgs a = embed_args(input_ids, token_weight, position_weight, segment_ids, segment_weight, position_ids,
                           ln_weight, ln_bias, eps, dropout_p, seed, offset);
  check_hidden(a.p, a.tok);
  const int64_t T = a.p.tokens;
  auto out = at::empty({a.batch, a.p.seq, a.p.hidden}, a.tok.options());
  const auto stat_opts = a.tok.options().dtype(acc_type(a.tok.scalar_type()));
  auto mean = at::empty({a.p.ln_w ? T : 0}, stat_opts);
  auto rstd = at::empty({a.p.ln_w ? T : 0}, stat_opts);
  auto flag = at::zeros({1}, a.ids.options().dtype(at::kInt));
  a.p.out = out.data_ptr();
  a.p.mean = mean.data_ptr();
  a.p.rstd = rstd.data_ptr();
  a.p.error = flag.data_ptr<int>();
  embed_forward_cuda(a.p, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int code = read_error(flag);
  TORCH_CHECK_VALUE(code == kOk, embed_error_message(code, a.p));
  return {out, mean, rstd};
}

// (sorted keys, permutation) of the flat index tensor, stable so equal keys keep token order.
std::tuple<at::Tensor, at::Tensor> sort_rows(const at::Tensor& idx) {
  auto sorted = at::sort(idx.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_gather_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input_ids, const at::Tensor& token_weight,
    const at::Tensor& position_weight, const c10::optional<at::Tensor>& segment_ids,
    const c10::optional<at::Tensor>& segment_weight, const c10::optional<at::Tensor>& position_ids,
    const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
    const at::Tensor& mean, const at::Tensor& rstd, double dropout_p, int64_t seed, int64_t offset,
    int64_t padding_idx, int64_t segment_padding_idx, bool need_token, bool need_position,
    bool need_segment, bool deterministic) {
  const c10::cuda::CUDAGuard guard(input_ids.device());
  EmbedArgs a = embed_args(input_ids, token_weight, position_weight, segment_ids, segment_weight, position_ids,
                           ln_weight, ln_bias, 0.0, dropout_p, seed, offset);
  check_hidden(a.p, a.tok);
  const EmbedParams& p = a.p;
  const int64_t T = p.tokens, N = p.hidden;
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == a.batch && grad.size(1) == p.seq && grad.size(2) == N,
                    "grad must be [", a.batch, ", ", p.seq, ", ", N, "], got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == token_weight.scalar_type(), "grad dtype ", grad.scalar_type(),
                   " != table dtype ", token_weight.scalar_type());
  const bool ln = p.ln_w != nullptr;
  if (ln) {
    TORCH_CHECK_VALUE(mean.numel() == T && rstd.numel() == T, "mean/rstd must hold one value per token");
  }
  const auto g = grad.contiguous();
  const auto m = mean.contiguous(), r = rstd.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = a.tok.options().dtype(acc_type(a.tok.scalar_type()));
  const auto empty = at::empty({0}, a.tok.options());
  at::Tensor grad_w = empty, grad_b = empty, dx, partial;
  const void* src = g.data_ptr();
  const bool src_is_acc = false;
  if (ln || p.dropout) {
    EmbedBackwardParams q;
    q.fwd = p;
    q.fwd.mean = const_cast<void*>(m.data_ptr());
    q.fwd.rstd = const_cast<void*>(r.data_ptr());
    q.grad = g.data_ptr();
    dx = at::empty({T, N}, a.tok.options());  // table dtype, as eager's LayerNorm backward
    q.dx = dx.data_ptr();
    if (ln) {
      q.n_chunks = (T + kLnRowsPerChunk - 1) / kLnRowsPerChunk;
      partial = at::empty({q.n_chunks, 2, N}, acc_opts);
      grad_w = at::empty({N}, a.tok.options());
      grad_b = at::empty({N}, a.tok.options());
      q.ln_partial = partial.data_ptr();
      q.grad_ln_w = grad_w.data_ptr();
      q.grad_ln_b = grad_b.data_ptr();
    }
    embed_backward_dx_cuda(q, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    src = dx.data_ptr();
  }
  at::Tensor gt = empty, gp = empty, gs = empty;
  if (need_token) {
    if (deterministic) {
      gt = at::zeros_like(a.tok);
      auto [keys, perm] = sort_rows(a.ids);
      segment_rows_sum_cuda(src, src_is_acc, keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), T, N, p.vocab,
                            padding_idx, gt.data_ptr(), p.dtype, stream);
    } else {
      auto acc = at::zeros({p.vocab, N}, acc_opts);
      scatter_add_atomic_cuda(src, src_is_acc, a.ids.data_ptr<int64_t>(), T, N, p.vocab, padding_idx,
                              acc.data_ptr(), p.dtype, stream);
      gt = acc.to(a.tok.scalar_type());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_position) {
    gp = at::zeros_like(a.pos);
    if (!a.pos_ids.defined()) {
      column_sum_cuda(src, src_is_acc, a.batch, p.seq, N, gp.data_ptr(), p.dtype, stream);
    } else {
      auto full = a.pos_ids.expand({a.batch, p.seq}).contiguous();
      auto [keys, perm] = sort_rows(full);
      segment_rows_sum_cuda(src, src_is_acc, keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), T, N, p.n_pos,
                            -1, gp.data_ptr(), p.dtype, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_segment && p.seg_ids) {
    gs = at::zeros_like(a.seg);
    if (p.n_seg <= kSmallTableRows) {
      const int64_t chunks = (T + kSmallTableChunk - 1) / kSmallTableChunk;
      auto part = at::empty({chunks, p.n_seg, N}, acc_opts);
      small_table_sum_cuda(src, src_is_acc, p.seg_ids, T, N, p.n_seg, segment_padding_idx, part.data_ptr(),
                            gs.data_ptr(), p.dtype, stream);
    } else {
      auto [keys, perm] = sort_rows(a.seg_ids);
      segment_rows_sum_cuda(src, src_is_acc, keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), T, N, p.n_seg,
                            segment_padding_idx, gs.data_ptr(), p.dtype, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gt, gp, gs, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlm_mask_cuda_op(
    const at::Tensor& input_ids, const at::Tensor& special_ids, const c10::optional<at::Tensor>& word_starts,
    int64_t vocab_size, int64_t mask_id, int64_t ignore_index, int64_t seed, int64_t offset,
    int64_t choose_threshold, int64_t mask_threshold, int64_t random_threshold, int64_t max_predictions) {
  const c10::cuda::CUDAGuard guard(input_ids.device());
  MlmParams p = mlm_args(input_ids, special_ids, word_starts, vocab_size, mask_id, ignore_index, seed, offset,
                         choose_threshold, mask_threshold, random_threshold, max_predictions);
  TORCH_CHECK_VALUE(p.seq <= kMlmMaxSeqCuda, "sequence length ", p.seq, " is above the CUDA mlm_mask limit (",
                    kMlmMaxSeqCuda, ")");
  // special ids: sorted, unique and in range, checked by the Python wrapper (fastbert.ops.mlm_mask)
  const auto ids = input_ids.contiguous();
  const auto special = special_ids.contiguous();
  at::Tensor ws;
  if (word_starts.has_value() && word_starts->defined()) {
    ws = word_starts->contiguous();
    p.word_starts = reinterpret_cast<const uint8_t*>(ws.data_ptr<bool>());
  }
  auto out = at::empty_like(ids);
  auto labels = at::empty_like(ids);
  auto chosen = at::empty(ids.sizes(), ids.options().dtype(at::kBool));
  auto flag = at::zeros({1}, ids.options().dtype(at::kInt));
  p.ids = ids.data_ptr();
  p.special = special.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.labels = labels.data_ptr();
  p.chosen = reinterpret_cast<uint8_t*>(chosen.data_ptr<bool>());
  p.error = flag.data_ptr<int>();
  mlm_mask_cuda(p, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK_VALUE(read_error(flag) == kOk, "input_ids out of range: every id must be in [0, ", vocab_size, ")");
  return {out, labels, chosen};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("embedding_gather", &embedding_gather_cuda);
  m.impl("embedding_gather_backward", &embedding_gather_backward_cuda);
  m.impl("mlm_mask", &mlm_mask_cuda_op);
}

}  // namespace fastbert
