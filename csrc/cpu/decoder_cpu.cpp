// CPU kernel of a decoder's attention for a few queries against a KV cache (decode steps, short chunks):
// cpp_decoder_decode_attention(q [B, A, Sq, D], k, v [B, Akv, Sk, D], q_to_kv [A] int64, key_mask [B, Sk] bool?,
// window, scale) -> ctx [B, A, Sq, D] in q's dtype. Query head a reads KV head q_to_kv[a] directly (no repeat_kv,
// no padded group rows, no mask tensor): query i sits at key position Sk - Sq + i and sees the keys j <= that
// position, within `window` of it when window > 0 (pos - j < window), whose key_mask entry is true. A query with
// no visible key gets a zero context (as SDPA gives it). Scores, softmax and the weighted sum are computed in fp32
// in one pass per query (online softmax). The (batch, head) rows are split over threads only when each thread gets
// enough work (kMinWorkPerThread multiply-adds): a decode step runs in the calling thread, with no parallel region
// to wait on. Forward only: the Python side calls it when no gradient is needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
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
  at::parallel_for(0, B * A, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / A, a = row % A, kv = map[a];
      const T* kb = kp + b * ks[0] + kv * ks[1];
      const T* vb = vp + b * vs[0] + kv * vs[1];
      const bool* mb = mask == nullptr ? nullptr : mask + b * Sk;
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

}  // namespace
}  // namespace structprune

TORCH_LIBRARY_IMPL(structprune, CPU, m) {
  m.impl("cpp_decoder_decode_attention", &structprune::decoder_decode_attention_cpu);
}
