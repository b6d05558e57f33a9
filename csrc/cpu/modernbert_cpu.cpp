// ModernBERT's attention kernels on the CPU, for inference: rotary positions on q and k (rotary_qk_cpu, at the end)
// and sliding-window (banded) softmax attention: each query visits only the keys of its band
// |q - k| <= window, so a local layer costs O(S * window) instead of O(S^2).
//
//   out[b, s, a, :] = softmax_k(q[b, a, s] . k[b, a, k] * scale + key_bias[b, k], k in band(s)) @ v[b, a, k]
//
// q, k, v: [B, A, S, D] of any strides whose last dimension is contiguous (e.g. views of the fused projection's
// [B, S, 3, A, D] output); key_bias: [B, S] fp32 additive (0 = attend, finfo.min = padding) or absent. Work units
// (b, a, block of `block` queries) run in parallel (at::parallel_for); each query computes the scores of the keys of
// its own band only (2 * window + 1 of them away from the ends), their softmax and the context, in fp32. On a CPU
// with AVX2 + FMA and head_dim a multiple of 8 (up to 128): intrinsics (the q row in registers, four keys per step,
// an 8-wide polynomial exp, the context accumulated in registers); otherwise plain loops. No BLAS or ATen op runs
// inside the parallel region (measured: ATen's small GEMMs there, nested in the 2-thread region, cost milliseconds
// each on a loaded machine). fp32, bf16 or fp16 in; out in the dtype of q, [B, S, A, D] contiguous (the layout the
// output projection reads). No autograd: the Python entry (structprune/backends/cpp/modernbert.py) calls it only
// when no gradient is needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "attention_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace structprune {
namespace {

struct Operand {  // a [B, A, S, D] fp32 tensor with a contiguous last dimension
  const float* p;
  int64_t sb, sa, ss;
  const float* row(int64_t b, int64_t a, int64_t s) const { return p + b * sb + a * sa + s * ss; }
};

using rows::exp_nonpositive;
using rows::kLanes;  // the fixed-width inner loops below become one AVX2 vector (two SSE ones)

__attribute__((always_inline)) inline float lane_sum(const float* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// The scores of keys k[first .. first + n) for the query row qr: row[j] = <qr, k_j> * scale + bias[j]. Two keys at a
// time share each load of q; lanes accumulate apart (no reassociation, so the compiler vectorizes them).
__attribute__((always_inline)) inline void scores(const float* qr, const Operand& k, int64_t b, int64_t a,
                                                  int64_t first, int64_t n, int64_t D, float scale,
                                                  const float* bias, float* row) {
  const int64_t Dv = D - D % kLanes;
  int64_t j = 0;
  for (; j + 1 < n; j += 2) {
    const float* k0 = k.row(b, a, first + j);
    const float* k1 = k.row(b, a, first + j + 1);
    float a0[kLanes] = {}, a1[kLanes] = {};
    for (int64_t d = 0; d < Dv; d += kLanes) {
      for (int64_t t = 0; t < kLanes; ++t) {
        a0[t] += qr[d + t] * k0[d + t];
        a1[t] += qr[d + t] * k1[d + t];
      }
    }
    float s0 = lane_sum(a0), s1 = lane_sum(a1);
    for (int64_t d = Dv; d < D; ++d) {
      s0 += qr[d] * k0[d];
      s1 += qr[d] * k1[d];
    }
    row[j] = s0 * scale + (bias ? bias[j] : 0.0f);
    row[j + 1] = s1 * scale + (bias ? bias[j + 1] : 0.0f);
  }
  for (; j < n; ++j) {
    const float* k0 = k.row(b, a, first + j);
    float s0 = 0.0f;
    for (int64_t d = 0; d < D; ++d) s0 += qr[d] * k0[d];
    row[j] = s0 * scale + (bias ? bias[j] : 0.0f);
  }
}

// row[0 .. n) <- exp(row - max), returns their sum.
__attribute__((always_inline)) inline float softmax_numerators(float* row, int64_t n) {
  float mx[kLanes];
  for (int64_t t = 0; t < kLanes; ++t) mx[t] = row[0];
  const int64_t nv = n - n % kLanes;
  for (int64_t j = 0; j < nv; j += kLanes) {
    for (int64_t t = 0; t < kLanes; ++t) mx[t] = mx[t] > row[j + t] ? mx[t] : row[j + t];
  }
  float m = mx[0];
  for (int64_t t = 1; t < kLanes; ++t) m = std::max(m, mx[t]);
  for (int64_t j = nv; j < n; ++j) m = std::max(m, row[j]);
  for (int64_t j = 0; j < n; ++j) row[j] = exp_nonpositive(row[j] - m);
  float sum[kLanes] = {};
  for (int64_t j = 0; j < nv; j += kLanes) {
    for (int64_t t = 0; t < kLanes; ++t) sum[t] += row[j + t];
  }
  float l = lane_sum(sum);
  for (int64_t j = nv; j < n; ++j) l += row[j];
  return l;
}

// out[0 .. D) = sum_j p[j] * v_j / l, eight output lanes at a time held in registers across the keys.
__attribute__((always_inline)) inline void context(const float* p, const Operand& v, int64_t b, int64_t a,
                                                   int64_t first, int64_t n, int64_t D, float inv_l, float* out) {
  const int64_t Dv = D - D % kLanes;
  for (int64_t d = 0; d < Dv; d += kLanes) {
    float acc[kLanes] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j];
      const float* vr = v.row(b, a, first + j) + d;
      for (int64_t t = 0; t < kLanes; ++t) acc[t] += pj * vr[t];
    }
    for (int64_t t = 0; t < kLanes; ++t) out[d + t] = acc[t] * inv_l;
  }
  for (int64_t d = Dv; d < D; ++d) {
    float acc = 0.0f;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * v.row(b, a, first + j)[d];
    out[d] = acc * inv_l;
  }
}

// One work unit: queries [q0, q1) of head a of sequence b; each visits exactly the keys of its band.
__attribute__((always_inline)) inline void banded_unit(const Operand& q, const Operand& k, const Operand& v,
                                                       const float* kb, float* out, int64_t b, int64_t a, int64_t q0,
                                                       int64_t q1, int64_t S, int64_t A, int64_t D, int64_t window,
                                                       float scale, float* row) {
  for (int64_t pos = q0; pos < q1; ++pos) {
    const int64_t first = std::max<int64_t>(0, pos - window), n = std::min(S, pos + window + 1) - first;
    scores(q.row(b, a, pos), k, b, a, first, n, D, scale, kb ? kb + b * S + first : nullptr, row);
    const float l = softmax_numerators(row, n);
    context(row, v, b, a, first, n, D, 1.0f / l, out + ((b * S + pos) * A + a) * D);
  }
}

// The same unit with the AVX2 + FMA row primitives of attention_rows.h (D a multiple of 8, up to 128).
__attribute__((target("avx2,fma"))) void banded_unit_avx2(const Operand& q, const Operand& k, const Operand& v,
                                                          const float* kb, float* out, int64_t b, int64_t a,
                                                          int64_t q0, int64_t q1, int64_t S, int64_t A, int64_t D,
                                                          int64_t window, float scale, float* row) {
  const int64_t V = D / kLanes;
  __m256 qv[rows::kMaxVectors];
  for (int64_t pos = q0; pos < q1; ++pos) {
    const int64_t first = std::max<int64_t>(0, pos - window), n = std::min(S, pos + window + 1) - first;
    rows::load_query(q.row(b, a, pos), V, scale, qv);
    rows::scores(qv, V, k.row(b, a, first), k.ss, n, row);
    if (kb) {
      const float* bias = kb + b * S + first;
      for (int64_t j = 0; j < n; ++j) row[j] += bias[j];
    }
    const float l = rows::softmax_numerators(row, n);
    rows::context(row, v.row(b, a, first), v.ss, n, V, 1.0f / l, out + ((b * S + pos) * A + a) * D);
  }
}

at::Tensor banded_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const std::optional<at::Tensor>& key_bias, int64_t window, double scale,
                                int64_t block) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "structprune: banded attention takes q, k, v of one shape [B, A, S, D], got ", q_in.sizes(), ", ",
              k_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "structprune: q, k and v of banded attention must share a dtype");
  TORCH_CHECK(window >= 0 && block >= 1, "structprune: banded attention needs window >= 0 and block >= 1, got ",
              window, " and ", block);
  const int64_t B = q_in.size(0), A = q_in.size(1), S = q_in.size(2), D = q_in.size(3);
  const auto as_float = [](const at::Tensor& t) {
    auto f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
    return f.stride(3) == 1 ? f : f.contiguous();
  };
  const at::Tensor q = as_float(q_in), k = as_float(k_in), v = as_float(v_in);
  at::Tensor kb;
  if (key_bias.has_value()) {
    TORCH_CHECK(key_bias->dim() == 2 && key_bias->size(0) == B && key_bias->size(1) == S,
                "structprune: key_bias must be [B, S] = [", B, ", ", S, "], got ", key_bias->sizes());
    kb = key_bias->to(at::kFloat).contiguous();
  }
  auto out = at::empty({B, S, A, D}, q.options());
  if (out.numel() == 0) return out.to(q_in.scalar_type());
  const auto operand = [](const at::Tensor& t) {
    return Operand{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
  };
  const Operand qo = operand(q), ko = operand(k), vo = operand(v);
  const float* kbp = kb.defined() ? kb.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const int64_t nblocks = (S + block - 1) / block;
  const bool avx2 = rows::attention_rows_avx2(D);
  at::parallel_for(0, B * A * nblocks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> row(static_cast<size_t>(2 * window + 1));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t blk = u % nblocks, a = (u / nblocks) % A, b = u / (nblocks * A);
      const int64_t q0 = blk * block, q1 = std::min(S, q0 + block);
      if (avx2) {
        banded_unit_avx2(qo, ko, vo, kbp, outp, b, a, q0, q1, S, A, D, window, static_cast<float>(scale), row.data());
      } else {
        banded_unit(qo, ko, vo, kbp, outp, b, a, q0, q1, S, A, D, window, static_cast<float>(scale), row.data());
      }
    }
  });
  return out.scalar_type() == q_in.scalar_type() ? out : out.to(q_in.scalar_type());
}

// Rotary positions on the q and k blocks of the fused projection, for inference: qkv [B, S, P >= 2, A, D]
// (contiguous), cos / sin [1 or B, S, D] -> [B, S, 2, A, D] in qkv's dtype, each head's halves rotated together
// (r1 = t1 c1 - t2 s1, r2 = t2 c2 + t1 s2) in fp32 and rounded once, as structprune.ops.reference.apply_rotary.
template <typename T>
void rotary_rows(const T* in, T* out, const float* c, const float* s, int64_t A, int64_t D, int64_t in_row) {
  const int64_t h = D / 2;
  for (int64_t pa = 0; pa < 2 * A; ++pa) {  // the q heads, then the k heads
    const T* t = in + (pa / A) * in_row + (pa % A) * D;
    T* o = out + pa * D;
    for (int64_t d = 0; d < h; ++d) {
      const float t1 = static_cast<float>(t[d]), t2 = static_cast<float>(t[d + h]);
      o[d] = static_cast<T>(t1 * c[d] - t2 * s[d]);
      o[d + h] = static_cast<T>(t2 * c[d + h] + t1 * s[d + h]);
    }
  }
}

at::Tensor rotary_qk_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) >= 2 && qkv.size(4) % 2 == 0 && qkv.is_contiguous(),
              "structprune: rotary_qk takes a contiguous [B, S, P >= 2, A, D] projection with D even, got ",
              qkv.sizes());
  const int64_t B = qkv.size(0), S = qkv.size(1), P = qkv.size(2), A = qkv.size(3), D = qkv.size(4);
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) &&
                  cos.size(1) == S && cos.size(2) == D,
              "structprune: rotary_qk takes cos and sin of one shape [1 or B, S, D] = [1 or ", B, ", ", S, ", ", D,
              "], got ", cos.sizes(), " and ", sin.sizes());
  const auto c = cos.to(at::kFloat).contiguous(), sn = sin.to(at::kFloat).contiguous();
  auto out = at::empty({B, S, 2, A, D}, qkv.options());
  const float *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>();
  const int64_t table_b = cos.size(0) == 1 ? 0 : S * D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rotary_qk_cpu", [&] {
    const scalar_t* in = qkv.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * S, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / S, pos = r % S;
        rotary_rows(in + r * P * A * D, o + r * 2 * A * D, cp + b * table_b + pos * D, sp + b * table_b + pos * D,
                    A, D, A * D);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_banded_attention", &structprune::banded_attention_cpu);
  m.impl("cpp_rotary_qk", &structprune::rotary_qk_cpu);
}
