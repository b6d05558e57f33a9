// The pack cache (see pack_cache.h): entries, their stamps, and get_pack.
#include "pack_cache.h"

#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace structprune {
namespace detail {
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
    const bool has_bias = ins[1].defined();
    e.b_in = has_bias ? at::empty({P * R}, ins[1].options()) : at::Tensor();
    for (int64_t p = 0; p < P; ++p) {
      auto wdst = e.w_in.narrow(0, p * R, R);
      at::index_select_out(wdst, ins[2 * p], 0, pk.rows);
      if (!has_bias) continue;
      auto bdst = e.b_in.narrow(0, p * R, R);
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

  std::vector<at::Tensor> in_tensors;  // the defined ones (absent biases are not stamped)
  for (const auto& t : ins)
    if (t.defined()) in_tensors.push_back(t);
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

}  // namespace detail

void pack_cache_clear() {
  auto& c = detail::cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries.clear();
}

int64_t pack_cache_size() {
  auto& c = detail::cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<int64_t>(c.entries.size());
}

}  // namespace structprune
