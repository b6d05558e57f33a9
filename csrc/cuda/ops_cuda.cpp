// CUDA registrations of the structprune ops: tensor checks and cuBLAS GEMMs (at::addmm / at::mm) on packed weights
// via the device-generic code (attention.cpp, ffn.cpp), with the epilogues and the hard-concrete sampler of kernels.cu.
// Compiled only when torch has CUDA (build_recipe.py CUDA_SOURCES, for setup.py and the JIT build).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>

#include "../gated_core.h"
#include "kernels.h"

namespace structprune {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::F32;
    case at::kBFloat16:
      return cuda::DType::BF16;
    case at::kHalf:
      return cuda::DType::F16;
    default:
      TORCH_CHECK(false, "structprune: CUDA kernels support float32, bfloat16 and float16, got ", t.scalar_type());
  }
}

cuda::ActKind act_kind(Act act) {
  switch (act) {
    case Act::Gelu:
      return cuda::ActKind::Gelu;
    case Act::GeluTanh:
      return cuda::ActKind::GeluTanh;
    case Act::Silu:
      return cuda::ActKind::Silu;
    default:
      return cuda::ActKind::Relu;
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "structprune: CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void cuda_bias_act(at::Tensor& a, const at::Tensor& bias, const at::Tensor& col_scale, Act act, at::Tensor* h_out) {
  TORCH_INTERNAL_ASSERT(a.is_contiguous() && a.dim() == 2);
  const auto b = bias.defined() ? bias.contiguous() : bias;
  const auto sc = col_scale.defined() ? col_scale.contiguous() : col_scale;
  check_launch(cuda::bias_act(a.data_ptr(), b.defined() ? b.data_ptr() : nullptr, sc.defined() ? sc.data_ptr() : nullptr,
                              h_out ? h_out->data_ptr() : nullptr, a.size(0), a.size(1), dtype_of(a), act_kind(act),
                              stream()),
               "bias_act");
}

void cuda_act_backward(at::Tensor& dh, const at::Tensor& pre, Act act) {
  TORCH_INTERNAL_ASSERT(dh.is_contiguous() && pre.is_contiguous() && dh.sizes() == pre.sizes());
  check_launch(cuda::act_backward(dh.data_ptr(), pre.data_ptr(), dh.size(0), dh.size(1), dtype_of(dh),
                                  act_kind(act), stream()),
               "act_backward");
}

void cuda_scale_cols(at::Tensor& t, const at::Tensor& col_scale) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.dim() == 2);
  const auto sc = col_scale.contiguous();
  check_launch(cuda::scale_cols(t.data_ptr(), sc.data_ptr(), t.size(0), t.size(1), dtype_of(t), stream()),
               "scale_cols");
}

// Forward: SDPA (flash / memory-efficient kernels as torch picks), no log-sum-exp (the saved lse of a training
// forward is zeros). The backward recomputes the probabilities with the math formulation (fp32 softmax) on the
// packed heads (from the saved q|k|v of a training forward).
std::tuple<at::Tensor, at::Tensor> cuda_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask, double scale) {
  return {at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scale), at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_attn_bwd(const at::Tensor& dctx, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& /*ctx*/, const at::Tensor& /*aux*/,
                                                             const std::optional<at::Tensor>& mask, double scale) {
  auto scores = at::matmul(q, k.transpose(-2, -1)).to(at::kFloat).mul_(scale);
  if (mask.has_value()) scores.add_(mask->to(at::kFloat));
  const auto p = at::softmax(scores, -1);  // [B, A, S, S] fp32
  const auto pd = p.to(q.scalar_type());
  auto dv = at::matmul(pd.transpose(-2, -1), dctx);
  const auto dp = at::matmul(dctx, v.transpose(-2, -1)).to(at::kFloat);
  const auto ds = (p * (dp - (dp * p).sum(-1, true))).mul_(scale).to(q.scalar_type());
  auto dq = at::matmul(ds, k);
  auto dk = at::matmul(ds.transpose(-2, -1), q);
  return {dq, dk, dv};
}

const DeviceHooks& cuda_hooks() {
  static const DeviceHooks h{cuda_attn_fwd, cuda_attn_bwd, cuda_bias_act, cuda_act_backward, cuda_scale_cols,
                             /*fold_gates=*/false};
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_attention_cuda(
    const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
    const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo,
    const at::Tensor& head_gates, const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias,
    int64_t num_heads, bool save_for_backward, double dropout_p, int64_t seed, int64_t offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  return attention_forward(cuda_hooks(), x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias,
                           num_heads, save_for_backward, {dropout_p, seed, offset});
}

auto gated_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk,
                                   const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo,
                                   const at::Tensor& bo, const at::Tensor& head_gates,
                                   const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias,
                                   int64_t num_heads, const std::optional<at::Tensor>& qkv,
                                   const std::optional<at::Tensor>& ctx, const std::optional<at::Tensor>& lse,
                                   std::array<bool, 3> output_mask, double dropout_p, int64_t seed,
                                   int64_t offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  return attention_backward(cuda_hooks(), grad_out, x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads,
                            key_bias, num_heads, qkv, ctx, lse, output_mask, {dropout_p, seed, offset});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_ffn_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                              const at::Tensor& b1, const at::Tensor& w2,
                                                              const at::Tensor& b2, const at::Tensor& unit_gates,
                                                              const at::Tensor& kept_units,
                                                              c10::string_view activation, bool save_for_backward) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ffn_forward(cuda_hooks(), x, w1, b1, w2, b2, unit_gates, kept_units, std::string(activation),
                     save_for_backward);
}

auto gated_ffn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                             const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                             const at::Tensor& unit_gates, const at::Tensor& kept_units,
                             c10::string_view activation, const std::optional<at::Tensor>& pre,
                             const std::optional<at::Tensor>& h, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return ffn_backward(cuda_hooks(), grad_out, x, w1, b1, w2, b2, unit_gates, kept_units, std::string(activation),
                      pre, h, output_mask);
}

at::Tensor hard_concrete_cuda(const at::Tensor& log_alpha, int64_t seed, int64_t offset, double beta,
                              const std::optional<at::Tensor>& mask, const at::Tensor* grad) {
  TORCH_CHECK(log_alpha.is_cuda() && at::isFloatingType(log_alpha.scalar_type()),
              "structprune: log_alpha must be a floating CUDA tensor, got ", log_alpha.scalar_type(), " on ",
              log_alpha.device());
  const c10::cuda::CUDAGuard guard(log_alpha.device());
  const auto la = log_alpha.to(at::kFloat).contiguous();
  at::Tensor m, g;
  if (mask.has_value()) {
    TORCH_CHECK(mask->numel() == la.numel(), "structprune: mask must have ", la.numel(), " entries, got ",
                mask->numel());
    m = mask->to(la.device(), at::kFloat).contiguous();
  }
  if (grad) g = grad->to(at::kFloat).contiguous();
  auto out = at::empty_like(la);
  check_launch(cuda::hard_concrete(la.data_ptr<float>(), m.defined() ? m.data_ptr<float>() : nullptr,
                                   g.defined() ? g.data_ptr<float>() : nullptr, out.data_ptr<float>(), la.numel(),
                                   static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                                   static_cast<float>(beta), stream()),
               "hard_concrete");
  return out.to(log_alpha.scalar_type());
}

at::Tensor hard_concrete_sample_cuda(const at::Tensor& log_alpha, int64_t seed, int64_t offset, double beta,
                                     const std::optional<at::Tensor>& mask) {
  return hard_concrete_cuda(log_alpha, seed, offset, beta, mask, nullptr);
}

at::Tensor hard_concrete_sample_backward_cuda(const at::Tensor& grad, const at::Tensor& log_alpha, int64_t seed,
                                              int64_t offset, double beta, const std::optional<at::Tensor>& mask) {
  return hard_concrete_cuda(log_alpha, seed, offset, beta, mask, &grad);
}

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CUDA, m) {
  m.impl("cpp_gated_attention", &structprune::gated_attention_cuda);
  m.impl("cpp_gated_attention_backward", &structprune::gated_attention_backward_cuda);
  m.impl("cpp_gated_ffn", &structprune::gated_ffn_cuda);
  m.impl("cpp_gated_ffn_backward", &structprune::gated_ffn_backward_cuda);
  m.impl("cpp_hard_concrete_sample", &structprune::hard_concrete_sample_cuda);
  m.impl("cpp_hard_concrete_sample_backward", &structprune::hard_concrete_sample_backward_cuda);
}
