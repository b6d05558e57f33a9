// CPU kernels of the structprune ops: the fused bias + activation epilogue (at::vec, at::parallel_for),
// the attention core (ATen's CPU flash attention on the packed heads), the Philox hard-concrete sampler,
// and the CPU registrations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "../gated_core.h"
#include "../philox.h"

namespace structprune {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

template <typename T>
inline Vec load_f(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kVec ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    float tmp[kVec];
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp, n);
  }
}

template <typename T>
inline void store_f(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    float tmp[kVec];
    v.store(tmp, n);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kTanhBeta = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kTanhKappa = 0.044715f;

inline Vec act_fwd(const Vec& x, Act act) {
  switch (act) {
    case Act::Gelu:
      return x * Vec(0.5f) * (Vec(1.0f) + (x * Vec(kSqrt1_2)).erf());
    case Act::GeluTanh: {
      const Vec inner = Vec(kTanhBeta) * (x + Vec(kTanhKappa) * x * x * x);
      return Vec(0.5f) * x * (Vec(1.0f) + inner.tanh());
    }
    case Act::Silu:
      return x / (Vec(1.0f) + x.neg().exp());
    case Act::Relu:
    default:
      return at::vec::clamp_min(x, Vec(0.0f));
  }
}

inline Vec act_grad(const Vec& x, Act act) {  // d act / d x, as torch's gelu_backward / threshold_backward
  switch (act) {
    case Act::Gelu: {
      const Vec cdf = Vec(0.5f) * (Vec(1.0f) + (x * Vec(kSqrt1_2)).erf());
      const Vec pdf = (Vec(-0.5f) * x * x).exp() * Vec(kInvSqrt2Pi);
      return cdf + x * pdf;
    }
    case Act::GeluTanh: {
      const Vec x2 = x * x;
      const Vec t = (Vec(kTanhBeta) * (x + Vec(kTanhKappa) * x2 * x)).tanh();
      const Vec left = Vec(0.5f) * (Vec(1.0f) + t);
      const Vec right = Vec(0.5f) * x * (Vec(1.0f) - t * t) * Vec(kTanhBeta) * (Vec(1.0f) + Vec(3.0f * kTanhKappa) * x2);
      return left + right;
    }
    case Act::Silu: {
      const Vec sg = Vec(1.0f) / (Vec(1.0f) + x.neg().exp());
      return sg * (Vec(1.0f) + x * (Vec(1.0f) - sg));
    }
    case Act::Relu:
    default:
      return Vec::blendv(Vec(0.0f), Vec(1.0f), x > Vec(0.0f));
  }
}

int64_t grain_rows(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

template <typename T>
void bias_act_impl(T* a, const T* bias, const T* scale, T* h, int64_t N, int64_t K, Act act) {
  at::parallel_for(0, N, grain_rows(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = a + r * K;
      T* hrow = h ? h + r * K : nullptr;
      for (int64_t k = 0; k < K; k += kVec) {
        const int64_t n = std::min(kVec, K - k);
        const Vec pre = bias ? load_f(row + k, n) + load_f(bias + k, n) : load_f(row + k, n);
        Vec y = act_fwd(pre, act);
        if (hrow) {
          store_f(row + k, pre, n);
          store_f(hrow + k, y, n);
        } else {
          if (scale) y = y * load_f(scale + k, n);
          store_f(row + k, y, n);
        }
      }
    }
  });
}

template <typename T>
void act_backward_impl(T* dh, const T* pre, int64_t N, int64_t K, Act act) {
  at::parallel_for(0, N, grain_rows(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = 0; k < K; k += kVec) {
        const int64_t n = std::min(kVec, K - k);
        const Vec g = load_f(dh + r * K + k, n) * act_grad(load_f(pre + r * K + k, n), act);
        store_f(dh + r * K + k, g, n);
      }
    }
  });
}

// GELU and SiLU go through ATen's kernels: they are dispatched at run time to AVX2/AVX-512 code, while this file
// is compiled for the baseline ISA, where at::vec's erf/tanh/exp are scalar loops (measured ~4x slower than
// at::gelu_). ReLU (and the bias / gate for it) is one fused at::vec pass.
void cpu_bias_act(at::Tensor& a, const at::Tensor& bias, const at::Tensor& col_scale, Act act, at::Tensor* h_out) {
  TORCH_INTERNAL_ASSERT(a.is_contiguous() && a.dim() == 2);
  if (act != Act::Relu) {
    const c10::string_view approximate = act == Act::GeluTanh ? "tanh" : "none";
    if (bias.defined()) a.add_(bias);
    if (h_out) {
      if (act == Act::Silu) {
        at::silu_out(*h_out, a);
      } else {
        at::gelu_out(*h_out, a, approximate);
      }
    } else {
      if (act == Act::Silu) {
        at::silu_(a);
      } else {
        at::gelu_(a, approximate);
      }
      if (col_scale.defined()) a.mul_(col_scale);
    }
    return;
  }
  const auto b = bias.defined() ? bias.contiguous() : bias;
  const auto sc = col_scale.defined() ? col_scale.contiguous() : col_scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "structprune_bias_act", [&] {
    bias_act_impl<scalar_t>(a.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                            sc.defined() ? sc.data_ptr<scalar_t>() : nullptr,
                            h_out ? h_out->data_ptr<scalar_t>() : nullptr, a.size(0), a.size(1), act);
  });
}

void cpu_act_backward(at::Tensor& dh, const at::Tensor& pre, Act act) {
  TORCH_INTERNAL_ASSERT(dh.is_contiguous() && pre.is_contiguous() && dh.sizes() == pre.sizes());
  if (act != Act::Relu) {  // see cpu_bias_act
    dh = act == Act::Silu ? at::silu_backward(dh, pre) : at::gelu_backward(dh, pre, act == Act::GeluTanh ? "tanh" : "none");
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dh.scalar_type(), "structprune_act_backward", [&] {
    act_backward_impl<scalar_t>(dh.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(), dh.size(0), dh.size(1), act);
  });
}

void cpu_scale_cols(at::Tensor& t, const at::Tensor& col_scale) { t.mul_(col_scale); }

// --- packing and output-projection gradients (one pass each over the full-size tensor) ---------------------------

std::vector<int64_t> index_vec(const at::Tensor& rows) {
  auto r = rows.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

// Maximal runs of consecutive kept columns [j, j + len) <- [r, r + len) (rows sorted, unique), with the pruned
// gaps between them as runs with r = -1; they cover [0, C).
struct Run {
  int64_t j, r, len;
};
std::vector<Run> column_runs(const std::vector<int64_t>& rows, int64_t C) {
  std::vector<Run> runs;
  int64_t j = 0;
  for (size_t i = 0; i < rows.size();) {
    size_t k = i + 1;
    while (k < rows.size() && rows[k] == rows[k - 1] + 1) ++k;
    if (rows[i] > j) runs.push_back({j, -1, rows[i] - j});
    runs.push_back({rows[i], static_cast<int64_t>(i), static_cast<int64_t>(k - i)});
    j = rows[k - 1] + 1;
    i = k;
  }
  if (j < C) runs.push_back({j, -1, C - j});
  return runs;
}

template <typename T>
void gather_cols_impl(const T* w, int64_t C, const int64_t* rows, int64_t R, const T* scale, T* out, int64_t E) {
  at::parallel_for(0, E, grain_rows(R), [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const T* we = w + e * C;
      T* oe = out + e * R;
      if (scale) {
        for (int64_t r = 0; r < R; ++r) oe[r] = static_cast<T>(static_cast<float>(we[rows[r]]) * static_cast<float>(scale[r]));
      } else {
        for (int64_t r = 0; r < R; ++r) oe[r] = we[rows[r]];
      }
    }
  });
}

at::Tensor cpu_gather_cols(const at::Tensor& w_full, const at::Tensor& rows, const at::Tensor& col_scale) {
  const auto w = w_full.contiguous();
  const auto idx = rows.to(at::kLong).contiguous();
  const auto sc = col_scale.defined() ? col_scale.to(w.scalar_type()).contiguous() : col_scale;
  const int64_t E = w.size(0), C = w.size(1), R = idx.numel();
  auto out = at::empty({E, R}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "structprune_gather_cols", [&] {
    gather_cols_impl<scalar_t>(w.data_ptr<scalar_t>(), C, idx.data_ptr<int64_t>(), R,
                               sc.defined() ? sc.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), E);
  });
  return out;
}

// dw [E, C]: dw[:, rows[r]] = M[:, r] * scale[r], 0 elsewhere; dg[r] = sum_e M[e, r] * w[e, rows[r]] (double sums).
// Either output may be skipped (nullptr). Parallel over column ranges: each kept column's dg belongs to one thread.
template <typename T>
void out_proj_grad_impl(const T* M, const T* w, const T* scale, const std::vector<Run>& runs, int64_t E, int64_t C,
                        int64_t R, T* dw, double* dg) {
  at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(E, 1)), [&](int64_t c0, int64_t c1) {
    // runs intersecting [c0, c1)
    auto it = std::upper_bound(runs.begin(), runs.end(), c0, [](int64_t c, const Run& u) { return c < u.j; });
    if (it != runs.begin()) --it;
    std::vector<Run> mine;
    for (; it != runs.end() && it->j < c1; ++it) {
      const int64_t lo = std::max(c0, it->j), hi = std::min(c1, it->j + it->len);
      if (hi > lo) mine.push_back({lo, it->r < 0 ? -1 : it->r + (lo - it->j), hi - lo});
    }
    for (int64_t e = 0; e < E; ++e) {
      const T* me = M + e * R;
      const T* we = w + e * C;
      for (const Run& u : mine) {
        if (u.r < 0) {
          if (dw) std::fill(dw + e * C + u.j, dw + e * C + u.j + u.len, static_cast<T>(0));
          continue;
        }
        const T* mr = me + u.r;
        if (dw) {
          const T* sr = scale + u.r;
          T* dr = dw + e * C + u.j;
          for (int64_t i = 0; i < u.len; ++i)
            dr[i] = static_cast<T>(static_cast<float>(mr[i]) * static_cast<float>(sr[i]));
        }
        if (dg) {
          const T* wr = we + u.j;
          double* gr = dg + u.r;
          for (int64_t i = 0; i < u.len; ++i)
            gr[i] += static_cast<double>(static_cast<float>(mr[i])) * static_cast<double>(static_cast<float>(wr[i]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cpu_out_proj_grad(const at::Tensor& M_in, const at::Tensor& w_full,
                                                     const at::Tensor& rows, const at::Tensor& col_scale,
                                                     bool want_dw, bool want_dg) {
  const auto w = w_full.contiguous();
  const auto M = M_in.to(w.scalar_type()).contiguous();
  const auto sc = col_scale.to(w.scalar_type()).contiguous();
  const int64_t E = w.size(0), C = w.size(1), R = M.size(1);
  TORCH_INTERNAL_ASSERT(M.size(0) == E && sc.numel() == R && rows.numel() == R);
  const auto runs = column_runs(index_vec(rows), C);
  at::Tensor dw, dg;
  if (want_dw) dw = at::empty({E, C}, w.options());
  if (want_dg) dg = at::zeros({R}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "structprune_out_proj_grad", [&] {
    out_proj_grad_impl<scalar_t>(M.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), runs, E, C,
                                 R, want_dw ? dw.data_ptr<scalar_t>() : nullptr,
                                 want_dg ? dg.data_ptr<double>() : nullptr);
  });
  return {dw, want_dg ? dg.to(at::kFloat) : dg};
}

// Full-size copies of srcs (rows `rows` of the result), zero rows elsewhere; one parallel pass over all of them.
std::vector<at::Tensor> cpu_scatter_rows(const std::vector<at::Tensor>& srcs, const at::Tensor& rows,
                                         int64_t full_rows) {
  const auto idx = index_vec(rows);
  std::vector<int64_t> pos(full_rows, -1);
  for (size_t r = 0; r < idx.size(); ++r) pos[idx[r]] = static_cast<int64_t>(r);
  std::vector<at::Tensor> src(srcs.size()), out(srcs.size());
  std::vector<int64_t> row_bytes(srcs.size());
  int64_t max_bytes = 1;
  for (size_t i = 0; i < srcs.size(); ++i) {
    src[i] = srcs[i].contiguous();
    auto shape = src[i].sizes().vec();
    shape[0] = full_rows;
    out[i] = at::empty(shape, src[i].options());
    row_bytes[i] = src[i].dim() > 1 ? src[i].stride(0) * src[i].element_size() : src[i].element_size();
    max_bytes = std::max(max_bytes, row_bytes[i]);
  }
  const int64_t n = full_rows * static_cast<int64_t>(srcs.size());
  at::parallel_for(0, n, std::max<int64_t>(1, (1 << 17) / max_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / full_rows, f = i % full_rows, rb = row_bytes[t];
      char* dst = static_cast<char*>(out[t].data_ptr()) + f * rb;
      if (pos[f] < 0) {
        std::memset(dst, 0, rb);
      } else {
        std::memcpy(dst, static_cast<const char*>(src[t].data_ptr()) + pos[f] * rb, rb);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cpu_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask, double scale) {
  return at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_attn_bwd(const at::Tensor& dctx, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& ctx, const at::Tensor& lse,
                                                            const std::optional<at::Tensor>& mask, double scale) {
  return at::_scaled_dot_product_flash_attention_for_cpu_backward(dctx, q, k, v, ctx, lse, 0.0, false, mask, scale);
}

const DeviceHooks& cpu_hooks() {
  static const DeviceHooks h{cpu_attn_fwd,     cpu_attn_bwd,      cpu_bias_act,
                             cpu_act_backward, cpu_scale_cols,    /*fold_gates=*/true,
                             cpu_gather_cols,  cpu_out_proj_grad, cpu_scatter_rows};
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_attention_cpu(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
    const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo,
    const at::Tensor& head_gates, const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias,
    int64_t num_heads, bool save_for_backward, double dropout_p, int64_t seed, int64_t offset) {
  return attention_forward(cpu_hooks(), x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias,
                           num_heads, save_for_backward, {dropout_p, seed, offset});
}

auto gated_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wq,
                                  const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
                                  const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo,
                                  const at::Tensor& bo, const at::Tensor& head_gates, const at::Tensor& active_heads,
                                  const std::optional<at::Tensor>& key_bias, int64_t num_heads,
                                  const std::optional<at::Tensor>& qkv, const std::optional<at::Tensor>& ctx,
                                  const std::optional<at::Tensor>& lse, std::array<bool, 3> output_mask,
                                  double dropout_p, int64_t seed, int64_t offset) {
  return attention_backward(cpu_hooks(), grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                            key_bias, num_heads, qkv, ctx, lse, output_mask, {dropout_p, seed, offset});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                             const at::Tensor& b1, const at::Tensor& w2,
                                                             const at::Tensor& b2, const at::Tensor& unit_gates,
                                                             const at::Tensor& kept_units,
                                                             c10::string_view activation, bool save_for_backward) {
  return ffn_forward(cpu_hooks(), x, w1, b1, w2, b2, unit_gates, kept_units, std::string(activation),
                     save_for_backward);
}

auto gated_ffn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            const at::Tensor& unit_gates, const at::Tensor& kept_units, c10::string_view activation,
                            const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& h,
                            std::array<bool, 3> output_mask) {
  return ffn_backward(cpu_hooks(), grad_out, x, w1, b1, w2, b2, unit_gates, kept_units, std::string(activation),
                      pre, h, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_glu_ffn_cpu(
    const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const at::Tensor& unit_gates, const at::Tensor& kept_units,
    c10::string_view activation, bool save_for_backward) {
  return glu_ffn_forward(cpu_hooks(), x, w1, b1.value_or(at::Tensor()), w2, b2.value_or(at::Tensor()), unit_gates,
                         kept_units, std::string(activation), save_for_backward);
}

auto gated_glu_ffn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                                const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                const std::optional<at::Tensor>& b2, const at::Tensor& unit_gates,
                                const at::Tensor& kept_units, c10::string_view activation,
                                const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& h,
                                std::array<bool, 3> output_mask) {
  return glu_ffn_backward(cpu_hooks(), grad_out, x, w1, b1.value_or(at::Tensor()), w2, b2.value_or(at::Tensor()),
                          unit_gates, kept_units, std::string(activation), pre, h, output_mask);
}

// Hard-concrete sample z (and, for the backward, grad * dz/dlog_alpha) with Philox noise; see philox.h.
at::Tensor hard_concrete_cpu(const at::Tensor& log_alpha, int64_t seed, int64_t offset, double beta,
                             const std::optional<at::Tensor>& mask, const at::Tensor* grad) {
  TORCH_CHECK(at::isFloatingType(log_alpha.scalar_type()), "structprune: log_alpha must be floating, got ",
              log_alpha.scalar_type());
  const auto la = log_alpha.to(at::kFloat).contiguous();
  const int64_t n = la.numel();
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->numel() == n, "structprune: mask must have ", n, " entries like log_alpha, got ",
                mask->numel());
    m = mask->to(at::kCPU, at::kFloat).contiguous();
  }
  at::Tensor g = grad ? grad->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty_like(la);
  const float* lp = la.data_ptr<float>();
  const float* mp = m.defined() ? m.data_ptr<float>() : nullptr;
  const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float b = static_cast<float>(beta);
  for (int64_t blk = 0; blk * 4 < n; ++blk) {
    const Philox4 r = philox_block(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), blk);
    for (int j = 0; j < 4 && blk * 4 + j < n; ++j) {
      const int64_t i = blk * 4 + j;
      float dz;
      const float z = hard_concrete_value(clamp_uniform(philox_to_uniform(r.v[j])), lp[i], b, &dz);
      const float mk = mp ? mp[i] : 1.0f;
      op[i] = gp ? gp[i] * dz * mk : z * mk;
    }
  }
  return out.to(log_alpha.scalar_type());
}

at::Tensor hard_concrete_sample_cpu(const at::Tensor& log_alpha, int64_t seed, int64_t offset, double beta,
                                    const std::optional<at::Tensor>& mask) {
  return hard_concrete_cpu(log_alpha, seed, offset, beta, mask, nullptr);
}

at::Tensor hard_concrete_sample_backward_cpu(const at::Tensor& grad, const at::Tensor& log_alpha, int64_t seed,
                                             int64_t offset, double beta, const std::optional<at::Tensor>& mask) {
  return hard_concrete_cpu(log_alpha, seed, offset, beta, mask, &grad);
}

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_gated_attention", &structprune::gated_attention_cpu);
  m.impl("cpp_gated_attention_backward", &structprune::gated_attention_backward_cpu);
  m.impl("cpp_gated_ffn", &structprune::gated_ffn_cpu);
  m.impl("cpp_gated_ffn_backward", &structprune::gated_ffn_backward_cpu);
  m.impl("cpp_gated_glu_ffn", &structprune::gated_glu_ffn_cpu);
  m.impl("cpp_gated_glu_ffn_backward", &structprune::gated_glu_ffn_backward_cpu);
  m.impl("cpp_hard_concrete_sample", &structprune::hard_concrete_sample_cpu);
  m.impl("cpp_hard_concrete_sample_backward", &structprune::hard_concrete_sample_backward_cpu);
}
