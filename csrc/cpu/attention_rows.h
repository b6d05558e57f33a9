// One query row of softmax attention with AVX2 + FMA, shared by the CPU inference kernels (banded attention in
// modernbert_cpu.cpp, decode steps in decoder_cpu.cpp): the scores of n keys, their softmax numerators and the
// weighted sum of n value rows, in fp32, for head_dim D a multiple of 8 up to 128 (V = D / 8 vectors per row).
// Keys and values are rows `stride` elements apart, fp32 or bf16 (widened on load; no copy of the cache). Callers
// check __builtin_cpu_supports("avx2") and ("fma") first (attention_rows_avx2()) and keep a scalar path.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace structprune {
namespace rows {

constexpr int64_t kLanes = 8;        // floats per AVX2 vector
constexpr int64_t kMaxVectors = 16;  // D <= 128

inline bool attention_rows_avx2(int64_t D) {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu && D % kLanes == 0 && D <= kMaxVectors * kLanes;
}

// exp(x) for x <= 0 (scores minus the row max): round-to-nearest range reduction x = n ln2 + r, |r| <= ln2 / 2,
// degree-6 Taylor polynomial (error below 2e-7 relative), 2^n built in the exponent bits; x < -87 gives ~1e-38.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);  // trunc toward 0 of a negative: round
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
  float poly = 1.3888889e-3f;  // 1/720, then Horner down to 1
  for (const float c : {8.3333338e-3f, 4.1666668e-2f, 1.6666667e-1f, 0.5f, 1.0f, 1.0f}) poly = poly * r + c;
  return poly * __builtin_bit_cast(float, (n + 127) << 23);
}

__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 nf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.3888889e-3f);
  for (const float c : {8.3333338e-3f, 4.1666668e-2f, 1.6666667e-1f, 0.5f, 1.0f, 1.0f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

__attribute__((target("avx2,fma"))) inline __m256 load8(const c10::BFloat16* p) {  // bf16 -> fp32: shift into the high half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// qv[0 .. V) <- the query row times scale.
template <typename T>
__attribute__((target("avx2,fma"))) inline void load_query(const T* q, int64_t V, float scale, __m256* qv) {
  for (int64_t c = 0; c < V; ++c) qv[c] = _mm256_mul_ps(load8(q + c * kLanes), _mm256_set1_ps(scale));
}

// row[j] = <qv, k_j> for the n key rows k + j * stride; four keys per step share each query vector.
template <typename T>
__attribute__((target("avx2,fma"))) inline void scores(const __m256* qv, int64_t V, const T* k, int64_t stride,
                                                       int64_t n, float* row) {
  int64_t j = 0;
  for (; j + 3 < n; j += 4) {
    const T* k0 = k + j * stride;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t c = 0; c < V; ++c) {
      s0 = _mm256_fmadd_ps(qv[c], load8(k0 + c * kLanes), s0);
      s1 = _mm256_fmadd_ps(qv[c], load8(k0 + stride + c * kLanes), s1);
      s2 = _mm256_fmadd_ps(qv[c], load8(k0 + 2 * stride + c * kLanes), s2);
      s3 = _mm256_fmadd_ps(qv[c], load8(k0 + 3 * stride + c * kLanes), s3);
    }
    row[j] = hsum8(s0);
    row[j + 1] = hsum8(s1);
    row[j + 2] = hsum8(s2);
    row[j + 3] = hsum8(s3);
  }
  for (; j < n; ++j) {
    const T* k0 = k + j * stride;
    __m256 s0 = _mm256_setzero_ps();
    for (int64_t c = 0; c < V; ++c) s0 = _mm256_fmadd_ps(qv[c], load8(k0 + c * kLanes), s0);
    row[j] = hsum8(s0);
  }
}

// row[0 .. n) <- exp(row - max) (n >= 1); returns their sum.
__attribute__((target("avx2,fma"))) inline float softmax_numerators(float* row, int64_t n) {
  float m = row[0];
  for (int64_t j = 1; j < n; ++j) m = m > row[j] ? m : row[j];
  const __m256 mv = _mm256_set1_ps(m);
  __m256 lv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(row + j), mv));
    _mm256_storeu_ps(row + j, e);
    lv = _mm256_add_ps(lv, e);
  }
  float l = hsum8(lv);
  for (; j < n; ++j) {
    row[j] = exp_nonpositive(row[j] - m);
    l += row[j];
  }
  return l;
}

// out[0 .. 8V) = inv * sum_j p[j] * v_j for the n value rows v + j * stride, four output vectors (32 columns) per
// pass over the keys, held in registers. Written as fp32 (`O` float) or rounded once to bf16.
template <typename T, typename O>
__attribute__((target("avx2,fma"))) inline void context(const float* p, const T* v, int64_t stride, int64_t n,
                                                        int64_t V, float inv, O* out) {
  for (int64_t c0 = 0; c0 < V; c0 += 4) {
    const int64_t nc = V - c0 < 4 ? V - c0 : 4;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const T* vr = v + j * stride + c0 * kLanes;
      for (int64_t c = 0; c < nc; ++c) acc[c] = _mm256_fmadd_ps(pj, load8(vr + c * kLanes), acc[c]);
    }
    for (int64_t c = 0; c < nc; ++c) {
      const __m256 r = _mm256_mul_ps(acc[c], _mm256_set1_ps(inv));
      if constexpr (sizeof(O) == sizeof(float)) {
        _mm256_storeu_ps(reinterpret_cast<float*>(out) + (c0 + c) * kLanes, r);
      } else {
        alignas(32) float tmp[kLanes];
        _mm256_store_ps(tmp, r);
        for (int64_t t = 0; t < kLanes; ++t) out[(c0 + c) * kLanes + t] = static_cast<O>(tmp[t]);
      }
    }
  }
}

}  // namespace rows
}  // namespace structprune
