// Device-generic gated GLU FFN (ModernBERT's MLP) forward / backward on packed weights (see gated_core.h).
//
//   y = ((act(x @ w1[u].T + b1[u]) * (x @ w1[u + I].T + b1[u + I])) * gate[u])_u @ w2.T + b2
//
// over the kept units u only: unit u is the row pair (u, u + I) of w1 (input half, gate half) and column u of w2.
// The pack cache (pack_cache.cpp) stacks the kept rows of both halves into one [2K, E] matrix (one GEMM gives the
// input half | gate half) and the kept columns of w2 (gated when the device folds gates), built once per mask or
// weight change. Biases may be absent. The activation and its derivative are ATen's (as the reference's), so the
// code runs on any device with the hooks of that device.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "gated_common.h"
#include "gated_core.h"
#include "pack_cache.h"

namespace structprune {

using namespace detail;

namespace {

struct GluShapes {
  int64_t B, S, E, I, K;
};

GluShapes check_glu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const at::Tensor& unit_gates, const at::Tensor& kept_units) {
  check_x(x);
  GluShapes s;
  s.B = x.size(0);
  s.S = x.size(1);
  s.E = x.size(2);
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) % 2 == 0, "structprune: w1 of a GLU FFN must be [2 * I, E], got ",
              w1.sizes());
  s.I = w1.size(0) / 2;
  check_same(w1, "w1", x, {2 * s.I, s.E});
  if (b1.defined()) check_same(b1, "b1", x, {2 * s.I});
  check_same(w2, "w2", x, {s.E, s.I});
  if (b2.defined()) check_same(b2, "b2", x, {s.E});
  check_index(kept_units, "kept_units", s.I, unit_gates, x);
  s.K = kept_units.numel();
  return s;
}

at::Tensor act_forward(const at::Tensor& a, Act act) {
  switch (act) {
    case Act::Gelu:
      return at::gelu(a);
    case Act::GeluTanh:
      return at::gelu(a, "tanh");
    case Act::Relu:
      return at::relu(a);
    case Act::Silu:
      return at::silu(a);
  }
  TORCH_CHECK(false, "structprune: unknown activation");
}

// grad * act'(a), as the reference's autograd computes it
at::Tensor act_grad(const at::Tensor& grad, const at::Tensor& a, Act act) {
  switch (act) {
    case Act::Gelu:
      return at::gelu_backward(grad, a, "none");
    case Act::GeluTanh:
      return at::gelu_backward(grad, a, "tanh");
    case Act::Relu:
      return at::threshold_backward(grad, a, 0);
    case Act::Silu:
      return at::silu_backward(grad, a);
  }
  TORCH_CHECK(false, "structprune: unknown activation");
}

// t [N, C] @ w.T (+ bias, in the GEMM as F.linear, when defined)
at::Tensor linear_2d(const at::Tensor& t, const at::Tensor& w, const at::Tensor& bias) {
  return bias.defined() ? at::addmm(bias, t, w.t()) : at::mm(t, w.t());
}

Pack glu_pack(const DeviceHooks& hooks, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
              const at::Tensor& w2, const at::Tensor& unit_gates, const at::Tensor& kept_units, int64_t I,
              bool want_raw) {
  const auto half = [&](const at::Tensor& t, int64_t p) { return t.defined() ? t.narrow(0, p * I, I) : at::Tensor(); };
  return get_pack(Kind::GluFfn, hooks, {half(w1, 0), half(b1, 0), half(w1, 1), half(b1, 1)}, w2, unit_gates,
                  kept_units, 1, I, x.scalar_type(), want_raw);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_ffn_forward(const DeviceHooks& hooks, const at::Tensor& x,
                                                               const at::Tensor& w1, const at::Tensor& b1,
                                                               const at::Tensor& w2, const at::Tensor& b2,
                                                               const at::Tensor& unit_gates,
                                                               const at::Tensor& kept_units,
                                                               const std::string& activation,
                                                               bool save_for_backward) {
  const Act act = parse_activation(activation);
  const auto s = check_glu(x, w1, b1, w2, b2, unit_gates, kept_units);
  const int64_t N = s.B * s.S;
  const auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one per output: outputs never alias
  if (s.K == 0 || N == 0) {
    auto y = b2.defined() ? broadcast_bias(b2, s.B, s.S) : at::zeros({s.B, s.S, s.E}, x.options());
    if (!save_for_backward) return {y, none(), none()};
    return {y, at::empty({N, 2 * s.K}, x.options()), at::empty({N, s.K}, x.options())};
  }
  const Pack pk = glu_pack(hooks, x, w1, b1, w2, unit_gates, kept_units, s.I, /*want_raw=*/false);
  auto pre = linear_2d(rows_2d(x), pk.w_in, pk.b_in);  // [N, 2K]: input half | gate half
  auto h = act_forward(pre.narrow(1, 0, s.K), act).mul_(pre.narrow(1, s.K, s.K));  // [N, K], ungated
  at::Tensor hg = h;
  if (!pk.folded) {
    if (save_for_backward) {
      hg = h.clone();
      hooks.scale_cols(hg, pk.gcols);
    } else {
      hooks.scale_cols(h, pk.gcols);
    }
  }
  auto y = b2.defined() ? at::addmm(b2, hg, pk.w_out.t()) : at::mm(hg, pk.w_out.t());
  if (!save_for_backward) return {y.view({s.B, s.S, s.E}), none(), none()};
  return {y.view({s.B, s.S, s.E}), pre, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
glu_ffn_backward(const DeviceHooks& hooks, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& unit_gates,
                 const at::Tensor& kept_units, const std::string& activation,
                 const std::optional<at::Tensor>& saved_pre, const std::optional<at::Tensor>& saved_h,
                 OutputMask output_mask) {
  const Act act = parse_activation(activation);
  const auto s = check_glu(x, w1, b1, w2, b2, unit_gates, kept_units);
  check_same(grad_out, "grad_out", x, {s.B, s.S, s.E});
  const int64_t N = s.B * s.S;
  const bool has_pre = check_saved(saved_pre, "pre", x, x.scalar_type(), {N, 2 * s.K});
  const bool has_h = check_saved(saved_h, "h", x, x.scalar_type(), {N, s.K});
  TORCH_CHECK(has_pre == has_h,
              "structprune: pass both of the saved pre and h to cpp_gated_glu_ffn_backward, or none");
  const auto [need_x, need_w, need_g] = output_mask;
  const auto go2 = rows_2d(grad_out);
  const auto bias_grad = [&](bool wanted, const at::Tensor& b, const at::Tensor& weight) {
    return wanted && b.defined() ? at::zeros(b.sizes(), b.options()) : skipped(weight);
  };
  auto db2 = need_w && b2.defined() ? go2.sum(0) : skipped(w2);
  if (s.K == 0 || N == 0 || !(need_x || need_w || need_g)) {
    return {zero_grad_or_skip(need_x, x), zero_grad_or_skip(need_w, w1), bias_grad(need_w, b1, w1),
            zero_grad_or_skip(need_w, w2), db2, zero_grad_or_skip(need_g, unit_gates)};
  }

  const Pack pk = glu_pack(hooks, x, w1, b1, w2, unit_gates, kept_units, s.I,
                           /*want_raw=*/need_g && hooks.out_proj_grad == nullptr);
  const auto x2 = rows_2d(x);
  at::Tensor pre, h;
  if (has_pre) {
    pre = saved_pre->is_contiguous() ? *saved_pre : saved_pre->contiguous();
    h = saved_h->is_contiguous() ? *saved_h : saved_h->contiguous();
  } else {
    pre = linear_2d(x2, pk.w_in, pk.b_in);
    h = act_forward(pre.narrow(1, 0, s.K), act).mul_(pre.narrow(1, s.K, s.K));
  }
  const auto a = pre.narrow(1, 0, s.K), g = pre.narrow(1, s.K, s.K);

  at::Tensor dw2 = skipped(w2), dgates = skipped(unit_gates);
  if (need_w || need_g) {
    auto [dw_out, dg] = out_proj_grad(hooks, at::mm(go2.t(), h), w2, pk, need_w, need_g);  // M = grad^T @ h [E, K]
    if (need_w) dw2 = dw_out;
    if (need_g) dgates = scatter_gate_grad(unit_gates, kept_units, dg);
  }
  at::Tensor dx = skipped(x), dw1 = skipped(w1), db1 = skipped(w1);
  if (!(need_x || need_w)) return {dx, dw1, db1, dw2, db2, dgates};

  auto dh = at::mm(go2, pk.w_out);  // [N, K] gradient of the ungated h (the gates are folded into w_out)
  if (!pk.folded) hooks.scale_cols(dh, pk.gcols);
  auto dpre = at::empty({N, 2 * s.K}, x.options());  // input half | gate half
  dpre.narrow(1, 0, s.K).copy_(act_grad(dh * g, a, act));
  auto dpre_gate = dpre.narrow(1, s.K, s.K);
  at::mul_out(dpre_gate, dh, act_forward(a, act));
  if (need_x) {
    dx = at::empty({s.B, s.S, s.E}, x.options());
    auto dx2 = dx.view({N, s.E});
    at::mm_out(dx2, dpre, pk.w_in);
  }
  if (need_w) {
    std::vector<at::Tensor> grads = {at::mm(dpre.t(), x2)};  // [2K, E]
    if (b1.defined()) grads.push_back(dpre.sum(0));
    if (!pk.identity_rows) {  // kept rows (u, u + I): sorted, as scatter_rows needs
      grads = scatter_rows(hooks, grads, at::cat({pk.rows, pk.rows + s.I}), 2 * s.I);
    }
    dw1 = grads[0];
    if (b1.defined()) db1 = grads[1];
  }
  return {dx, dw1, db1, dw2, db2, dgates};
}

}  // namespace structprune
