// CPU kernel of a decoder's attention for a few queries against a KV cache (decode steps, short chunks):
// cpp_decoder_decode_attention(q [B, A, Sq, D], k, v [B, Akv, Sk, D], q_to_kv [A] int64, key_mask [B, Sk] bool?,
// window, scale) -> ctx [B, A, Sq, D] in q's dtype. Query head a reads KV head q_to_kv[a] directly (no repeat_kv,
// no padded group rows, no mask tensor): query i sits at key position Sk - Sq + i and sees the keys j <= that
// position, within `window` of it when window > 0 (pos - j < window), whose key_mask entry is true. A query with
// no visible key gets a zero context (as SDPA gives it). Scores, softmax and the weighted sum are computed in fp32:
// for fp32 or bf16 with D a multiple of 8 (up to 128) on an AVX2 + FMA CPU by the row primitives of
// attention_rows.h (the scores of the visible keys into a row buffer, their softmax, the context; k and v read in
// their own dtype), otherwise in one scalar pass per query (online softmax). The (batch, head) rows are split over threads only when each thread gets
// enough work (kMinWorkPerThread multiply-adds): a decode step runs in the calling thread, with no parallel region
// to wait on. Forward only: the Python side calls it when no gradient is needed.
//
// cpp_decoder_rotary(qkv [B, S, (A + 2 Akv) D], cos, sin [B|1, S, D], q_norm?, k_norm? [D], eps, head_dim, A, Akv)
// -> (q [B, A, S, D], k, v [B, Akv, S, D]): the epilogue of the fused q/k/v GEMM in one pass (one parallel region
// at most): Qwen3's per-head RMSNorm (fp32 statistics, normalised value rounded to the dtype, times the weight),
// HF's rotary positions (x * cos + rotate_half(x) * sin, in fp32, rounded once) and the [B, S, H, D] ->
// [B, H, S, D] layout the attention and the KV cache take. Forward only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace structprune {
namespace {

constexpr int64_t kMinWorkPerThread = int64_t{1} << 22;

template <typename T>
inline float dot(const T* a, const T* b, int64_t n) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    s0 += static_cast<float>(a[d]) * static_cast<float>(b[d]);
    s1 += static_cast<float>(a[d + 1]) * static_cast<float>(b[d + 1]);
    s2 += static_cast<float>(a[d + 2]) * static_cast<float>(b[d + 2]);
    s3 += static_cast<float>(a[d + 3]) * static_cast<float>(b[d + 3]);
  }
  for (; d < n; ++d) s0 += static_cast<float>(a[d]) * static_cast<float>(b[d]);
  return (s0 + s1) + (s2 + s3);
}

// Query rows i of head a of sequence b with the AVX2 + FMA row primitives (fp32 or bf16, D a multiple of 8, up
// to 128): scores of the visible keys, softmax, context; keys the mask hides get no weight.
template <typename T>
__attribute__((target("avx2,fma"))) void decode_row_avx2(const T* qh, int64_t qs2, const T* kb, int64_t ks2,
                                                         const T* vb, int64_t vs2, const bool* mb, int64_t Sq,
                                                         int64_t Sk, int64_t D, int64_t window, float scale, T* oh,
                                                         float* row) {
  const int64_t V = D / rows::kLanes;
  __m256 qv[rows::kMaxVectors];
  for (int64_t i = 0; i < Sq; ++i) {
    const int64_t pos = Sk - Sq + i;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0, n = pos - lo + 1;
    int64_t visible = n;
    if (mb != nullptr) {
      for (int64_t j = lo; j <= pos; ++j) visible -= mb[j] ? 0 : 1;
    }
    T* oi = oh + i * D;
    if (visible == 0) {
      std::fill(oi, oi + D, static_cast<T>(0.f));
      continue;
    }
    rows::load_query(qh + i * qs2, V, scale, qv);
    rows::scores(qv, V, kb + lo * ks2, ks2, n, row);
    if (visible < n) {
      for (int64_t j = 0; j < n; ++j) row[j] = mb[lo + j] ? row[j] : -std::numeric_limits<float>::infinity();
    }
    float l = rows::softmax_numerators(row, n);
    if (visible < n) {
      for (int64_t j = 0; j < n; ++j) {
        if (!mb[lo + j]) {
          l -= row[j];
          row[j] = 0.f;
        }
      }
    }
    rows::context(row, vb + lo * vs2, vs2, n, V, 1.f / l, oi);
  }
}

template <typename T>
void decode_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* map,
                 const bool* mask, int64_t window, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), A = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const int64_t work = std::max<int64_t>(1, Sq * Sk * D * 2);
  const int64_t grain = std::max<int64_t>(1, (kMinWorkPerThread + work - 1) / work);
  constexpr bool vectorised_type = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;
  const bool avx2 = vectorised_type && rows::attention_rows_avx2(D);
  at::parallel_for(0, B * A, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D), scores(avx2 ? Sk : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / A, a = row % A, kv = map[a];
      const T* kb = kp + b * ks[0] + kv * ks[1];
      const T* vb = vp + b * vs[0] + kv * vs[1];
      const bool* mb = mask == nullptr ? nullptr : mask + b * Sk;
      if constexpr (vectorised_type) {
        if (avx2) {
          decode_row_avx2(qp + b * qs[0] + a * qs[1], qs[2], kb, ks[2], vb, vs[2], mb, Sq, Sk, D, window, scale,
                          op + (b * A + a) * Sq * D, scores.data());
          continue;
        }
      }
      for (int64_t i = 0; i < Sq; ++i) {
        const T* qi = qp + b * qs[0] + a * qs[1] + i * qs[2];
        const int64_t pos = Sk - Sq + i;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        float m = -std::numeric_limits<float>::infinity(), l = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = lo; j <= pos; ++j) {
          if (mb != nullptr && !mb[j]) continue;
          const float s = dot(qi, kb + j * ks[2], D) * scale;
          const T* vj = vb + j * vs[2];
          if (s > m) {  // rescale what was summed under the old maximum
            const float c = std::exp(m - s);
            l *= c;
            for (int64_t d = 0; d < D; ++d) acc[d] *= c;
            m = s;
          }
          const float p = std::exp(s - m);
          l += p;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vj[d]);
        }
        T* oi = op + ((b * A + a) * Sq + i) * D;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<T>(acc[d] * inv);
      }
    }
  });
}

at::Tensor decoder_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& q_to_kv, const c10::optional<at::Tensor>& key_mask,
                                        int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "structprune::cpp_decoder_decode_attention: expected q [B, A, Sq, D] and k, v [B, Akv, Sk, D], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) && k.size(2) >= q.size(2),
              "structprune::cpp_decoder_decode_attention: k and v must be [B, Akv, Sk >= Sq, D] for q ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "structprune::cpp_decoder_decode_attention: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q_to_kv.scalar_type() == at::kLong && q_to_kv.dim() == 1 && q_to_kv.size(0) == q.size(1),
              "structprune::cpp_decoder_decode_attention: q_to_kv must be int64 [A=", q.size(1), "], got ",
              q_to_kv.scalar_type(), " ", q_to_kv.sizes());
  const auto map = q_to_kv.contiguous();
  const int64_t Akv = k.size(1);
  const int64_t* mp = map.data_ptr<int64_t>();
  for (int64_t a = 0; a < map.size(0); ++a) {
    TORCH_CHECK(mp[a] >= 0 && mp[a] < Akv, "structprune::cpp_decoder_decode_attention: q_to_kv[", a, "] = ", mp[a],
                " is not a KV head of k (", Akv, " heads)");
  }
  at::Tensor mask;
  if (key_mask.has_value() && key_mask->defined()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == q.size(0) &&
                    key_mask->size(1) == k.size(2),
                "structprune::cpp_decoder_decode_attention: key_mask must be bool [B, Sk] = [", q.size(0), ", ",
                k.size(2), "], got ", key_mask->scalar_type(), " ", key_mask->sizes());
    mask = key_mask->contiguous();
  }
  auto last_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const auto qc = last_contiguous(q), kc = last_contiguous(k), vc = last_contiguous(v);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cpp_decoder_decode_attention", [&] {
    decode_rows<scalar_t>(qc, kc, vc, mp, mask.defined() ? mask.data_ptr<bool>() : nullptr, window,
                          static_cast<float>(scale), out);
  });
  return out;
}

template <typename T>
void rotary_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const float* qn,
                 const float* kn, float eps, int64_t D, int64_t A, int64_t Akv, at::Tensor& q, at::Tensor& k,
                 at::Tensor& v) {
  const int64_t B = qkv.size(0), S = qkv.size(1), N = qkv.size(2), H = A + 2 * Akv, half = D / 2;
  const bool cos_batched = cos.size(0) == B && B > 1;
  const T* src = qkv.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, H * D));
  at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / S, s = row % S;
      const T* in = src + row * N;
      const float* c = cp + ((cos_batched ? b : 0) * S + s) * D;
      const float* sn = sp + ((cos_batched ? b : 0) * S + s) * D;
      for (int64_t h = 0; h < H; ++h) {
        const T* xi = in + h * D;
        if (h >= A + Akv) {  // v: the layout only
          T* out = vp + ((b * Akv + (h - A - Akv)) * S + s) * D;
          std::copy(xi, xi + D, out);
          continue;
        }
        const bool is_q = h < A;
        const float* norm = is_q ? qn : kn;
        for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(xi[d]);
        if (norm != nullptr) {
          float ss = 0.f;
          for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
          const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
          for (int64_t d = 0; d < D; ++d) {
            const float n = static_cast<float>(static_cast<T>(x[d] * r));
            x[d] = static_cast<float>(static_cast<T>(norm[d] * n));
          }
        }
        T* out = is_q ? qp + ((b * A + h) * S + s) * D : kp + ((b * Akv + (h - A)) * S + s) * D;
        for (int64_t d = 0; d < half; ++d) {
          out[d] = static_cast<T>(x[d] * c[d] - x[d + half] * sn[d]);
          out[d + half] = static_cast<T>(x[d + half] * c[d + half] + x[d] * sn[d + half]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decoder_rotary_cpu(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& q_norm,
    const c10::optional<at::Tensor>& k_norm, double eps, int64_t head_dim, int64_t num_q, int64_t num_kv) {
  const int64_t D = head_dim;
  TORCH_CHECK(qkv.dim() == 3 && D > 0 && D % 2 == 0 && num_q >= 0 && num_kv >= 0 &&
                  qkv.size(2) == (num_q + 2 * num_kv) * D,
              "structprune::cpp_decoder_rotary: expected qkv [B, S, (A + 2 Akv) * D] with an even D, got ",
              qkv.sizes(), " for A=", num_q, ", Akv=", num_kv, ", D=", D);
  const int64_t B = qkv.size(0), S = qkv.size(1);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == S && t->size(2) == D,
                "structprune::cpp_decoder_rotary: cos and sin must be [B or 1, S, D] = [", B, ", ", S, ", ", D,
                "], got ", t->sizes());
  }
  at::Tensor qn, kn;
  for (auto [opt, out, name] : {std::make_tuple(&q_norm, &qn, "q_norm"), std::make_tuple(&k_norm, &kn, "k_norm")}) {
    if (opt->has_value() && (*opt)->defined()) {
      TORCH_CHECK((*opt)->dim() == 1 && (*opt)->size(0) == D, "structprune::cpp_decoder_rotary: ", name,
                  " must be [D=", D, "], got ", (*opt)->sizes());
      *out = (*opt)->to(at::kFloat).contiguous();
    }
  }
  const auto x = qkv.contiguous();
  const auto c = cos.to(at::kFloat).contiguous(), sn = sin.to(at::kFloat).contiguous();
  auto q = at::empty({B, num_q, S, D}, x.options());
  auto k = at::empty({B, num_kv, S, D}, x.options());
  auto v = at::empty({B, num_kv, S, D}, x.options());
  if (x.numel() == 0) return {q, k, v};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cpp_decoder_rotary", [&] {
    rotary_rows<scalar_t>(x, c, sn, qn.defined() ? qn.data_ptr<float>() : nullptr,
                          kn.defined() ? kn.data_ptr<float>() : nullptr, static_cast<float>(eps), D, num_q, num_kv,
                          q, k, v);
  });
  return {q, k, v};
}

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_decoder_decode_attention", &structprune::decoder_decode_attention_cpu);
  m.impl("cpp_decoder_rotary", &structprune::decoder_rotary_cpu);
}
