// The core both serving attention paths share (cpp_serving_attention: fp32 in serving_attention_cpu.cpp, bf16's
// vdpbf16ps path in serving_attention_bf16_cpu.cpp), templated on the element type through a traits struct Tr:
// the score tiles and their epilogue (acc * scale + bias, the row max), the context tiles, the softmax numerators,
// the tile-size dispatch, one work unit (attend_block), the k^T packing, the query prefetch and the work loop.
//
// Tr (defined by each .cpp, its members always_inline with that file's target):
//   T       element type of q, k, v, the probabilities and the output (float, or uint16_t holding bf16 bits);
//   Vec     a zmm of T as the products read it (__m512 / __m512i);
//   kPair   elements per fp32 lane of one product step (1: an FMA; 2: vdpbf16ps over a pair);
//   load(p): the zmm of packed keys or values at p; broadcast(p): p[0 .. kPair) in every lane;
//   dot(acc, a, b): acc + a * b per fp32 lane (summed over the kPair products: FMA / vdpbf16ps);
//   store(p, x): 16 fp32 lanes as 16 T; store_tail(p, m, x): a row's last, partial vector (fp32: the lanes of m
//   only; bf16: 16 lanes, 0 past m), returning x as it enters the row sum (fp32: every lane; bf16: 0 past m).
//
// The templates that use intrinsics carry SP_SERVING_TARGET, which the including .cpp defines as its target
// attribute (avx512f, or avx512f + avx512bw + avx512vl + avx512bf16); a GCC template cannot take its target from a
// template argument. Hence this header's templates sit in an anonymous namespace: each translation unit has its own
// copy, compiled for its own target.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#ifndef SP_SERVING_TARGET
#error "define SP_SERVING_TARGET (the target attribute of the including path) before serving_attention_core.h"
#endif

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

namespace {

constexpr int64_t kLanes = 16;     // fp32 lanes per zmm
constexpr int kScoreRows = 6;      // query rows per score tile (6 x 4 accumulators)
constexpr int kScoreVectors = 4;   // 64 keys per score tile
constexpr int64_t kPanel = kScoreVectors * kLanes;  // keys per panel of the packed k^T
constexpr int64_t kBlock = 24;     // query rows per work unit: a multiple of 6, 8 and 12

template <class T>
struct Operand {  // a [B, H, S, D] tensor with a contiguous last dimension
  const T* p;
  int64_t sb, sh, ss;
  const T* row(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

// Scores of R query rows (q[r]) against NV * 16 keys of a packed k^T panel (step t of kPair head-dim entries at
// kt + t * ldk), stored as acc * scale + bias into s + r * lds (fp32); mx + 16 r: the lanes of row r's running max.
template <class Tr, int R, int NV>
SP_SERVING_TARGET void score_tile(const typename Tr::T* const* q, const typename Tr::T* kt, int64_t ldk, int64_t D,
                                  float scale, const float* bias, float* s, int64_t lds, float* mx) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < D / Tr::kPair; ++t) {
    typename Tr::Vec kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = Tr::load(kt + t * ldk + c * Tr::kPair * kLanes);
    for (int r = 0; r < R; ++r) {
      const typename Tr::Vec qb = Tr::broadcast(q[r] + Tr::kPair * t);
      for (int c = 0; c < NV; ++c) acc[r][c] = Tr::dot(acc[r][c], qb, kv[c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 m[R];
  for (int r = 0; r < R; ++r) m[r] = _mm512_loadu_ps(mx + r * kLanes);
  for (int c = 0; c < NV; ++c) {
    const __m512 bv = _mm512_loadu_ps(bias + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_fmadd_ps(acc[r][c], sc, bv);
      _mm512_storeu_ps(s + r * lds + c * kLanes, x);
      m[r] = _mm512_max_ps(m[r], x);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(mx + r * kLanes, m[r]);
}

// Context of R rows of probabilities (p + r * ldp, `steps` steps of kPair keys) over NV output vectors starting at
// column c0 of the packed values (step t at v + t * vs, kPair entries per column):
// out[r] + c0 = (sum_j p[r][j] v[j]) * inv[r], rounded to T once on the store.
template <class Tr, int R, int NV>
SP_SERVING_TARGET void context_tile(const typename Tr::T* p, int64_t ldp, int64_t steps, const typename Tr::T* v,
                                    int64_t vs, int64_t c0, typename Tr::T* const* out, const float* inv) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < steps; ++t) {
    typename Tr::Vec vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = Tr::load(v + t * vs + Tr::kPair * (c0 + c * kLanes));
    for (int r = 0; r < R; ++r) {
      const typename Tr::Vec pb = Tr::broadcast(p + r * ldp + Tr::kPair * t);
      for (int c = 0; c < NV; ++c) acc[r][c] = Tr::dot(acc[r][c], pb, vv[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 iv = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < NV; ++c) Tr::store(out[r] + c0 + c * kLanes, _mm512_mul_ps(acc[r][c], iv));
  }
}

// The tiles for `rows` rows (1 .. kScoreRows), chosen at compile time.
template <class Tr, int NV, int R = 1>
void score_rows(int rows, const typename Tr::T* const* q, const typename Tr::T* kt, int64_t ldk, int64_t D,
                float scale, const float* bias, float* s, int64_t lds, float* mx) {
  if constexpr (R < kScoreRows) {
    if (rows > R) return score_rows<Tr, NV, R + 1>(rows, q, kt, ldk, D, scale, bias, s, lds, mx);
  }
  score_tile<Tr, R, NV>(q, kt, ldk, D, scale, bias, s, lds, mx);
}

// Context tiles: at most 24 accumulators, so up to 12 rows for 1-2 output vectors, 8 for 3, 6 for 4.
constexpr int context_tile_rows(int64_t nv) { return nv <= 2 ? 12 : (nv == 3 ? 8 : 6); }

template <class Tr, int NV, int R = 1>
void context_rows(int rows, const typename Tr::T* p, int64_t ldp, int64_t steps, const typename Tr::T* v, int64_t vs,
                  int64_t c0, typename Tr::T* const* out, const float* inv) {
  if constexpr (R < context_tile_rows(NV)) {
    if (rows > R) return context_rows<Tr, NV, R + 1>(rows, p, ldp, steps, v, vs, c0, out, inv);
  }
  context_tile<Tr, R, NV>(p, ldp, steps, v, vs, c0, out, inv);
}

// Softmax numerators of one row of n fp32 scores x, given the lanes of its max (lanes past n hold -inf scores):
// p[j] = exp(x[j] - max) stored as T into p[0 .. n) (fp32: p may be x, in place; bf16: up to n rounded up to 16,
// 0 past n); returns 1 / the sum of the fp32 numerators.
template <class Tr>
SP_SERVING_TARGET float softmax_row(float* x, int64_t n, const float* max_lanes, typename Tr::T* p) {
  const int64_t nv = n - n % kLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % kLanes)) - 1u);
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float m = _mm512_reduce_max_ps(_mm512_loadu_ps(max_lanes));
  if (m < -1e30f) {  // every key padded (finfo.min): m log2(e) would overflow, so shift the row by m first
    for (int64_t j = 0; j < n; ++j) x[j] -= m;
    m = 0.0f;
  }
  const __m512 mx = _mm512_set1_ps(m * 1.44269504088896341f);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < nv; j += kLanes) {
    const __m512 e = exp_shifted16(_mm512_loadu_ps(x + j), mx);
    Tr::store(p + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = exp_shifted16(_mm512_mask_loadu_ps(lowest, tail, x + nv), mx);
    sum = _mm512_add_ps(sum, Tr::store_tail(p + nv, tail, e));
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// k^T of one head in panels of panel_width keys, kPair head-dim entries per 32-bit lane:
// kt[p * Dp + t * kPair * width + kPair * (j - p) + e] = k[j][kPair * t + e] for the panel p = j - j % panel_width of
// width min(panel_width, ldk - p), 16 keys per 32-bit gather (columns past Sk, and steps past D up to Dp, keep their
// zeros).
template <class Tr>
SP_SERVING_TARGET void pack_keys(const typename Tr::T* k, int64_t ks, int64_t Sk, int64_t D, int64_t Dp,
                                 int64_t panel_width, typename Tr::T* kt, int64_t ldk) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int32_t>(ks)));
  for (int64_t j = 0; j < Sk; j += kLanes) {
    const __mmask16 m = Sk - j >= kLanes ? static_cast<__mmask16>(0xFFFF)
                                         : static_cast<__mmask16>((1u << (Sk - j)) - 1u);
    const typename Tr::T* kj = k + j * ks;
    const int64_t panel = j - j % panel_width, width = std::min(panel_width, ldk - panel);
    for (int64_t t = 0; t < D / Tr::kPair; ++t) {  // the index counts elements: scale sizeof(T) bytes
      _mm512_storeu_si512(kt + panel * Dp + t * Tr::kPair * width + Tr::kPair * (j - panel),
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, kj + Tr::kPair * t,
                                                      sizeof(typename Tr::T)));
    }
  }
}

// One work unit: query rows [i0, i1) of head (b, h); kt, vp, bias: the packed keys ([D / kPair, 64, kPair] panels
// at kt + j * D), values (steps of kPair keys, D * kPair apart) and bias of (b, h); s: the [kBlock, ldk] fp32 scores
// buffer (ldk: Sk rounded up to 16), pb: the [kBlock, ldk] probabilities (fp32: s itself).
template <class Tr>
void attend_block(const Operand<typename Tr::T>& q, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t H,
                  int64_t Sq, int64_t Sk, int64_t D, float scale, const typename Tr::T* kt, int64_t ldk,
                  const typename Tr::T* vp, const float* bias, float* s, typename Tr::T* pb, typename Tr::T* out) {
  using T = typename Tr::T;
  constexpr int64_t kPair = Tr::kPair;
  const int64_t rows = i1 - i0;
  const T* qrow[kBlock];
  T* orow[kBlock];
  float inv[kBlock];
  float mx[kBlock * kLanes];
  std::fill(mx, mx + rows * kLanes, -std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    qrow[r] = q.row(b, h, i0 + r);
    orow[r] = out + ((b * Sq + i0 + r) * H + h) * D;
  }
  for (int64_t r = 0; r < rows; r += kScoreRows) {
    const int n = static_cast<int>(std::min<int64_t>(kScoreRows, rows - r));
    for (int64_t j = 0; j < ldk; j += kPanel) {
      const int64_t nv = std::min<int64_t>(kScoreVectors, (ldk - j) / kLanes);
      const T* panel = kt + j * D;  // [D / kPair, nv * 16, kPair]
      float* st = s + r * ldk + j;
      float* m = mx + r * kLanes;
      switch (nv) {
        case 1: score_rows<Tr, 1>(n, qrow + r, panel, kPair * 1 * kLanes, D, scale, bias + j, st, ldk, m); break;
        case 2: score_rows<Tr, 2>(n, qrow + r, panel, kPair * 2 * kLanes, D, scale, bias + j, st, ldk, m); break;
        case 3: score_rows<Tr, 3>(n, qrow + r, panel, kPair * 3 * kLanes, D, scale, bias + j, st, ldk, m); break;
        default: score_rows<Tr, 4>(n, qrow + r, panel, kPair * 4 * kLanes, D, scale, bias + j, st, ldk, m); break;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) inv[r] = softmax_row<Tr>(s + r * ldk, Sk, mx + r * kLanes, pb + r * ldk);
  const int64_t steps = (Sk + kPair - 1) / kPair, vs = kPair * D;
  for (int64_t c = 0; c < D / kLanes; c += kScoreVectors) {
    const int64_t nv = std::min<int64_t>(kScoreVectors, D / kLanes - c);
    const int tile = context_tile_rows(nv);
    for (int64_t r = 0; r < rows; r += tile) {
      const int n = static_cast<int>(std::min<int64_t>(tile, rows - r));
      const T* p = pb + r * ldk;
      switch (nv) {
        case 1: context_rows<Tr, 1>(n, p, ldk, steps, vp, vs, c * kLanes, orow + r, inv + r); break;
        case 2: context_rows<Tr, 2>(n, p, ldk, steps, vp, vs, c * kLanes, orow + r, inv + r); break;
        case 3: context_rows<Tr, 3>(n, p, ldk, steps, vp, vs, c * kLanes, orow + r, inv + r); break;
        default: context_rows<Tr, 4>(n, p, ldk, steps, vp, vs, c * kLanes, orow + r, inv + r); break;
      }
    }
  }
}

// Software prefetch of the query rows of unit u (blocks of `block` rows) into L1 while the unit before it runs (the
// projection's row stride, 3 * H * D elements, is beyond the hardware prefetchers' reach).
template <class T>
void prefetch_queries(const Operand<T>& q, int64_t u, int64_t nblocks, int64_t block, int64_t H, int64_t Sq,
                      int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t blk = u % nblocks, bh = u / nblocks;
  for (int64_t i = blk * block; i < std::min(Sq, (blk + 1) * block); ++i) {
    const T* row = q.row(bh / H, bh % H, i);
    for (int64_t d = 0; d < D; d += kLine) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
  }
}

// The work units [u0, u1) of one parallel chunk (unit u: block u % nblocks of `block` query rows of head
// bh = u / nblocks, bh = b * H + h), in order: the key bias of batch row b copied into bias[0 .. Sk) when b changes
// (bias_p null: zeros), pack(b, h) when the head changes, the next unit's queries prefetched, then
// attend(b, h, i0, i1).
template <class T, class Pack, class Attend>
void run_units(int64_t u0, int64_t u1, int64_t nblocks, int64_t block, int64_t H, int64_t Sq, int64_t Sk, int64_t D,
               const Operand<T>& q, const float* bias_p, float* bias, const Pack& pack, const Attend& attend) {
  int64_t cur_b = -1, cur_h = -1;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t blk = u % nblocks, bh = u / nblocks, h = bh % H, b = bh / H;
    if (b != cur_b) {
      for (int64_t j = 0; j < Sk; ++j) bias[j] = bias_p ? bias_p[b * Sk + j] : 0.0f;
    }
    if (b != cur_b || h != cur_h) {
      pack(b, h);
      cur_b = b;
      cur_h = h;
    }
    const int64_t i0 = blk * block;
    if (u + 1 < u1) prefetch_queries(q, u + 1, nblocks, block, H, Sq, D);
    attend(b, h, i0, std::min(Sq, i0 + block));
  }
}

}  // namespace
}  // namespace structprune
