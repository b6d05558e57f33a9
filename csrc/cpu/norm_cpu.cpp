// Row norms for inference on the CPU, forward only (the Python side calls them when no gradient is needed, else the
// ATen compositions run):
//
// cpp_rms_norm(x [..., E], weight [E], eps): HF's RMSNorm (Llama, Mistral, Qwen2, Qwen3): n = (x in fp32) *
//   rsqrt(mean(x^2) + eps), rounded to x's dtype; out = weight * n in result_type(weight, x). HF composes it of six
//   element-wise ops (to, pow, mean, add, rsqrt, two muls; each a parallel region and a pass over memory); here a
//   row is read once for its statistics and once more, from cache, for the output. The inner loops work on fixed
//   groups of kLanes floats that the compiler turns into vectors, compiled for AVX-512, AVX2 and the baseline and
//   chosen at load time (target_clones).
// cpp_layer_norm(x [..., E] fp32 or bf16, weight [E] fp32, bias [E] fp32, eps): LayerNorm as ATen's with fp32
//   affine parameters (the serving module's): statistics and affine map in fp32, rounded once to x's dtype; AVX-512
//   intrinsics where the CPU has them (ATen's bf16 LayerNorm runs at a fraction of the memory bandwidth).
// cpp_embedding_layer_norm(ids, type_ids?, position_ids, word, types?, positions, weight, bias, eps, bf16_out): the
//   serving module's embedding block (the three table rows summed in HF's order, then that LayerNorm), one pass per
//   token, out in fp32 or bf16.
//
// Rows are split over threads only when each thread gets kMinElementsPerThread elements: a decode step's one row
// runs in the calling thread, with no parallel region.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

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
  STRUCTPRUNE_CLONES void NAME(const T* x, const W* w, O* out, int64_t n, float eps, int64_t begin,  \
                               int64_t end) {                                                       \
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
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, "structprune::", op,
              ": x must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.size(0) == x.size(-1), "structprune::", op, ": ", what,
              " must be a CPU tensor of shape [", x.size(-1), "], got ", w.sizes(), " on ", w.device());
  const auto wt = w.scalar_type();
  TORCH_CHECK(wt == xt || wt == at::kFloat || (xt == at::kFloat && (wt == at::kBFloat16 || wt == at::kHalf)),
              "structprune::", op, ": ", what, " must be in x's dtype (", x.scalar_type(), ") or float32, got ",
              w.scalar_type());
}

// --- LayerNorm (serving: fp32 or bf16 activations, fp32 weight and bias) --------------------------------------------
// Statistics in two passes over the row (mean, then the centred sum of squares: no cancellation), then
// y = (x - mean) * rstd * w + b in fp32, rounded once. The AVX-512 path takes 16 lanes per step (bf16 widened by a
// shift, narrowed with round-to-nearest-even, a masked tail); the portable path is the same arithmetic in scalars.
template <typename T, typename O>
void layer_norm_rows_portable(const T* x, const float* w, const float* b, O* out, int64_t n, float eps,
                              int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * n;
    O* yr = out + r * n;
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += get(xr, i);
    const float mean = s / static_cast<float>(n);
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += (get(xr, i) - mean) * (get(xr, i) - mean);
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) put(yr, i, (get(xr, i) - mean) * rstd * w[i] + b[i]);
  }
}

#define STRUCTPRUNE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

STRUCTPRUNE_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
STRUCTPRUNE_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
STRUCTPRUNE_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
STRUCTPRUNE_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));  // NaN
  _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p), m, _mm512_cvtepi32_epi16(r));
}

template <typename T, typename O>
STRUCTPRUNE_AVX512 void layer_norm_rows_avx512(const T* x, const float* w, const float* b, O* out, int64_t n,
                                               float eps, int64_t begin, int64_t end) {
  const int64_t full = n / 16 * 16;
  const __mmask16 all = 0xFFFF, tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * n;
    O* yr = out + r * n;
    // four accumulators per pass: the adds of a row do not wait on one another (a 384-wide row: 24 vectors)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < full; i += 16) acc[(i >> 4) & 3] = _mm512_add_ps(acc[(i >> 4) & 3], load16(xr + i, all));
    if (tail) acc[0] = _mm512_add_ps(acc[0], load16(xr + full, tail));
    const __m512 mean = _mm512_set1_ps(
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) /
        static_cast<float>(n));
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += 16) {
      const __m512 d = _mm512_sub_ps(load16(xr + i, all), mean);
      acc[(i >> 4) & 3] = _mm512_fmadd_ps(d, d, acc[(i >> 4) & 3]);
    }
    if (tail) {
      const __m512 d = _mm512_maskz_sub_ps(tail, load16(xr + full, tail), mean);
      acc[0] = _mm512_fmadd_ps(d, d, acc[0]);
    }
    const float var = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(var / static_cast<float>(n) + eps));
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = i < full ? all : tail;
      const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(load16(xr + i, m), mean), rstd),
                                       _mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, b + i));
      store16(yr + i, y, m);
    }
  }
}

}  // namespace

at::Tensor layer_norm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 1 && x_in.size(-1) > 0 &&
                  (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "structprune::cpp_layer_norm: x must be a float32 or bfloat16 CPU tensor [..., E] with E > 0, got ",
              x_in.scalar_type(), " ", x_in.sizes(), " on ", x_in.device());
  for (const auto* t : {&w_in, &b_in})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == x_in.size(-1),
                "structprune::cpp_layer_norm: weight and bias must be float32 CPU tensors of shape [", x_in.size(-1),
                "], got ", t->scalar_type(), " ", t->sizes());
  const auto x = x_in.contiguous();
  const auto w = w_in.contiguous(), b = b_in.contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  const float e = static_cast<float>(eps);
  const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat) {
      const float* xp = x.data_ptr<float>();
      float* op = out.data_ptr<float>();
      avx512 ? layer_norm_rows_avx512(xp, wp, bp, op, n, e, begin, end)
             : layer_norm_rows_portable(xp, wp, bp, op, n, e, begin, end);
    } else {
      const auto* xp = x.data_ptr<c10::BFloat16>();
      auto* op = out.data_ptr<c10::BFloat16>();
      avx512 ? layer_norm_rows_avx512(xp, wp, bp, op, n, e, begin, end)
             : layer_norm_rows_portable(xp, wp, bp, op, n, e, begin, end);
    }
  });
  return out;
}

// cpp_embedding_layer_norm: a BERT-layout embedding block for inference, one pass per token:
//   out[t] = LayerNorm((word[ids[t]] + types[type_ids[t]]) + positions[position_ids[t]]) * weight + bias
// (the adds in HF's order, in fp32; no types table: no type term), written as fp32 or rounded once to bf16, instead
// of three index_selects, two [N, E] adds, a LayerNorm and a cast, each a pass over memory.
at::Tensor embedding_layer_norm_cpu(const at::Tensor& ids_in, const c10::optional<at::Tensor>& type_ids_in,
                                    const at::Tensor& position_ids_in, const at::Tensor& word_in,
                                    const c10::optional<at::Tensor>& types_in, const at::Tensor& positions_in,
                                    const at::Tensor& w_in, const at::Tensor& b_in, double eps, bool bf16_out) {
  const bool typed = types_in.has_value() && types_in->defined();
  TORCH_CHECK(typed == (type_ids_in.has_value() && type_ids_in->defined()),
              "structprune::cpp_embedding_layer_norm: type_ids and the types table come together or not at all");
  const int64_t n = word_in.dim() == 2 ? word_in.size(1) : -1;
  std::vector<const at::Tensor*> tables = {&word_in, &positions_in};
  if (typed) tables.push_back(&*types_in);
  for (const auto* t : tables)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == n && n > 0,
                "structprune::cpp_embedding_layer_norm: the tables must be float32 CPU [rows, E] of one E, got ",
                t->scalar_type(), " ", t->sizes());
  for (const auto* t : {&w_in, &b_in})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n,
                "structprune::cpp_embedding_layer_norm: weight and bias must be float32 CPU [", n, "], got ",
                t->scalar_type(), " ", t->sizes());
  const int64_t N = ids_in.numel();
  std::vector<std::pair<const at::Tensor*, const at::Tensor*>> index = {{&ids_in, &word_in},
                                                                         {&position_ids_in, &positions_in}};
  if (typed) index.push_back({&*type_ids_in, &*types_in});
  std::vector<at::Tensor> flat;
  for (const auto& [idx, table] : index) {
    TORCH_CHECK(idx->device().is_cpu() && idx->scalar_type() == at::kLong && idx->numel() == N,
                "structprune::cpp_embedding_layer_norm: ids, position_ids and type_ids must be int64 CPU tensors of "
                "one size, got ", idx->scalar_type(), " ", idx->sizes(), " for ", N, " ids");
    flat.push_back(idx->reshape({N}).contiguous());
    const int64_t* p = flat.back().data_ptr<int64_t>();
    for (int64_t t = 0; t < N; ++t)
      TORCH_CHECK(p[t] >= 0 && p[t] < table->size(0), "structprune::cpp_embedding_layer_norm: index ", p[t],
                  " out of range for a table of ", table->size(0), " rows");
  }
  const auto word = word_in.contiguous(), pos = positions_in.contiguous(), w = w_in.contiguous(),
             b = b_in.contiguous();
  const auto types = typed ? types_in->contiguous() : at::Tensor();
  auto out = at::empty({N, n}, word.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  const int64_t *ip = flat[0].data_ptr<int64_t>(), *pp = flat[1].data_ptr<int64_t>();
  const int64_t* tp = typed ? flat[2].data_ptr<int64_t>() : nullptr;
  const float *wp = word.data_ptr<float>(), *posp = pos.data_ptr<float>(), *typ = typed ? types.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, N, grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t t = begin; t < end; ++t) {
      const float *wr = wp + ip[t] * n, *pr = posp + pp[t] * n, *tr = typed ? typ + tp[t] * n : nullptr;
      for (int64_t i = 0; i < n; ++i) row[i] = (tr ? wr[i] + tr[i] : wr[i]) + pr[i];
      const float *lw = w.data_ptr<float>(), *lb = b.data_ptr<float>();
      if (bf16_out) {
        auto* o = out.data_ptr<c10::BFloat16>() + t * n;
        avx512 ? layer_norm_rows_avx512(row.data(), lw, lb, o, n, e, 0, 1)
               : layer_norm_rows_portable(row.data(), lw, lb, o, n, e, 0, 1);
      } else {
        float* o = out.data_ptr<float>() + t * n;
        avx512 ? layer_norm_rows_avx512(row.data(), lw, lb, o, n, e, 0, 1)
               : layer_norm_rows_portable(row.data(), lw, lb, o, n, e, 0, 1);
      }
    }
  });
  return out;
}

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
      rms_f32(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), n, e, begin, end);
    } else if (xt == at::kBFloat16 && wt == at::kFloat) {
      rms_bf16_wf32(x.data_ptr<c10::BFloat16>(), w.data_ptr<float>(), out.data_ptr<float>(), n, e, begin,
                    end);
    } else if (xt == at::kBFloat16) {
      rms_bf16(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), n, e,
               begin, end);
    } else if (xt == at::kHalf && wt == at::kFloat) {
      rms_f16_wf32(x.data_ptr<c10::Half>(), w.data_ptr<float>(), out.data_ptr<float>(), n, e, begin, end);
    } else if (xt == at::kHalf) {
      rms_f16(x.data_ptr<c10::Half>(), w.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), n, e, begin, end);
    } else if (wt == at::kBFloat16) {
      rms_f32_wbf16(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), out.data_ptr<float>(), n, e, begin,
                    end);
    } else {
      rms_f32_wf16(x.data_ptr<float>(), w.data_ptr<c10::Half>(), out.data_ptr<float>(), n, e, begin, end);
    }
  });
  return out;
}

}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_rms_norm", &structprune::rms_norm_cpu);
  m.impl("cpp_layer_norm", &structprune::layer_norm_cpu);
  m.impl("cpp_embedding_layer_norm", &structprune::embedding_layer_norm_cpu);
}
