// fastbert._C_cuda: torch glue of the CUDA ops, built only with a CUDA torch and nvcc, as a module of its
// own beside fastbert._C (which defines the schemas and the CPU kernels): it links libtorch_cuda and
// the CUDA runtime, so under a CPU torch it fails to load while fastbert._C still does. It checks arguments
// (shared with the CPU ops, common.h), allocates outputs, launches the torch-free kernels of
// embed_kernels.cu / mlm_mask_kernels.cu on the current stream, and turns the device-side error
// flag into a ValueError (this reads one int back, so each call synchronises once).
// LibTorch stable ABI only (see common.h): device guard, current stream and the dispatcher calls
// (sort, expand) go through libtorch's C shim.
#include <Python.h>
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>

#include <cstdlib>
#include <string>

#include "../common.h"
#include "../kernels.h"

// STABLE_TORCH_ERROR_CODE_CHECK (with libtorch's message) is in the headers of torch >= 2.13 only;
// older headers (2.10, 2.11: the GPU machines' torch) have TORCH_ERROR_CODE_CHECK.
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define FB_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define FB_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

namespace fastbert {
namespace {

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  FB_SHIM_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

#define FB_CUDA_LAUNCH_CHECK() STD_CUDA_KERNEL_LAUNCH_CHECK()

// The device-side error flag (one int32), read back on the host: one stream sync per call. Skipped
// (reported as no error) while the stream is being captured into a CUDA graph, where a sync is not
// allowed, and when FASTBERT_EMBED_CHECK=0 (a caller that checked its ids on the host, as
// fastbert.train.packing does, keeps its step free of syncs). The kernels themselves never read or
// write out of bounds for a bad id: they raise the flag and skip the token.
int read_error(const Tensor& flag) {
  const cudaStream_t stream = current_stream(flag);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  STD_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const char* check = std::getenv("FASTBERT_EMBED_CHECK");
  if (capture != cudaStreamCaptureStatusNone || (check != nullptr && std::string(check) == "0")) {
    return 0;
  }
  int value = 0;
  STD_CUDA_CHECK(cudaMemcpyAsync(&value, flag.data_ptr(), sizeof(int), cudaMemcpyDeviceToHost, stream));
  STD_CUDA_CHECK(cudaStreamSynchronize(stream));
  return value;
}

// An aten op through the dispatcher by name (the stable ABI's generic call); the outputs replace the
// first entries of the stack.
template <size_t N>
void call_aten(const char* name, const char* overload, std::array<StableIValue, N>& stack) {
  FB_SHIM_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
}

// (sorted keys, permutation) of the flat index tensor, stable so equal keys keep token order.
std::tuple<Tensor, Tensor> sort_rows(const Tensor& idx) {
  namespace sd = torch::stable::detail;
  const Tensor flat = torch::stable::reshape(idx, {-1});
  // aten::sort.stable(Tensor self, *, bool? stable, int dim=-1, bool descending=False)
  std::array<StableIValue, 4> stack{sd::from(flat), sd::from(std::optional<bool>(true)), sd::from(int64_t(0)),
                                    sd::from(false)};
  call_aten("aten::sort", "stable", stack);
  return {torch::stable::contiguous(sd::to<Tensor>(stack[0])), torch::stable::contiguous(sd::to<Tensor>(stack[1]))};
}

// [S] or [B, S] position ids as a contiguous [B, S] tensor.
Tensor expand_rows(const Tensor& pos_ids, int64_t B, int64_t S) {
  if (pos_ids.dim() == 2) return torch::stable::contiguous(pos_ids);
  namespace sd = torch::stable::detail;
  const std::vector<int64_t> size{B, S};
  // aten::expand(Tensor(a) self, SymInt[] size, *, bool implicit=False)
  std::array<StableIValue, 3> stack{sd::from(pos_ids), sd::from(torch::headeronly::IntHeaderOnlyArrayRef(size)),
                                    sd::from(false)};
  call_aten("aten::expand", "", stack);
  return torch::stable::contiguous(sd::to<Tensor>(stack[0]));
}

void check_hidden(const EmbedParams& p, const Tensor& tok) {
  const int64_t acc_bytes = tok.scalar_type() == ScalarType::Double ? 8 : 4;
  // forward: 4 rows x N accumulators; LN backward: 4 rows x 2 x N, in 48 KiB of shared memory
  FB_CHECK_VALUE(p.hidden * acc_bytes * 8 <= 49152, "hidden size ", p.hidden,
                    " is too large for the CUDA embedding kernels (at most ", 49152 / (acc_bytes * 8), ")");
}

std::tuple<Tensor, Tensor, Tensor> embedding_gather_cuda(
    Tensor input_ids, Tensor token_weight, Tensor position_weight, OptTensor segment_ids,
    OptTensor segment_weight, OptTensor position_ids, OptTensor ln_weight, OptTensor ln_bias, double eps,
    double dropout_p, int64_t seed, int64_t offset, int64_t /*padding_idx*/, int64_t /*segment_padding_idx*/,
    bool /*deterministic*/) {
  const torch::stable::accelerator::DeviceGuard guard(input_ids.get_device_index());
  EmbedArgs a = embed_args(input_ids, token_weight, position_weight, segment_ids, segment_weight, position_ids,
                           ln_weight, ln_bias, eps, dropout_p, seed, offset);
  check_hidden(a.p, a.tok);
  const int64_t T = a.p.tokens;
  const ScalarType st = a.tok.scalar_type();
  Tensor out = new_empty(a.tok, {a.batch, a.p.seq, a.p.hidden}, st);
  Tensor mean = new_empty(a.tok, {a.p.ln_w ? T : 0}, acc_type(st));
  Tensor rstd = new_empty(a.tok, {a.p.ln_w ? T : 0}, acc_type(st));
  Tensor flag = new_zeros(a.ids, {1}, ScalarType::Int);
  a.p.out = out.data_ptr();
  a.p.mean = mean.data_ptr();
  a.p.rstd = rstd.data_ptr();
  a.p.error = ptr<int>(flag);
  embed_forward_cuda(a.p, current_stream(a.tok));
  FB_CUDA_LAUNCH_CHECK();
  const int code = read_error(flag);
  FB_CHECK_VALUE(code == kOk, embed_error_message(code, a.p));
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> embedding_gather_backward_cuda(
    Tensor grad, Tensor input_ids, Tensor token_weight, Tensor position_weight, OptTensor segment_ids,
    OptTensor segment_weight, OptTensor position_ids, OptTensor ln_weight, OptTensor ln_bias, Tensor mean,
    Tensor rstd, double dropout_p, int64_t seed, int64_t offset, int64_t padding_idx, int64_t segment_padding_idx,
    bool need_token, bool need_position, bool need_segment, bool deterministic) {
  const torch::stable::accelerator::DeviceGuard guard(input_ids.get_device_index());
  EmbedArgs a = embed_args(input_ids, token_weight, position_weight, segment_ids, segment_weight, position_ids,
                           ln_weight, ln_bias, 0.0, dropout_p, seed, offset);
  check_hidden(a.p, a.tok);
  const EmbedParams& p = a.p;
  const int64_t T = p.tokens, N = p.hidden;
  FB_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == a.batch && grad.size(1) == p.seq && grad.size(2) == N,
                 "grad must be [", a.batch, ", ", p.seq, ", ", N, "], got ", shape_str(grad));
  FB_CHECK_TYPE(grad.scalar_type() == token_weight.scalar_type(), "grad dtype ", dtype_str(grad.scalar_type()),
                " != table dtype ", dtype_str(token_weight.scalar_type()));
  const bool ln = p.ln_w != nullptr;
  if (ln) {
    FB_CHECK_VALUE(mean.numel() == T && rstd.numel() == T, "mean/rstd must hold one value per token");
  }
  const Tensor g = torch::stable::contiguous(grad);
  const Tensor m = torch::stable::contiguous(mean), r = torch::stable::contiguous(rstd);
  const cudaStream_t stream = current_stream(a.tok);
  const ScalarType st = a.tok.scalar_type();
  const Tensor empty = new_empty(a.tok, {0}, st);
  Tensor grad_w = empty, grad_b = empty;
  OptTensor dx, partial;
  const void* src = g.data_ptr();
  const bool src_is_acc = false;
  if (ln || p.dropout) {
    EmbedBackwardParams q;
    q.fwd = p;
    q.fwd.mean = m.data_ptr();
    q.fwd.rstd = r.data_ptr();
    q.grad = g.data_ptr();
    dx = new_empty(a.tok, {T, N}, st);  // table dtype, as eager's LayerNorm backward
    q.dx = dx->data_ptr();
    if (ln) {
      q.n_chunks = (T + kLnRowsPerChunk - 1) / kLnRowsPerChunk;
      partial = new_empty(a.tok, {q.n_chunks, 2, N}, acc_type(st));
      grad_w = new_empty(a.tok, {N}, st);
      grad_b = new_empty(a.tok, {N}, st);
      q.ln_partial = partial->data_ptr();
      q.grad_ln_w = grad_w.data_ptr();
      q.grad_ln_b = grad_b.data_ptr();
    }
    embed_backward_dx_cuda(q, stream);
    FB_CUDA_LAUNCH_CHECK();
    src = dx->data_ptr();
  }
  Tensor gt = empty, gp = empty, gs = empty;
  if (need_token) {
    if (deterministic) {
      gt = new_zeros(a.tok, sizes_of(a.tok), st);
      auto [keys, perm] = sort_rows(a.ids);
      segment_rows_sum_cuda(src, src_is_acc, ptr<const int64_t>(keys), ptr<const int64_t>(perm), T, N, p.vocab,
                            padding_idx, gt.data_ptr(), p.dtype, stream);
    } else {
      Tensor acc = new_zeros(a.tok, {p.vocab, N}, acc_type(st));
      scatter_add_atomic_cuda(src, src_is_acc, ptr<const int64_t>(a.ids), T, N, p.vocab, padding_idx,
                              acc.data_ptr(), p.dtype, stream);
      gt = torch::stable::to(acc, st);
    }
    FB_CUDA_LAUNCH_CHECK();
  }
  if (need_position) {
    gp = new_zeros(a.pos, sizes_of(a.pos), st);
    if (!a.pos_ids.has_value()) {
      column_sum_cuda(src, src_is_acc, a.batch, p.seq, N, gp.data_ptr(), p.dtype, stream);
    } else {
      auto [keys, perm] = sort_rows(expand_rows(*a.pos_ids, a.batch, p.seq));
      segment_rows_sum_cuda(src, src_is_acc, ptr<const int64_t>(keys), ptr<const int64_t>(perm), T, N, p.n_pos,
                            -1, gp.data_ptr(), p.dtype, stream);
    }
    FB_CUDA_LAUNCH_CHECK();
  }
  if (need_segment && p.seg_ids) {
    gs = new_zeros(*a.seg, sizes_of(*a.seg), st);
    if (p.n_seg <= kSmallTableRows) {
      const int64_t chunks = (T + kSmallTableChunk - 1) / kSmallTableChunk;
      Tensor part = new_empty(a.tok, {chunks, p.n_seg, N}, acc_type(st));
      small_table_sum_cuda(src, src_is_acc, p.seg_ids, T, N, p.n_seg, segment_padding_idx, part.data_ptr(),
                           gs.data_ptr(), p.dtype, stream);
    } else {
      auto [keys, perm] = sort_rows(*a.seg_ids);
      segment_rows_sum_cuda(src, src_is_acc, ptr<const int64_t>(keys), ptr<const int64_t>(perm), T, N, p.n_seg,
                            segment_padding_idx, gs.data_ptr(), p.dtype, stream);
    }
    FB_CUDA_LAUNCH_CHECK();
  }
  return {gt, gp, gs, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> mlm_mask_cuda_op(Tensor input_ids, Tensor special_ids, OptTensor word_starts,
                                                    int64_t vocab_size, int64_t mask_id, int64_t ignore_index,
                                                    int64_t seed, int64_t offset, int64_t choose_threshold,
                                                    int64_t mask_threshold, int64_t random_threshold,
                                                    int64_t max_predictions) {
  const torch::stable::accelerator::DeviceGuard guard(input_ids.get_device_index());
  MlmParams p = mlm_args(input_ids, special_ids, word_starts, vocab_size, mask_id, ignore_index, seed, offset,
                         choose_threshold, mask_threshold, random_threshold, max_predictions);
  FB_CHECK_VALUE(p.seq <= kMlmMaxSeqCuda, "sequence length ", p.seq, " is above the CUDA mlm_mask limit (",
                 kMlmMaxSeqCuda, ")");
  // special ids: sorted, unique and in range, checked by the Python wrapper (fastbert.ops.mlm_mask).
  // Deliberate twin of the CPU op's set-up in csrc/mlm_mask.cpp (the same outputs, device buffers).
  const Tensor ids = torch::stable::contiguous(input_ids);
  const Tensor special = torch::stable::contiguous(special_ids);
  OptTensor ws;
  if (given(word_starts)) {
    ws = torch::stable::contiguous(*word_starts);
    p.word_starts = ptr<const uint8_t>(*ws);
  }
  Tensor out = torch::stable::empty_like(ids);
  Tensor labels = torch::stable::empty_like(ids);
  Tensor chosen = new_empty(ids, sizes_of(ids), ScalarType::Bool);
  Tensor flag = new_zeros(ids, {1}, ScalarType::Int);
  p.ids = ids.data_ptr();
  p.special = ptr<const int64_t>(special);
  p.out = out.data_ptr();
  p.labels = labels.data_ptr();
  p.chosen = ptr<uint8_t>(chosen);
  p.error = ptr<int>(flag);
  mlm_mask_cuda(p, current_stream(ids));
  FB_CUDA_LAUNCH_CHECK();
  FB_CHECK_VALUE(read_error(flag) == kOk, "input_ids out of range: every id must be in [0, ", vocab_size, ")");
  return {out, labels, chosen};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("embedding_gather", TORCH_BOX(&embedding_gather_cuda));
  m.impl("embedding_gather_backward", TORCH_BOX(&embedding_gather_backward_cuda));
  m.impl("mlm_mask", TORCH_BOX(&mlm_mask_cuda_op));
}

}  // namespace fastbert

namespace {
PyModuleDef cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                           "fastbert CUDA kernels: registers torch.ops.fastbert.* for CUDA tensors", -1, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&cuda_module); }
