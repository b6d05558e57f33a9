// Device-generic gated attention forward / backward on packed weights, and the attention-dropout stream (see
// gated_core.h). Input checks: checks.cpp; packed weights: pack_cache.cpp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "gated_common.h"
#include "gated_core.h"
#include "pack_cache.h"
#include "philox.h"

namespace structprune {

using namespace detail;

namespace {

std::optional<at::Tensor> make_mask(const std::optional<at::Tensor>& key_bias, const at::Tensor& x) {
  if (!key_bias.has_value()) return std::nullopt;
  // Clamped to the dtype's finite range first: finfo(float32).min would round to -inf in fp16 / bf16, and a fully
  // padded row of -inf gives NaN.
  const double lo = x.scalar_type() == at::kHalf ? -65504.0 : x.scalar_type() == at::kBFloat16 ? -3.3895313892515355e38
                                                                                                 : -3.4028234663852886e38;
  return key_bias->clamp_min(lo).to(x.scalar_type()).view({x.size(0), 1, 1, x.size(1)});
}

// Attention with probability dropout, in fp32 on materialised [B, A, S, S] scores (generic ATen code for any
// device; the flash hooks have no dropout). Returns the context [B, A, S, D] (dtype of q) and the log-sum-exp
// [B, A, S] fp32 of the scaled, masked scores.
std::tuple<at::Tensor, at::Tensor> dropout_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& key_bias,
                                                    const at::Tensor& heads, int64_t num_heads, double scale,
                                                    const AttnDropout& drop) {
  auto s = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-2, -1)).mul_(scale);
  if (key_bias.has_value()) s.add_(key_bias->to(at::kFloat).view({q.size(0), 1, 1, q.size(2)}));
  auto lse = at::logsumexp(s, -1, /*keepdim=*/true);
  auto p = s.sub_(lse).exp_().mul_(attention_dropout_scale(q.size(0), num_heads, q.size(2), heads, drop, q.device()));
  return {at::matmul(p.to(q.scalar_type()), v), lse.squeeze(-1)};
}

// Its backward from the saved log-sum-exp, the mask regenerated: dv = Pd^T dO, dPd = dO V^T, dP = dPd * m,
// dS = P * (dP - rowsum(P * dP)), dq = dS K * scale, dk = dS^T Q * scale (Pd = P * m, m the dropout scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dropout_attn_bwd(const at::Tensor& dctx, const at::Tensor& q,
                                                                const at::Tensor& k, const at::Tensor& v,
                                                                const at::Tensor& lse,
                                                                const std::optional<at::Tensor>& key_bias,
                                                                const at::Tensor& heads, int64_t num_heads,
                                                                double scale, const AttnDropout& drop) {
  const auto qf = q.to(at::kFloat), kf = k.to(at::kFloat), vf = v.to(at::kFloat), dof = dctx.to(at::kFloat);
  auto s = at::matmul(qf, kf.transpose(-2, -1)).mul_(scale);
  if (key_bias.has_value()) s.add_(key_bias->to(at::kFloat).view({q.size(0), 1, 1, q.size(2)}));
  const auto p = s.sub_(lse.to(at::kFloat).unsqueeze(-1)).exp_();
  const auto m = attention_dropout_scale(q.size(0), num_heads, q.size(2), heads, drop, q.device());
  const auto dv = at::matmul((p * m).to(q.scalar_type()).to(at::kFloat).transpose(-2, -1), dof);
  auto dp = at::matmul(dof, vf.transpose(-2, -1)).mul_(m);
  const auto delta = (dp * p).sum(-1, /*keepdim=*/true);
  const auto ds = dp.sub_(delta).mul_(p);
  const auto dq = at::matmul(ds, kf).mul_(scale);
  const auto dk = at::matmul(ds.transpose(-2, -1), qf).mul_(scale);
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

at::Tensor attention_dropout_scale(int64_t B, int64_t num_heads, int64_t S, const at::Tensor& heads,
                                   const AttnDropout& drop, at::Device device) {
  const auto h = heads.to(at::kCPU, at::kLong).contiguous();
  const int64_t A = h.numel();
  const int64_t* hp = h.data_ptr<int64_t>();
  auto out = at::empty({B, A, S, S}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const float p = static_cast<float>(drop.p), keep = static_cast<float>(1.0 / (1.0 - drop.p));
  const uint64_t seed = static_cast<uint64_t>(drop.seed), offset = static_cast<uint64_t>(drop.offset);
  at::parallel_for(0, B * A * S, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // row r = (b, a, i): elements base .. base + S - 1 of the stream
      const int64_t i = r % S, a = (r / S) % A, b = r / (S * A);
      const uint64_t base = static_cast<uint64_t>(((b * num_heads + hp[a]) * S + i) * S);
      float* out_row = op + r * S;
      // one Philox call per 4 consecutive elements (a block); the row may start and end inside a block
      for (uint64_t block = base >> 2; block <= (base + static_cast<uint64_t>(S) - 1) >> 2; ++block) {
        const Philox4 words = philox_block(seed, offset, block);
        for (int w = 0; w < 4; ++w) {
          const uint64_t n = (block << 2) + static_cast<uint64_t>(w);
          if (n < base || n >= base + static_cast<uint64_t>(S)) continue;
          out_row[n - base] = philox_to_uniform(words.v[w]) >= p ? keep : 0.0f;
        }
      }
    }
  });
  return out.to(device);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const DeviceHooks& hooks, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk,
    const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo,
    const at::Tensor& head_gates, const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias,
    int64_t num_heads, bool save_for_backward, const AttnDropout& drop) {
  const auto s = check_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads);
  const int64_t N = s.B * s.S, R = s.R;
  const auto fopts = x.options().dtype(at::kFloat);
  if (s.A == 0 || N == 0) {  // only the output bias; saved outputs have their shapes but hold nothing
    auto y = broadcast_bias(bo, s.B, s.S);
    if (!save_for_backward) return {y, at::empty({0}, x.options()), at::empty({0}, x.options()), at::empty({0}, fopts)};
    return {y, at::empty({N, 3 * R}, x.options()), at::empty({N, R}, x.options()), at::empty({s.B, s.S, s.A}, fopts)};
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  auto attn_core = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return drop.p > 0.0 ? dropout_attn_fwd(q, k, v, key_bias, active_heads, num_heads, scale, drop)
                        : hooks.attn_fwd(q, k, v, make_mask(key_bias, x), scale);
  };
  if (!save_for_backward) {  // inference: nothing kept, the context is gated in place when gates are not folded
    const Pack pk = get_pack(Kind::Attention, hooks, {wq, bq, wk, bk, wv, bv}, wo, head_gates, active_heads, s.D,
                             s.H * s.D, x.scalar_type(), /*want_raw=*/false);
    const auto qkv = at::addmm(pk.b_in, rows_2d(x), pk.w_in.t()).view({s.B, s.S, 3, s.A, s.D});
    auto [ctx, aux] = attn_core(qkv.select(2, 0).transpose(1, 2), qkv.select(2, 1).transpose(1, 2),
                                qkv.select(2, 2).transpose(1, 2));
    auto ctx2 = ctx.transpose(1, 2).reshape({N, R});
    if (!pk.folded) {
      if (!ctx2.is_contiguous()) ctx2 = ctx2.contiguous();
      hooks.scale_cols(ctx2, pk.gcols);
    }
    return {at::addmm(bo, ctx2, pk.w_out.t()).view({s.B, s.S, s.E}), at::empty({0}, x.options()),
            at::empty({0}, x.options()), at::empty({0}, fopts)};
  }
  // Training: keep q|k|v, the ungated context and the log-sum-exp for the backward.
  const Pack pk = get_pack(Kind::Attention, hooks, {wq, bq, wk, bk, wv, bv}, wo, head_gates, active_heads, s.D,
                           s.H * s.D, x.scalar_type(), /*want_raw=*/false);
  auto qkv2 = at::addmm(pk.b_in, rows_2d(x), pk.w_in.t());  // [N, 3R]
  const auto qkv = qkv2.view({s.B, s.S, 3, s.A, s.D});
  auto [ctx, aux] = attn_core(qkv.select(2, 0).transpose(1, 2), qkv.select(2, 1).transpose(1, 2),
                              qkv.select(2, 2).transpose(1, 2));
  auto ctx2 = contiguous_2d(ctx.transpose(1, 2), N, R);  // a view for the CPU flash kernel ([B, S, A, D] memory)
  at::Tensor lse;
  if (aux.defined()) {
    lse = aux.transpose(1, 2);  // [B, S, A]
    if (!lse.is_contiguous()) lse = lse.contiguous();
    if (lse.scalar_type() != at::kFloat) lse = lse.to(at::kFloat);
  } else {
    lse = at::zeros({s.B, s.S, s.A}, fopts);
  }
  at::Tensor y;
  if (pk.folded) {
    y = at::addmm(bo, ctx2, pk.w_out.t());
  } else {
    auto ctx_g = ctx2.clone();
    hooks.scale_cols(ctx_g, pk.gcols);
    y = at::addmm(bo, ctx_g, pk.w_out.t());
  }
  return {y.view({s.B, s.S, s.E}), qkv2, ctx2, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
attention_backward(const DeviceHooks& hooks, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wq,
                   const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk, const at::Tensor& wv,
                   const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo, const at::Tensor& head_gates,
                   const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias, int64_t num_heads,
                   const std::optional<at::Tensor>& saved_qkv, const std::optional<at::Tensor>& saved_ctx,
                   const std::optional<at::Tensor>& saved_lse, OutputMask output_mask, const AttnDropout& drop) {
  const auto s = check_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads);
  check_same(grad_out, "grad_out", x, {s.B, s.S, s.E});
  const int64_t N = s.B * s.S, R = s.R;
  const bool has_qkv = check_saved(saved_qkv, "qkv", x, x.scalar_type(), {N, 3 * R});
  const bool has_ctx = check_saved(saved_ctx, "ctx", x, x.scalar_type(), {N, R});
  const bool has_lse = check_saved(saved_lse, "lse", x, at::kFloat, {s.B, s.S, s.A});
  TORCH_CHECK(has_qkv == has_ctx && has_ctx == has_lse,
              "structprune: pass all of the saved qkv, ctx and lse to cpp_gated_attention_backward, or none");
  const auto [need_x, need_w, need_g] = output_mask;
  const auto go2 = rows_2d(grad_out);
  auto dbo = need_w ? go2.sum(0) : skipped(bo);
  if (s.A == 0 || N == 0 || !(need_x || need_w || need_g)) {
    return {zero_grad_or_skip(need_x, x), zero_grad_or_skip(need_w, wq), zero_grad_or_skip(need_w, bq),
            zero_grad_or_skip(need_w, wk), zero_grad_or_skip(need_w, bk), zero_grad_or_skip(need_w, wv),
            zero_grad_or_skip(need_w, bv), zero_grad_or_skip(need_w, wo), dbo,
            zero_grad_or_skip(need_g, head_gates)};
  }

  const Pack pk = get_pack(Kind::Attention, hooks, {wq, bq, wk, bk, wv, bv}, wo, head_gates, active_heads, s.D,
                           s.H * s.D, x.scalar_type(), /*want_raw=*/need_g && hooks.out_proj_grad == nullptr);
  const auto x2 = rows_2d(x);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  const auto mask = make_mask(key_bias, x);
  at::Tensor qkv, ctx, aux, ctx2;
  if (has_qkv) {
    qkv = saved_qkv->view({s.B, s.S, 3, s.A, s.D});
    ctx2 = saved_ctx->is_contiguous() ? *saved_ctx : saved_ctx->contiguous();
    ctx = ctx2.view({s.B, s.S, s.A, s.D}).transpose(1, 2);
    aux = saved_lse->transpose(1, 2);  // [B, A, S]
  } else {  // recompute the forward up to the (ungated) context
    qkv = at::addmm(pk.b_in, x2, pk.w_in.t()).view({s.B, s.S, 3, s.A, s.D});
    const auto q = qkv.select(2, 0).transpose(1, 2), k = qkv.select(2, 1).transpose(1, 2),
               v = qkv.select(2, 2).transpose(1, 2);
    std::tie(ctx, aux) = drop.p > 0.0 ? dropout_attn_fwd(q, k, v, key_bias, active_heads, num_heads, scale, drop)
                                      : hooks.attn_fwd(q, k, v, mask, scale);
    ctx2 = contiguous_2d(ctx.transpose(1, 2), N, R);  // [N, R] ungated
  }

  // out = (ctx * g) @ wo_sel^T + bo. With M = grad^T @ ctx: dwo_sel = M * g, dg_a = sum(M * wo_sel) over head a.
  at::Tensor dwo = skipped(wo), dgates = skipped(head_gates);
  if (need_w || need_g) {
    auto [dw_out, dg_cols] = out_proj_grad(hooks, at::mm(go2.t(), ctx2), wo, pk, need_w, need_g);  // M [E, R]
    if (need_w) dwo = dw_out;
    if (need_g) dgates = scatter_gate_grad(head_gates, active_heads, dg_cols.view({s.A, s.D}).sum(1));
  }
  std::vector<at::Tensor> dw = {skipped(wq), skipped(wk), skipped(wv)}, db = {skipped(bq), skipped(bk), skipped(bv)};
  at::Tensor dx = skipped(x);
  if (!(need_x || need_w)) return {dx, dw[0], db[0], dw[1], db[1], dw[2], db[2], dwo, dbo, dgates};

  const auto q = qkv.select(2, 0).transpose(1, 2);
  const auto k = qkv.select(2, 1).transpose(1, 2);
  const auto v = qkv.select(2, 2).transpose(1, 2);
  auto dctx2 = at::mm(go2, pk.w_out);  // gated when folded
  if (!pk.folded) hooks.scale_cols(dctx2, pk.gcols);
  const auto dctx = dctx2.view({s.B, s.S, s.A, s.D}).transpose(1, 2);
  auto [dq, dk, dv] = drop.p > 0.0
                         ? dropout_attn_bwd(dctx, q, k, v, aux, key_bias, active_heads, num_heads, scale, drop)
                         : hooks.attn_bwd(dctx, q, k, v, ctx, aux, mask, scale);

  // Input projections, one per q / k / v (the CPU flash backward gives [B, S, A, D] memory: [N, R] views).
  const at::Tensor dproj[3] = {contiguous_2d(dq.transpose(1, 2), N, R), contiguous_2d(dk.transpose(1, 2), N, R),
                               contiguous_2d(dv.transpose(1, 2), N, R)};
  if (need_x) {
    dx = at::empty({s.B, s.S, s.E}, x.options());
    auto dx2 = dx.view({N, s.E});
    for (int p = 0; p < 3; ++p) {
      const auto w_sel = pk.w_in.narrow(0, p * R, R);
      if (p == 0) {
        at::mm_out(dx2, dproj[p], w_sel);
      } else {
        dx2.addmm_(dproj[p], w_sel);
      }
    }
  }
  if (need_w) {
    for (int p = 0; p < 3; ++p) {
      dw[p] = at::mm(dproj[p].t(), x2);
      db[p] = dproj[p].sum(0);
    }
    if (!pk.identity_rows) {
      dw = scatter_rows(hooks, dw, pk.rows, s.H * s.D);
      db = scatter_rows(hooks, db, pk.rows, s.H * s.D);
    }
  }
  return {dx, dw[0], db[0], dw[1], db[1], dw[2], db[2], dwo, dbo, dgates};
}

}  // namespace structprune
