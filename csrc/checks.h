// The checks the C++ ops make themselves: only those that guard memory, i.e. the sizes, dtypes and devices the
// kernels index with, the bounds of the kept indices (and their order: the fused CPU kernels write each kept row
// from its own thread, and "every row kept" is detected as R == full_rows), and the saved tensors handed back to a
// backward. Everything else (and every user-facing message) is checked in Python before the op is called, once for
// every backend: structprune/_input_checks.py. Internal to csrc/.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

namespace structprune::detail {

// t is on x's device, has x's dtype and the given shape.
void check_same(const at::Tensor& t, const char* name, const at::Tensor& x, std::initializer_list<int64_t> shape);

// index: 1-D int64 on x's device or the CPU, at most n entries, sorted unique in [0, n) (values checked on the CPU
// only); gates: floating 1-D of n entries.
void check_index(const at::Tensor& index, const char* name, int64_t n, const at::Tensor& gates, const at::Tensor& x);

// x is [B, S, E] float32, bfloat16 or float16.
void check_x(const at::Tensor& x);

// A saved tensor handed back to a backward: defined, on x's device, of the given shape and dtype.
bool check_saved(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, at::ScalarType dtype,
                 std::initializer_list<int64_t> shape);

struct AttnShapes {
  int64_t B, S, E, H, D, A, R;
};

AttnShapes check_attention(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq, const at::Tensor& wk,
                           const at::Tensor& bk, const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wo,
                           const at::Tensor& bo, const at::Tensor& head_gates, const at::Tensor& active_heads,
                           const std::optional<at::Tensor>& key_bias, int64_t num_heads);

struct FfnShapes {
  int64_t B, S, E, I, K;
};

FfnShapes check_ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const at::Tensor& unit_gates, const at::Tensor& kept_units);

}  // namespace structprune::detail
