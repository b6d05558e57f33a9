// CPU kernels of the structprune ops: the fused bias + activation epilogue (at::vec, at::parallel_for),
// the attention core (ATen's CPU flash attention on the packed heads), the Philox hard-concrete sampler,
// and the CPU registrations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

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

// GELU goes through ATen's gelu kernel: it is dispatched at run time to AVX2/AVX-512 code, while this file is
// compiled for the baseline ISA, where at::vec's erf/tanh are scalar loops (measured ~4x slower than at::gelu_).
// ReLU (and the bias / gate for it) is one fused at::vec pass.
void cpu_bias_act(at::Tensor& a, const at::Tensor& bias, const at::Tensor& col_scale, Act act, at::Tensor* h_out) {
  TORCH_INTERNAL_ASSERT(a.is_contiguous() && a.dim() == 2);
  if (act != Act::Relu) {
    const c10::string_view approximate = act == Act::GeluTanh ? "tanh" : "none";
    if (bias.defined()) a.add_(bias);
    if (h_out) {
      at::gelu_out(*h_out, a, approximate);
    } else {
      at::gelu_(a, approximate);
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
    dh = at::gelu_backward(dh, pre, act == Act::GeluTanh ? "tanh" : "none");
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dh.scalar_type(), "structprune_act_backward", [&] {
    act_backward_impl<scalar_t>(dh.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(), dh.size(0), dh.size(1), act);
  });
}

void cpu_scale_cols(at::Tensor& t, const at::Tensor& col_scale) { t.mul_(col_scale); }

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
  static const DeviceHooks h{cpu_attn_fwd, cpu_attn_bwd, cpu_bias_act, cpu_act_backward, cpu_scale_cols,
                             /*fold_gates=*/true};
  return h;
}

at::Tensor gated_attention_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk,
                               const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo,
                               const at::Tensor& bo, const at::Tensor& head_gates, const at::Tensor& active_heads,
                               const std::optional<at::Tensor>& key_bias, int64_t num_heads) {
  return attention_forward(cpu_hooks(), x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias,
                           num_heads);
}

auto gated_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wq,
                                  const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
                                  const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo,
                                  const at::Tensor& bo, const at::Tensor& head_gates, const at::Tensor& active_heads,
                                  const std::optional<at::Tensor>& key_bias, int64_t num_heads) {
  return attention_backward(cpu_hooks(), grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                            key_bias, num_heads);
}

at::Tensor gated_ffn_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                         const at::Tensor& b2, const at::Tensor& unit_gates, const at::Tensor& kept_units,
                         c10::string_view activation) {
  return ffn_forward(cpu_hooks(), x, w1, b1, w2, b2, unit_gates, kept_units, std::string(activation));
}

auto gated_ffn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                            const at::Tensor& unit_gates, const at::Tensor& kept_units, c10::string_view activation) {
  return ffn_backward(cpu_hooks(), grad_out, x, w1, b1, w2, b2, unit_gates, kept_units, std::string(activation));
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
  m.impl("hard_concrete_sample", &structprune::hard_concrete_sample_cpu);
  m.impl("hard_concrete_sample_backward", &structprune::hard_concrete_sample_backward_cpu);
}
