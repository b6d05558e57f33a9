// Small pieces the attention and FFN ops share: 2-D views, the bias broadcast, the placeholders of masked-out
// gradients, and the output-projection / row-scatter gradients on packed weights. Header-only; internal to csrc/.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "gated_core.h"
#include "pack_cache.h"

namespace structprune::detail {

inline at::Tensor broadcast_bias(const at::Tensor& bias, int64_t B, int64_t S) {
  auto out = at::empty({B, S, bias.size(0)}, bias.options());
  out.copy_(bias.view({1, 1, bias.size(0)}).expand({B, S, bias.size(0)}));
  return out;
}

inline at::Tensor rows_2d(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.is_contiguous() ? r : r.contiguous();
}

inline at::Tensor contiguous_2d(const at::Tensor& t, int64_t rows, int64_t cols) {
  auto r = t.reshape({rows, cols});
  return r.is_contiguous() ? r : r.contiguous();
}

// Full-size tensors of `full_rows` rows with srcs[i] [R, ...] in the kept rows, zero elsewhere.
inline std::vector<at::Tensor> scatter_rows(const DeviceHooks& hooks, const std::vector<at::Tensor>& srcs,
                                            const at::Tensor& rows, int64_t full_rows) {
  if (hooks.scatter_rows) return hooks.scatter_rows(srcs, rows, full_rows);
  std::vector<at::Tensor> out;
  for (const auto& g : srcs) {
    auto shape = g.sizes().vec();
    shape[0] = full_rows;
    out.push_back(at::zeros(shape, g.options()));
    out.back().index_copy_(0, rows, g);
  }
  return out;
}

// Output-projection gradients: (dw_out [E, C] full-size, dg per kept column [R] fp32), each only when wanted
// (undefined otherwise; dg needs pk.w_out_raw without a fused hook). M [E, R] is consumed.
inline std::tuple<at::Tensor, at::Tensor> out_proj_grad(const DeviceHooks& hooks, at::Tensor M,
                                                        const at::Tensor& w_full, const Pack& pk, bool want_dw,
                                                        bool want_dg) {
  if (hooks.out_proj_grad) return hooks.out_proj_grad(M, w_full, pk.rows, pk.gcols, want_dw, want_dg);
  at::Tensor dg;
  if (want_dg) dg = (M.to(at::kFloat) * pk.w_out_raw.to(at::kFloat)).sum(0);
  if (!want_dw) return {at::Tensor(), dg};
  M.mul_(pk.gcols);
  if (pk.identity_rows) return {M, dg};
  auto dw = at::zeros(w_full.sizes(), w_full.options());
  dw.index_copy_(1, pk.rows, M);
  return {dw, dg};
}

// The placeholder of a gradient masked out by the output mask: an empty [0] tensor with t's options.
inline at::Tensor skipped(const at::Tensor& t) { return at::empty({0}, t.options()); }

// A gradient that is zero everywhere (nothing to compute), or the placeholder when masked out.
inline at::Tensor zero_grad_or_skip(bool wanted, const at::Tensor& t) {
  return wanted ? at::zeros(t.sizes(), t.options()) : skipped(t);
}

// The per-gate gradient [n] from the gradient of the kept entries (`index`), zero for the others.
inline at::Tensor scatter_gate_grad(const at::Tensor& gates, const at::Tensor& index, const at::Tensor& kept_grad) {
  auto dgates = at::zeros(gates.sizes(), gates.options());
  dgates.index_copy_(0, index.to(gates.device()), kept_grad.to(gates.scalar_type()));
  return dgates;
}

}  // namespace structprune::detail
