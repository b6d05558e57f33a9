// Philox4x32-10 counter-based RNG (Salmon et al., SC'11) and the hard-concrete gate math.
// Plain C++ usable from host code and from CUDA device code: no torch and no CUDA headers needed.
// Uniform stream: element i of a gate vector uses counter (i / 4 lo, i / 4 hi, offset lo, offset hi) and
// key (seed lo, seed hi), output word i % 4, so the CPU and CUDA samplers draw bit-identical noise.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define SP_HD __host__ __device__ __forceinline__
#else
#define SP_HD inline
#endif

namespace structprune {

constexpr float kGamma = -0.1f;  // hard-concrete stretch interval (gamma, zeta), as in structprune/gates.py
constexpr float kZeta = 1.1f;
constexpr float kUniformEps = 1e-6f;  // u is clamped to [eps, 1 - eps], as gates.HardConcreteGate does

struct Philox4 {
  uint32_t v[4];
};

SP_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

SP_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, ctr.v[0], &hi0, &lo0);
    philox_mulhilo(0xCD9E8D57u, ctr.v[2], &hi1, &lo1);
    Philox4 out;
    out.v[0] = hi1 ^ ctr.v[1] ^ k0;
    out.v[1] = lo1;
    out.v[2] = hi0 ^ ctr.v[3] ^ k1;
    out.v[3] = lo0;
    ctr = out;
  }
  return ctr;
}

// The 4 raw words of block `block` (elements 4*block .. 4*block+3) of the stream (seed, offset).
SP_HD Philox4 philox_block(uint64_t seed, uint64_t offset, uint64_t block) {
  Philox4 c;
  c.v[0] = static_cast<uint32_t>(block);
  c.v[1] = static_cast<uint32_t>(block >> 32);
  c.v[2] = static_cast<uint32_t>(offset);
  c.v[3] = static_cast<uint32_t>(offset >> 32);
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// 32 random bits -> float in (0, 1): 23 bits, centred in their bin, so 0 and 1 are never produced.
SP_HD float philox_to_uniform(uint32_t w) {
  return (static_cast<float>(w >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

SP_HD float clamp_uniform(float u) {
  return u < kUniformEps ? kUniformEps : (u > 1.0f - kUniformEps ? 1.0f - kUniformEps : u);
}

// s = sigmoid((log u - log(1-u) + log_alpha) / beta); z = clamp(s * (zeta - gamma) + gamma, 0, 1).
// Returns z and writes d z / d log_alpha into *dz (0 where the clamp is active, as torch.clamp's gradient).
SP_HD float hard_concrete_value(float u, float log_alpha, float beta, float* dz) {
  const float t = (logf(u) - log1pf(-u) + log_alpha) / beta;
  const float s = 1.0f / (1.0f + expf(-t));
  const float pre = s * (kZeta - kGamma) + kGamma;
  if (dz) *dz = (pre >= 0.0f && pre <= 1.0f) ? (kZeta - kGamma) * s * (1.0f - s) / beta : 0.0f;
  return pre < 0.0f ? 0.0f : (pre > 1.0f ? 1.0f : pre);
}

}  // namespace structprune
