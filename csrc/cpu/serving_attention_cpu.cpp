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
// serving_attention_bf16_cpu.cpp's path (AMX tiles or AVX512-BF16 dot products). Steps 1-3, the packing of k^T and
// the work loop are serving_attention_core.h's, shared with that path; this file holds the fp32 traits (F32), the
// values' packing, the checks and the fp32 driver.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#define SP_SERVING_TARGET __attribute__((target("avx512f")))
#include "serving_attention_core.h"

namespace structprune {

// The bf16 path (serving_attention_bf16_cpu.cpp), called after the checks below with key_bias contiguous or
// undefined.
at::Tensor serving_attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& key_bias, double scale);

namespace {

constexpr int64_t kMaxD = 128;  // 8 vectors per row

bool avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

#define SP_F32 __attribute__((target("avx512f"), always_inline))

struct F32 {  // serving_attention_core.h's element traits: fp32, one FMA per step
  using T = float;
  using Vec = __m512;
  static constexpr int64_t kPair = 1;
  SP_F32 static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  SP_F32 static inline __m512 broadcast(const float* p) { return _mm512_set1_ps(*p); }
  SP_F32 static inline __m512 dot(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
  SP_F32 static inline void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
  SP_F32 static inline __m512 store_tail(float* p, __mmask16 m, __m512 x) {
    _mm512_mask_storeu_ps(p, m, x);
    return x;
  }
};

// The values of one head as contiguous [Sk, D] rows, vp[j * D + d] = v[j][d] (no cache-set conflicts of the
// projection's row stride).
__attribute__((target("avx512f"))) void pack_values(const float* v, int64_t vs, int64_t Sk, int64_t D, float* vp) {
  for (int64_t j = 0; j < Sk; ++j) {
    for (int64_t d = 0; d < D; d += kLanes) _mm512_storeu_ps(vp + j * D + d, _mm512_loadu_ps(v + j * vs + d));
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
    return Operand<float>{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
  };
  const Operand<float> qo = operand(q), ko = operand(k), vo = operand(v);
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
    const auto pack = [&](int64_t b, int64_t h) {
      pack_keys<F32>(ko.row(b, h, 0), ko.ss, Sk, D, D, kPanel, kt, ldk);
      pack_values(vo.row(b, h, 0), vo.ss, Sk, D, vp);
    };
    const auto attend = [&](int64_t b, int64_t h, int64_t i0, int64_t i1) {
      attend_block<F32>(qo, b, h, i0, i1, H, Sq, Sk, D, scale, kt, ldk, vp, bias, s, s, op);
    };
    run_units(u0, u1, nblocks, kBlock, H, Sq, Sk, D, qo, bias_p, bias, pack, attend);
  });
  return out;
}

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_serving_attention", &structprune::serving_attention_cpu);
}
