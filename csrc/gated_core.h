// Device-generic forward/backward of the two gated ops, written with ATen calls on packed weights.
// Each device (cpu/ops_cpu.cpp, cuda/ops_cuda.cpp) supplies the few pieces that differ: the attention core,
// the bias + activation (+ gate) epilogue and its backward, and whether gates are folded into the packed
// output weights (CPU: yes, keyed on the gate values; CUDA: no, so nothing is read back to the host).
// Implemented by job: attention.cpp, ffn.cpp, glu_ffn.cpp (the GLU FFN), pack_cache.cpp (the packed-weight cache),
// checks.cpp (the checks that guard memory; the user-facing input checks are Python's, structprune/_input_checks.py).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace structprune {

enum class Act { Gelu, GeluTanh, Relu, Silu };
// The activation called `name` (one of activation_names(), else an error naming them).
Act parse_activation(const std::string& name);
// The activation names the FFN ops accept, in table order: the same as structprune/activations.py's ACTIVATIONS.
std::vector<std::string> activation_names();

struct DeviceHooks {
  // Attention on [B, A, S, D] views; mask is [B, 1, 1, S] in the dtype of q (or undefined).
  // Returns the context [B, A, S, D] and whatever the backward needs (e.g. the log-sum-exp).
  std::tuple<at::Tensor, at::Tensor> (*attn_fwd)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask, double scale);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*attn_bwd)(const at::Tensor& dctx, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& ctx, const at::Tensor& aux,
                                                             const std::optional<at::Tensor>& mask, double scale);
  // a [N, K] (contiguous) <- act(a + bias) * col_scale (bias and col_scale may be undefined). With h_out (training
  // forward, backward recompute; a tensor like a): a <- a + bias (the pre-activation), *h_out <- act(a + bias), ungated.
  void (*bias_act)(at::Tensor& a, const at::Tensor& bias, const at::Tensor& col_scale, Act act, at::Tensor* h_out);
  // dh [N, K] (contiguous) <- dh * act'(pre), in place or by rebinding dh to a new tensor
  void (*act_backward)(at::Tensor& dh, const at::Tensor& pre, Act act);
  // Scale columns: t [N, C] (contiguous) <- t * col_scale[C] (used when gates are not folded).
  void (*scale_cols)(at::Tensor& t, const at::Tensor& col_scale);
  bool fold_gates;  // fold the gates into the packed wo / w2 columns (needs the gate values on the host)
  // Optional fused kernels (nullptr: generic ATen code). rows [R] int64: sorted kept columns / rows.
  // w_full [E, C] -> [E, R] with out[:, r] = w_full[:, rows[r]] * col_scale[r] (col_scale may be undefined).
  at::Tensor (*gather_cols)(const at::Tensor& w_full, const at::Tensor& rows, const at::Tensor& col_scale);
  // Output-projection gradients from M = grad^T @ context [E, R]: (dw [E, C] full-size, dw[:, rows[r]] =
  // M[:, r] * col_scale[r], zero elsewhere; dg [R] fp32, dg[r] = sum_e M[e, r] * w_full[e, rows[r]]), each
  // only when wanted (undefined otherwise).
  std::tuple<at::Tensor, at::Tensor> (*out_proj_grad)(const at::Tensor& M, const at::Tensor& w_full,
                                                      const at::Tensor& rows, const at::Tensor& col_scale,
                                                      bool want_dw, bool want_dg);
  // Full-size tensors [F, ...] with srcs[i] [R, ...] (contiguous) in rows `rows`, zero elsewhere.
  std::vector<at::Tensor> (*scatter_rows)(const std::vector<at::Tensor>& srcs, const at::Tensor& rows,
                                          int64_t full_rows);
};

// Forward ops return (y, saved...). With save_for_backward the saved tensors are what the backward needs, so it
// recomputes nothing: attention (qkv [B*S, 3*A*D] packed q|k|v rows of the active heads, ctx [B*S, A*D] the ungated
// attention context, lse [B, S, A] fp32 the softmax log-sum-exp of the CPU flash kernel; zeros on CUDA, whose
// backward recomputes the probabilities); FFN (pre [B*S, K] the pre-activation with bias, h [B*S, K] = act(pre),
// ungated). Without it they are empty ([0]) tensors: inference keeps nothing.
// Attention-probability dropout (training): probability p, Philox stream (seed, offset). Element (b, h, i, j) of the
// [B, H, S, S] probabilities of the full layer (h: the head's index among all num_heads, so a head's mask does not
// depend on which other heads are pruned) has linear index ((b * H + h) * S + i) * S + j = n and is kept when
// philox_to_uniform(word n % 4 of philox_block(seed, offset, n / 4)) >= p; kept values are scaled by 1 / (1 - p).
// The backward regenerates the mask from (seed, offset); nothing is stored.
struct AttnDropout {
  double p = 0.0;
  int64_t seed = 0, offset = 0;
};

// The dropout multipliers [B, A, S, S] fp32 (0 or 1 / (1 - p)) for the active heads `heads` (int64 [A], any
// device) of a layer with num_heads heads, on `device` (generated on the CPU).
at::Tensor attention_dropout_scale(int64_t B, int64_t num_heads, int64_t S, const at::Tensor& heads,
                                   const AttnDropout& drop, at::Device device);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const DeviceHooks& hooks, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk,
    const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo,
    const at::Tensor& head_gates, const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias,
    int64_t num_heads, bool save_for_backward, const AttnDropout& drop = {});

// Which gradients a backward computes: {dx, every weight and bias gradient, the gate gradient}. The work that
// serves only masked-out gradients is skipped, and those outputs are empty [0] tensors (options of the input).
using OutputMask = std::array<bool, 3>;

// Returns dx, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dhead_gates (zero rows/columns/entries for pruned heads).
// qkv / ctx / lse: the tensors saved by attention_forward(save_for_backward=true), or all absent (recompute).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
attention_backward(const DeviceHooks& hooks, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wq,
                   const at::Tensor& bq, const at::Tensor& wk, const at::Tensor& bk, const at::Tensor& wv,
                   const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo, const at::Tensor& head_gates,
                   const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias, int64_t num_heads,
                   const std::optional<at::Tensor>& qkv, const std::optional<at::Tensor>& ctx,
                   const std::optional<at::Tensor>& lse, OutputMask output_mask, const AttnDropout& drop = {});

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_forward(const DeviceHooks& hooks, const at::Tensor& x,
                                                           const at::Tensor& w1, const at::Tensor& b1,
                                                           const at::Tensor& w2, const at::Tensor& b2,
                                                           const at::Tensor& unit_gates, const at::Tensor& kept_units,
                                                           const std::string& activation, bool save_for_backward);

// Returns dx, dw1, db1, dw2, db2, dunit_gates (masked as in attention_backward). pre / h: saved by
// ffn_forward(save_for_backward=true), or absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ffn_backward(const DeviceHooks& hooks, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
             const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& unit_gates,
             const at::Tensor& kept_units, const std::string& activation, const std::optional<at::Tensor>& pre,
             const std::optional<at::Tensor>& h, OutputMask output_mask);

// The GLU FFN (glu_ffn.cpp): w1 [2 * I, E] (input half, gate half: unit u is the row pair (u, u + I)), b1 [2 * I]
// or undefined, w2 [E, I], b2 [E] or undefined. Saved: pre [B*S, 2K] (input half | gate half of the kept units,
// bias included), h [B*S, K] = act(pre_in) * pre_gate, ungated.
std::tuple<at::Tensor, at::Tensor, at::Tensor> glu_ffn_forward(const DeviceHooks& hooks, const at::Tensor& x,
                                                               const at::Tensor& w1, const at::Tensor& b1,
                                                               const at::Tensor& w2, const at::Tensor& b2,
                                                               const at::Tensor& unit_gates,
                                                               const at::Tensor& kept_units,
                                                               const std::string& activation, bool save_for_backward);

// Returns dx, dw1, db1, dw2, db2, dunit_gates (masked as in attention_backward; db1 / db2 empty without the bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
glu_ffn_backward(const DeviceHooks& hooks, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& unit_gates,
                 const at::Tensor& kept_units, const std::string& activation, const std::optional<at::Tensor>& pre,
                 const std::optional<at::Tensor>& h, OutputMask output_mask);

// Pack cache (shared by all devices): drop every entry / number of live entries.
void pack_cache_clear();
int64_t pack_cache_size();

}  // namespace structprune
