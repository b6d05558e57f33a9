// The pack cache, shared by every device: for one layer, the kept rows of the input projection(s) stacked into one
// matrix and the kept columns of the output projection (optionally gated), built once and reused while the weights,
// the kept index and the folded gates are unchanged (pack_cache.cpp says exactly when). Internal to csrc/.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "gated_core.h"

namespace structprune::detail {

enum class Kind { Attention, Ffn, GluFfn };

struct Pack {
  at::Tensor rows;  // int64 [R] rows of the input projection kept (block-expanded index)
  at::Tensor w_in, b_in;  // [P * R, E], [P * R]  (P = 3 for attention, 1 for the FFN, 2 for the GLU FFN: input
                         // half | gate half); b_in undefined when the input projections have no bias
  at::Tensor w_out;  // [E, R], gated when folded
  at::Tensor w_out_raw;  // [E, R] ungated kept columns (only with want_raw)
  at::Tensor gcols;  // [R] gate per kept column, in the dtype of x
  bool folded;
  bool identity_rows;  // every row kept (R == full_rows)
};

// ins: the P input weights followed by their P biases interleaved (w, b, w, b, ...), the biases all defined or all
// undefined (no bias); out: the output weight.
// want_raw: also give the ungated kept output columns (backward without a fused out_proj_grad hook).
Pack get_pack(Kind kind, const DeviceHooks& hooks, const std::vector<at::Tensor>& ins, const at::Tensor& w_out_full,
              const at::Tensor& gates, const at::Tensor& index, int64_t block, int64_t full_rows,
              at::ScalarType dtype, bool want_raw);

}  // namespace structprune::detail
