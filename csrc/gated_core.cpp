// Device-generic gated attention / FFN on packed weights, plus the pack cache. See gated_core.h.
#include "gated_core.h"

#include <ATen/Parallel.h>

#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "philox.h"

namespace structprune {

Act parse_activation(const std::string& name) {
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK(false, "structprune: activation must be one of 'gelu', 'gelu_tanh', 'relu', got '", name, "'");
}

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Pack cache. An entry holds, for one layer, the kept rows of the input projection(s) stacked into one matrix
// (wq|wk|wv rows of the active heads, or w1 rows of the kept units) and the kept columns of the output projection
// (wo / w2), optionally pre-multiplied by the gates. An entry is reused only while every weight it was built from
// is the same live storage at the same data pointer, shape, strides and version counter (so in-place updates made
// under autograd's view of the tensor, e.g. optimizer steps, `with torch.no_grad(): w.add_(...)`, `w.copy_(...)`,
// load_state_dict, invalidate it), the kept index has the same content (CPU) or is the same unmodified tensor
// (CUDA), and the folded gate values are equal. Writes through `w.data` bypass PyTorch's version counter: on CPU
// each stamp also keeps the bits of kFingerprint elements spread evenly over the tensor (first and last
// included), so rewriting a whole weight through `.data` (re-initialisation, `w.data.copy_(other)`, scaling) is
// seen at the cost of a few loads per call; a write through `.data` that misses every sampled element is not:
// call pack_cache_clear() after those (structprune.clear_cache()). CUDA tensors are not sampled (a device sync).
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kFingerprint = 32;

// The bits of up to kFingerprint elements of a CPU tensor at evenly spaced logical positions; empty otherwise.
std::vector<uint64_t> fingerprint(const at::Tensor& t) {
  std::vector<uint64_t> out;
  const int64_t n = t.numel();
  if (!t.is_cpu() || n == 0) return out;
  const int64_t k = std::min(n, kFingerprint);
  const size_t esize = t.element_size();
  const auto* base = static_cast<const unsigned char*>(t.data_ptr());
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  out.reserve(k);
  for (int64_t j = 0; j < k; ++j) {
    int64_t p = k == 1 ? 0 : j * (n - 1) / (k - 1);  // logical (row-major) position
    int64_t offset = 0;
    for (int64_t d = t.dim() - 1; d >= 0; --d) {
      offset += (p % sizes[d]) * strides[d];
      p /= sizes[d];
    }
    uint64_t bits = 0;
    std::memcpy(&bits, base + offset * static_cast<int64_t>(esize), std::min(esize, sizeof(bits)));
    out.push_back(bits);
  }
  return out;
}

struct Stamp {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t version;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  at::Device device;
  std::vector<uint64_t> sample;  // fingerprint() of the tensor when stamped

  explicit Stamp(const at::Tensor& t)
      : storage(t.storage().getWeakStorageImpl()),
        data(t.data_ptr()),
        version(version_of(t)),
        sizes(t.sizes().vec()),
        strides(t.strides().vec()),
        dtype(t.scalar_type()),
        device(t.device()),
        sample(fingerprint(t)) {}

  static int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : t._version(); }
  bool alive() const { return !storage.expired(); }
  bool same_tensor(const at::Tensor& t) const {
    return alive() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() && data == t.data_ptr();
  }
  bool matches(const at::Tensor& t) const {
    return same_tensor(t) && version == version_of(t) && t.sizes().equals(sizes) && t.strides().equals(strides) &&
           dtype == t.scalar_type() && device == t.device() && sample == fingerprint(t);
  }
};

enum class Kind { Attention, Ffn };

struct Entry {
  Kind kind;
  std::vector<Stamp> in_stamps;  // wq, bq, wk, bk, wv, bv | w1, b1
  std::vector<Stamp> out_stamps;  // wo | w2
  std::vector<int64_t> index_content;  // CPU index
  std::vector<Stamp> index_stamp;  // CUDA index (0 or 1 element)
  int64_t block = 1;  // rows per kept index (head_dim for attention)
  std::vector<float> gate_values;  // folded gates (empty when not folded)
  bool folded = false;
  at::Tensor rows, w_in, b_in, w_out;  // w_in / b_in / w_out undefined when "identity" (use the live weight)
  uint64_t tick = 0;
};

struct Cache {
  std::mutex mu;
  std::vector<Entry> entries;
  uint64_t clock = 0;
};

Cache& cache() {
  static Cache c;
  return c;
}

size_t cache_capacity() {
  static const size_t cap = [] {
    const char* s = std::getenv("STRUCTPRUNE_PACK_CACHE_SIZE");
    return s ? static_cast<size_t>(std::strtoull(s, nullptr, 10)) : static_cast<size_t>(256);
  }();
  return cap;
}

bool stamps_match(const std::vector<Stamp>& stamps, const std::vector<at::Tensor>& ts) {
  if (stamps.size() != ts.size()) return false;
  for (size_t i = 0; i < ts.size(); ++i)
    if (!stamps[i].matches(ts[i])) return false;
  return true;
}

std::vector<Stamp> make_stamps(const std::vector<at::Tensor>& ts) {
  std::vector<Stamp> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.emplace_back(t);
  return out;
}

std::vector<int64_t> index_content(const at::Tensor& index) {
  auto c = index.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

bool index_matches(const Entry& e, const at::Tensor& index) {
  if (index.is_cpu()) {
    if (static_cast<int64_t>(e.index_content.size()) != index.numel() || !e.index_stamp.empty()) return false;
    auto c = index.contiguous();
    return std::equal(e.index_content.begin(), e.index_content.end(), c.data_ptr<int64_t>());
  }
  return e.index_stamp.size() == 1 && e.index_stamp[0].matches(index);
}

}  // namespace

void pack_cache_clear() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries.clear();
}

int64_t pack_cache_size() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<int64_t>(c.entries.size());
}

namespace {

struct Pack {
  at::Tensor rows;  // int64 [R] rows of the input projection kept (block-expanded index)
  at::Tensor w_in, b_in;  // [P * R, E], [P * R]  (P = 3 for attention, 1 for the FFN)
  at::Tensor w_out;  // [E, R], gated when folded
  at::Tensor w_out_raw;  // [E, R] ungated kept columns (only with want_raw)
  at::Tensor gcols;  // [R] gate per kept column, in the dtype of x
  bool folded;
  bool identity_rows;  // every row kept (R == full_rows)
};

// ins: the P input weights followed by their P biases interleaved (w, b, w, b, ...); out: the output weight.
// want_raw: also give the ungated kept output columns (backward without a fused out_proj_grad hook).
Pack get_pack(Kind kind, const DeviceHooks& hooks, const std::vector<at::Tensor>& ins, const at::Tensor& w_out_full,
              const at::Tensor& gates, const at::Tensor& index, int64_t block, int64_t full_rows,
              at::ScalarType dtype, bool want_raw) {
  const int64_t P = static_cast<int64_t>(ins.size()) / 2;
  const int64_t n_idx = index.numel();
  const int64_t R = n_idx * block;
  const auto dev = ins[0].device();
  Pack pk;
  pk.folded = hooks.fold_gates;

  at::Tensor idx_dev = index.to(dev, at::kLong);
  at::Tensor gates_kept = gates.to(dev).index_select(0, idx_dev);
  pk.gcols = (block == 1 ? gates_kept : gates_kept.repeat_interleave(block)).to(dtype);
  pk.rows = block == 1 ? idx_dev
                       : (idx_dev.view({n_idx, 1}) * block + at::arange(block, idx_dev.options()).view({1, block}))
                             .reshape({R});

  std::vector<float> gate_values;
  if (pk.folded) {
    auto g = gates_kept.to(at::kCPU, at::kFloat).contiguous();
    gate_values.assign(g.data_ptr<float>(), g.data_ptr<float>() + g.numel());
  }
  const bool identity_rows = R == full_rows;  // sorted unique indices covering everything
  pk.identity_rows = identity_rows;
  const bool gates_one =
      pk.folded && std::all_of(gate_values.begin(), gate_values.end(), [](float v) { return v == 1.0f; });
  const bool identity_in = identity_rows && P == 1;
  const bool identity_out = identity_rows && (!pk.folded || gates_one);

  auto build_in = [&](Entry& e) {
    if (identity_in) {
      e.w_in = at::Tensor();
      e.b_in = at::Tensor();
      return;
    }
    const int64_t E = ins[0].size(1);
    e.w_in = at::empty({P * R, E}, ins[0].options().memory_format(at::MemoryFormat::Contiguous));
    e.b_in = at::empty({P * R}, ins[1].options());
    for (int64_t p = 0; p < P; ++p) {
      auto wdst = e.w_in.narrow(0, p * R, R);
      auto bdst = e.b_in.narrow(0, p * R, R);
      at::index_select_out(wdst, ins[2 * p], 0, pk.rows);
      at::index_select_out(bdst, ins[2 * p + 1], 0, pk.rows);
    }
  };
  auto gather_raw = [&]() {
    return hooks.gather_cols ? hooks.gather_cols(w_out_full, pk.rows, at::Tensor())
                             : w_out_full.index_select(1, pk.rows);
  };
  auto build_out = [&](Entry& e) {
    if (identity_out) {
      e.w_out = at::Tensor();
    } else if (!pk.folded) {
      e.w_out = gather_raw();
    } else if (identity_rows) {
      e.w_out = w_out_full * pk.gcols;
    } else if (hooks.gather_cols) {
      e.w_out = hooks.gather_cols(w_out_full, pk.rows, pk.gcols);
    } else {
      e.w_out = w_out_full.index_select(1, pk.rows).mul_(pk.gcols);
    }
    e.gate_values = gate_values;
    e.folded = pk.folded;
  };
  auto fill = [&](const Entry& e) {
    if (identity_in) {
      pk.w_in = ins[0];
      pk.b_in = ins[1];
    } else {
      pk.w_in = e.w_in;
      pk.b_in = e.b_in;
    }
    pk.w_out = identity_out ? w_out_full : e.w_out;
    if (want_raw) pk.w_out_raw = !pk.folded ? pk.w_out : identity_rows ? w_out_full : gather_raw();
  };

  std::vector<at::Tensor> in_tensors(ins.begin(), ins.end());
  const size_t cap = cache_capacity();
  if (cap == 0) {
    Entry e;
    build_in(e);
    build_out(e);
    fill(e);
    return pk;
  }

  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  Entry* hit = nullptr;
  for (auto& e : c.entries) {
    if (e.kind == kind && e.block == block && !e.in_stamps.empty() && e.in_stamps[0].same_tensor(ins[0]) &&
        !e.out_stamps.empty() && e.out_stamps[0].same_tensor(w_out_full)) {
      hit = &e;
      break;
    }
  }
  if (hit == nullptr) {
    // Drop entries of freed layers, then the least recently used ones beyond capacity.
    c.entries.erase(std::remove_if(c.entries.begin(), c.entries.end(),
                                   [](const Entry& e) {
                                     for (const auto& s : e.in_stamps)
                                       if (!s.alive()) return true;
                                     for (const auto& s : e.out_stamps)
                                       if (!s.alive()) return true;
                                     return false;
                                   }),
                    c.entries.end());
    while (c.entries.size() >= cap) {
      auto oldest = std::min_element(c.entries.begin(), c.entries.end(),
                                     [](const Entry& a, const Entry& b) { return a.tick < b.tick; });
      c.entries.erase(oldest);
    }
    c.entries.emplace_back();
    hit = &c.entries.back();
    hit->kind = kind;
    hit->block = block;
  }
  Entry& e = *hit;
  e.tick = ++c.clock;
  const bool same_index = index_matches(e, index);
  const bool in_ok = same_index && stamps_match(e.in_stamps, in_tensors) && e.rows.defined();
  const bool out_ok = same_index && stamps_match(e.out_stamps, {w_out_full}) && e.folded == pk.folded &&
                      e.gate_values == gate_values && e.rows.defined();
  if (!in_ok) {
    build_in(e);
    e.in_stamps = make_stamps(in_tensors);
  }
  if (!out_ok) {
    build_out(e);
    e.out_stamps = make_stamps({w_out_full});
  }
  if (!same_index || !e.rows.defined()) {
    if (index.is_cpu()) {
      e.index_content = index_content(index);
      e.index_stamp.clear();
    } else {
      e.index_content.clear();
      e.index_stamp = make_stamps({index});
    }
  }
  e.rows = pk.rows;
  fill(e);
  return pk;
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& x, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device() == x.device(), "structprune: ", name, " must be on ", x.device(), " like x, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "structprune: ", name, " must have dtype ", x.scalar_type(),
              " like x, got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "structprune: ", name, " must have shape ", at::IntArrayRef(shape), ", got ",
              t.sizes());
}

void check_index(const at::Tensor& index, const char* name, int64_t n, const at::Tensor& gates, const at::Tensor& x) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "structprune: ", name,
              " must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(index.numel() <= n, "structprune: ", name, " has ", index.numel(), " entries for ", n, " gates");
  TORCH_CHECK(index.device() == x.device() || index.is_cpu(), "structprune: ", name, " must be on ", x.device(),
              " or the CPU, got ", index.device());
  TORCH_CHECK(gates.dim() == 1 && gates.size(0) == n && at::isFloatingType(gates.scalar_type()),
              "structprune: gates must be a floating 1-D tensor of ", n, " entries, got ", gates.scalar_type(),
              " of shape ", gates.sizes());
  if (index.is_cpu() && index.numel() > 0) {
    auto c = index.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < n && (i == 0 || p[i] > p[i - 1]), "structprune: ", name,
                  " must hold sorted unique indices in [0, ", n, "), got ", p[i], " at position ", i);
    }
  }
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "structprune: x must be [B, S, E], got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "structprune: x must be float32, bfloat16 or float16, got ", dt);
}

at::Tensor broadcast_bias(const at::Tensor& bias, int64_t B, int64_t S) {
  auto out = at::empty({B, S, bias.size(0)}, bias.options());
  out.copy_(bias.view({1, 1, bias.size(0)}).expand({B, S, bias.size(0)}));
  return out;
}

struct AttnShapes {
  int64_t B, S, E, H, D, A, R;
};

AttnShapes check_attention(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk,
                           const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo,
                           const at::Tensor& bo, const at::Tensor& head_gates, const at::Tensor& active_heads,
                           const std::optional<at::Tensor>& key_bias, int64_t num_heads) {
  check_x(x);
  AttnShapes s;
  s.B = x.size(0);
  s.S = x.size(1);
  s.E = x.size(2);
  s.H = num_heads;
  TORCH_CHECK(num_heads > 0 && wq.dim() == 2 && wq.size(0) % num_heads == 0,
              "structprune: wq must be [num_heads * head_dim, E] with num_heads = ", num_heads, ", got ", wq.sizes());
  const int64_t HD = wq.size(0);
  s.D = HD / num_heads;
  check_same(wq, "wq", x, {HD, s.E});
  check_same(wk, "wk", x, {HD, s.E});
  check_same(wv, "wv", x, {HD, s.E});
  check_same(bq, "bq", x, {HD});
  check_same(bk, "bk", x, {HD});
  check_same(bv, "bv", x, {HD});
  check_same(wo, "wo", x, {s.E, HD});
  check_same(bo, "bo", x, {s.E});
  check_index(active_heads, "active_heads", num_heads, head_gates, x);
  if (key_bias.has_value()) {
    TORCH_CHECK(key_bias->sizes().equals({s.B, s.S}) && key_bias->device() == x.device(),
                "structprune: key_bias must be [B, S] = [", s.B, ", ", s.S, "] on ", x.device(), ", got ",
                key_bias->sizes(), " on ", key_bias->device());
  }
  s.A = active_heads.numel();
  s.R = s.A * s.D;
  return s;
}

std::optional<at::Tensor> make_mask(const std::optional<at::Tensor>& key_bias, const at::Tensor& x) {
  if (!key_bias.has_value()) return std::nullopt;
  // Clamped to the dtype's finite range first: finfo(float32).min would round to -inf in fp16 / bf16, and a fully
  // padded row of -inf gives NaN.
  const double lo = x.scalar_type() == at::kHalf ? -65504.0 : x.scalar_type() == at::kBFloat16 ? -3.3895313892515355e38
                                                                                                 : -3.4028234663852886e38;
  return key_bias->clamp_min(lo).to(x.scalar_type()).view({x.size(0), 1, 1, x.size(1)});
}

at::Tensor rows_2d(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.is_contiguous() ? r : r.contiguous();
}

}  // namespace

namespace {

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

void check_dropout(const AttnDropout& drop) {
  TORCH_CHECK(drop.p >= 0.0 && drop.p < 1.0, "structprune: dropout_p must be in [0, 1), got ", drop.p);
  TORCH_CHECK(drop.seed >= 0 && drop.offset >= 0, "structprune: dropout seed and offset must be >= 0, got seed ",
              drop.seed, ", offset ", drop.offset);
}

}  // namespace

at::Tensor attention_dropout_scale(int64_t B, int64_t num_heads, int64_t S, const at::Tensor& heads,
                                   const AttnDropout& drop, at::Device device) {
  check_dropout(drop);
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

namespace {

// A saved tensor handed back to a backward: defined, on x's device, of the given shape and dtype.
bool check_saved(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, at::ScalarType dtype,
                 std::initializer_list<int64_t> shape) {
  if (!t.has_value() || !t->defined()) return false;
  TORCH_CHECK(t->device() == x.device() && t->scalar_type() == dtype && t->sizes().equals(shape),
              "structprune: saved ", name, " must be ", dtype, " of shape ", at::IntArrayRef(shape), " on ",
              x.device(), ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  return true;
}

at::Tensor contiguous_2d(const at::Tensor& t, int64_t rows, int64_t cols) {
  auto r = t.reshape({rows, cols});
  return r.is_contiguous() ? r : r.contiguous();
}

// Full-size tensors of `full_rows` rows with srcs[i] [R, ...] in the kept rows, zero elsewhere.
std::vector<at::Tensor> scatter_rows(const DeviceHooks& hooks, const std::vector<at::Tensor>& srcs,
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
std::tuple<at::Tensor, at::Tensor> out_proj_grad(const DeviceHooks& hooks, at::Tensor M, const at::Tensor& w_full,
                                                 const Pack& pk, bool want_dw, bool want_dg) {
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
at::Tensor skipped(const at::Tensor& t) { return at::empty({0}, t.options()); }

// A gradient that is zero everywhere (nothing to compute), or the placeholder when masked out.
at::Tensor zero_grad_or_skip(bool wanted, const at::Tensor& t) {
  return wanted ? at::zeros(t.sizes(), t.options()) : skipped(t);
}

// The per-gate gradient [n] from the gradient of the kept entries (`index`), zero for the others.
at::Tensor scatter_gate_grad(const at::Tensor& gates, const at::Tensor& index, const at::Tensor& kept_grad) {
  auto dgates = at::zeros(gates.sizes(), gates.options());
  dgates.index_copy_(0, index.to(gates.device()), kept_grad.to(gates.scalar_type()));
  return dgates;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const DeviceHooks& hooks, const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk,
    const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo, const at::Tensor& bo,
    const at::Tensor& head_gates, const at::Tensor& active_heads, const std::optional<at::Tensor>& key_bias,
    int64_t num_heads, bool save_for_backward, const AttnDropout& drop) {
  const auto s = check_attention(x, wq, bq, wk, bk, wv, bv, wo, bo, head_gates, active_heads, key_bias, num_heads);
  check_dropout(drop);
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
  check_dropout(drop);
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

namespace {

struct FfnShapes {
  int64_t B, S, E, I, K;
};

FfnShapes check_ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const at::Tensor& unit_gates, const at::Tensor& kept_units) {
  check_x(x);
  FfnShapes s;
  s.B = x.size(0);
  s.S = x.size(1);
  s.E = x.size(2);
  TORCH_CHECK(w1.dim() == 2, "structprune: w1 must be [I, E], got ", w1.sizes());
  s.I = w1.size(0);
  check_same(w1, "w1", x, {s.I, s.E});
  check_same(b1, "b1", x, {s.I});
  check_same(w2, "w2", x, {s.E, s.I});
  check_same(b2, "b2", x, {s.E});
  check_index(kept_units, "kept_units", s.I, unit_gates, x);
  s.K = kept_units.numel();
  return s;
}

}  // namespace

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
