// Sliding-window (banded) softmax attention on the CPU, for inference: each query visits only the keys of its band
// |q - k| <= window, so a local layer costs O(S * window) instead of O(S^2).
//
//   out[b, s, a, :] = softmax_k(q[b, a, s] . k[b, a, k] * scale + key_bias[b, k], k in band(s)) @ v[b, a, k]
//
// q, k, v: [B, A, S, D] of any strides whose last dimension is contiguous (e.g. views of the fused projection's
// [B, S, 3, A, D] output); key_bias: [B, S] fp32 additive (0 = attend, finfo.min = padding) or absent. The queries go
// in blocks of `block` rows; block i meets the keys [q0 - window, q1 + window), and the work units (b, a, block) run
// in parallel (at::parallel_for), each with two small GEMMs (ATen's mm on views: BLAS, single-threaded inside the
// parallel region) around a row softmax computed here in fp32. Keys out of the band are skipped in the softmax (a
// query always has its own key in its band, so no row is empty). fp32, bf16 or fp16 in; computed in fp32; out in the
// dtype of q, [B, S, A, D] contiguous (the layout the output projection reads). No autograd: the Python entry
// (structprune/backends/cpp/modernbert.py) calls it only when no gradient is needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace structprune {
namespace {

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
  const int64_t nblocks = (S + block - 1) / block;
  const float* kbp = kb.defined() ? kb.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * A * nblocks, 1, [&](int64_t u0, int64_t u1) {
    const int64_t span = std::min(S, block + 2 * window);
    auto scores = at::empty({block * span}, q.options());  // per thread: reused by every unit it runs
    auto ctx = at::empty({block, D}, q.options());
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t blk = u % nblocks, a = (u / nblocks) % A, b = u / (nblocks * A);
      const int64_t q0 = blk * block, q1 = std::min(S, q0 + block), nq = q1 - q0;
      const int64_t lo = std::max<int64_t>(0, q0 - window), hi = std::min(S, q1 + window), nk = hi - lo;
      auto s = scores.narrow(0, 0, nq * nk).view({nq, nk});  // contiguous: BLAS writes it in place
      at::mm_out(s, q[b][a].narrow(0, q0, nq), k[b][a].narrow(0, lo, nk).t());
      float* sp = s.data_ptr<float>();
      const int64_t ld = nk;
      const float* bias = kbp ? kbp + b * S + lo : nullptr;
      for (int64_t i = 0; i < nq; ++i) {
        float* row = sp + i * ld;
        const int64_t pos = q0 + i;  // the band of this query, in key indices relative to lo
        const int64_t first = std::max<int64_t>(0, pos - window - lo), last = std::min(nk, pos + window + 1 - lo);
        float m = neg_inf;
        for (int64_t j = first; j < last; ++j) {
          row[j] = row[j] * fscale + (bias ? bias[j] : 0.0f);
          m = std::max(m, row[j]);
        }
        float l = 0.0f;
        for (int64_t j = 0; j < first; ++j) row[j] = 0.0f;
        for (int64_t j = first; j < last; ++j) {
          row[j] = std::exp(row[j] - m);
          l += row[j];
        }
        for (int64_t j = last; j < nk; ++j) row[j] = 0.0f;
        const float inv = 1.0f / l;
        for (int64_t j = first; j < last; ++j) row[j] *= inv;
      }
      auto c = ctx.narrow(0, 0, nq);
      at::mm_out(c, s, v[b][a].narrow(0, lo, nk));
      const float* cp = c.data_ptr<float>();
      for (int64_t i = 0; i < nq; ++i) {  // out[b, q0 + i, a, :]
        std::copy(cp + i * D, cp + (i + 1) * D, outp + ((b * S + q0 + i) * A + a) * D);
      }
    }
  });
  return out.scalar_type() == q_in.scalar_type() ? out : out.to(q_in.scalar_type());
}

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) { m.impl("cpp_banded_attention", &structprune::banded_attention_cpu); }
