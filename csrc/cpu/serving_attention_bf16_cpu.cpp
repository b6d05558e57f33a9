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
// at run time; the Python entry returns None without it, so ATen's SDPA runs). The vdpbf16ps path is
// serving_attention_core.h's, shared with the fp32 path, on this file's bf16 traits (Bf16); the AMX path is here.
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

#define SP_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define SP_SERVING_TARGET SP_BF16_TARGET
#include "serving_attention_core.h"

namespace structprune {
namespace {

bool avx512bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

#define SP_BF16_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline))

struct Bf16 {  // serving_attention_core.h's element traits: bf16 bits, vdpbf16ps over pairs
  using T = uint16_t;
  using Vec = __m512i;
  static constexpr int64_t kPair = 2;
  SP_BF16_INLINE static inline __m512i load(const uint16_t* p) { return _mm512_loadu_si512(p); }
  SP_BF16_INLINE static inline __m512i broadcast(const uint16_t* p) {  // the pair p[0], p[1] in every lane
    int32_t x;
    std::memcpy(&x, p, sizeof(x));
    return _mm512_set1_epi32(x);
  }
  SP_BF16_INLINE static inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
  SP_BF16_INLINE static inline void store(uint16_t* p, __m512 x) {  // rounded to nearest even
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
  }
  SP_BF16_INLINE static inline __m512 store_tail(uint16_t* p, __mmask16 m, __m512 x) {  // 16 lanes, 0 past m
    const __m512 y = _mm512_maskz_mov_ps(m, x);
    store(p, y);
    return y;
  }
};

// The values of one head packed as pairs over keys: vp[j2 * 2D + 2 d + e] = v[2 j2 + e][d] (a zero row past an odd
// Sk).
SP_BF16_TARGET void pack_values(const uint16_t* v, int64_t vs, int64_t Sk, int64_t D, uint16_t* vp) {
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
    Bf16::store(pb + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// One AMX work unit: query rows [i0, i1) (at most 32) of head (b, h), copied into qb ([32, Dp], columns past D
// zero); s, pb: [32, ldk] fp32 scores and bf16 probabilities; cb: [32, D] fp32 context.
SP_AMX_TARGET void attend_block_amx(const Operand<uint16_t>& q, int64_t b, int64_t h, int64_t i0, int64_t i1,
                                    int64_t H, int64_t Sq, int64_t Sk, int64_t D, int64_t Dp, float scale,
                                    const uint16_t* kt, int64_t ldk, const uint16_t* vp, const float* bias,
                                    uint16_t* qb, float* s, uint16_t* pb, float* cb, uint16_t* out) {
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
      Bf16::store(o + d, _mm512_mul_ps(_mm512_loadu_ps(cb + r * D + d), iv));
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
    return Operand<uint16_t>{reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()), t.stride(0),
                             t.stride(1), t.stride(2)};
  };
  const Operand<uint16_t> qo = operand(q), ko = operand(k), vo = operand(v);
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
    const auto pack = [&](int64_t b, int64_t h) {
      pack_keys<Bf16>(ko.row(b, h, 0), ko.ss, Sk, D, Dp, panel_width, kt, ldk);
      pack_values(vo.row(b, h, 0), vo.ss, Sk, D, vp);
    };
    const auto attend = [&](int64_t b, int64_t h, int64_t i0, int64_t i1) {
      if (amx) {
        attend_block_amx(qo, b, h, i0, i1, H, Sq, Sk, D, Dp, scale, kt, ldk, vp, bias, qb, s, pb, cb, op);
      } else {
        attend_block<Bf16>(qo, b, h, i0, i1, H, Sq, Sk, D, scale, kt, ldk, vp, bias, s, pb, op);
      }
    };
    run_units(u0, u1, nblocks, block, H, Sq, Sk, D, qo, bias_p, bias, pack, attend);
    if (amx) amx_release();
  });
  return out;
}

}  // namespace structprune
