// Counter-based random numbers shared by the C++ (CPU) and CUDA code of fastbert.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a keyed
// bijection of a 128-bit counter. Every random word is a pure function of (key, counter), so any
// thread on any device can compute the draw of any position with no state: this is what makes the
// CPU and CUDA ops give bit-identical results for the same (seed, offset).
//
// fastbert keys the generator by the 64-bit seed and counts with
//   counter = (position lo 32, position hi 32, offset lo 32, offset hi 32)
// where position is the flat index of a token (mlm_mask) or of a group of 4 elements (dropout) and
// seed/offset are drawn from a torch.Generator by the Python wrapper. One call gives 4 words.
//
// Only integer arithmetic is used, and thresholds are integers too (a probability p becomes
// round(p * 2^32) and a draw w is "below p" when w < threshold), so no floating-point rounding can
// make the CPU and the GPU disagree.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FB_HOST_DEVICE inline
#endif

namespace fastbert {

struct Philox4 {
  uint32_t v[4];
};

FB_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds. ctr: 4 counter words, key: 2 key words.
FB_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                     uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  Philox4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// The 4 random words of `position` for a stream keyed by (seed, offset).
FB_HOST_DEVICE Philox4 philox_at(uint64_t seed, uint64_t offset, uint64_t position) {
  return philox4x32_10(static_cast<uint32_t>(position), static_cast<uint32_t>(position >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Word i (0..3) of a Philox result, by selects (no dynamically indexed array, which would live in
// local memory on the GPU).
FB_HOST_DEVICE uint32_t philox_word(const Philox4& r, int64_t i) {
  return (i & 2) ? ((i & 1) ? r.v[3] : r.v[2]) : ((i & 1) ? r.v[1] : r.v[0]);
}

// floor(w * n / 2^32): a uniform integer in [0, n) from a 32-bit word (n < 2^32).
FB_HOST_DEVICE uint32_t scale_to(uint32_t w, uint32_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(w) * static_cast<uint64_t>(n)) >> 32);
}

}  // namespace fastbert
