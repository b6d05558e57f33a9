// Exact softmax attention for CPU inference in fp32 with a small head_dim (the serving module's encoder layers,
// structprune/serving/encoder.py): ATen's flash kernel runs tiny BLAS GEMMs per 32-wide head and reaches about a
// third of the core's FMA peak there; this kernel is tiled like a GEMM instead.
//
//   out[b, s, h, :] = softmax_k(q[b, h, s] . k[b, h, k] * scale + key_bias[b, k]) @ v[b, h, k]
//
// q: [B, H, Sq, D], k and v: [B, H, Sk, D], fp32 of any strides whose last dimension is contiguous (views of the
// fused projection's [B, S, 3, H, D] output); key_bias: [B, Sk] fp32 additive (0 = attend, finfo.min = padding) or
// absent. out: [B, Sq, H, D] fp32 contiguous (the layout the output projection reads as [B * Sq, H * D]).
//
// Algorithm (AVX-512F, D a multiple of 16 up to 128): work units (b, h, block of kBlock queries) run in parallel
// (at::parallel_for). A thread packs its current (b, h) when it changes: k^T in panels of 64 keys ([D, 64] each, the
// last one 16/32/48 wide; columns past Sk zero; 16 keys per gather), the values as contiguous [Sk, D] rows (the
// projection's row stride would put them in a few cache sets), and the key bias of its batch row (-inf past Sk).
// Its buffers are 64-byte aligned (a zmm load across two cache lines costs two) and allocated once per parallel
// chunk; the next unit's query rows are prefetched. Per block:
//   1. scores: tiles of kScoreRows query rows x 64 keys, kScoreRows x 4 zmm accumulators over d (broadcast q[i][d],
//      FMA with the 4 vectors of the panel's row d), stored as acc * scale + bias into the block's [kBlock, Sk16]
//      buffer, the row max kept on the way;
//   2. softmax numerators, exactly (the full row, not online): p = exp(x - max) = 2^(x log2 e - max log2 e) with a
//      16-lane polynomial (~1e-38 for a padded key) and the row sum;
//   3. context: tiles of up to 12 rows x up to 4 output vectors accumulate p[i][j] * v[j] over the keys (broadcast
//      p, FMA with the value row's vectors), scaled by 1 / sum on the store.
// A row whose keys are all padded gets equal scores (finfo.min + a small score rounds to finfo.min), so uniform
// weights, as ATen's SDPA with the same additive mask. No BLAS or ATen op runs inside the parallel region. Other CPUs
// and head dims are refused (the Python entry, structprune/backends/cpp/serving_attention.py, calls the op only where
// it applies). No autograd. bf16 q, k, v (same rules, key_bias fp32, output bf16) pass the same checks and run
// serving_attention_bf16_cpu.cpp's path (AMX tiles or AVX512-BF16 dot products).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "serving_attention_exp.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace structprune {

// The bf16 path (serving_attention_bf16_cpu.cpp), called after the checks below with key_bias contiguous or
// undefined.
at::Tensor serving_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& key_bias, double scale);

namespace {

constexpr int64_t kLanes = 16;     // floats per zmm
constexpr int64_t kMaxD = 128;     // 8 vectors per row
constexpr int kScoreRows = 6;      // query rows per score tile (6 x 4 accumulators)
constexpr int kScoreVectors = 4;   // 64 keys per score tile
constexpr int64_t kPanel = kScoreVectors * 16;  // keys per panel of the packed k^T
constexpr int64_t kBlock = 24;     // query rows per work unit: a multiple of 6, 8 and 12

bool avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

struct Operand {  // a [B, H, S, D] fp32 tensor with a contiguous last dimension
  const float* p;
  int64_t sb, sh, ss;
  const float* row(int64_t b, int64_t h, int64_t s) const { return p + b * sb + h * sh + s * ss; }
};

// Scores of R query rows (q[r] + d) against NV * 16 keys of the packed k^T (row d at kt + d * ldk), stored as
// acc * scale + bias into s + r * lds; mx + 16 r: the lanes of row r's running max.
template <int R, int NV>
__attribute__((target("avx512f"))) void score_tile(const float* const* q, const float* kt, int64_t ldk, int64_t D,
                                                   float scale, const float* bias, float* s, int64_t lds,
                                                   float* mx) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_ps(kt + d * ldk + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r][d]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
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

// Context of R rows of probabilities (p + r * ldp, n keys) over NV output vectors starting at column c0 of the
// value rows (v + j * vs): out[r] + c0 = (sum_j p[r][j] v[j]) * inv[r].
template <int R, int NV>
__attribute__((target("avx512f"))) void context_tile(const float* p, int64_t ldp, int64_t n, const float* v,
                                                     int64_t vs, int64_t c0, float* const* out, const float* inv) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * vs + c0 + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 iv = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out[r] + c0 + c * kLanes, _mm512_mul_ps(acc[r][c], iv));
  }
}

// The tiles for `rows` rows (1 .. kScoreRows), chosen at compile time.
template <int NV, int R = 1>
void score_rows(int rows, const float* const* q, const float* kt, int64_t ldk, int64_t D, float scale,
                const float* bias, float* s, int64_t lds, float* mx) {
  if constexpr (R < kScoreRows) {
    if (rows > R) return score_rows<NV, R + 1>(rows, q, kt, ldk, D, scale, bias, s, lds, mx);
  }
  score_tile<R, NV>(q, kt, ldk, D, scale, bias, s, lds, mx);
}

// Context tiles: at most 24 accumulators, so up to 12 rows for 1-2 output vectors, 8 for 3, 6 for 4.
constexpr int context_tile_rows(int64_t nv) { return nv <= 2 ? 12 : (nv == 3 ? 8 : 6); }

template <int NV, int R = 1>
void context_rows(int rows, const float* p, int64_t ldp, int64_t n, const float* v, int64_t vs, int64_t c0,
                  float* const* out, const float* inv) {
  if constexpr (R < context_tile_rows(NV)) {
    if (rows > R) return context_rows<NV, R + 1>(rows, p, ldp, n, v, vs, c0, out, inv);
  }
  context_tile<R, NV>(p, ldp, n, v, vs, c0, out, inv);
}

// Softmax numerators of one row of n scores in place (x -> exp(x - max)), given the lanes of its max (lanes past
// n hold -inf scores); returns 1 / their sum.
__attribute__((target("avx512f"))) float softmax_row(float* x, int64_t n, const float* max_lanes) {
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
    _mm512_storeu_ps(x + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = exp_shifted16(_mm512_mask_loadu_ps(lowest, tail, x + nv), mx);
    _mm512_mask_storeu_ps(x + nv, tail, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// Packs the keys and values of one head: k^T in panels of kPanel keys, kt[p * D + d * width + j - p] = k[j][d] for
// the panel p = j - j % kPanel of width min(kPanel, ldk - p) (16 keys per gather; the columns past Sk keep their
// zeros) and vp[j * D + d] = v[j][d] (contiguous rows: no cache-set conflicts of the projection's row stride).
__attribute__((target("avx512f"))) void pack_head(const float* k, int64_t ks, const float* v, int64_t vs, int64_t Sk,
                                                  int64_t D, float* kt, int64_t ldk, float* vp) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int32_t>(ks)));
  for (int64_t j = 0; j < Sk; j += kLanes) {
    const __mmask16 m = Sk - j >= kLanes ? static_cast<__mmask16>(0xFFFF)
                                         : static_cast<__mmask16>((1u << (Sk - j)) - 1u);
    const float* kj = k + j * ks;
    const int64_t panel = j - j % kPanel, width = std::min(kPanel, ldk - panel);
    for (int64_t d = 0; d < D; ++d) {
      _mm512_storeu_ps(kt + panel * D + d * width + (j - panel),
                       _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, kj + d, 4));
    }
  }
  for (int64_t j = 0; j < Sk; ++j) {
    for (int64_t d = 0; d < D; d += kLanes) _mm512_storeu_ps(vp + j * D + d, _mm512_loadu_ps(v + j * vs + d));
  }
}

// One work unit: query rows [i0, i1) of head (b, h); kt, vp, bias: the packed keys, values and bias of (b, h);
// s: the [kBlock, ldk] scores buffer (ldk: Sk rounded up to 16).
void attend_block(const Operand& q, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t H, int64_t Sq,
                  int64_t Sk, int64_t D, float scale, const float* kt, int64_t ldk, const float* vp,
                  const float* bias, float* s, float* out) {
  const int64_t rows = i1 - i0;
  const float* qrow[kBlock];
  float* orow[kBlock];
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
      const float* panel = kt + j * D;  // [D, nv * 16]
      float* st = s + r * ldk + j;
      float* m = mx + r * kLanes;
      switch (nv) {
        case 1: score_rows<1>(n, qrow + r, panel, 1 * kLanes, D, scale, bias + j, st, ldk, m); break;
        case 2: score_rows<2>(n, qrow + r, panel, 2 * kLanes, D, scale, bias + j, st, ldk, m); break;
        case 3: score_rows<3>(n, qrow + r, panel, 3 * kLanes, D, scale, bias + j, st, ldk, m); break;
        default: score_rows<4>(n, qrow + r, panel, 4 * kLanes, D, scale, bias + j, st, ldk, m); break;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) inv[r] = softmax_row(s + r * ldk, Sk, mx + r * kLanes);
  for (int64_t c = 0; c < D / kLanes; c += kScoreVectors) {
    const int64_t nv = std::min<int64_t>(kScoreVectors, D / kLanes - c);
    const int tile = context_tile_rows(nv);
    for (int64_t r = 0; r < rows; r += tile) {
      const int n = static_cast<int>(std::min<int64_t>(tile, rows - r));
      const float* p = s + r * ldk;
      switch (nv) {
        case 1: context_rows<1>(n, p, ldk, Sk, vp, D, c * kLanes, orow + r, inv + r); break;
        case 2: context_rows<2>(n, p, ldk, Sk, vp, D, c * kLanes, orow + r, inv + r); break;
        case 3: context_rows<3>(n, p, ldk, Sk, vp, D, c * kLanes, orow + r, inv + r); break;
        default: context_rows<4>(n, p, ldk, Sk, vp, D, c * kLanes, orow + r, inv + r); break;
      }
    }
  }
}

// Software prefetch of the query rows of unit u into L1 while the unit before it runs (the projection's row stride,
// 3 * H * D floats, is beyond the hardware prefetchers' reach).
void prefetch_queries(const Operand& q, int64_t u, int64_t nblocks, int64_t H, int64_t Sq, int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(float);
  const int64_t blk = u % nblocks, bh = u / nblocks;
  for (int64_t i = blk * kBlock; i < std::min(Sq, (blk + 1) * kBlock); ++i) {
    const float* row = q.row(bh / H, bh % H, i);
    for (int64_t d = 0; d < D; d += kLine) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
  }
}

void check_operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "structprune: cpp_serving_attention takes CPU tensors; ", name, " is on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "structprune: "
              "cpp_serving_attention takes float32 or bfloat16 q, k, v (fp16 runs ATen's SDPA); ", name, " is ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 4, "structprune: cpp_serving_attention expects ", name, " as [batch, heads, seq, head_dim], "
              "got ", t.dim(), " dims");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "structprune: cpp_serving_attention needs a contiguous last "
              "dimension (head_dim) in ", name, ", got strides ", t.strides());
}

at::Tensor serving_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_bias_in, double scale_in) {
  check_operand(q, "q");
  check_operand(k, "k");
  check_operand(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "structprune: "
              "cpp_serving_attention takes q, k, v of one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "structprune: cpp_serving_attention expects k and v as [", B, ", ", H, ", Sk, ", D,
              "] like q [batch, heads, Sq, head_dim]; got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(D % kLanes == 0 && D > 0 && D <= kMaxD, "structprune: cpp_serving_attention needs head_dim a multiple "
              "of 16 up to 128, got ", D);
  TORCH_CHECK(avx512f(), "structprune: cpp_serving_attention needs a CPU with AVX-512F (use "
              "torch.nn.functional.scaled_dot_product_attention elsewhere)");
  TORCH_CHECK(Sk > 0 || Sq == 0, "structprune: cpp_serving_attention needs at least one key, got k ", k.sizes());
  TORCH_CHECK(k.stride(2) >= 0 && k.stride(2) <= std::numeric_limits<int32_t>::max() / kLanes,
              "structprune: cpp_serving_attention needs k's row stride (dim 2) in [0, 2^31 / 16), got ", k.stride(2));
  at::Tensor key_bias;
  if (key_bias_in.has_value()) {
    key_bias = key_bias_in->contiguous();
    TORCH_CHECK(key_bias.device().is_cpu() && key_bias.scalar_type() == at::kFloat && key_bias.dim() == 2 &&
                    key_bias.size(0) == B && key_bias.size(1) == Sk,
                "structprune: cpp_serving_attention expects key_bias as a float32 CPU tensor [", B, ", ", Sk,
                "] (batch, keys), got ", key_bias.scalar_type(), " ", key_bias.sizes());
  }
  if (q.scalar_type() == at::kBFloat16) return serving_attention_bf16(q, k, v, key_bias, scale_in);
  at::Tensor out = at::empty({B, Sq, H, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto operand = [](const at::Tensor& t) {
    return Operand{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
  };
  const Operand qo = operand(q), ko = operand(k), vo = operand(v);
  const float* bias_p = key_bias.defined() ? key_bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float scale = static_cast<float>(scale_in);
  const int64_t ldk = (Sk + kLanes - 1) / kLanes * kLanes;
  const int64_t nblocks = (Sq + kBlock - 1) / kBlock;
  at::parallel_for(0, B * H * nblocks, 1, [&](int64_t u0, int64_t u1) {
    // one buffer, each part 64-byte aligned (a zmm load across two cache lines costs two): k^T panels, values,
    // key bias, scores
    std::vector<float> buffer(D * ldk + Sk * D + ldk + kBlock * ldk + 4 * kLanes, 0.0f);
    float* kt = buffer.data() + (-reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float) & (kLanes - 1));
    float* vp = kt + D * ldk;
    float* bias = vp + (Sk * D + kLanes - 1) / kLanes * kLanes;
    float* s = bias + ldk;
    std::fill(bias, bias + ldk, -std::numeric_limits<float>::infinity());
    int64_t cur_b = -1, cur_h = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t blk = u % nblocks, bh = u / nblocks, h = bh % H, b = bh / H;
      if (b != cur_b) {
        for (int64_t j = 0; j < Sk; ++j) bias[j] = bias_p ? bias_p[b * Sk + j] : 0.0f;
      }
      if (b != cur_b || h != cur_h) {
        pack_head(ko.row(b, h, 0), ko.ss, vo.row(b, h, 0), vo.ss, Sk, D, kt, ldk, vp);
        cur_b = b;
        cur_h = h;
      }
      const int64_t i0 = blk * kBlock;
      if (u + 1 < u1) prefetch_queries(qo, u + 1, nblocks, H, Sq, D);
      attend_block(qo, b, h, i0, std::min(Sq, i0 + kBlock), H, Sq, Sk, D, scale, kt, ldk, vp, bias, s, op);
    }
  });
  return out;
}

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_serving_attention", &structprune::serving_attention_cpu);
}
