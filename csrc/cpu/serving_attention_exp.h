// exp_shifted16: the 16-lane exp of a softmax row's scores minus its max, shared by the fp32 and bf16 serving
// attention kernels (serving_attention_cpu.cpp, serving_attention_bf16_cpu.cpp).
#pragma once

#include <immintrin.h>

namespace structprune {

// exp(x - m) for scores x <= m, 16 lanes, as 2^t with t = x log2(e) - m log2(e): one FMA (the rounding of
// m log2(e) is common to the row and cancels in the normalisation), t = n + f with n = round(t), |f| <= 1/2,
// 2^f = exp(f ln 2) by the degree-6 Taylor polynomial (relative error ~1e-7, as attention_rows.h's), 2^n applied by
// scalef; t < -126 (a padded key: finfo.min) gives ~1e-38.
__attribute__((target("avx512f"))) inline __m512 exp_shifted16(__m512 x, __m512 m_log2e) {
  const __m512 t = _mm512_max_ps(_mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504088896341f), m_log2e),
                                 _mm512_set1_ps(-126.0f));
  const __m512 nf = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, nf);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);  // ln2^6 / 6!, then Horner down to 1
  for (const float c : {1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022651e-1f, 6.9314718e-1f, 1.0f}) {
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, nf);
}

}  // namespace structprune
