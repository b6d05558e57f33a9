// The memory-guarding checks of the C++ ops (see checks.h).
#include "checks.h"

namespace structprune::detail {

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

// A saved tensor handed back to a backward: defined, on x's device, of the given shape and dtype.
bool check_saved(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, at::ScalarType dtype,
                 std::initializer_list<int64_t> shape) {
  if (!t.has_value() || !t->defined()) return false;
  TORCH_CHECK(t->device() == x.device() && t->scalar_type() == dtype && t->sizes().equals(shape),
              "structprune: saved ", name, " must be ", dtype, " of shape ", at::IntArrayRef(shape), " on ",
              x.device(), ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  return true;
}

}  // namespace structprune::detail
