// fastbert._C: operator schemas (STABLE_TORCH_LIBRARY) and the Python module.
//
// Built on the LibTorch stable ABI (see common.h): the module imports no C++ symbol of ATen, c10 or
// torch, only libtorch's C shim, so a build made against one torch >= 2.10 loads under later ones. With
// Py_LIMITED_API (setup.py) it is also one binary for every CPython >= 3.10 (abi3).
//
// CPU kernels: embed.cpp, mlm_mask.cpp. CUDA kernels: cuda/*.cu (torch-free), registered for the CUDA
// dispatch key by cuda/glue.cpp, which is the separate module fastbert._C_cuda (built only with a CUDA
// torch and nvcc; fastbert._ext imports it after this one, when torch is a CUDA build).
// Autograd, fake (meta) implementations and the user-facing wrappers live in fastbert/ops/.
#include <Python.h>
#include <torch/csrc/stable/library.h>
#include <torch/headeronly/version.h>

#ifndef FASTBERT_ABI_TARGET
#define FASTBERT_ABI_TARGET "unknown"
#endif

STABLE_TORCH_LIBRARY(fastbert, m) {
  // out [B, S, N] = dropout(LN(tok[ids] + pos[pid] + seg[sids])); mean, rstd [T] fp32 (fp64 for fp64
  // tables) when ln_weight is given, else empty. Dropout keeps element e when Philox(seed, offset)
  // says so (see philox.h), so the backward regenerates the mask. padding_idx, segment_padding_idx
  // and deterministic are unused by the forward: they are here for the backward (autograd's
  // setup_context sees only the forward's inputs).
  m.def(
      "embedding_gather(Tensor input_ids, Tensor token_weight, Tensor position_weight, "
      "Tensor? segment_ids, Tensor? segment_weight, Tensor? position_ids, Tensor? ln_weight, "
      "Tensor? ln_bias, float eps, float dropout_p, int seed, int offset, int padding_idx, "
      "int segment_padding_idx, bool deterministic) -> (Tensor, Tensor, Tensor)");
  // -> (grad_token [V, N], grad_position [P, N], grad_segment [G, N], grad_ln_weight [N],
  //     grad_ln_bias [N]); a gradient that is not needed (or has no input) is an empty tensor.
  // padding_idx / segment_padding_idx: row that gets no gradient, -1 for none.
  m.def(
      "embedding_gather_backward(Tensor grad, Tensor input_ids, Tensor token_weight, "
      "Tensor position_weight, Tensor? segment_ids, Tensor? segment_weight, Tensor? position_ids, "
      "Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, float dropout_p, int seed, "
      "int offset, int padding_idx, int segment_padding_idx, bool need_token, bool need_position, "
      "bool need_segment, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (masked_ids, labels, chosen [B, S] bool). special_ids: sorted unique int64 (pad included);
  // thresholds are probabilities times 2^32; max_predictions -1 for no cap. See kernels.h MlmParams.
  m.def(
      "mlm_mask(Tensor input_ids, Tensor special_ids, Tensor? word_starts, int vocab_size, int mask_id, "
      "int ignore_index, int seed, int offset, int choose_threshold, int mask_threshold, "
      "int random_threshold, int max_predictions) -> (Tensor, Tensor, Tensor)");
}

namespace {

// The CUDA kernels live in fastbert._C_cuda; kept for callers of the old single-module build.
PyObject* with_cuda(PyObject*, PyObject*) { Py_RETURN_FALSE; }

PyObject* abi_target(PyObject*, PyObject*) { return PyUnicode_FromString(FASTBERT_ABI_TARGET); }

PyObject* built_with_torch(PyObject*, PyObject*) { return PyUnicode_FromString(TORCH_VERSION); }

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "False: the CUDA kernels are the module fastbert._C_cuda."},
    {"abi_target", abi_target, METH_NOARGS,
     "The oldest torch this build loads under (LibTorch stable ABI, TORCH_TARGET_VERSION)."},
    {"built_with_torch", built_with_torch, METH_NOARGS, "The torch version whose headers built this module."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastbert C++/CUDA ops (torch.ops.fastbert.*)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
