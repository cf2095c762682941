// Torch-free CUDA helpers: dtype dispatch, fp32/fp64 accumulation types, aligned vector packs, warp sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels.h"

namespace fastbert {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct Cast;
template <>
struct Cast<float> {
  __device__ static float from(float x) { return x; }
};
template <>
struct Cast<double> {
  __device__ static double from(double x) { return x; }
};
template <>
struct Cast<__half> {
  __device__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cast<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

// VEC consecutive elements moved as one aligned load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

inline bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Records the first error code (device side); the glue reads it back and raises.
__device__ __forceinline__ void report(int* error, int code) {
  if (error != nullptr) atomicCAS(error, 0, code);
}

}  // namespace fastbert

// One case per dtype, each the same body: the repetition is the point of the macro.
#define FB_DISPATCH_DTYPE(dtype, T, ...)           \
  switch (dtype) {                                 \
    case ::fastbert::DType::kFloat32: {            \
      using T = float;                             \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
    case ::fastbert::DType::kFloat16: {            \
      using T = __half;                            \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
    case ::fastbert::DType::kBFloat16: {           \
      using T = __nv_bfloat16;                     \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
    case ::fastbert::DType::kFloat64: {            \
      using T = double;                            \
      __VA_ARGS__;                                 \
      break;                                       \
    }                                              \
  }
