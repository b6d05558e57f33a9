// HF's RMSNorm (Llama, Mistral, Qwen2, Qwen3) for inference on the CPU, forward only (the Python side calls it when no
// gradient is needed, else the ATen composition runs):
//
// cpp_rms_norm(x [..., E], weight [E], eps) -> n = (x in fp32) * rsqrt(mean(x^2) + eps), rounded to x's dtype;
//   out = weight * n in result_type(weight, x).
//
// HF composes it of six element-wise ops (to, pow, mean, add, rsqrt, two muls; each a parallel region and a pass
// over memory). Here a row is read once for its statistics and once more, from cache, for the output; the inner
// loops work on fixed groups of kLanes floats that the compiler turns into vectors, compiled for AVX-512, AVX2 and
// the baseline and chosen at load time (target_clones). Rows are split over threads only when each thread gets kMinElementsPerThread elements: a decode
// step's one row runs in the calling thread, with no parallel region.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace structprune {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMinElementsPerThread = int64_t{1} << 16;

// float -> bf16 bits, rounded to nearest even as c10::BFloat16 does (NaN -> quiet NaN), without branches.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
}

inline float bf16_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Element access in fp32 for the three storage types (bf16 through its bits so that the loops vectorise).
inline float get(const float* p, int64_t i) { return p[i]; }
inline float get(const c10::BFloat16* p, int64_t i) { return bf16_float(p[i].x); }
inline float get(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline void put(float* p, int64_t i, float v) { p[i] = v; }
inline void put(c10::BFloat16* p, int64_t i, float v) { p[i].x = bf16_bits(v); }
inline void put(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
// v rounded to T and back (the identity for float)
inline float round_to(const float*, float v) { return v; }
inline float round_to(const c10::BFloat16*, float v) { return bf16_float(bf16_bits(v)); }
inline float round_to(const c10::Half*, float v) { return static_cast<float>(c10::Half(v)); }

template <typename T>
inline float sum_sq(const T* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const float d = get(x, i + l);
      acc[l] += d * d;
    }
  float s = 0.f;
  for (; i < n; ++i) s += get(x, i) * get(x, i);
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T, typename W, typename O>
inline void rms_row(const T* x, const W* w, O* out, int64_t n, float eps) {
  const float rstd = 1.f / std::sqrt(sum_sq(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) put(out, i, get(w, i) * round_to(x, get(x, i) * rstd));
}

// One entry per dtype combination, each compiled for AVX-512, AVX2 and the baseline (the row helpers, inlined, are
// vectorised for the clone's target).
#define STRUCTPRUNE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define STRUCTPRUNE_RMS(T, W, O, NAME)                                                              \
  STRUCTPRUNE_CLONES void NAME(const T* x, const W* w, O* out, int64_t rows, int64_t n, float eps,  \
                               int64_t begin, int64_t end) {                                        \
    (void)rows;                                                                                     \
    for (int64_t r = begin; r < end; ++r) rms_row(x + r * n, w, out + r * n, n, eps);               \
  }
STRUCTPRUNE_RMS(float, float, float, rms_f32)
STRUCTPRUNE_RMS(c10::BFloat16, float, float, rms_bf16_wf32)
STRUCTPRUNE_RMS(c10::BFloat16, c10::BFloat16, c10::BFloat16, rms_bf16)
STRUCTPRUNE_RMS(c10::Half, float, float, rms_f16_wf32)
STRUCTPRUNE_RMS(c10::Half, c10::Half, c10::Half, rms_f16)
STRUCTPRUNE_RMS(float, c10::BFloat16, float, rms_f32_wbf16)
STRUCTPRUNE_RMS(float, c10::Half, float, rms_f32_wf16)
#undef STRUCTPRUNE_RMS

#undef STRUCTPRUNE_CLONES

int64_t grain(int64_t n) { return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(n, 1)); }

void check_row_input(const at::Tensor& x, const at::Tensor& w, const char* op, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "structprune::", op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "structprune::", op, ": x must be [..., E] with E > 0, got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kDouble, "structprune::", op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.size(0) == x.size(-1), "structprune::", op, ": ", what,
              " must be a CPU tensor of shape [", x.size(-1), "], got ", w.sizes(), " on ", w.device());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat ||
                  (x.scalar_type() == at::kFloat && w.scalar_type() != at::kDouble),
              "structprune::", op, ": ", what, " must be in x's dtype (", x.scalar_type(), ") or float32, got ",
              w.scalar_type());
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  check_row_input(x_in, w_in, "cpp_rms_norm", "weight");
  const auto x = x_in.contiguous();
  const auto w = w_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const auto out_type = at::result_type(w, x);
  auto out = at::empty(x.sizes(), x.options().dtype(out_type));
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    if (xt == at::kFloat && wt == at::kFloat) {
      rms_f32(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), rows, n, e, begin, end);
    } else if (xt == at::kBFloat16 && wt == at::kFloat) {
      rms_bf16_wf32(x.data_ptr<c10::BFloat16>(), w.data_ptr<float>(), out.data_ptr<float>(), rows, n, e, begin,
                    end);
    } else if (xt == at::kBFloat16) {
      rms_bf16(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, n, e,
               begin, end);
    } else if (xt == at::kHalf && wt == at::kFloat) {
      rms_f16_wf32(x.data_ptr<c10::Half>(), w.data_ptr<float>(), out.data_ptr<float>(), rows, n, e, begin, end);
    } else if (xt == at::kHalf) {
      rms_f16(x.data_ptr<c10::Half>(), w.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, n, e, begin, end);
    } else if (wt == at::kBFloat16) {
      rms_f32_wbf16(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), out.data_ptr<float>(), rows, n, e, begin,
                    end);
    } else {
      rms_f32_wf16(x.data_ptr<float>(), w.data_ptr<c10::Half>(), out.data_ptr<float>(), rows, n, e, begin, end);
    }
  });
  return out;
}

}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_rms_norm", &structprune::rms_norm_cpu);
}
