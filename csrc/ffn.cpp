// Device-generic gated FFN forward / backward on packed weights, and the activation names (see gated_core.h).
// Input checks: checks.cpp; packed weights: pack_cache.cpp.
#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "gated_common.h"
#include "gated_core.h"
#include "pack_cache.h"

namespace structprune {

using namespace detail;

namespace {

// The activations the FFN ops accept: exactly the names of structprune/activations.py (ACTIVATIONS), which
// tests/test_cpp_ops.py holds this table to through the activation_names op.
const std::pair<const char*, Act> kActivations[] = {
    {"gelu", Act::Gelu},
    {"gelu_tanh", Act::GeluTanh},
    {"relu", Act::Relu},
    {"silu", Act::Silu},
};

}  // namespace

Act parse_activation(const std::string& name) {
  for (const auto& [n, act] : kActivations)
    if (name == n) return act;
  std::string expected;
  for (const auto& [n, act] : kActivations) expected += std::string(expected.empty() ? "'" : ", '") + n + "'";
  TORCH_CHECK(false, "structprune: activation must be one of ", expected, ", got '", name, "'");
}

std::vector<std::string> activation_names() {
  std::vector<std::string> out;
  for (const auto& [n, act] : kActivations) out.emplace_back(n);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_forward(const DeviceHooks& hooks, const at::Tensor& x,
                                                           const at::Tensor& w1, const at::Tensor& b1,
                                                           const at::Tensor& w2, const at::Tensor& b2,
                                                           const at::Tensor& unit_gates, const at::Tensor& kept_units,
                                                           const std::string& activation, bool save_for_backward) {
  const Act act = parse_activation(activation);
  const auto s = check_ffn(x, w1, b1, w2, b2, unit_gates, kept_units);
  const int64_t N = s.B * s.S;
  if (s.K == 0 || N == 0) {
    auto y = broadcast_bias(b2, s.B, s.S);
    if (!save_for_backward) return {y, at::empty({0}, x.options()), at::empty({0}, x.options())};
    return {y, at::empty({N, s.K}, x.options()), at::empty({N, s.K}, x.options())};
  }
  const Pack pk = get_pack(Kind::Ffn, hooks, {w1, b1}, w2, unit_gates, kept_units, 1, s.I, x.scalar_type(),
                           /*want_raw=*/false);
  auto a = at::addmm(pk.b_in, rows_2d(x), pk.w_in.t());  // [N, K], bias in the GEMM (as F.linear)
  if (!save_for_backward) {  // inference: activation (and gate) in place
    hooks.bias_act(a, at::Tensor(), pk.folded ? at::Tensor() : pk.gcols, act, nullptr);
    return {at::addmm(b2, a, pk.w_out.t()).view({s.B, s.S, s.E}), at::empty({0}, x.options()),
            at::empty({0}, x.options())};
  }
  // Training: keep the pre-activation and the ungated activation for the backward.
  auto h = at::empty_like(a);
  hooks.bias_act(a, at::Tensor(), at::Tensor(), act, &h);  // h = act(a), ungated; a unchanged (no bias)
  at::Tensor y;
  if (pk.folded) {
    y = at::addmm(b2, h, pk.w_out.t());
  } else {
    auto h_g = h.clone();
    hooks.scale_cols(h_g, pk.gcols);
    y = at::addmm(b2, h_g, pk.w_out.t());
  }
  return {y.view({s.B, s.S, s.E}), a, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ffn_backward(const DeviceHooks& hooks, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
             const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& unit_gates,
             const at::Tensor& kept_units, const std::string& activation, const std::optional<at::Tensor>& saved_pre,
             const std::optional<at::Tensor>& saved_h, OutputMask output_mask) {
  const Act act = parse_activation(activation);
  const auto s = check_ffn(x, w1, b1, w2, b2, unit_gates, kept_units);
  check_same(grad_out, "grad_out", x, {s.B, s.S, s.E});
  const int64_t N = s.B * s.S;
  const bool has_pre = check_saved(saved_pre, "pre", x, x.scalar_type(), {N, s.K});
  const bool has_h = check_saved(saved_h, "h", x, x.scalar_type(), {N, s.K});
  TORCH_CHECK(has_pre == has_h, "structprune: pass both of the saved pre and h to cpp_gated_ffn_backward, or none");
  const auto [need_x, need_w, need_g] = output_mask;
  const auto go2 = rows_2d(grad_out);
  auto db2 = need_w ? go2.sum(0) : skipped(b2);
  if (s.K == 0 || N == 0 || !(need_x || need_w || need_g)) {
    return {zero_grad_or_skip(need_x, x), zero_grad_or_skip(need_w, w1), zero_grad_or_skip(need_w, b1),
            zero_grad_or_skip(need_w, w2), db2, zero_grad_or_skip(need_g, unit_gates)};
  }

  const Pack pk = get_pack(Kind::Ffn, hooks, {w1, b1}, w2, unit_gates, kept_units, 1, s.I, x.scalar_type(),
                           /*want_raw=*/need_g && hooks.out_proj_grad == nullptr);
  const auto x2 = rows_2d(x);
  at::Tensor pre, h;
  if (has_pre) {
    pre = saved_pre->is_contiguous() ? *saved_pre : saved_pre->contiguous();
    h = saved_h->is_contiguous() ? *saved_h : saved_h->contiguous();
  } else {
    // Recompute the pre-activation with the bias inside the GEMM (one rounding, as F.linear: in bf16 the sign of
    // near-zero values, hence relu's derivative, then matches the reference).
    pre = at::addmm(pk.b_in, x2, pk.w_in.t());
    h = at::empty_like(pre);
    hooks.bias_act(pre, at::Tensor(), at::Tensor(), act, &h);  // h = act(pre), ungated
  }

  at::Tensor dw2 = skipped(w2), dgates = skipped(unit_gates);
  if (need_w || need_g) {
    auto [dw_out, dg] = out_proj_grad(hooks, at::mm(go2.t(), h), w2, pk, need_w, need_g);  // M = grad^T @ h [E, K]
    if (need_w) dw2 = dw_out;
    if (need_g) dgates = scatter_gate_grad(unit_gates, kept_units, dg);
  }
  at::Tensor dx = skipped(x);
  std::vector<at::Tensor> dw1_db1 = {skipped(w1), skipped(b1)};
  if (!(need_x || need_w)) return {dx, dw1_db1[0], dw1_db1[1], dw2, db2, dgates};

  auto dh = at::mm(go2, pk.w_out);  // [N, K], gated when folded
  if (!pk.folded) hooks.scale_cols(dh, pk.gcols);
  hooks.act_backward(dh, pre, act);  // dh <- d pre
  if (need_x) {
    dx = at::empty({s.B, s.S, s.E}, x.options());
    auto dx2 = dx.view({N, s.E});
    at::mm_out(dx2, dh, pk.w_in);
  }
  if (need_w) {
    dw1_db1 = {at::mm(dh.t(), x2), dh.sum(0)};
    if (!pk.identity_rows) dw1_db1 = scatter_rows(hooks, dw1_db1, pk.rows, s.I);
  }
  return {dx, dw1_db1[0], dw1_db1[1], dw2, db2, dgates};
}

}  // namespace structprune
