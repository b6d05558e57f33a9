// The bf16 path of cpp_serving_attention (serving_attention_cpu.cpp checks the operands, then calls
// serving_attention_bf16 for bf16 q, k, v): exact softmax attention with both products on AVX512-BF16's dot product
// of bf16 pairs (vdpbf16ps: 2 products per fp32 lane, accumulated in fp32).
//
//   out[b, s, h, :] = bf16(softmax_k(q[b, h, s] . k[b, h, k] * scale + key_bias[b, k]) @ v[b, h, k])
//
// q: [B, H, Sq, D], k and v: [B, H, Sk, D] bf16 (last dimension contiguous), key_bias [B, Sk] fp32 or absent;
// out: [B, Sq, H, D] bf16 contiguous. Same work units and per-thread (b, h) packing as the fp32 path:
//   1. scores: k^T packed as bf16 pairs, panels of 64 keys laid out [D/2, 64, 2] (keys j and head-dim entries
//      d, d + 1 adjacent), 16 keys per 32-bit gather; tiles of 6 query rows x 64 keys, the query's (d, d + 1) pair
//      broadcast as one 32-bit value and vdpbf16ps'd into fp32 accumulators (D/2 steps: half the instructions of
//      the fp32 FMA loop); stored as acc * scale + bias (fp32), the row max kept on the way;
//   2. softmax numerators in fp32, exactly (two passes, exp_shifted16), the row sum of the fp32 values; the
//      numerators are then rounded to bf16 for P @ V, as ATen's bf16 flash kernel does;
//   3. context: values packed as pairs over keys, [ceil(Sk/2), D, 2] (keys j, j + 1 adjacent for each output
//      column; a zero row past an odd Sk), the rows' (p_j, p_j+1) pairs broadcast and vdpbf16ps'd into fp32
//      accumulators; scaled by 1 / sum and rounded to bf16 once, on the store.
// Where the CPU has AMX-BF16 (and Linux grants the tile data permission), both products run on AMX tiles instead
// (tdpbf16ps, 16 x 16 fp32 tiles over a depth of 32 bf16): blocks of 32 query rows copied to [32, D rounded up to
// 32]; k^T packed the same way in panels of 16 keys (one B tile per 16 keys x 32 head-dim entries); raw scores
// stored as tiles, then the softmax as above with scale and bias applied in both passes; P (bf16, keys padded to 32
// with zeros) times the pair-packed values as tiles, scaled by 1 / sum and rounded to bf16 on the way out. Measured
// on this machine's Xeon (AMX + AVX512-BF16): vdpbf16ps zmm issues at a quarter of the rate of an fp32 FMA, so its
// path is 2x slower per flop than the fp32 kernel; the AMX path is the fast one.
// STRUCTPRUNE_SERVING_ATTENTION_AMX=0 (read per call) forces the vdpbf16ps path (tests). Needs AVX512-BF16 (checked
// at run time; the Python entry returns None without it, so ATen's SDPA runs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "serving_attention_exp.h"

#define SP_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace structprune {
namespace {

constexpr int64_t kLanes = 16;     // fp32 lanes per zmm (32 bf16)
constexpr int kScoreRows = 6;      // query rows per score tile (6 x 4 accumulators)
constexpr int kScoreVectors = 4;   // 64 keys per score tile
constexpr int64_t kPanel = kScoreVectors * kLanes;
constexpr int64_t kBlock = 24;     // query rows per work unit

bool avx512bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

struct Operand {  // a [B, H, S, D] bf16 tensor (raw bits) with a contiguous last dimension
  const uint16_t* p;
  int64_t sb, sh, ss;
  const uint16_t* row(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

SP_BF16_TARGET inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

SP_BF16_TARGET inline __m512i broadcast_pair(const uint16_t* p) {  // the bf16 pair p[0], p[1] in every lane
  int32_t x;
  std::memcpy(&x, p, sizeof(x));
  return _mm512_set1_epi32(x);
}

// Scores of R query rows (q[r], bf16) against NV * 16 keys of a packed k^T panel (pair row d2 at kt + d2 * ldk
// bf16), stored as acc * scale + bias into s + r * lds; mx + 16 r: the lanes of row r's running max.
template <int R, int NV>
SP_BF16_TARGET void score_tile(const uint16_t* const* q, const uint16_t* kt, int64_t ldk, int64_t D, float scale,
                               const float* bias, float* s, int64_t lds, float* mx) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < D / 2; ++d2) {
    __m512i kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_si512(kt + d2 * ldk + c * 2 * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512i qb = broadcast_pair(q[r] + 2 * d2);
      for (int c = 0; c < NV; ++c) acc[r][c] = dot_pairs(acc[r][c], qb, kv[c]);
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

// Context of R rows of bf16 probabilities (p + r * ldp, npairs key pairs) over NV output vectors starting at
// column c0 of the pair-packed values (pair row j2 at v + j2 * 2D): out[r] + c0 = bf16((sum_j p[r][j] v[j]) inv[r]).
template <int R, int NV>
SP_BF16_TARGET void context_tile(const uint16_t* p, int64_t ldp, int64_t npairs, const uint16_t* v, int64_t D,
                                 int64_t c0, uint16_t* const* out, const float* inv) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j2 = 0; j2 < npairs; ++j2) {
    __m512i vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_si512(v + j2 * 2 * D + 2 * (c0 + c * kLanes));
    for (int r = 0; r < R; ++r) {
      const __m512i pb = broadcast_pair(p + r * ldp + 2 * j2);
      for (int c = 0; c < NV; ++c) acc[r][c] = dot_pairs(acc[r][c], pb, vv[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 iv = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < NV; ++c) {
      const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], iv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + c0 + c * kLanes), (__m256i)o);
    }
  }
}

template <int NV, int R = 1>
void score_rows(int rows, const uint16_t* const* q, const uint16_t* kt, int64_t ldk, int64_t D, float scale,
                const float* bias, float* s, int64_t lds, float* mx) {
  if constexpr (R < kScoreRows) {
    if (rows > R) return score_rows<NV, R + 1>(rows, q, kt, ldk, D, scale, bias, s, lds, mx);
  }
  score_tile<R, NV>(q, kt, ldk, D, scale, bias, s, lds, mx);
}

constexpr int context_tile_rows(int64_t nv) { return nv <= 2 ? 12 : (nv == 3 ? 8 : 6); }

template <int NV, int R = 1>
void context_rows(int rows, const uint16_t* p, int64_t ldp, int64_t npairs, const uint16_t* v, int64_t D,
                  int64_t c0, uint16_t* const* out, const float* inv) {
  if constexpr (R < context_tile_rows(NV)) {
    if (rows > R) return context_rows<NV, R + 1>(rows, p, ldp, npairs, v, D, c0, out, inv);
  }
  context_tile<R, NV>(p, ldp, npairs, v, D, c0, out, inv);
}

// Softmax numerators of one row of n fp32 scores x, given the lanes of its max (lanes past n hold -inf scores),
// written as bf16 into pb[0 .. n rounded up to 16) (0 past n); returns 1 / the sum of the fp32 numerators.
SP_BF16_TARGET float softmax_row(float* x, int64_t n, const float* max_lanes, uint16_t* pb) {
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
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), (__m256i)_mm512_cvtneps_pbh(e));
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_shifted16(_mm512_mask_loadu_ps(lowest, tail, x + nv), mx));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + nv), (__m256i)_mm512_cvtneps_pbh(e));
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// Packs the keys and values of one head: k^T as pairs in panels of panel_width keys, kt[p * Dp + d2 * 2 width +
// 2 (j - p) + e] = k[j][2 d2 + e] for the panel p = j - j % panel_width of width min(panel_width, ldk - p)
// (columns past Sk and pair rows past D / 2, up to Dp / 2, stay 0), and vp[j2 * 2D + 2 d + e] = v[2 j2 + e][d] (a
// zero row past an odd Sk).
SP_BF16_TARGET void pack_head(const uint16_t* k, int64_t ks, const uint16_t* v, int64_t vs, int64_t Sk, int64_t D,
                              int64_t Dp, int64_t panel_width, uint16_t* kt, int64_t ldk, uint16_t* vp) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int32_t>(ks)));
  for (int64_t j = 0; j < Sk; j += kLanes) {
    const __mmask16 m = Sk - j >= kLanes ? static_cast<__mmask16>(0xFFFF)
                                         : static_cast<__mmask16>((1u << (Sk - j)) - 1u);
    const uint16_t* kj = k + j * ks;
    const int64_t panel = j - j % panel_width, width = std::min(panel_width, ldk - panel);
    for (int64_t d2 = 0; d2 < D / 2; ++d2) {  // index in bf16 elements, scale 2 (bytes)
      _mm512_storeu_si512(kt + panel * Dp + d2 * 2 * width + 2 * (j - panel),
                          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, kj + 2 * d2, 2));
    }
  }
  // interleave 16 columns of two value rows: out[2 i] = row j [i], out[2 i + 1] = row j + 1 [i]
  const __m512i mix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < Sk; j += 2) {
    const uint16_t* v0 = v + j * vs;
    for (int64_t d = 0; d < D; d += kLanes) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d));
      const __m256i b = j + 1 < Sk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + vs + d))
                                   : _mm256_setzero_si256();
      _mm512_storeu_si512(vp + j * D + 2 * d,
                          _mm512_permutexvar_epi16(mix, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1)));
    }
  }
}

// One work unit: query rows [i0, i1) of head (b, h); kt, vp, bias: the packed keys, values and bias of (b, h);
// s: the [kBlock, ldk] fp32 scores buffer, pb: the [kBlock, ldk] bf16 probabilities.
void attend_block(const Operand& q, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t H, int64_t Sq,
                  int64_t Sk, int64_t D, float scale, const uint16_t* kt, int64_t ldk, const uint16_t* vp,
                  const float* bias, float* s, uint16_t* pb, uint16_t* out) {
  const int64_t rows = i1 - i0;
  const uint16_t* qrow[kBlock];
  uint16_t* orow[kBlock];
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
      const uint16_t* panel = kt + j * D;  // [D / 2, nv * 16, 2]
      float* st = s + r * ldk + j;
      float* m = mx + r * kLanes;
      switch (nv) {
        case 1: score_rows<1>(n, qrow + r, panel, 2 * kLanes, D, scale, bias + j, st, ldk, m); break;
        case 2: score_rows<2>(n, qrow + r, panel, 4 * kLanes, D, scale, bias + j, st, ldk, m); break;
        case 3: score_rows<3>(n, qrow + r, panel, 6 * kLanes, D, scale, bias + j, st, ldk, m); break;
        default: score_rows<4>(n, qrow + r, panel, 8 * kLanes, D, scale, bias + j, st, ldk, m); break;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) inv[r] = softmax_row(s + r * ldk, Sk, mx + r * kLanes, pb + r * ldk);
  const int64_t npairs = (Sk + 1) / 2;
  for (int64_t c = 0; c < D / kLanes; c += kScoreVectors) {
    const int64_t nv = std::min<int64_t>(kScoreVectors, D / kLanes - c);
    const int tile = context_tile_rows(nv);
    for (int64_t r = 0; r < rows; r += tile) {
      const int n = static_cast<int>(std::min<int64_t>(tile, rows - r));
      const uint16_t* p = pb + r * ldk;
      switch (nv) {
        case 1: context_rows<1>(n, p, ldk, npairs, vp, D, c * kLanes, orow + r, inv + r); break;
        case 2: context_rows<2>(n, p, ldk, npairs, vp, D, c * kLanes, orow + r, inv + r); break;
        case 3: context_rows<3>(n, p, ldk, npairs, vp, D, c * kLanes, orow + r, inv + r); break;
        default: context_rows<4>(n, p, ldk, npairs, vp, D, c * kLanes, orow + r, inv + r); break;
      }
    }
  }
}

void prefetch_queries(const Operand& q, int64_t u, int64_t nblocks, int64_t block, int64_t H, int64_t Sq,
                      int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(uint16_t);
  const int64_t blk = u % nblocks, bh = u / nblocks;
  for (int64_t i = blk * block; i < std::min(Sq, (blk + 1) * block); ++i) {
    const uint16_t* row = q.row(bh / H, bh % H, i);
    for (int64_t d = 0; d < D; d += kLine) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
  }
}

// --- AMX: the same packed operands, products as 16 x 16 tiles (tdpbf16ps) --------------------------------------
// Tiles 0-3: fp32 accumulators, 4-5: the two 16-row halves of the A operand (queries or probabilities), 6-7: the
// B operand (16 pair rows of keys or values); every tile 16 rows x 64 bytes.
#define SP_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define SP_MEMORY_BARRIER() __asm__ volatile("" ::: "memory")  // GCC's tile loads and stores declare no memory

constexpr int64_t kAmxBlock = 32;  // query rows per work unit: two tiles

bool amx_bf16() {  // AMX-TILE and AMX-BF16 (CPUID 7.0 EDX bits 24, 22) and the kernel's permission for tile data
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool use_amx() {  // STRUCTPRUNE_SERVING_ATTENTION_AMX=0 runs the vdpbf16ps path instead (read per call, for tests)
  const char* env = std::getenv("STRUCTPRUNE_SERVING_ATTENTION_AMX");
  return amx_bf16() && !(env != nullptr && env[0] == '0');
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

SP_AMX_TARGET void amx_release() { _tile_release(); }

SP_AMX_TARGET void amx_configure() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(c));  // GCC 12's _tile_loadconfig declares only 8 bytes read
}

// Raw scores s[r][j] (fp32, row stride ldk) of the 32 query rows of qb ([32, Dp] bf16) against the ldk keys of kt
// (key block j / 16 at kt + j * Dp: [Dp / 2, 16, 2]).
SP_AMX_TARGET void amx_scores(const uint16_t* qb, int64_t Dp, const uint16_t* kt, int64_t ldk, float* s) {
  SP_MEMORY_BARRIER();
  for (int64_t j = 0; j < ldk; j += 32) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* k0 = kt + j * Dp;
    for (int64_t d = 0; d < Dp; d += 32) {
      _tile_loadd(4, qb + d, Dp * 2);
      _tile_loadd(5, qb + 16 * Dp + d, Dp * 2);
      _tile_loadd(6, k0 + d * 16, 64);
      _tile_loadd(7, k0 + 16 * Dp + d * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, s + j, ldk * 4);
    _tile_stored(1, s + j + 16, ldk * 4);
    _tile_stored(2, s + 16 * ldk + j, ldk * 4);
    _tile_stored(3, s + 16 * ldk + j + 16, ldk * 4);
  }
  SP_MEMORY_BARRIER();
}

// c[r][0 .. D) = sum_j pb[r][j] v[j] (fp32, row stride D) for the 32 rows of pb ([32, ldk] bf16) over the
// pair-packed values vp ([ldk / 2, D, 2], zero past Sk).
SP_AMX_TARGET void amx_context(const uint16_t* pb, int64_t ldk, const uint16_t* vp, int64_t D, float* c) {
  SP_MEMORY_BARRIER();
  for (int64_t c0 = 0; c0 < D; c0 += 32) {
    const bool two = c0 + 16 < D;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t j = 0; j < ldk; j += 32) {
      _tile_loadd(4, pb + j, ldk * 2);
      _tile_loadd(5, pb + 16 * ldk + j, ldk * 2);
      const uint16_t* v0 = vp + j * D + 2 * c0;
      _tile_loadd(6, v0, D * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (two) {
        _tile_loadd(7, v0 + 32, D * 4);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, c + c0, D * 4);
    _tile_stored(2, c + 16 * D + c0, D * 4);
    if (two) {
      _tile_stored(1, c + c0 + 16, D * 4);
      _tile_stored(3, c + 16 * D + c0 + 16, D * 4);
    }
  }
  SP_MEMORY_BARRIER();
}

// Softmax numerators of one row of n raw AMX scores x: p = exp(x * scale + bias - max) (bias -inf past n; two passes,
// as softmax_row), written as bf16 into pb[0 .. n rounded up to 16) (0 past n); returns 1 / the sum of the fp32 p.
SP_BF16_TARGET float softmax_raw_row(const float* x, int64_t n, float scale, const float* bias, uint16_t* pb) {
  const int64_t n16 = (n + kLanes - 1) / kLanes * kLanes;
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n16; j += kLanes) {
    mv = _mm512_max_ps(mv, _mm512_fmadd_ps(_mm512_loadu_ps(x + j), sc, _mm512_loadu_ps(bias + j)));
  }
  float m = _mm512_reduce_max_ps(mv), shift = 0.0f;
  if (m < -1e30f) {  // every key padded (finfo.min): m log2(e) would overflow, so shift the row by m first
    shift = m;
    m = 0.0f;
  }
  const __m512 mx = _mm512_set1_ps(m * 1.44269504088896341f), sh = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n16; j += kLanes) {
    __m512 y = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), sc, _mm512_loadu_ps(bias + j));
    if (shift != 0.0f) y = _mm512_sub_ps(y, sh);
    const __mmask16 keep = n - j >= kLanes ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(keep, exp_shifted16(y, mx));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + j), (__m256i)_mm512_cvtneps_pbh(e));
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// One AMX work unit: query rows [i0, i1) (at most 32) of head (b, h), copied into qb ([32, Dp], columns past D
// zero); s, pb: [32, ldk] fp32 scores and bf16 probabilities; cb: [32, D] fp32 context.
SP_AMX_TARGET void attend_block_amx(const Operand& q, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t H,
                                    int64_t Sq, int64_t Sk, int64_t D, int64_t Dp, float scale, const uint16_t* kt,
                                    int64_t ldk, const uint16_t* vp, const float* bias, uint16_t* qb, float* s,
                                    uint16_t* pb, float* cb, uint16_t* out) {
  const int64_t rows = i1 - i0;
  for (int64_t r = 0; r < rows; ++r) std::memcpy(qb + r * Dp, q.row(b, h, i0 + r), D * sizeof(uint16_t));
  amx_scores(qb, Dp, kt, ldk, s);
  float inv[kAmxBlock];
  for (int64_t r = 0; r < rows; ++r) inv[r] = softmax_raw_row(s + r * ldk, Sk, scale, bias, pb + r * ldk);
  amx_context(pb, ldk, vp, D, cb);
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* o = out + ((b * Sq + i0 + r) * H + h) * D;
    const __m512 iv = _mm512_set1_ps(inv[r]);
    for (int64_t d = 0; d < D; d += kLanes) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(cb + r * D + d), iv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), (__m256i)y);
    }
  }
}

}  // namespace

at::Tensor serving_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& key_bias, double scale_in) {
  TORCH_CHECK(avx512bf16(), "structprune: cpp_serving_attention in bfloat16 needs a CPU with AVX512-BF16 (use "
              "torch.nn.functional.scaled_dot_product_attention elsewhere, or float32 inputs)");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  at::Tensor out = at::empty({B, Sq, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto operand = [](const at::Tensor& t) {
    return Operand{reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()), t.stride(0), t.stride(1),
                   t.stride(2)};
  };
  const Operand qo = operand(q), ko = operand(k), vo = operand(v);
  const float* bias_p = key_bias.defined() ? key_bias.data_ptr<float>() : nullptr;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float scale = static_cast<float>(scale_in);
  const bool amx = use_amx();
  // AMX: head_dim padded to 32 (a tile's depth), keys to 32, key panels of 16, blocks of 32 query rows
  const int64_t Dp = amx ? (D + 31) / 32 * 32 : D, kround = amx ? 32 : kLanes;
  const int64_t ldk = (Sk + kround - 1) / kround * kround, panel_width = amx ? kLanes : kPanel;
  const int64_t block = amx ? kAmxBlock : kBlock;
  const int64_t vsize = ldk / 2 * 2 * D;
  const int64_t nblocks = (Sq + block - 1) / block;
  at::parallel_for(0, B * H * nblocks, 1, [&](int64_t u0, int64_t u1) {
    // one fp32 buffer, each part 64-byte aligned: key bias, scores and context (fp32), then k^T pairs, value
    // pairs, probabilities and queries (bf16; every size a multiple of 32 bf16)
    const int64_t cb_size = amx ? block * D : 0, qb_size = amx ? block * Dp : 0;
    const int64_t bf16_size = Dp * ldk + vsize + block * ldk + qb_size;
    std::vector<float> buffer(ldk + block * ldk + cb_size + bf16_size / 2 + kLanes, 0.0f);
    float* bias = buffer.data() + (-reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float) & (kLanes - 1));
    float* s = bias + ldk;
    float* cb = s + block * ldk;
    uint16_t* kt = reinterpret_cast<uint16_t*>(cb + cb_size);
    uint16_t* vp = kt + Dp * ldk;
    uint16_t* pb = vp + vsize;
    uint16_t* qb = pb + block * ldk;
    std::fill(bias, bias + ldk, -std::numeric_limits<float>::infinity());
    if (amx) amx_configure();
    int64_t cur_b = -1, cur_h = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t blk = u % nblocks, bh = u / nblocks, h = bh % H, b = bh / H;
      if (b != cur_b) {
        for (int64_t j = 0; j < Sk; ++j) bias[j] = bias_p ? bias_p[b * Sk + j] : 0.0f;
      }
      if (b != cur_b || h != cur_h) {
        pack_head(ko.row(b, h, 0), ko.ss, vo.row(b, h, 0), vo.ss, Sk, D, Dp, panel_width, kt, ldk, vp);
        cur_b = b;
        cur_h = h;
      }
      const int64_t i0 = blk * block, i1 = std::min(Sq, i0 + block);
      if (u + 1 < u1) prefetch_queries(qo, u + 1, nblocks, block, H, Sq, D);
      if (amx) {
        attend_block_amx(qo, b, h, i0, i1, H, Sq, Sk, D, Dp, scale, kt, ldk, vp, bias, qb, s, pb, cb, op);
      } else {
        attend_block(qo, b, h, i0, i1, H, Sq, Sk, D, scale, kt, ldk, vp, bias, s, pb, op);
      }
    }
    if (amx) amx_release();
  });
  return out;
}

}  // namespace structprune
